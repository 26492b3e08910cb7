"""The README's generated tables (pretrain/docs.py: config keys, composition, resume classes, HF exports) are current,
and the README names the two commands of a fresh machine."""

import os

import pytest

from pretrain.docs import GENERATED, regenerated, stale_blocks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")


def test_readme_generated_tables_are_current():
    stale = stale_blocks(open(README, encoding="utf-8").read())
    assert not stale, f"README's {', '.join(stale)} tables are stale: run `pretrain config --docs --write README.md`"


def test_regenerating_rewrites_only_the_generated_blocks():
    text = open(README, encoding="utf-8").read()
    start = text.index("<!-- composition:start")
    edited = text[:start] + text[start:].replace("| `pre_ln` |", "| `pre_ln_stale` |", 1)
    assert stale_blocks(edited) == ["composition"] and regenerated(edited) == text
    with pytest.raises(ValueError, match="markers"):
        regenerated(text.replace(f"<!-- {next(iter(GENERATED))}:end -->", ""))


def test_readme_names_both_quickstart_commands():
    text = open(README).read()
    assert "make quickstart" in text and "make test" in text
    assert "make test" in open(os.path.join(REPO, ".ci", "run")).read()
