"""Tests of the preference / SFT data pipeline (jaxbilevel._src.llm.data).

The shipped sample ``tests/data/hh_rlhf_sample.jsonl.gz`` holds 64 real pairs
of the Anthropic HH-RLHF harmless-base test split (MIT licence, see
``tests/data/HH_RLHF_LICENSE``).
"""

import gzip
import json
import os

import numpy as np
import pytest

from _helpers import byte_level_bpe as _byte_level_bpe
from jaxbilevel._src.llm import data

SAMPLE = os.path.join(os.path.dirname(__file__), "data",
                      "hh_rlhf_sample.jsonl.gz")

WORDS = ["[PAD]", "[BOS]", "[EOS]", "Human", "Assistant", ":", "hi", "hello",
         "bye", "go", "away", "a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture(scope="module")
def word_tok():
  """A word-level tokenizer with a fixed vocabulary: id = index in WORDS."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(WORDS)}, unk_token="[PAD]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return tok


@pytest.fixture(scope="module")
def sample_pairs():
  return data.load_preference_jsonl(SAMPLE)


@pytest.fixture(scope="module")
def bpe_tok(sample_pairs):
  """A byte-level BPE (lossless round trip) trained on the sample."""
  return _byte_level_bpe([p.prompt + p.chosen for p in sample_pairs], 400,
                         decoder=True)


def _write(tmp_path, name, lines, mode="w"):
  path = tmp_path / name
  if mode == "wb":
    path.write_bytes(lines)
  else:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


# ------------------------------------------------------------------ reading


def test_split_hh_dialogue():
  text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d e"
  prompt, response = data.split_hh_dialogue(text)
  assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
  assert response == " d e"


def test_load_hh_sample_counts_and_split(sample_pairs):
  with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  assert len(raw) == 64 and len(sample_pairs) == 64
  for row, pair in zip(raw, sample_pairs):
    assert pair.prompt.endswith("\n\nAssistant:")
    assert pair.prompt.startswith("\n\nHuman:")
    assert pair.prompt + pair.chosen == row["chosen"]
    assert pair.prompt + pair.rejected == row["rejected"]
    assert "\n\nAssistant:" not in pair.chosen
  first = sample_pairs[0]
  assert first.prompt.startswith(
      "\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: "
      "Are you looking for practical joke ideas?\n\nHuman: yep\n\nAssistant:"
      " Ok, I’ll give you a couple examples")
  assert first.prompt.endswith(
      "\n\nHuman: okay some of these do not have anything to do with pens"
      "\n\nAssistant:")
  assert first.chosen.startswith(" No, sorry!  All of these involve a pen")
  assert first.rejected.startswith(" There are lots of funny things you can")
  assert data.load_preference_jsonl(SAMPLE, limit=5) == sample_pairs[:5]


def test_prompt_format_and_auto_detection(tmp_path):
  rows = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello",
           "rejected": " go away"},
          {"chosen": "\n\nHuman: hi\n\nAssistant: bye",
           "rejected": "\n\nHuman: hi\n\nAssistant: go"}]
  path = _write(tmp_path, "p.jsonl", [json.dumps(r) for r in rows])
  assert data.load_preference_jsonl(path) == [
      data.PreferenceExample("\n\nHuman: hi\n\nAssistant:", " hello",
                             " go away"),
      data.PreferenceExample("\n\nHuman: hi\n\nAssistant:", " bye", " go")]
  with pytest.raises(data.LLMDataError, match=r"p.jsonl, line 2: missing key "
                     r"'prompt'"):
    data.load_preference_jsonl(path, format="prompt")


def test_mismatched_prompts_skipped_with_warning_or_refused(tmp_path):
  good = {"chosen": "\n\nHuman: hi\n\nAssistant: a",
          "rejected": "\n\nHuman: hi\n\nAssistant: b"}
  bad = {"chosen": "\n\nHuman: hi\n\nAssistant: a",
         "rejected": "\n\nHuman: bye\n\nAssistant: b"}
  path = _write(tmp_path, "m.jsonl", [json.dumps(good), json.dumps(bad),
                                      json.dumps(good)])
  with pytest.warns(UserWarning, match=r"skipped 1 pair.*lines \[2\]"):
    pairs = data.load_preference_jsonl(path)
  assert len(pairs) == 2
  with pytest.raises(data.LLMDataError,
                     match=r"m.jsonl, line 2: 'chosen' and 'rejected' do "
                     "not share the prompt"):
    data.load_preference_jsonl(path, on_mismatch="error")


def test_sft_loader_and_preference_to_sft(tmp_path):
  path = _write(tmp_path, "s.jsonl", [
      json.dumps({"prompt": "Q: 1+1?\nA:", "response": " 2"}), "",
      json.dumps({"prompt": "Q: 2+2?\nA:", "response": " 4"})])
  assert data.load_sft_jsonl(path) == [data.SFTExample("Q: 1+1?\nA:", " 2"),
                                       data.SFTExample("Q: 2+2?\nA:", " 4")]
  pairs = [data.PreferenceExample("p", " c", " r")]
  assert data.preference_to_sft(pairs) == [data.SFTExample("p", " c")]


def test_from_hf_dataset_duck_typed_rows():
  rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: a",
           "rejected": "\n\nHuman: hi\n\nAssistant: b", "extra": 1}]
  assert data.from_hf_dataset(rows) == [
      data.PreferenceExample("\n\nHuman: hi\n\nAssistant:", " a", " b")]
  with pytest.raises(data.LLMDataError,
                     match=r"dataset, row 0: missing key 'prompt'"):
    data.from_hf_dataset(rows, kind="sft")
  with pytest.raises(ValueError, match="kind must be"):
    data.from_hf_dataset(rows, kind="rlhf")


def test_from_hf_dataset_with_datasets():
  datasets = pytest.importorskip("datasets")
  if not hasattr(datasets, "Dataset"):  # another module named "datasets"
    pytest.skip(f"'datasets' is {datasets.__file__}, not Hugging Face's.")
  pyarrow = pytest.importorskip("pyarrow")
  # An in-memory Dataset. An explicit fingerprint skips datasets' hashing of
  # the table, which fails to pickle pyarrow 26 types in datasets 5.2.0
  # (Dataset.from_list raises PicklingError there).
  ds = datasets.Dataset(pyarrow.Table.from_pylist(
      [{"prompt": "Q:", "chosen": " yes", "rejected": " no"}] * 3),
                        fingerprint="test")
  assert data.from_hf_dataset(ds) == [
      data.PreferenceExample("Q:", " yes", " no")] * 3


# --------------------------------------------------------------- templating


def test_hh_messages_on_sample(sample_pairs):
  """Every sample prompt parses into alternating turns, user first and last."""
  for pair in sample_pairs:
    roles = [m["role"] for m in data.hh_messages(pair.prompt)]
    assert roles[0] == roles[-1] == "user"
    assert all(a != b for a, b in zip(roles, roles[1:]))
  assert sum(len(data.hh_messages(p.prompt)) for p in sample_pairs) == 246


def test_hh_messages_and_chat_template():
  prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
  assert data.hh_messages(prompt) == [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "bye"}]
  assert data.hh_messages("plain text") == [
      {"role": "user", "content": "plain text"}]
  template = lambda ms: "|".join(m["role"][0] + "=" + m["content"]
                                 for m in ms) + "|a="
  out = data.apply_chat_template(
      [data.PreferenceExample(prompt, " c ", " r"),
       data.SFTExample(prompt, " s")], template, response_suffix="</s>")
  assert out == [data.PreferenceExample("u=hi|a=hello|u=bye|a=", "c</s>",
                                        "r</s>"),
                 data.SFTExample("u=hi|a=hello|u=bye|a=", "s</s>")]
  with pytest.raises(TypeError, match="template must be a callable"):
    data.apply_chat_template(out, "not callable")


# ------------------------------------------------------------- tokenization


def test_masks_on_hand_made_batch(word_tok):
  """Known token positions: prompt 0..2, response after, then padding."""
  pairs = [data.PreferenceExample("Human : hi Assistant :", " hello",
                                  " go away")]
  arrays = data.tokenize_preferences(pairs, word_tok, max_len=9, pad_id=0,
                                     bos_id=1, eos_id=2)
  assert set(arrays) == set(data.PREFERENCE_KEYS)
  # [BOS] Human : hi Assistant : | hello [EOS] | pad
  np.testing.assert_array_equal(arrays["chosen_ids"],
                                [[1, 3, 5, 6, 4, 5, 7, 2, 0]])
  np.testing.assert_array_equal(arrays["chosen_attention_mask"],
                                [[1, 1, 1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(arrays["chosen_loss_mask"],
                                [[0, 0, 0, 0, 0, 0, 1, 1, 0]])
  np.testing.assert_array_equal(arrays["rejected_ids"],
                                [[1, 3, 5, 6, 4, 5, 9, 10, 2]])
  np.testing.assert_array_equal(arrays["rejected_loss_mask"],
                                [[0, 0, 0, 0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(arrays["rejected_attention_mask"],
                                np.ones((1, 9)))
  for v in arrays.values():
    assert v.dtype == np.int32

  sft = data.tokenize_sft([data.SFTExample("hi", " hello"),
                           data.SFTExample("a b c", " d")], word_tok,
                          max_len=5, pad_id=0)
  np.testing.assert_array_equal(sft["input_ids"], [[6, 7, 0, 0, 0],
                                                   [11, 12, 13, 14, 0]])
  np.testing.assert_array_equal(sft["attention_mask"], [[1, 1, 0, 0, 0],
                                                        [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(sft["loss_mask"], [[0, 1, 0, 0, 0],
                                                   [0, 0, 0, 1, 0]])


def test_truncation_rule(word_tok):
  # Prompt a..f (6 tokens), chosen g h (2), rejected "g h a b c" (5).
  pair = data.PreferenceExample("a b c d e f", " g h", " g h a b c")
  # Fits: nothing is cut, even though the prompt is longer than max_prompt_len.
  fits = data.tokenize_preferences([pair], word_tok, max_len=11,
                                   max_prompt_len=2)
  np.testing.assert_array_equal(fits["rejected_ids"][0],
                                [11, 12, 13, 14, 15, 16, 17, 18, 11, 12, 13])
  # Too long (6 + 5 > 8): the prompt keeps its LAST 3 tokens (d e f); each
  # response keeps its FIRST 8 - 3 = 5 tokens; the longer response decides,
  # so both share the cut prompt.
  cut = data.tokenize_preferences([pair], word_tok, max_len=8,
                                  max_prompt_len=3)
  np.testing.assert_array_equal(cut["chosen_ids"][0],
                                [14, 15, 16, 17, 18, 0, 0, 0])
  np.testing.assert_array_equal(cut["chosen_loss_mask"][0],
                                [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(cut["rejected_ids"][0],
                                [14, 15, 16, 17, 18, 11, 12, 13])
  # Response longer than what is left: it keeps its first tokens.
  sft = data.tokenize_sft([data.SFTExample("a b c d e f", " g h a b c")],
                          word_tok, max_len=6, max_prompt_len=2)
  np.testing.assert_array_equal(sft["input_ids"][0], [15, 16, 17, 18, 11, 12])
  np.testing.assert_array_equal(sft["loss_mask"][0], [0, 0, 1, 1, 1, 1])
  with pytest.raises(data.LLMDataError,
                     match=r"example 0: prompt \(6 tokens\) \+ response \(5 "
                     r"tokens\) = 11 tokens > max_len=8; .*truncate=True"):
    data.tokenize_preferences([pair], word_tok, max_len=8, truncate=False)


def test_sample_tokenization_shapes_and_round_trip(sample_pairs, bpe_tok):
  arrays = data.tokenize_preferences(sample_pairs, bpe_tok, max_len=96,
                                     max_prompt_len=64)
  for k in data.PREFERENCE_KEYS:
    assert arrays[k].shape == (64, 96) and arrays[k].dtype == np.int32
  n_full = 0
  for side in ("chosen", "rejected"):
    ids = arrays[f"{side}_ids"]
    att = arrays[f"{side}_attention_mask"]
    loss = arrays[f"{side}_loss_mask"]
    lengths = att.sum(1)
    # Attention is a prefix of ones; the loss mask is a contiguous block that
    # ends where the attention ends (response after the prompt, then padding).
    np.testing.assert_array_equal(att, np.arange(96) < lengths[:, None])
    assert np.all(loss <= att) and np.all(loss[:, 0] == 0)
    starts = loss.argmax(1)
    np.testing.assert_array_equal(
        loss, (np.arange(96) >= starts[:, None]) & (att == 1))
    assert np.all(ids[att == 0] == 0)
    for i, pair in enumerate(sample_pairs):
      text = pair.prompt + getattr(pair, side)
      longest = max(len(bpe_tok.encode(pair.chosen).ids),
                    len(bpe_tok.encode(pair.rejected).ids))
      if len(bpe_tok.encode(pair.prompt).ids) + longest <= 96:
        n_full += 1
        assert bpe_tok.decode(ids[i, :starts[i]].tolist()) == pair.prompt
        assert bpe_tok.decode(ids[i, :lengths[i]].tolist()) == text
  assert n_full >= 10  # the round trip was checked on real examples
  # The truncation rule on real data: a pair whose prompt + longer response
  # exceeds 96 tokens keeps min(prompt, 64) prompt tokens, and its longer
  # response fills the row.
  n_cut = 0
  for i, pair in enumerate(sample_pairs):
    n_p = len(bpe_tok.encode(pair.prompt).ids)
    n_c = len(bpe_tok.encode(pair.chosen).ids)
    n_r = len(bpe_tok.encode(pair.rejected).ids)
    kept = n_p if n_p + max(n_c, n_r) <= 96 else min(n_p, 64)
    n_cut += kept < n_p
    for side, n in (("chosen", n_c), ("rejected", n_r)):
      assert arrays[f"{side}_loss_mask"][i].argmax() == kept
      assert arrays[f"{side}_loss_mask"][i].sum() == min(n, 96 - kept)
    if kept < n_p:  # the END of the prompt is kept
      np.testing.assert_array_equal(arrays["chosen_ids"][i, :kept],
                                    bpe_tok.encode(pair.prompt).ids[-kept:])
  assert n_cut >= 10


# ----------------------------------------------------- shuffle/split/batch


def test_shuffle_seeded(sample_pairs):
  a = data.shuffle(sample_pairs, seed=3)
  assert a == data.shuffle(sample_pairs, seed=3)
  assert a != data.shuffle(sample_pairs, seed=4)
  assert sorted(a) == sorted(sample_pairs)
  arrays = {"i": np.arange(10), "j": np.arange(10) * 2}
  s = data.shuffle(arrays, 1)
  np.testing.assert_array_equal(s["j"], 2 * s["i"])
  assert not np.array_equal(s["i"], np.arange(10))


def test_train_eval_split_and_disjoint_sft(sample_pairs):
  train, ev = data.train_eval_split(sample_pairs, eval_size=0.25, seed=0)
  assert (len(train), len(ev)) == (48, 16)
  assert not set(train) & set(ev)
  assert set(train) | set(ev) == set(sample_pairs)
  again, _ = data.train_eval_split(sample_pairs, eval_size=16, seed=0)
  assert again == train
  other, _ = data.train_eval_split(sample_pairs, eval_size=16, seed=1)
  assert other != train
  # Disjoint SFT set: DPO on one half, SFT on the chosen dialogues of the
  # other half.
  dpo_pairs, sft_pairs = data.train_eval_split(sample_pairs, eval_size=0.5,
                                               seed=0)
  sft = data.preference_to_sft(sft_pairs)
  assert len(dpo_pairs) == len(sft) == 32
  dpo_dialogues = {p.prompt + p.chosen for p in dpo_pairs}
  assert not dpo_dialogues & {s.prompt + s.response for s in sft}
  with pytest.raises(ValueError, match="both parts must be non-empty"):
    data.train_eval_split(sample_pairs, eval_size=64)


def test_batch_iterator_epochs_and_seed():
  arrays = {"i": np.arange(10), "x": np.arange(20).reshape(10, 2)}
  batches = list(data.batch_iterator(arrays, 3, num_epochs=2, seed=0))
  assert len(batches) == 6  # 3 full batches per epoch, remainder dropped
  for b in batches:
    np.testing.assert_array_equal(b["x"], np.stack([2 * b["i"],
                                                    2 * b["i"] + 1], 1))
  for epoch in (batches[:3], batches[3:]):
    seen = np.concatenate([b["i"] for b in epoch])
    assert len(set(seen.tolist())) == 9
  assert not np.array_equal(np.concatenate([b["i"] for b in batches[:3]]),
                            np.concatenate([b["i"] for b in batches[3:]]))
  again = list(data.batch_iterator(arrays, 3, num_epochs=2, seed=0))
  assert all(np.array_equal(a["i"], b["i"]) for a, b in zip(batches, again))
  other = list(data.batch_iterator(arrays, 3, num_epochs=2, seed=1))
  assert any(not np.array_equal(a["i"], b["i"])
             for a, b in zip(batches, other))
  ordered = list(data.batch_iterator(arrays, 4, shuffle=False))
  np.testing.assert_array_equal([b["i"] for b in ordered],
                                [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_stacked_batches_single_and_mixture():
  arrays = {"i": np.arange(7)}
  out = data.stacked_batches(arrays, 2, num_steps=5, seed=0)
  assert out["i"].shape == (5, 2)
  # 3 batches per epoch: steps 0-2 are one epoch (6 distinct examples).
  assert len(set(out["i"][:3].ravel().tolist())) == 6
  it = data.batch_iterator(arrays, 2, num_epochs=None, seed=0)
  np.testing.assert_array_equal(out["i"], [next(it)["i"] for _ in range(5)])

  mix = {"dpo": {"a": np.arange(6)}, "sft": {"b": np.arange(100, 108),
                                             "c": np.arange(8) * 10}}
  out = data.stacked_batches(mix, {"dpo": 2, "sft": 4}, num_steps=4, seed=1)
  assert out["dpo"]["a"].shape == (4, 2) and out["sft"]["b"].shape == (4, 4)
  np.testing.assert_array_equal(out["sft"]["c"], (out["sft"]["b"] - 100) * 10)
  assert set(out["dpo"]["a"][:3].ravel().tolist()) == set(range(6))
  assert set(out["sft"]["b"][:2].ravel().tolist()) == set(range(100, 108))


# -------------------------------------------------------------------- errors


def test_errors_name_file_line_and_fix(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(data.LLMDataError,
                     match=r"data file '.*nope.jsonl' does not exist"):
    data.load_preference_jsonl(missing)
  good = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b",
                     "rejected": "\n\nHuman: a\n\nAssistant: c"})
  path = _write(tmp_path, "bad.jsonl", [good, "{not json"])
  with pytest.raises(data.LLMDataError,
                     match=r"bad.jsonl, line 2: malformed JSON"):
    data.load_preference_jsonl(path)
  path = _write(tmp_path, "arr.jsonl", [good, "[1, 2]"])
  with pytest.raises(data.LLMDataError,
                     match=r"arr.jsonl, line 2: expected a JSON object, got "
                     "list"):
    data.load_preference_jsonl(path)
  path = _write(tmp_path, "key.jsonl", [good, good, json.dumps(
      {"chosen": "\n\nHuman: a\n\nAssistant: b"})])
  with pytest.raises(data.LLMDataError,
                     match=r"key.jsonl, line 3: missing key 'rejected'"):
    data.load_preference_jsonl(path)
  path = _write(tmp_path, "type.jsonl", [json.dumps({"prompt": "p",
                                                     "response": 3})])
  with pytest.raises(data.LLMDataError,
                     match=r"type.jsonl, line 1: key 'response' must be a "
                     "string, got int"):
    data.load_sft_jsonl(path)
  path = _write(tmp_path, "turn.jsonl", [json.dumps({"chosen": "a",
                                                     "rejected": "b"})])
  with pytest.raises(data.LLMDataError,
                     match=r"turn.jsonl, line 1: the dialogue has no "
                     r"'\\n\\nAssistant:' turn"):
    data.load_preference_jsonl(path)
  path = _write(tmp_path, "empty.jsonl", [""])
  with pytest.raises(data.LLMDataError, match=r"empty.jsonl: no preference "
                     "pairs found; the data set is empty"):
    data.load_preference_jsonl(path)
  with pytest.raises(data.LLMDataError, match=r"empty.jsonl: no SFT "
                     "examples found"):
    data.load_sft_jsonl(path)
  path = _write(tmp_path, "latin.jsonl.gz",
                gzip.compress((good + "\n").encode() + b'{"chosen": "caf\xe9"}'
                              + b"\n"), mode="wb")
  with pytest.raises(data.LLMDataError,
                     match=r"latin.jsonl.gz, line 2: not valid UTF-8"):
    data.load_preference_jsonl(path)
  with pytest.raises(ValueError, match="batch_size=5 is larger than the data "
                     r"set \(3 examples\)"):
    data.stacked_batches({"a": np.arange(3)}, 5, num_steps=1)
  with pytest.raises(ValueError, match="must share their leading"):
    data.shuffle({"a": np.arange(3), "b": np.arange(4)}, 0)
  with pytest.raises(ValueError, match=r"batch_size has no entry for part\(s\)"
                     r" \['sft'\]"):
    data.stacked_batches({"dpo": {"a": np.arange(3)},
                          "sft": {"a": np.arange(3)}}, {"dpo": 1}, 2)


def test_tokenization_errors(word_tok):
  with pytest.raises(data.LLMDataError, match="the data set is empty"):
    data.tokenize_sft([], word_tok, max_len=4)
  with pytest.raises(data.LLMDataError,
                     match="example 0: the prompt has no tokens.*bos_id"):
    data.tokenize_sft([data.SFTExample("", " hi")], word_tok, max_len=4)
  with pytest.raises(ValueError, match=r"max_prompt_len must be in \[1, "
                     r"max_len\) = \[1, 4\)"):
    data.tokenize_sft([data.SFTExample("a", " b")], word_tok, max_len=4,
                      max_prompt_len=4)


def test_truncated_gzip_names_the_file_and_the_line(tmp_path):
  lines = [json.dumps({"prompt": f"p{i}", "response": "r" * 40})
           for i in range(300)]
  whole = gzip.compress(("\n".join(lines) + "\n").encode())
  path = _write(tmp_path, "cut.jsonl.gz", whole[:len(whole) // 2], mode="wb")
  with pytest.raises(data.LLMDataError,
                     match=r"cut.jsonl.gz: the gzip file is truncated or "
                           r"corrupt: reading stopped after line \d+ "
                           r"\(EOFError: .*\)\. Download or compress the "
                           r"file again"):
    data.load_sft_jsonl(path)
  # The whole file reads.
  path = _write(tmp_path, "whole.jsonl.gz", whole, mode="wb")
  assert len(data.load_sft_jsonl(path)) == 300
