"""The documentation a user looks things up in stays true: the configuration page is the config's."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import config_doc  # noqa: E402


def test_the_configuration_page_is_generated_from_the_current_config():
    assert config_doc.PAGE.read_text() == config_doc.render(), \
        "docs/configuration.md is stale: run python scripts/config_doc.py"


def test_every_config_field_is_documented_on_the_page():
    from mmgrpo.config import WHERE

    docs = config_doc.field_docs()
    assert set(WHERE) <= set(docs), sorted(set(WHERE) - set(docs))  # a field without its docstring
    page = config_doc.PAGE.read_text()
    assert all(f"| `{key}` |" in page for _, key in WHERE.values())


def test_the_repository_speaks_of_the_product_not_of_its_making():
    import re

    pattern = re.compile(r"\bstops? \d|\bsessions?\b|\bissue \d|issue's", re.IGNORECASE)
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/*.md"), *ROOT.glob("studies/*.md"),
             *ROOT.glob("studies/*.py"), *ROOT.glob("src/mmgrpo/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
             *ROOT.glob("examples/**/*.py"), *ROOT.glob("scripts/*.py")]
    found = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for f in files
             for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, found
