r"""Preference (DPO) and supervised fine-tuning (SFT) data for language models.

The pipeline has three stages, each a plain function, so that any stage can be
replaced:

1. **Read** text examples: :func:`load_preference_jsonl`,
   :func:`load_sft_jsonl` (JSONL or gzip-compressed JSONL) or
   :func:`from_hf_dataset` (any iterable of dicts, e.g. a Hugging Face
   ``datasets.Dataset``). Preference examples are :class:`PreferenceExample`
   ``(prompt, chosen, rejected)``; SFT examples are :class:`SFTExample`
   ``(prompt, response)``. :func:`preference_to_sft` turns preference pairs
   into SFT examples (the chosen dialogue).
2. Optionally **template** the prompts: :func:`apply_chat_template`.
3. **Tokenize** into static-shape NumPy arrays: :func:`tokenize_preferences`,
   :func:`tokenize_sft`; then split (:func:`train_eval_split`), shuffle
   (:func:`shuffle`) and batch (:func:`batch_iterator`,
   :func:`stacked_batches`).

Formats
-------
* **HH-RLHF** (Bai et al., 2022): each line holds ``chosen`` and ``rejected``,
  two full dialogues ``"\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...
  \n\nAssistant: ..."`` that differ only in the last assistant turn. The
  prompt is everything up to and including the last ``"\n\nAssistant:"``; the
  response is the rest (it usually starts with a space). A line whose two
  dialogues do not share that prompt (5 of the 2,312 lines of the harmless-base
  test split) is skipped with a warning, or refused with
  ``on_mismatch="error"``.
* **prompt/chosen/rejected** (the ``rm-hh-rlhf`` style): the prompt and the two
  responses are given separately.
* **SFT**: ``prompt`` and ``response``.

Default chat format: the HH ``"\n\nHuman: ...\n\nAssistant:"`` text is used as
is, which is what base (not instruction-tuned) models are fine-tuned on in the
DPO paper (Rafailov et al., 2023). For an instruction-tuned model, pass its
template to :func:`apply_chat_template`.

Arrays
------
Sequences are right-padded to a static length ``max_len`` (so that one
compiled step serves every batch). For a sequence of ``n`` real tokens:

* ``*_ids``: int32 token ids, ``pad_id`` after position ``n``;
* ``*_attention_mask``: int32, 1 on the ``n`` real tokens, 0 on padding;
* ``*_loss_mask``: int32, 1 on response tokens only, 0 on prompt and padding.

A preference set is a dict with ``chosen_ids, chosen_attention_mask,
chosen_loss_mask, rejected_ids, rejected_attention_mask,
rejected_loss_mask``; an SFT set has ``input_ids, attention_mask,
loss_mask``. All arrays share the leading (example) axis.

A *mixture* is a dict of such sets, e.g. ``{"dpo": preference_set, "sft":
sft_set}``; :func:`batch_iterator` and :func:`stacked_batches` batch each part
separately, which gives the ``batch["dpo"]`` / ``batch["sft"]`` convention of
:mod:`jaxbilevel._src.llm.losses`.

Truncation rule
---------------
Prompt and response are tokenized separately (without special tokens), then
``bos_id`` (if given) is prepended to the prompt and ``eos_id`` (if given) is
appended to the response. If ``len(prompt) + len(response) <= max_len``
nothing is cut. Otherwise the prompt keeps its **last** ``max_prompt_len``
tokens (the end of the conversation, next to the response, matters most) and
then the response keeps its **first** ``max_len - len(prompt)`` tokens. For a
preference pair the longer of the two responses decides whether the prompt is
cut, so both sequences keep the same prompt tokens. With ``truncate=False`` a
sequence that does not fit raises :class:`LLMDataError` instead.

References:
  Bai et al., "Training a Helpful and Harmless Assistant with Reinforcement
  Learning from Human Feedback", arXiv:2204.05862, 2022.

  Rafailov et al., "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", NeurIPS 2023, arXiv:2305.18290.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    NamedTuple, Optional, Sequence, Tuple, Union)

import numpy as np

from jaxbilevel._src.datasets import DatasetError

PathLike = Union[str, os.PathLike]
Arrays = Dict[str, np.ndarray]
Message = Dict[str, str]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

PREFERENCE_KEYS = ("chosen_ids", "chosen_attention_mask", "chosen_loss_mask",
                   "rejected_ids", "rejected_attention_mask",
                   "rejected_loss_mask")
SFT_KEYS = ("input_ids", "attention_mask", "loss_mask")


class LLMDataError(DatasetError, ValueError):
  """Raised when preference or SFT data cannot be read, parsed or tokenized.

  It is both a :class:`jaxbilevel.datasets.DatasetError` (an ``OSError``) and
  a ``ValueError``; the message names the file, the line and the fix.
  """


class PreferenceExample(NamedTuple):
  """One preference pair: a shared prompt and two responses (text)."""

  prompt: str
  chosen: str
  rejected: str


class SFTExample(NamedTuple):
  """One supervised example: a prompt and the response to imitate (text)."""

  prompt: str
  response: str


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def split_hh_dialogue(text: str, *, source: str = "<text>") -> Tuple[str, str]:
  r"""Splits an HH-RLHF dialogue into prompt and final assistant response.

  The prompt is everything up to and including the last ``"\n\nAssistant:"``;
  the response is the rest.

  Args:
    text: a dialogue ``"\n\nHuman: ...\n\nAssistant: ..."``.
    source: a name for error messages (e.g. ``"file.jsonl line 3"``).

  Returns:
    ``(prompt, response)`` with ``prompt + response == text``.

  Raises:
    LLMDataError: if ``text`` has no ``"\n\nAssistant:"`` turn.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> data.split_hh_dialogue("\n\nHuman: Hi!\n\nAssistant: Hello.")
    ('\n\nHuman: Hi!\n\nAssistant:', ' Hello.')
  """
  if not isinstance(text, str):
    raise LLMDataError(f"{source}: expected a dialogue string, got "
                       f"{type(text).__name__}.")
  cut = text.rfind(HH_ASSISTANT)
  if cut < 0:
    raise LLMDataError(
        f"{source}: the dialogue has no {HH_ASSISTANT!r} turn, so it cannot "
        "be split into prompt and response. HH-RLHF dialogues look like "
        "'\\n\\nHuman: ...\\n\\nAssistant: ...'; for other data give "
        "'prompt'/'chosen'/'rejected' keys (format='prompt').")
  cut += len(HH_ASSISTANT)
  return text[:cut], text[cut:]


def read_jsonl(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
  """Yields ``(line_number, record)`` for each non-blank line of a JSONL file.

  Gzip-compressed files are recognised by their magic bytes (whatever their
  name). Line numbers start at 1.

  Args:
    path: a ``.jsonl`` or ``.jsonl.gz`` file.

  Yields:
    ``(line_number, dict)`` pairs.

  Raises:
    LLMDataError: if the file is missing, truncated or corrupt (a cut
      ``.gz`` download), a line is not UTF-8, not JSON, or not a JSON object;
      the message names the file and the line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise LLMDataError(
        f"data file {path!r} does not exist (or is not a file); pass the path "
        "of a .jsonl or .jsonl.gz file.")
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  opener = gzip.open if gzipped else open
  with opener(path, "rb") as f:
    lineno = 0
    while True:
      try:
        raw = f.readline()
      except (EOFError, OSError, zlib.error) as e:
        # A truncated download (EOFError) or damaged compressed data.
        raise LLMDataError(
            f"{path}: the {'gzip ' if gzipped else ''}file is truncated or "
            f"corrupt: reading stopped after line {lineno} "
            f"({type(e).__name__}: {e}). Download or compress the file "
            "again.") from None
      if not raw:
        break
      lineno += 1
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise LLMDataError(
            f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte "
            f"{e.start}); re-encode the file as UTF-8.") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise LLMDataError(
            f"{path}, line {lineno}: malformed JSON ({e.msg} at column "
            f"{e.colno}); each line must be one JSON object.") from None
      if not isinstance(record, dict):
        raise LLMDataError(
            f"{path}, line {lineno}: expected a JSON object, got "
            f"{type(record).__name__}; each line must be one JSON object.")
      yield lineno, record


def _text_field(record, key, where, keys_hint):
  if key not in record:
    raise LLMDataError(
        f"{where}: missing key {key!r} (found {sorted(record)}); "
        f"{keys_hint}.")
  value = record[key]
  if not isinstance(value, str):
    raise LLMDataError(f"{where}: key {key!r} must be a string, got "
                       f"{type(value).__name__}.")
  return value


_HH_HINT = "HH-RLHF records need 'chosen' and 'rejected' dialogues"
_PROMPT_HINT = "format='prompt' records need 'prompt', 'chosen' and 'rejected'"
_SFT_HINT = "SFT records need 'prompt' and 'response'"


def _parse_preferences(rows, name, unit, fmt, on_mismatch):
  if fmt not in ("auto", "hh", "prompt"):
    raise ValueError(f"format must be 'auto', 'hh' or 'prompt', got {fmt!r}.")
  if on_mismatch not in ("skip", "error"):
    raise ValueError(
        f"on_mismatch must be 'skip' or 'error', got {on_mismatch!r}.")
  out, skipped = [], []
  for number, record in rows:
    where = f"{name}, {unit} {number}"
    if not isinstance(record, Mapping):
      raise LLMDataError(f"{where}: expected a dict, got "
                         f"{type(record).__name__}.")
    row_fmt = fmt
    if row_fmt == "auto":
      row_fmt = "prompt" if "prompt" in record else "hh"
    if row_fmt == "prompt":
      out.append(PreferenceExample(
          _text_field(record, "prompt", where, _PROMPT_HINT),
          _text_field(record, "chosen", where, _PROMPT_HINT),
          _text_field(record, "rejected", where, _PROMPT_HINT)))
      continue
    prompt, chosen = split_hh_dialogue(
        _text_field(record, "chosen", where, _HH_HINT), source=where)
    prompt_r, rejected = split_hh_dialogue(
        _text_field(record, "rejected", where, _HH_HINT), source=where)
    if prompt != prompt_r:
      if on_mismatch == "error":
        raise LLMDataError(
            f"{where}: 'chosen' and 'rejected' do not share the prompt (the "
            "text up to their last '\\n\\nAssistant:'); fix the line or pass "
            "on_mismatch='skip'.")
      skipped.append(number)
      continue
    out.append(PreferenceExample(prompt, chosen, rejected))
  if skipped:
    warnings.warn(
        f"{name}: skipped {len(skipped)} pair(s) whose 'chosen' and "
        f"'rejected' dialogues do not share the prompt ({unit}s "
        f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}).",
        stacklevel=3)
  if not out:
    raise LLMDataError(f"{name}: no preference pairs found; the data set is "
                       "empty.")
  return out


def _parse_sft(rows, name, unit):
  out = []
  for number, record in rows:
    where = f"{name}, {unit} {number}"
    if not isinstance(record, Mapping):
      raise LLMDataError(f"{where}: expected a dict, got "
                         f"{type(record).__name__}.")
    out.append(SFTExample(_text_field(record, "prompt", where, _SFT_HINT),
                          _text_field(record, "response", where, _SFT_HINT)))
  if not out:
    raise LLMDataError(f"{name}: no SFT examples found; the data set is "
                       "empty.")
  return out


def load_preference_jsonl(path: PathLike, *, format: str = "auto",  # pylint: disable=redefined-builtin
                          on_mismatch: str = "skip",
                          limit: Optional[int] = None
                          ) -> List[PreferenceExample]:
  r"""Reads preference pairs from a JSONL (or JSONL.gz) file.

  Args:
    path: the file.
    format: ``"hh"`` (``chosen``/``rejected`` full HH-RLHF dialogues, split
      by :func:`split_hh_dialogue`), ``"prompt"`` (``prompt``/``chosen``/
      ``rejected``) or ``"auto"`` (``"prompt"`` for lines with a ``prompt``
      key, else ``"hh"``).
    on_mismatch: for ``"hh"`` lines whose two dialogues do not share the
      prompt: ``"skip"`` (with one warning naming the lines) or ``"error"``.
    limit: read at most this many records (non-blank lines; ``None``: all).

  Returns:
    A list of :class:`PreferenceExample`.

  Raises:
    LLMDataError: missing file, non-UTF-8 or malformed line, missing key (the
      message names file, line and key), or no pairs at all.

  Examples:
    >>> import json, os, tempfile
    >>> from jaxbilevel._src.llm import data
    >>> path = os.path.join(tempfile.mkdtemp(), "pairs.jsonl")
    >>> with open(path, "w") as f:
    ...   _ = f.write(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
    ...                           "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}))
    >>> data.load_preference_jsonl(path)
    [PreferenceExample(prompt='\n\nHuman: Hi\n\nAssistant:', chosen=' Hello', rejected=' Go')]
  """
  rows = read_jsonl(path)
  if limit is not None:
    rows = (r for r, _ in zip(rows, range(limit)))
  return _parse_preferences(rows, os.fspath(path), "line", format,
                            on_mismatch)


def load_sft_jsonl(path: PathLike, *, limit: Optional[int] = None
                   ) -> List[SFTExample]:
  """Reads ``prompt``/``response`` SFT examples from a JSONL (or .gz) file.

  Args:
    path: the file.
    limit: read at most this many records (non-blank lines; ``None``: all).

  Returns:
    A list of :class:`SFTExample`.

  Raises:
    LLMDataError: as :func:`load_preference_jsonl`.
  """
  rows = read_jsonl(path)
  if limit is not None:
    rows = (r for r, _ in zip(rows, range(limit)))
  return _parse_sft(rows, os.fspath(path), "line")


def from_hf_dataset(dataset: Iterable[Mapping[str, Any]], *,
                    kind: str = "preference", format: str = "auto",  # pylint: disable=redefined-builtin
                    on_mismatch: str = "skip", name: str = "dataset"
                    ) -> Union[List[PreferenceExample], List[SFTExample]]:
  """Reads examples from a Hugging Face ``datasets.Dataset`` (or any rows).

  ``datasets`` is not imported: any iterable of dicts works (a
  ``datasets.Dataset`` iterates over its rows as dicts), so the library does
  not depend on it. The keys are those of the JSONL formats.

  Args:
    dataset: an iterable of dicts, e.g. ``load_dataset("Anthropic/hh-rlhf",
      split="test")``.
    kind: ``"preference"`` or ``"sft"``.
    format: for preference data, as in :func:`load_preference_jsonl`.
    on_mismatch: as in :func:`load_preference_jsonl`.
    name: a name for error messages (rows are numbered from 0).

  Returns:
    A list of :class:`PreferenceExample` or :class:`SFTExample`.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> rows = [{"prompt": "Q: 2+2?\\nA:", "response": " 4"}]
    >>> data.from_hf_dataset(rows, kind="sft")
    [SFTExample(prompt='Q: 2+2?\\nA:', response=' 4')]
  """
  rows = enumerate(dataset)
  if kind == "preference":
    return _parse_preferences(rows, name, "row", format, on_mismatch)
  if kind == "sft":
    return _parse_sft(rows, name, "row")
  raise ValueError(f"kind must be 'preference' or 'sft', got {kind!r}.")


def preference_to_sft(pairs: Sequence[PreferenceExample]) -> List[SFTExample]:
  """SFT examples from preference pairs: each prompt with its chosen response.

  Use it on a part of the preference file that the DPO set does not use (see
  :func:`train_eval_split`) to get a disjoint SFT set from the same source.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> data.preference_to_sft([data.PreferenceExample("Q:", " yes", " no")])
    [SFTExample(prompt='Q:', response=' yes')]
  """
  return [SFTExample(p.prompt, p.chosen) for p in pairs]


# ----------------------------------------------------------------------------
# Chat templates.
# ----------------------------------------------------------------------------


def hh_messages(prompt: str) -> List[Message]:
  r"""Parses an HH-style prompt into chat messages.

  ``"\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"`` becomes
  ``[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
  {"role": "user", "content": "c"}]`` (contents stripped; the trailing empty
  assistant turn is dropped). Text before the first turn marker becomes a
  ``"system"`` message; a prompt with no marker at all is one user message.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> data.hh_messages("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye"
    ...                  "\n\nAssistant:")  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'},
     {'role': 'user', 'content': 'Bye'}]
  """
  markers = {HH_HUMAN: "user", HH_ASSISTANT: "assistant"}
  messages: List[Message] = []
  pos, role = 0, "system"
  while True:
    found = [(prompt.find(m, pos), m) for m in markers]
    found = [(i, m) for i, m in found if i >= 0]
    end = min(found)[0] if found else len(prompt)
    messages.append({"role": role, "content": prompt[pos:end].strip()})
    if not found:
      break
    marker = min(found)[1]
    role, pos = markers[marker], end + len(marker)
  if len(messages) == 1:  # No turn markers: the whole text is the user's.
    return [{"role": "user", "content": messages[0]["content"]}]
  if not messages[0]["content"]:
    messages = messages[1:]
  if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages = messages[:-1]
  return messages


def apply_chat_template(
    examples: Sequence[Union[PreferenceExample, SFTExample]],
    template: Callable[[List[Message]], str], *,
    response_suffix: str = "") -> List[Union[PreferenceExample, SFTExample]]:
  r"""Rewrites HH-style examples with a chat template.

  The default format (no call to this function) keeps the HH
  ``"\n\nHuman: ...\n\nAssistant:"`` text as is. This function instead
  parses each prompt with :func:`hh_messages` and replaces it by
  ``template(messages)``; each response is stripped of surrounding white space
  and followed by ``response_suffix`` (e.g. the model's end-of-turn text).

  Args:
    examples: :class:`PreferenceExample` or :class:`SFTExample` items.
    template: ``messages -> text``; it must return the prompt text including
      whatever opens the assistant's turn (for a ``transformers`` tokenizer:
      ``lambda m: tok.apply_chat_template(m, tokenize=False,
      add_generation_prompt=True)``).
    response_suffix: text appended to every response.

  Returns:
    New examples of the same types.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> tpl = lambda ms: "".join(f"<{m['role']}>{m['content']}\n" for m in ms
    ...                          ) + "<assistant>"
    >>> ex = data.PreferenceExample("\n\nHuman: Hi\n\nAssistant:", " Yo", " No")
    >>> data.apply_chat_template([ex], tpl, response_suffix="<end>")
    [PreferenceExample(prompt='<user>Hi\n<assistant>', chosen='Yo<end>', rejected='No<end>')]
  """
  if not callable(template):
    raise TypeError("template must be a callable messages -> text, got "
                    f"{type(template).__name__}.")
  out = []
  for i, ex in enumerate(examples):
    prompt = template(hh_messages(ex.prompt))
    if not isinstance(prompt, str):
      raise TypeError(f"template returned {type(prompt).__name__} for "
                      f"example {i}; it must return a string.")
    if isinstance(ex, PreferenceExample):
      out.append(PreferenceExample(prompt,
                                   ex.chosen.strip() + response_suffix,
                                   ex.rejected.strip() + response_suffix))
    elif isinstance(ex, SFTExample):
      out.append(SFTExample(prompt, ex.response.strip() + response_suffix))
    else:
      raise TypeError(f"example {i} is a {type(ex).__name__}; expected "
                      "PreferenceExample or SFTExample.")
  return out


# ----------------------------------------------------------------------------
# Tokenization.
# ----------------------------------------------------------------------------


def _encode(tokenizer, texts):
  # The tokenizer adds no special tokens here: bos/eos are explicit arguments.
  return [e.ids for e in tokenizer.encode_batch(list(texts),
                                                add_special_tokens=False)]


def _default_pad_id(tokenizer, pad_id):
  if pad_id is not None:
    return int(pad_id)
  padding = getattr(tokenizer, "padding", None)
  if padding:
    return int(padding["pad_id"])
  return 0


def _check_lengths(max_len, max_prompt_len):
  if not isinstance(max_len, (int, np.integer)) or max_len < 2:
    raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}.")
  if max_prompt_len is None:
    max_prompt_len = max_len // 2
  if not 1 <= max_prompt_len < max_len:
    raise ValueError(
        f"max_prompt_len must be in [1, max_len) = [1, {max_len}) so that "
        f"at least one response token fits, got {max_prompt_len!r}.")
  return int(max_len), int(max_prompt_len)


def _truncate(prompt, responses, max_len, max_prompt_len, truncate, index):
  """Applies the module's truncation rule to one prompt and its responses."""
  longest = max(len(r) for r in responses)
  if len(prompt) + longest <= max_len:
    return prompt, responses
  if not truncate:
    raise LLMDataError(
        f"example {index}: prompt ({len(prompt)} tokens) + response "
        f"({longest} tokens) = {len(prompt) + longest} tokens > max_len="
        f"{max_len}; raise max_len, drop the example, or pass truncate=True "
        "(keeps the last max_prompt_len prompt tokens and the first response "
        "tokens).")
  prompt = prompt[-max_prompt_len:]
  return prompt, [r[:max_len - len(prompt)] for r in responses]


def _pack(prompts, responses, max_len, pad_id):
  n = len(prompts)
  ids = np.full((n, max_len), pad_id, np.int32)
  attention = np.zeros((n, max_len), np.int32)
  loss = np.zeros((n, max_len), np.int32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    ids[i, :len(p) + len(r)] = p + r
    attention[i, :len(p) + len(r)] = 1
    loss[i, len(p):len(p) + len(r)] = 1
  return ids, attention, loss


def _tokenize(prompts, response_lists, tokenizer, max_len, max_prompt_len,
              truncate, pad_id, bos_id, eos_id):
  if not prompts:
    raise LLMDataError("no examples to tokenize; the data set is empty.")
  max_len, max_prompt_len = _check_lengths(max_len, max_prompt_len)
  pad_id = _default_pad_id(tokenizer, pad_id)
  bos = [] if bos_id is None else [int(bos_id)]
  eos = [] if eos_id is None else [int(eos_id)]
  prompt_ids = [bos + p for p in _encode(tokenizer, prompts)]
  response_ids = [[r + eos for r in _encode(tokenizer, texts)]
                  for texts in response_lists]
  out_prompts, out_responses = [], [[] for _ in response_lists]
  for i, p in enumerate(prompt_ids):
    if not p:
      raise LLMDataError(
          f"example {i}: the prompt has no tokens, so the first response "
          "token has nothing to be predicted from; pass bos_id or a "
          "non-empty prompt.")
    p, rs = _truncate(p, [r[i] for r in response_ids], max_len,
                      max_prompt_len, truncate, i)
    out_prompts.append(p)
    for k, r in enumerate(rs):
      out_responses[k].append(r)
  return [_pack(out_prompts, rs, max_len, pad_id) for rs in out_responses]


def tokenize_preferences(pairs: Sequence[PreferenceExample], tokenizer, *,
                         max_len: int, max_prompt_len: Optional[int] = None,
                         truncate: bool = True, pad_id: Optional[int] = None,
                         bos_id: Optional[int] = None,
                         eos_id: Optional[int] = None) -> Arrays:
  r"""Tokenizes preference pairs into right-padded arrays of static shape.

  Args:
    pairs: :class:`PreferenceExample` items.
    tokenizer: a ``tokenizers.Tokenizer``.
    max_len: the length ``T`` of every sequence (prompt + response + padding).
    max_prompt_len: prompt tokens kept when a pair must be cut (default
      ``max_len // 2``); see the truncation rule in the module docstring.
    truncate: cut long pairs by that rule; if ``False``, raise instead.
    pad_id: the padding id (default: the tokenizer's padding id if padding
      is enabled, else 0). Padding is masked out, so its value only matters
      for models that read it.
    bos_id: an id prepended to every prompt (``None``: none).
    eos_id: an id appended to every response, and counted in its loss mask
      (``None``: none).

  Returns:
    A dict of ``(N, max_len)`` int32 arrays: ``chosen_ids``,
    ``chosen_attention_mask``, ``chosen_loss_mask`` and the same for
    ``rejected``.

  Raises:
    LLMDataError: if ``pairs`` is empty, a prompt has no tokens, or
      ``truncate=False`` and a pair is longer than ``max_len``.

  Examples:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from jaxbilevel._src.llm import data
    >>> vocab = {"[PAD]": 0, "Q": 1, ":": 2, "yes": 3, "no": 4}
    >>> tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> arrays = data.tokenize_preferences(
    ...     [data.PreferenceExample("Q:", " yes", " no no")], tok, max_len=5)
    >>> arrays["chosen_ids"], arrays["chosen_loss_mask"]
    (array([[1, 2, 3, 0, 0]], dtype=int32), array([[0, 0, 1, 0, 0]], dtype=int32))
    >>> arrays["rejected_ids"], arrays["rejected_attention_mask"]
    (array([[1, 2, 4, 4, 0]], dtype=int32), array([[1, 1, 1, 1, 0]], dtype=int32))
  """
  pairs = list(pairs)
  (c_ids, c_att, c_loss), (r_ids, r_att, r_loss) = _tokenize(
      [p.prompt for p in pairs],
      [[p.chosen for p in pairs], [p.rejected for p in pairs]],
      tokenizer, max_len, max_prompt_len, truncate, pad_id, bos_id, eos_id)
  return {"chosen_ids": c_ids, "chosen_attention_mask": c_att,
          "chosen_loss_mask": c_loss, "rejected_ids": r_ids,
          "rejected_attention_mask": r_att, "rejected_loss_mask": r_loss}


def tokenize_sft(examples: Sequence[SFTExample], tokenizer, *, max_len: int,
                 max_prompt_len: Optional[int] = None, truncate: bool = True,
                 pad_id: Optional[int] = None, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None) -> Arrays:
  """Tokenizes SFT examples into right-padded arrays of static shape.

  Arguments and truncation are those of :func:`tokenize_preferences`.

  Returns:
    A dict of ``(N, max_len)`` int32 arrays ``input_ids``,
    ``attention_mask`` and ``loss_mask`` (1 on response tokens only).

  Examples:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from jaxbilevel._src.llm import data
    >>> vocab = {"[PAD]": 0, "Q": 1, ":": 2, "yes": 3}
    >>> tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> arrays = data.tokenize_sft([data.SFTExample("Q:", " yes")], tok,
    ...                            max_len=4, eos_id=0)
    >>> arrays["input_ids"], arrays["loss_mask"]
    (array([[1, 2, 3, 0]], dtype=int32), array([[0, 0, 1, 1]], dtype=int32))
  """
  examples = list(examples)
  ((ids, att, loss),) = _tokenize(
      [e.prompt for e in examples], [[e.response for e in examples]],
      tokenizer, max_len, max_prompt_len, truncate, pad_id, bos_id, eos_id)
  return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


# ----------------------------------------------------------------------------
# Shuffling, splitting and batching.
# ----------------------------------------------------------------------------

Data = Union[Arrays, Sequence[Any]]


def num_examples(data: Data) -> int:
  """The number of examples of a list or of a dict of arrays (leading axis)."""
  if isinstance(data, Mapping):
    if not data:
      raise LLMDataError("the data set is an empty dict (no arrays).")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None
             for k, v in data.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
      raise ValueError("all arrays of a data set must share their leading "
                       f"(example) axis; got leading sizes {sizes}.")
    return next(iter(sizes.values()))
  return len(data)


def _take(data, idx):
  if isinstance(data, Mapping):
    return {k: np.asarray(v)[idx] for k, v in data.items()}
  return [data[i] for i in idx]


def shuffle(data: Data, seed: int) -> Data:
  """Returns the examples in an order drawn from ``seed``.

  Args:
    data: a list of examples or a dict of arrays with a shared leading axis.
    seed: the seed of a ``numpy.random.default_rng``; the same seed gives the
      same order.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> data.shuffle(list(range(5)), seed=0) == data.shuffle(list(range(5)), 0)
    True
  """
  n = num_examples(data)
  return _take(data, np.random.default_rng(seed).permutation(n))


def train_eval_split(data: Data, *, eval_size: Union[int, float],
                     seed: int = 0) -> Tuple[Data, Data]:
  """Splits examples into disjoint train and eval parts after a seeded shuffle.

  Also the way to carve a disjoint SFT set out of a preference file: split
  the pairs, use one part for DPO and :func:`preference_to_sft` of the other
  for SFT.

  Args:
    data: a list of examples or a dict of arrays.
    eval_size: the number of eval examples (an int) or their fraction (a float
      in ``(0, 1)``, rounded to the nearest count).
    seed: the shuffle seed.

  Returns:
    ``(train, eval)``, both non-empty, of the type of ``data``.

  Examples:
    >>> from jaxbilevel._src.llm import data
    >>> train, ev = data.train_eval_split(list(range(10)), eval_size=0.2)
    >>> len(train), len(ev), sorted(train + ev) == list(range(10))
    (8, 2, True)
  """
  n = num_examples(data)
  if isinstance(eval_size, float):
    if not 0.0 < eval_size < 1.0:
      raise ValueError(f"a float eval_size must be in (0, 1), got {eval_size}.")
    n_eval = int(round(eval_size * n))
  else:
    n_eval = int(eval_size)
  if not 1 <= n_eval <= n - 1:
    raise ValueError(
        f"eval_size={eval_size!r} gives {n_eval} eval examples out of {n}; "
        "both parts must be non-empty.")
  perm = np.random.default_rng(seed).permutation(n)
  return _take(data, np.sort(perm[n_eval:])), _take(data, np.sort(perm[:n_eval]))


def _is_mixture(data):
  return (isinstance(data, Mapping) and data
          and all(isinstance(v, Mapping) for v in data.values()))


def _epoch_orders(n, batch_size, seed, shuffle_each_epoch):
  """Yields index arrays of full batches, epoch after epoch (forever)."""
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} is larger than the data set "
                     f"({n} examples); lower batch_size.")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n) if shuffle_each_epoch else np.arange(n)
    for start in range(0, n - batch_size + 1, batch_size):
      yield order[start:start + batch_size]


def _batch_sizes(data, batch_size):
  if isinstance(batch_size, Mapping):
    missing = set(data) - set(batch_size)
    if missing:
      raise ValueError(f"batch_size has no entry for part(s) "
                       f"{sorted(missing)} of the mixture.")
    return {k: int(batch_size[k]) for k in data}
  return {k: int(batch_size) for k in data}


def batch_iterator(data: Union[Arrays, Mapping[str, Arrays]],
                   batch_size: Union[int, Mapping[str, int]], *,
                   num_epochs: Optional[int] = 1, seed: int = 0,
                   shuffle: bool = True) -> Iterator[Any]:  # pylint: disable=redefined-outer-name
  """Yields fixed-size batches, dropping the last incomplete one of each epoch.

  Each epoch visits the examples in a new order drawn from ``seed`` (or in
  order with ``shuffle=False``). For a mixture ``{"dpo": ..., "sft": ...}``
  each part is batched separately (its own order, derived from ``seed``) and
  each batch is a dict with the same keys; an epoch then ends when the part
  with the fewest batches runs out.

  Args:
    data: a dict of arrays, or a mixture (a dict of such dicts).
    batch_size: examples per batch (for a mixture: an int for all parts or a
      dict part -> int).
    num_epochs: passes over the data (``None``: forever).
    seed: the shuffle seed.
    shuffle: shuffle the examples each epoch.

  Yields:
    Dicts of arrays with leading axis ``batch_size``.

  Examples:
    >>> import numpy as np
    >>> from jaxbilevel._src.llm import data
    >>> batches = list(data.batch_iterator({"a": np.arange(5)}, 2))
    >>> len(batches), [b["a"].shape for b in batches]
    (2, [(2,), (2,)])
  """
  if _is_mixture(data):
    sizes = _batch_sizes(data, batch_size)
    per_epoch = min(num_examples(v) // sizes[k] for k, v in data.items())
    orders = {k: _epoch_orders(num_examples(v), sizes[k], seed + 1 + j,
                               shuffle)
              for j, (k, v) in enumerate(data.items())}
    n_batches = None if num_epochs is None else num_epochs * per_epoch
    count = 0
    while n_batches is None or count < n_batches:
      yield {k: _take(v, next(orders[k])) for k, v in data.items()}
      count += 1
    return
  n = num_examples(data)
  per_epoch = n // int(batch_size)
  orders = _epoch_orders(n, int(batch_size), seed, shuffle)
  count = 0
  while num_epochs is None or count < num_epochs * per_epoch:
    yield _take(data, next(orders))
    count += 1


def stacked_batches(data: Union[Arrays, Mapping[str, Arrays]],
                    batch_size: Union[int, Mapping[str, int]],
                    num_steps: int, seed: int = 0) -> Any:
  """Stacks ``num_steps`` batches along a new leading step axis.

  The batches are those of :func:`batch_iterator` with ``num_epochs=None``
  (reshuffled each epoch, incomplete batches dropped), so the result can be
  passed to ``jbl.run(tx, params, num_steps=num_steps, batches=...)``, which
  reads batch ``t`` at step ``t``.

  Args:
    data: a dict of arrays, or a mixture ``{"dpo": ..., "sft": ...}``.
    batch_size: examples per batch (an int, or per part for a mixture).
    num_steps: the number of batches.
    seed: the shuffle seed.

  Returns:
    The same structure as one batch, every array with a leading axis of
    length ``num_steps``: shape ``(num_steps, batch_size, ...)``.

  Examples:
    >>> import numpy as np
    >>> from jaxbilevel._src.llm import data
    >>> mix = {"dpo": {"a": np.zeros((6, 3))}, "sft": {"b": np.ones((4, 3))}}
    >>> out = data.stacked_batches(mix, {"dpo": 2, "sft": 4}, num_steps=5)
    >>> out["dpo"]["a"].shape, out["sft"]["b"].shape
    ((5, 2, 3), (5, 4, 3))
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  it = batch_iterator(data, batch_size, num_epochs=None, seed=seed)
  batches = [next(it) for _ in range(num_steps)]

  def stack(parts):
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

  if _is_mixture(data):
    return {k: stack([b[k] for b in batches]) for k in data}
  return stack(batches)
