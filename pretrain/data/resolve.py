"""What a data path or a tokenizer argument names: a prepared folder, a Tokenizer, token datasets.

The top of the data package: it imports the pretraining and SFT modules it builds on and none of them imports it.

Data paths (`data.paths`, `--data`, `data info`): a prepared folder (pretraining or SFT) as it is, or a bundled set,
built on first use (about a second) into `$PRETRAIN_CACHE` (default `~/.cache/pretrain`) by its recipe here:
    bundled:tinyshakespeare            the corpus (sources.py: corpora/NAME.txt); trains its tokenizer, then prepares
    bundled:tiny-instruct (and -test)  an instruction set (sources.BUNDLED_RECORDS), prepared as an SFT folder with
                                       the bundled tiny-Shakespeare tokenizer
Each goes into a folder keyed by a hash of its recipe, its text's bytes, the folder format (and the sentencepiece
version, or the tokenizer's hash); later calls reuse it. Ranks that build it at the same time each write a private
staging folder and rename it into place; the losers use the winner's.

Tokenizers (`--tokenizer`, and every command that reads a model's text): a .model file or a folder holding one,
`bundled:NAME` (the bundled data's), or a run / checkpoint folder (the tokenizer of its training data).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import sentencepiece as spm

from pretrain.data.folders import FORMAT_VERSION, OutputExists, incomplete_reason, is_run_folder, read_meta
from pretrain.data.prepare import prepare_dataset
from pretrain.data.sft_prepare import SFT_VERSION, is_sft_folder, prepare_sft, read_sft_meta
from pretrain.data.sources import BUNDLED_PREFIX as PREFIX
from pretrain.data.sources import BUNDLED_RECORDS, bundled_corpus_path, bundled_records_name, records_spec
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import UserError
from pretrain.runs import CONFIG_FILE, find_checkpoint, read_stored_config

if TYPE_CHECKING:
    # annotations only: pretrain.config (through models/) and the loaders import torch, which resolving never needs
    from pretrain.config import ExperimentConfig
    from pretrain.data.loader import Dataset


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


@dataclass(frozen=True)
class SFTRecipe:
    """How a bundled instruction set (the records sources.records_spec finds) becomes an SFT folder; every field,
    and the records' file name, goes into the cache key."""

    tokenizer: str = "bundled:tinyshakespeare"
    template: str = "default"
    val_fraction: float = 0.1
    seed: int = 0


# One recipe for every bundled instruction set (the train and the held-out file alike).
SFT_RECIPES: dict[str, SFTRecipe] = {name: SFTRecipe() for name in BUNDLED_RECORDS}


def corpus_path(spec: str) -> str:
    """The text file of `bundled:NAME`."""
    _recipe(spec)
    return bundled_corpus_path(spec)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where bundled sets are prepared: `cache_dir`, else $PRETRAIN_CACHE, else ~/.cache/pretrain."""
    return Path(cache_dir or os.environ.get("PRETRAIN_CACHE") or "~/.cache/pretrain").expanduser()


def resolve_data_path(spec: str, cache_dir: str | None = None) -> str:
    """A prepared folder for `spec`: `bundled:NAME` (a corpus or an instruction set) is built on first use; anything
    else must be a complete prepared folder, pretraining or SFT."""
    if bundled_records_name(spec):
        return _instruction_folder(spec, cache_dir)
    if not spec.startswith(PREFIX):
        read_meta(spec)  # one-line UserError for a missing or interrupted folder
        return str(Path(spec).expanduser().absolute())
    return _corpus_folder(spec, cache_dir)


def resolve_tokenizer(spec: str, cache_dir: str | None = None) -> Tokenizer:
    """A tokenizer from a .model file or a folder holding one (a prepared data folder, an HF directory),
    `bundled:NAME` (the bundled data's tokenizer), or a run / checkpoint folder (its training data's)."""
    if isinstance(spec, str) and spec.startswith(PREFIX):
        return Tokenizer.load(resolve_data_path(spec, cache_dir))
    p = Path(spec).expanduser()
    if is_run_folder(p) and not any(p.glob("*.model")):
        return checkpoint_tokenizer(str(p))
    return Tokenizer.load(spec)


def checkpoint_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of the data a training checkpoint (step, checkpoints/ or run folder) was trained on."""
    folder = find_checkpoint(path)
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise UserError(f"{path}: no {CONFIG_FILE}; give a checkpoint, run folder or tokenizer (--tokenizer)")
    return training_tokenizer(read_stored_config(folder), path)


def training_tokenizer(cfg: ExperimentConfig, path: str) -> Tokenizer:
    """The tokenizer of the data `cfg` (a run's stored config) trains on; `path` names the run in errors."""
    try:
        return Tokenizer.load(resolve_data_path(cfg.data.paths[0], cfg.data.cache_dir))
    except UserError as e:
        raise UserError(f"{path}: cannot find the tokenizer of its data {cfg.data.paths[0]} ({e}); pass --tokenizer") from None


def open_dataset(paths: str | Sequence[str], seq_len: int, split: str = "train",
                 weights: Sequence[float] | None = None, cache_dir: str | None = None) -> Dataset:
    """One prepared folder (or `bundled:NAME`) as a TokenDataset; several as a BlendedDataset."""
    from pretrain.data.loader import BlendedDataset, TokenDataset  # imports torch: resolving alone never needs it

    paths = [paths] if isinstance(paths, str) else list(paths)
    datasets = [TokenDataset(resolve_data_path(p, cache_dir), seq_len, split) for p in paths]
    if len(datasets) == 1 and weights is None:
        return datasets[0]
    return BlendedDataset(datasets, weights)


def _corpus_folder(spec: str, cache_dir: str | None) -> str:
    """The prepared folder of the bundled corpus `spec`, built (tokenizer, then data) if missing."""
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


def _instruction_folder(spec: str, cache_dir: str | None) -> str:
    """The SFT folder of the bundled instruction set `spec`, prepared with its recipe's tokenizer if missing."""
    name = bundled_records_name(spec)
    recipe = SFT_RECIPES[name]
    tok = resolve_tokenizer(recipe.tokenizer, cache_dir)
    text = Path(records_spec(spec))
    key = hashlib.sha256(json.dumps(
        # "file" was a field of the recipe once (the records now are sources.py's); kept so existing caches stay valid
        {"recipe": {**asdict(recipe), "file": text.name}, "records_sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
         "tokenizer_sha256": tok.sha256, "format_version": FORMAT_VERSION, "sft_version": SFT_VERSION},
        sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / f"{name}-{key}"
    if is_sft_folder(folder):
        return str(folder)
    if folder.exists():
        raise UserError(damaged_cache_message(folder))
    with quiet_datasets():
        try:
            prepare_sft(spec, tok, str(folder), template=recipe.template, val_fraction=recipe.val_fraction,
                        seed=recipe.seed)
        except OutputExists:
            pass  # another rank published first
    read_sft_meta(folder)
    return str(folder)


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
