"""Write docs/configuration.md from the documented fields of mmgrpo's config (config/schema.py):
every key by section, with its type, default and the docstring written under it.

Usage: python scripts/config_doc.py            (rewrites the page; tests/test_docs.py fails when it is stale)
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

from mmgrpo import config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
INTRO = """# Configuration

A config is a TOML (or YAML) file in sections; every key may be left out (its default is used) or set
from the command line with `--set SECTION.KEY=VALUE`, or from Python with
`mmgrpo.optimize(config={"SECTION": {"KEY": VALUE}})`. An unknown key, a key in the wrong section and a
value of the wrong type are errors that name the key. Example: `examples/banking77_demo.toml`.

This page is generated from the documented fields of `src/mmgrpo/config/schema.py` by
`python scripts/config_doc.py`.
"""


def field_docs() -> dict[str, str]:
    """Each field's docstring: the string literal written right under it in the dataclass."""
    tree = ast.parse(inspect.getsource(config.TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def render() -> str:
    docs = field_docs()
    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    defaults = config.TrainConfig().to_json()
    hints = {n: str(f.type).replace("typing.", "") for n, f in fields.items()}
    out = [INTRO]
    for section, keys in config.SECTIONS.items():
        out.append(f"\n## [{section}]\n\n| key | type | default | what |\n|---|---|---|---|")
        for key, name in keys.items():
            default = "unset" if defaults[name] is None else f"`{json.dumps(defaults[name])}`"
            what = docs.get(name, "").replace("|", "\\|")
            kind = hints[name].replace(" | None", ", optional").replace(" | ", " or ")
            out.append(f"| `{key}` | {kind} | {default} | {what} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
