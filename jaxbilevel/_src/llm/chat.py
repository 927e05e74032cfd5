r"""Chat templates: turning a list of messages into a model's prompt text.

Instruction-tuned checkpoints ship a Jinja chat template: a GGUF file in the
metadata key ``tokenizer.chat_template``, a Hugging Face directory in
``chat_template.jinja`` or in the ``chat_template`` field of
``tokenizer_config.json``. :func:`read_chat_template` finds it and
:func:`format_chat` renders it with ``messages`` and
``add_generation_prompt`` (as ``transformers``' ``apply_chat_template`` does:
a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``).

Fallback: without a template, or when ``jinja2`` is not installed (it is not
part of the ``llm`` extra: ``pip install jinja2``), the ChatML format that
SmolLM2 and Qwen2 use is written instead::

  <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n

Note that a template may add more than that; SmolLM2's adds a default system
message ("You are a helpful AI assistant named SmolLM, trained by Hugging
Face") when the conversation has none, which the fallback does not.

:func:`chat_template` binds a template into a ``messages -> text`` callable,
the argument :func:`jaxbilevel.llm.apply_chat_template` takes to rewrite
HH-style training examples.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from jaxbilevel._src import base

Message = Dict[str, str]


def _chatml(messages: Sequence[Mapping[str, str]],
            add_generation_prompt: bool) -> str:
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                 for m in messages)
  return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _check_messages(messages) -> List[Message]:
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise base.BilevelValidationError(
        f"format_chat: messages must be a list of {{'role': ..., 'content': "
        f"...}} dicts, got {type(messages).__name__}.")
  out = []
  for i, m in enumerate(messages):
    if (not isinstance(m, Mapping) or not isinstance(m.get("role"), str)
        or not isinstance(m.get("content"), str)):
      raise base.BilevelValidationError(
          f"format_chat: message {i} must be a dict with string 'role' and "
          f"'content', got {m!r}.")
    out.append(dict(m))
  return out


def _render(template: str, messages, add_generation_prompt, extra):
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                              lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  try:
    compiled = env.from_string(template)
    return compiled.render(messages=messages,
                           add_generation_prompt=add_generation_prompt,
                           **extra)
  except jinja2.exceptions.TemplateError as err:
    raise base.BilevelValidationError(
        f"format_chat: the chat template failed: {err}.") from None


def format_chat(messages: Sequence[Mapping[str, str]],
                template: Optional[str] = None, *,
                add_generation_prompt: bool = True, **extra: Any) -> str:
  r"""The prompt text of a conversation under a chat template.

  Args:
    messages: ``[{"role": "system" | "user" | "assistant", "content":
      str}, ...]``.
    template: a Jinja chat template (from :func:`read_chat_template`), or
      ``None`` for ChatML.
    add_generation_prompt: end with the opening of the assistant's turn.
    **extra: more variables for the template (e.g. ``bos_token``).

  Returns:
    The text. With a template but no ``jinja2`` installed, the ChatML text
    and a ``UserWarning``.

  Examples:
    >>> from jaxbilevel import llm
    >>> llm.format_chat([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    >>> tpl = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
    ...        "{% endfor %}{% if add_generation_prompt %}[assistant] "
    ...        "{% endif %}")
    >>> llm.format_chat([{"role": "user", "content": "Hi"}], tpl)
    '[user] Hi\n[assistant] '
  """
  messages = _check_messages(messages)
  if template is None:
    return _chatml(messages, add_generation_prompt)
  if not isinstance(template, str):
    raise base.BilevelValidationError(
        f"format_chat: template must be a Jinja template string or None, got "
        f"{type(template).__name__}.")
  try:
    import jinja2  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    warnings.warn(
        "format_chat: jinja2 is not installed (pip install jinja2); writing "
        "the ChatML format instead of the model's chat template.",
        UserWarning, stacklevel=2)
    return _chatml(messages, add_generation_prompt)
  return _render(template, messages, add_generation_prompt, extra)


def read_chat_template(path_or_name) -> Optional[str]:
  """The Jinja chat template shipped with a checkpoint (``None`` if none).

  Args:
    path_or_name: a ``.gguf`` file (metadata ``tokenizer.chat_template``), a
      Hugging Face directory (``chat_template.jinja``, else the
      ``chat_template`` of ``tokenizer_config.json``), or a model name of
      :func:`jaxbilevel.llm.load_pretrained` (``"smollm2"``).

  Returns:
    The template text, or ``None`` when the checkpoint has none.
  """
  from jaxbilevel._src.llm import loading  # pylint: disable=g-import-not-at-top
  if isinstance(path_or_name, str) and path_or_name in loading._NAMED:  # pylint: disable=protected-access
    path_or_name = loading.locate(path_or_name)
  path = pathlib.Path(path_or_name)
  if path.is_dir():
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
      return jinja.read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    if not config.is_file():
      return None
    try:
      template = json.loads(config.read_text(encoding="utf-8")).get(
          "chat_template")
    except json.JSONDecodeError as err:
      raise loading.CheckpointError(
          f"{config}: not valid JSON ({err.msg}).") from None
    if isinstance(template, list):  # Named templates: take "default".
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default")
    return template
  reader = loading._gguf_reader(path)  # pylint: disable=protected-access
  return loading._field(reader, "tokenizer.chat_template")  # pylint: disable=protected-access


def chat_template(path_or_name=None, *, add_generation_prompt: bool = True,
                  **extra: Any) -> Callable[[Sequence[Message]], str]:
  """A ``messages -> text`` function for a checkpoint's chat template.

  Args:
    path_or_name: as :func:`read_chat_template`; ``None`` for ChatML.
    add_generation_prompt: passed to :func:`format_chat`.
    **extra: more template variables.

  Returns:
    ``template(messages) -> str``, e.g. for
    :func:`jaxbilevel.llm.apply_chat_template`.

  Examples:
    >>> from jaxbilevel import llm
    >>> template = llm.chat_template()   # ChatML
    >>> pairs = [llm.PreferenceExample("\\n\\nHuman: Hi\\n\\nAssistant:",
    ...                                " Hello.", " Go away.")]
    >>> llm.apply_chat_template(pairs, template,
    ...                         response_suffix="<|im_end|>")[0].prompt
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
  """
  template = (None if path_or_name is None
              else read_chat_template(path_or_name))

  def apply(messages: Sequence[Message]) -> str:
    return format_chat(messages, template,
                       add_generation_prompt=add_generation_prompt, **extra)

  apply.template = template
  return apply
