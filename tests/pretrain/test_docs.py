"""The docs: the generated tables (pretrain/docs.py: config keys, composition, resume classes, HF exports) are current
in their pages, the README stays a short entry point that names the two commands of a fresh machine, and every
relative link of the README and docs/ points at a file (and heading) that exists."""

import os
import re

import pytest

from pretrain.cli import main
from pretrain.docs import GENERATED, PAGES, blocks_in, regenerated, stale_blocks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
README_MAX_LINES = 250


def markdown_files() -> list[str]:
    """The README, launch/README.md and every page of docs/, repository-relative."""
    pages = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
    return ["README.md", os.path.join("launch", "README.md"), *pages]


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_every_generated_table_is_current_in_its_page_and_only_there():
    holders = {name: [p for p in markdown_files() if name in blocks_in(read(p))] for name in GENERATED}
    assert holders == {name: [PAGES[name]] for name in GENERATED}
    for page in set(PAGES.values()):
        stale = stale_blocks(read(page))
        assert not stale, f"{page}: the {', '.join(stale)} tables are stale: run `pretrain config --docs --write`"


def test_regenerating_rewrites_only_the_generated_blocks():
    text = read(PAGES["composition"])
    start = text.index("<!-- composition:start")
    edited = text[:start] + text[start:].replace("| `pre_ln` |", "| `pre_ln_stale` |", 1)
    assert stale_blocks(edited) == ["composition"] and regenerated(edited, ["composition"]) == text
    with pytest.raises(ValueError, match="markers"):
        regenerated(text.replace("<!-- composition:end -->", ""), ["composition"])


def test_the_readme_is_short_and_names_both_commands_and_every_page():
    text = read("README.md")
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md is the entry point: move reference into docs/"
    assert "make quickstart" in text and "make test" in text
    assert "make test" in read(os.path.join(".ci", "run"))
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    pages = {p for p in markdown_files() if p.startswith("docs")}
    assert pages <= linked, f"pages the README's contents do not list: {sorted(pages - linked)}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for page in markdown_files():
        text = re.sub(r"```.*?```", "", read(page), flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            path, _, fragment = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(REPO, resolved)):
                broken.append(f"{page}: {target} (no {resolved})")
            elif fragment and resolved.endswith(".md"):
                headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", read(resolved), flags=re.M)}
                if fragment not in headings:
                    broken.append(f"{page}: {target} (no heading #{fragment} in {resolved})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_printed_tables_are_for_reading(capsys):
    """`pretrain config --docs` prints every table as entries wrapped to the terminal (the Markdown runs to 500
    characters a line); `--markdown` prints the Markdown the pages hold."""
    assert main(["config", "--docs"]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "\nngpt\n  preset: tiny\n  its own training settings: train.lr=0.00849, train.warmup_steps=0\n" in text
    assert "\nmodel.norm_scheme\n  default: pre_ln\n  meaning: Where the norms go:" in text
    assert main(["config", "--docs", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert all(f"<!-- {name} -->\n{make().strip()}" in markdown for name, make in GENERATED.items())
    assert main(["config", "--markdown"]) == 2
