"""The README's generated parts: each block between `<!-- NAME:start ... -->` and `<!-- NAME:end -->` is the output
of one function of the tables it documents, so a new scheme, config key or export reaches the README with
`pretrain config --docs --write README.md`, and a test fails while the README is stale."""

from __future__ import annotations

import re
from typing import Callable

from models.hf import export_reference
from pretrain.config import composition_reference, config_reference
from pretrain.files import atomic_write
from pretrain.state.resume import resume_table

GENERATED: dict[str, Callable[[], str]] = {
    "composition": composition_reference,  # composable model keys by scheme (models/norms.py)
    "config-reference": config_reference,  # every config key (pretrain/config/sections.py)
    "resume-table": resume_table,  # what a resume does with each key (pretrain/state/resume.py)
    "hf-export": export_reference,  # the stock transformers class of each scheme (models/hf/choose.py)
}


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:start[^\n]*-->\n)(.*?)(\n<!-- {name}:end -->)", re.S)


def regenerated(text: str) -> str:
    """`text` (the README) with every generated block written anew; a missing marker pair is a one-line error."""
    for name, make in GENERATED.items():
        pattern = _block(name)
        if not pattern.search(text):
            raise ValueError(f"the README lacks the `<!-- {name}:start -->` ... `<!-- {name}:end -->` markers")
        text = pattern.sub(lambda m: m.group(1) + make().strip() + m.group(3), text, count=1)
    return text


def stale_blocks(text: str) -> list[str]:
    """The names of the generated blocks of `text` that differ from what their function generates now."""
    return [name for name, make in GENERATED.items()
            if (m := _block(name).search(text)) is None or m.group(2).strip() != make().strip()]


def write_readme(path: str) -> list[str]:
    """Regenerate the blocks of the README at `path` in place (atomically); the names of those that changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    changed = stale_blocks(text)
    if changed:
        atomic_write(path, regenerated(text))
    return changed
