"""Writes the documentation's method tables from ``jaxbilevel.METHODS``.

Each generated table sits in a page between the lines ``<!-- BEGIN
method-table: NAME -->`` and ``<!-- END method-table: NAME -->`` (HTML
comments: invisible on the rendered site and on GitHub). Run

    python docs/method_tables.py          # rewrite the tables
    python docs/method_tables.py --check  # exit 1 if one is out of date

after adding a method to ``jaxbilevel/_src/registry.py`` or changing one of
its properties. ``tests/test_registry.py`` and the Sphinx build
(``docs/conf.py``) fail while a table is out of date.
"""

import pathlib
import re
import sys

_DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_DOCS.parent))

import jaxbilevel as jbl  # pylint: disable=g-import-not-at-top,wrong-import-position


def _yes(flag):
  return "yes" if flag else "no"


def _row(*cells):
  return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def _codes(names):
  return ", ".join(f"`{name}`" for name in names)


def properties_table():
  """Every method's properties (docs/choosing.md)."""
  lines = ["| method | function | penalty | $\\gamma$ to choose | randomized "
           "(`key`) | second derivatives of $g$ | coupled constraints "
           "(`c`) | value tracker (`state.y_g`) |",
           "|---|---|---|---|---|---|---|---|"]
  for m in jbl.METHODS.values():
    lines.append(_row(
        m.label, f"`jbl.{m.name}`", _yes(m.penalty), _yes(not m.gamma_free),
        _yes(m.stochastic), _yes(m.needs_hvp), _yes(m.constraints),
        _yes(m.value_tracker)))
  return lines


def shared_call_table():
  """What each method needs besides the shared call (docs/vocabulary.md)."""
  lines = ["| method | needs besides the shared call |", "|---|---|"]
  for m in jbl.METHODS.values():
    lines.append(_row(f"`{m.name}`", _codes(m.required_arguments)))
  return lines


def diagnostics_table():
  """Each method's diagnostics keys (docs/vocabulary.md)."""
  lines = ["| method | diagnostics |", "|---|---|"]
  for m in jbl.METHODS.values():
    lines.append(_row(f"`{m.name}`", _codes(m.diagnostics)))
  return lines


# page -> {table name: function returning its lines}
TABLES = {
    "choosing.md": {"properties": properties_table},
    "vocabulary.md": {"shared-call": shared_call_table,
                      "diagnostics": diagnostics_table},
}


def _block(name):
  return re.compile(
      rf"(<!-- BEGIN method-table: {re.escape(name)} -->\n)(.*?)"
      rf"(<!-- END method-table: {re.escape(name)} -->)", re.DOTALL)


def rendered(page):
  """The text of ``docs/<page>`` with its tables regenerated."""
  text = (_DOCS / page).read_text()
  for name, table in TABLES[page].items():
    block = _block(name)
    if len(block.findall(text)) != 1:
      raise ValueError(
          f"docs/{page} needs exactly one pair of lines '<!-- BEGIN "
          f"method-table: {name} -->' and '<!-- END method-table: {name} "
          "-->'.")
    body = "\n".join(table()) + "\n"
    text = block.sub(lambda match, body=body: match.group(1) + body
                     + match.group(3), text)
  return text


def stale_pages():
  """The pages whose committed tables differ from the registry's."""
  return [page for page in TABLES
          if rendered(page) != (_DOCS / page).read_text()]


def main(argv):
  stale = stale_pages()
  if "--check" in argv:
    for page in stale:
      print(f"docs/{page}: method tables out of date; run "
            "python docs/method_tables.py")
    return 1 if stale else 0
  for page in stale:
    (_DOCS / page).write_text(rendered(page))
    print(f"rewrote the method tables of docs/{page}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
