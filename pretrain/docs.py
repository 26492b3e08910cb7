"""The docs' generated parts: each block between `<!-- NAME:start ... -->` and `<!-- NAME:end -->` is the output of one
function of the tables it documents and lives in one page (PAGES), so a new scheme, config key or export reaches the
docs with `pretrain config --docs --write`, and a test fails while a page is stale."""

from __future__ import annotations

import os
import re
import textwrap
from typing import Callable

from models.hf import export_reference
from pretrain.config import (composition_reference, config_reference, parametrization_reference,
                             scheme_defaults_reference)
from pretrain.files import atomic_write
from pretrain.state.resume import resume_table

GENERATED: dict[str, Callable[[], str]] = {
    "composition": composition_reference,  # composable model keys by scheme (models/norms.py)
    "scheme-defaults": scheme_defaults_reference,  # the training settings a scheme brings (models/norms.py)
    "config-reference": config_reference,  # every config key (pretrain/config/sections.py)
    "resume-table": resume_table,  # what a resume does with each key (pretrain/state/resume.py)
    "hf-export": export_reference,  # the stock transformers class of each scheme (models/hf/choose.py)
    "parametrizations": parametrization_reference,  # the parametrizations each scheme takes (models/parametrization.py)
}
# The page of the repository (a path relative to its root) that holds each block.
PAGES: dict[str, str] = {
    "composition": "docs/schemes.md",
    "scheme-defaults": "docs/schemes.md",
    "config-reference": "docs/configuration.md",
    "resume-table": "docs/training.md",
    "hf-export": "docs/interop.md",
    "parametrizations": "docs/parametrization.md",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a checkout (pip install -e .)


# What each block is, as `pretrain config --docs` titles it.
TITLES: dict[str, str] = {
    "composition": "Which composable model key each scheme takes (docs/schemes.md)",
    "scheme-defaults": "The training settings a scheme brings where the config does not choose them (docs/schemes.md)",
    "config-reference": "Every config key: default, meaning (docs/configuration.md)",
    "resume-table": "What a resume does with each key (docs/training.md)",
    "hf-export": "The stock transformers class of each scheme (docs/interop.md)",
    "parametrizations": "The parametrizations (model.parametrization) each scheme takes (docs/parametrization.md)",
}


def as_text(table: str, width: int = 100) -> str:
    """A generated Markdown table for reading in a terminal: one entry per row, its first cell as the heading and every
    other cell as `column: value`, wrapped to `width` (the tables themselves run to 500 characters a line)."""
    rows = [[cell.strip().replace("`", "") for cell in line.strip().strip("|").split(" | ")]
            for line in table.strip().splitlines() if not line.startswith("| ---")]
    header, entries = rows[0], rows[1:]
    out = []
    for row in entries:
        out.append(row[0])
        for column, cell in zip(header[1:], row[1:]):
            out += textwrap.wrap(f"{column}: {cell}", width, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(out)


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:start[^\n]*-->\n)(.*?)(\n<!-- {name}:end -->)", re.S)


def blocks_in(text: str) -> list[str]:
    """The names of the generated blocks whose markers `text` holds."""
    return [name for name in GENERATED if _block(name).search(text)]


def regenerated(text: str, names: list[str] | None = None) -> str:
    """`text` with the generated blocks `names` (default: every block) written anew; a missing marker pair is a
    one-line error."""
    for name in GENERATED if names is None else names:
        pattern = _block(name)
        if not pattern.search(text):
            raise ValueError(f"it lacks the `<!-- {name}:start -->` ... `<!-- {name}:end -->` markers")
        text = pattern.sub(lambda m: m.group(1) + GENERATED[name]().strip() + m.group(3), text, count=1)
    return text


def stale_blocks(text: str, names: list[str] | None = None) -> list[str]:
    """The names of the generated blocks `names` (default: those `text` holds) that differ from what their function
    generates now (a block whose markers are missing counts as stale)."""
    return [name for name in (blocks_in(text) if names is None else names)
            if (m := _block(name).search(text)) is None or m.group(2).strip() != GENERATED[name]().strip()]


def write_page(path: str, names: list[str] | None = None) -> list[str]:
    """Regenerate the blocks `names` (default: those it holds, at least one) of the page at `path` in place
    (atomically); the names of those that changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    names = blocks_in(text) if names is None else names
    if not names:
        raise ValueError(f"it holds no generated block (<!-- NAME:start --> ... <!-- NAME:end -->, NAME one of "
                         f"{', '.join(GENERATED)})")
    changed = stale_blocks(text, names)
    if changed:
        atomic_write(path, regenerated(text, changed))
    return changed


def write_docs(root: str = REPO) -> dict[str, list[str]]:
    """Regenerate every block in its page (PAGES) under the checkout `root`: {page: names that changed}."""
    pages: dict[str, list[str]] = {}
    for name, page in PAGES.items():
        pages.setdefault(page, []).append(name)
    return {page: write_page(os.path.join(root, page), names) for page, names in pages.items()}
