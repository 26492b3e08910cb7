"""Data pipeline: sentencepiece tokenizers, prepared token folders, a deterministic resumable loader, SFT data.

Modules, each importing only those above it:
    sources.py    where documents come from: local files, bundled:NAME texts, hub datasets (read via datasets)
    folders.py    the folders the package writes: prepared-folder format (read_meta, write_meta), telling folder
                  kinds apart (a tokenizer given as data ...), atomic publishing through a staging folder
    tokenizer.py  train_tokenizer, Tokenizer
    prepare.py    prepare_dataset (text -> train.bin / val.bin / meta.json), save_arrays
    bundled.py    resolve_data_path ("bundled:tinyshakespeare" -> a prepared folder in the cache)
    batches.py    the micro-batch protocol between loaders and the training loop (LMBatch, IGNORE_INDEX)
    loader.py     TokenDataset, BlendedDataset, DataLoader, validation_batches, check_vocab, check_seq_len
    sft.py        instruction data: templates, prepare_sft, SFT folders and loaders, bundled instruction sets
The commands (`pretrain tokenizer train`, `pretrain data prepare | prepare-sft | info`) are pretrain/cli/data.py.

Names are imported on first use, so `import pretrain.data` does not pull in torch or datasets.
"""

from importlib import import_module

_EXPORTS = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "prepare_dataset": "prepare", "read_meta": "folders", "save_arrays": "prepare",
    "TokenDataset": "loader", "BlendedDataset": "loader", "DataLoader": "loader", "validation_batches": "loader",
    "check_vocab": "loader", "check_seq_len": "loader", "open_dataset": "loader",
    "resolve_data_path": "bundled",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        # Lazy by design (PEP 562): `import pretrain.data` must not import torch (loader) or sentencepiece.
        return getattr(import_module(f"pretrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pretrain.data' has no attribute {name!r}")
