"""Bundled corpora: text that ships in the package, with the recipe that turns it into a prepared folder.

`bundled:tinyshakespeare` trains its tokenizer and prepares the corpus on first use (about a second) into
`$PRETRAIN_CACHE` (default `~/.cache/pretrain`), in a folder keyed by a hash of the recipe, the corpus
bytes, the folder format and the sentencepiece version; later calls reuse it. Ranks that build it at the
same time each write a private staging folder and rename it into place; the losers use the winner's.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from pretrain.data.folders import FORMAT_VERSION, OutputExists, incomplete_reason, read_meta
from pretrain.data.prepare import prepare_dataset
from pretrain.data.sources import BUNDLED_PREFIX as PREFIX
from pretrain.data.sources import bundled_corpus_path
from pretrain.data.tokenizer import train_tokenizer
from pretrain.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """How a bundled corpus (the text sources.bundled_corpus_path finds) becomes tokens; every field goes into
    the cache key."""

    vocab_size: int = 2048
    model_type: str = "bpe"
    sample_by: str = "paragraph"
    val_fraction: float = 0.1
    seed: int = 0


# vocab 2048 = the `tiny` preset's model.vocab_size; paragraphs (blank-line separated speeches) are documents.
RECIPES: dict[str, Recipe] = {
    "tinyshakespeare": Recipe(),
}


def corpus_path(spec: str) -> str:
    """The text file of `bundled:NAME`."""
    _recipe(spec)
    return bundled_corpus_path(spec)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where bundled corpora are prepared: `cache_dir`, else $PRETRAIN_CACHE, else ~/.cache/pretrain."""
    return Path(cache_dir or os.environ.get("PRETRAIN_CACHE") or "~/.cache/pretrain").expanduser()


def resolve_data_path(spec: str, cache_dir: str | None = None) -> str:
    """A prepared folder for `spec`: `bundled:NAME` is built on first use; anything else must be a complete folder."""
    if not spec.startswith(PREFIX):
        read_meta(spec)  # one-line UserError for a missing or interrupted folder
        return str(Path(spec).expanduser().absolute())
    name = spec[len(PREFIX):]
    recipe = _recipe(spec)
    text = Path(bundled_corpus_path(spec))
    key = hashlib.sha256(
        json.dumps(
            # "file" was a Recipe field once; kept in the key so existing caches stay valid
            {"recipe": {**asdict(recipe), "file": text.name}, "corpus_sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
             "format_version": FORMAT_VERSION, "sentencepiece": spm.__version__},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    root = cache_root(cache_dir)
    data_dir, tok_dir = root / f"{name}-{key}", root / f"{name}-{key}-tokenizer"
    try:
        read_meta(data_dir)
        return str(data_dir)
    except UserError:
        pass
    if data_dir.exists():
        raise UserError(damaged_cache_message(data_dir))
    try:
        train_tokenizer([str(text)], recipe.vocab_size, str(tok_dir), recipe.model_type, seed=recipe.seed)
    except OutputExists:
        pass  # built earlier or by another rank; training is deterministic, so it is the same model
    with quiet_datasets():
        try:
            prepare_dataset(
                str(text), str(tok_dir), str(data_dir), sample_by=recipe.sample_by,
                val_fraction=recipe.val_fraction, seed=recipe.seed,
            )
        except OutputExists:
            pass  # another rank published first
    read_meta(data_dir)
    return str(data_dir)


def damaged_cache_message(folder: Path) -> str:
    """The error for a bundled-data cache folder that exists but is not complete. Only a prepare writes it (whole,
    by renaming its staging folder), so it was damaged afterwards; it is a cache, rebuilt when missing."""
    reason = (incomplete_reason(folder) or "files that do not match its meta.json") if folder.is_dir() else "not a folder"
    return f"{folder}: a damaged bundled-data cache ({reason}); delete it, and the next use rebuilds it"


@contextmanager
def quiet_datasets():
    """No datasets progress bars while a training run builds its default data in passing."""
    import datasets  # 0.6 s to import: only building the bundled data needs it, not each training start

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _recipe(spec: str) -> Recipe:
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if name not in RECIPES:
        raise UserError(f"{spec}: no such bundled corpus; choose one of {', '.join(PREFIX + n for n in RECIPES)}")
    return RECIPES[name]
