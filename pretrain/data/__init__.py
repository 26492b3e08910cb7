"""Data pipeline: sentencepiece tokenizers, prepared token folders, a deterministic resumable loader.

    tokenizer.py  train_tokenizer, Tokenizer
    prepare.py    prepare_dataset (text -> train.bin / val.bin / meta.json, atomically), read_meta
    loader.py     TokenDataset, BlendedDataset, DataLoader, validation_batches, check_vocab, check_seq_len
    bundled.py    resolve_data_path ("bundled:tinyshakespeare" -> a prepared folder in the cache)
    cli.py        `pretrain tokenizer train`, `pretrain data prepare`, `pretrain data info`

Names are imported on first use, so `import pretrain.data` does not pull in torch or datasets.
"""

from importlib import import_module

_EXPORTS = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "prepare_dataset": "prepare", "read_meta": "prepare", "save_arrays": "prepare",
    "TokenDataset": "loader", "BlendedDataset": "loader", "DataLoader": "loader", "validation_batches": "loader",
    "check_vocab": "loader", "check_seq_len": "loader", "open_dataset": "loader",
    "resolve_data_path": "bundled",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"pretrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pretrain.data' has no attribute {name!r}")
