"""`pretrain data prepare-sft`: instruction records -> an SFT folder, and that folder's format.

Folder format (the conventions of `data prepare`, folders.py: staging folder renamed into place, meta.json written
last, FORMAT_VERSION 1, meta["kind"] == "sft"):
    train.bin, val.bin             every example's tokens back to back, uint16 (vocab <= 65536) or uint32
    train.mask.bin, val.mask.bin   one uint8 per token: 1 = the token is a trained next-token target
    train.idx, val.idx             int64 start offsets of the examples, number of examples + 1 entries
    tokenizer.model, meta.json     meta.json adds format, template, train_on_prompt, seq_len, overlong and the
                                   examples read / kept / truncated / dropped, per split the examples, trained
                                   tokens and the longest example in positions (tokens - 1)
An example (its tokens and loss mask: sft_format.py) of n tokens takes n - 1 model positions (inputs
tokens[:-1], targets tokens[1:]). With `seq_len` an example that needs more positions is an error, or truncated
(its end cut; dropped if no trained token is left) or dropped, as `overlong` says, and counted.

The tokenizer comes resolved (a `Tokenizer`): `bundled:NAME` or a run folder given as the tokenizer is
resolve.py's business, which sits above this module and prepares the bundled instruction sets with it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pretrain.data.backends import DEFAULT_BACKEND, encoder
from pretrain.data.folders import (
    META_FILE, MODEL_FILE, SFT_KIND, is_prepared, read_meta, staging_dir, token_dtype, write_meta,
)
from pretrain.data.prepare import assign_val
from pretrain.data.sft_format import FORMATS, check_tokenizer, encode_conversations, get_template, iter_records
from pretrain.data.sources import records_spec, resolve_source
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

KIND = SFT_KIND
SFT_VERSION = 1
OVERLONG = ("error", "truncate", "drop")
FILES = {"train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "train.idx", "val.idx", META_FILE, MODEL_FILE,
         ".hf_cache"}
SPLITS = ("train", "val")


def prepare_sft(
    source: str,
    tokenizer: Tokenizer,
    out_dir: str,
    fmt: str = "auto",
    template: str = "default",
    *,
    train_on_prompt: bool = False,
    seq_len: int | None = None,
    overlong: str = "error",
    val_fraction: float = 0.05,
    seed: int = 0,
    split: str = "train",
    subset: str | None = None,
    max_examples: int | None = None,
    num_proc: int | None = None,
    overwrite: bool = False,
    backend: str = DEFAULT_BACKEND,
) -> str:
    """Tokenize instruction records into an SFT folder at `out_dir` (see the module docstring) with the resolved
    `tokenizer` (resolve.resolve_tokenizer); return the folder's path.

    Each kept example goes to val with probability `val_fraction`, decided by a hash of (seed, record index), as
    `data prepare` does for documents. Nothing is written unless every record is valid. `backend` (backends.py):
    tokenizers or sentencepiece, the same ids and files."""
    tmpl = get_template(template)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise UserError(f"--overlong {overlong!r} is not one of {', '.join(OVERLONG)}")
    if seq_len is not None and seq_len < 2:
        raise UserError(f"--seq-len {seq_len} must be >= 2")
    if overlong != "error" and seq_len is None:
        raise UserError(f"--overlong {overlong} needs --seq-len (the data.seq_len you will train with)")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples {max_examples} must be >= 1")
    check_tokenizer(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    enc = encoder(tokenizer, backend, threads=num_proc or min(os.cpu_count() or 1, 16))
    out = Path(out_dir).expanduser().absolute()
    with staging_dir(out, overwrite, is_sft_folder, what="a prepared SFT dataset", known=FILES, kind=KIND) as tmp:
        cache = tmp / ".hf_cache"
        cache.mkdir()
        examples: list[tuple[np.ndarray, np.ndarray]] = []
        kept_flags: list[bool] = []
        counts = {"read": 0, "kept": 0, "truncated": 0, "dropped": 0}
        resolved = fmt
        label = resolve_source(records_spec(source), split=split, subset=subset).label
        for start, resolved, convs in iter_records(source, fmt, split, subset, str(cache), limit=max_examples):
            for i, (ids, mask) in enumerate(encode_conversations(tokenizer, tmpl, convs, train_on_prompt, encoder=enc)):
                counts["read"] += 1
                if seq_len is not None and len(ids) - 1 > seq_len:
                    if overlong == "error":
                        raise UserError(
                            f"{label} record {start + i + 1}: {len(ids)} tokens need {len(ids) - 1} positions, more "
                            f"than --seq-len {seq_len}; pass --overlong truncate or --overlong drop, or a larger --seq-len"
                        )
                    if overlong == "truncate" and mask[1:seq_len + 1].any():
                        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
                        counts["truncated"] += 1
                    else:  # dropped, or truncation would leave nothing to train
                        counts["dropped"] += 1
                        kept_flags.append(False)
                        continue
                examples.append((ids, mask))
                kept_flags.append(True)
        counts["kept"] = len(examples)
        if not examples:
            why = f" ({counts['dropped']} dropped as longer than --seq-len {seq_len})" if counts["dropped"] else ""
            raise UserError(f"{label}: no examples to write{why}")
        is_val = assign_val(np.array(kept_flags, bool), val_fraction, seed)[np.array(kept_flags, bool)]
        if val_fraction > 0 and not is_val.any():
            raise UserError(f"{label}: the validation split came out empty ({len(examples)} example"
                            f"{'s' if len(examples) != 1 else ''}, --val-fraction {val_fraction:g}); give more "
                            "examples, a larger --val-fraction, or pass --val-fraction 0")
        split_info = {}
        for name, chosen in (("train", ~is_val), ("val", is_val)):
            picked = [examples[j] for j in np.flatnonzero(chosen)]
            lengths = np.array([len(ids) for ids, _ in picked], np.int64)
            tokens = np.concatenate([ids for ids, _ in picked]) if picked else np.zeros(0, np.int64)
            masks = np.concatenate([m for _, m in picked]) if picked else np.zeros(0, bool)
            tokens.astype(dtype).tofile(tmp / f"{name}.bin")
            masks.astype(np.uint8).tofile(tmp / f"{name}.mask.bin")
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / f"{name}.idx")
            split_info[name] = {
                "num_examples": len(picked), "num_trained_tokens": int(masks.sum()),
                "max_example_positions": int(lengths.max() - 1) if len(lengths) else 0,
                "mask_file": f"{name}.mask.bin", "index_file": f"{name}.idx", "num_tokens": int(tokens.size),
            }
        (tmp / MODEL_FILE).write_bytes(tokenizer.model_bytes)
        shutil.rmtree(cache, ignore_errors=True)
        options = dict(format=resolved, template=template, train_on_prompt=train_on_prompt, seq_len=seq_len,
                       overlong=overlong, max_examples=max_examples)
        if not resolve_source(records_spec(source), split=split, subset=subset).local:
            options.update(split=split, subset=subset)
        meta = write_meta(tmp, tokenizer.info(), dtype, {s: split_info[s]["num_tokens"] for s in SPLITS},
                          {s: split_info[s]["num_examples"] for s in SPLITS}, label, options, val_fraction, seed)
        for s in SPLITS:
            meta["splits"][s].update(split_info[s])
        meta.update(kind=KIND, sft_version=SFT_VERSION, format=resolved, template=template,
                    train_on_prompt=train_on_prompt, examples=counts)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return str(out)


# ---------------------------------------------------------------------------------------------- SFT folders


def is_sft_folder(path) -> bool:
    """Whether `path` is a complete prepared SFT folder."""
    path = Path(path)
    if not is_prepared(path):
        return False
    try:
        read_sft_meta(path)
        return True
    except UserError:
        return False


def folder_kind(path: str) -> str:
    """"sft" or "pretrain" for a complete prepared folder (one-line error for anything else)."""
    return KIND if read_meta(path).get("kind") == KIND else "pretrain"


def read_sft_meta(path) -> dict:
    """The meta.json of a complete SFT folder; a one-line UserError for anything else."""
    meta = read_meta(path)
    if meta.get("kind") != KIND:
        raise UserError(f"data {path}: a pretraining folder, not an SFT one; prepare instruction data with "
                        "`pretrain data prepare-sft`")
    if meta.get("sft_version") != SFT_VERSION:
        raise UserError(f"data {path}: SFT format version {meta.get('sft_version')} but this version reads "
                        f"{SFT_VERSION}; re-run `pretrain data prepare-sft`")
    for s in SPLITS:
        info = meta["splits"][s]
        for name, size in ((info["mask_file"], info["num_tokens"]), (info["index_file"], 8 * (info["num_examples"] + 1))):
            f = Path(path) / name
            if not f.is_file() or f.stat().st_size != size:
                raise UserError(f"data {path}: {name} is missing or does not match meta.json; a prepare-sft publishes "
                                "only whole folders, so this one was cut short while being copied or was changed "
                                "since: copy it again, or re-create it with `pretrain data prepare-sft ... --out "
                                f"{path} --overwrite`")
    return meta
