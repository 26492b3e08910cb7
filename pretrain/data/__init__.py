"""Data pipeline: sentencepiece tokenizers, prepared token folders, a deterministic resumable loader, SFT data.

Modules, lowest first, each importing only those above it:
    sources.py        where documents come from: local files, bundled:NAME texts, hub datasets (read via datasets;
                      plain text in pieces, directly)
    folders.py        the folders the package writes: prepared-folder format (read_meta, write_meta), telling folder
                      kinds apart (a tokenizer given as data ...), atomic publishing through a staging folder
    tokenizer.py      train_tokenizer, Tokenizer
    text_bytes.py     the UTF-8 bytes of text that targets cover, by the tokenizer's pieces (bits per byte)
    prepare.py        prepare_dataset (text -> train.bin / val.bin / meta.json), save_arrays
    batches.py        the micro-batch protocol between loaders and the training loop (LMBatch, IGNORE_INDEX)
    loader.py         TokenDataset, BlendedDataset, DataLoader, validation_batches, check_vocab, check_seq_len
    sft_format.py     instruction records -> conversations -> tokens and loss mask: formats, templates, encoding
    sft_prepare.py    prepare_sft (records -> an SFT folder) and the SFT folder format (read_sft_meta, folder_kind)
    sft_loader.py     SFTDataset, SFTSamples (packing), SFTLoader, SFTValidationBatches
    hf_tokenizer.py   a tokenizer as Hugging Face files, a template as a chat template
    choice_tasks.py   lm-eval-style multiple-choice task files
    resolve.py        the top: data paths (bundled:NAME -> a prepared folder in the cache, built by the recipes
                      there), tokenizer arguments (a file, bundled:NAME, a run folder), open_dataset
The commands are pretrain/cli/tokenizer.py (`pretrain tokenizer train`) and pretrain/cli/data.py
(`pretrain data prepare | prepare-sft | info`).

Names are imported on first use, so `import pretrain.data` does not pull in torch or datasets.
"""

from importlib import import_module

_EXPORTS = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "prepare_dataset": "prepare", "read_meta": "folders", "save_arrays": "prepare",
    "TokenDataset": "loader", "BlendedDataset": "loader", "DataLoader": "loader", "validation_batches": "loader",
    "check_vocab": "loader", "check_seq_len": "loader",
    "open_dataset": "resolve", "resolve_data_path": "resolve", "resolve_tokenizer": "resolve",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        # Lazy by design (PEP 562): `import pretrain.data` must not import torch (loader) or sentencepiece.
        return getattr(import_module(f"pretrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pretrain.data' has no attribute {name!r}")
