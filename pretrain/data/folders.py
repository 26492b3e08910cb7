"""The folders the data package writes, how they are published, and how to tell them apart.

Prepared dataset (FORMAT_VERSION 1; `prepare.py` writes pretraining folders, `sft_prepare.py` SFT folders, meta["kind"] "sft"):
    train.bin, val.bin   every document's tokens followed by EOS, back to back, as raw uint16 (vocab <= 65536)
                         or uint32 little-endian; read with np.memmap(dtype=meta["dtype"])
    tokenizer.model      a copy of the tokenizer, so the folder alone can encode and decode
    meta.json            written last: tokenizer sha256/path/ids, vocab_size, dtype, token and document
                         counts per split, source and options, created_at, format_version
Trained tokenizer (`tokenizer.py`): tokenizer.model and tokenizer_meta.json (the sha256 of the model among others).

Every writer fills a hidden sibling folder `.NAME.partial-PID-RANDOM` (`staging_dir`) and renames it into place at
the end, so a folder at NAME either does not exist or is complete; only a staging folder can be half-written (its
writer was killed before it could remove it). A folder given where another kind is expected (a tokenizer folder
as data, data as a tokenizer's output ...) is refused with what it is and what to pass instead (`identify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.errors import UserError
from pretrain.files import publish_folder
from pretrain.runs import CHECKPOINTS_DIR, CONFIG_FILE, LATEST_FILE

FORMAT_VERSION = 1
META_FILE = "meta.json"
MODEL_FILE = "tokenizer.model"  # the model of a tokenizer folder, and the copy in a prepared folder
TOKENIZER_META_FILE = "tokenizer_meta.json"
SPLITS = ("train", "val")
SFT_KIND = "sft"
# Names a prepare writes; a non-empty folder holding anything else is the user's, never overwritten.
PREPARED_FILES = {"train.bin", "val.bin", META_FILE, MODEL_FILE, ".hf_cache"}
STAGING_MARK = ".partial-"  # in the name of a staging folder: .NAME.partial-PID-RANDOM


class OutputExists(UserError):
    """The output folder already holds a finished result and overwriting was not asked for."""


# ---------------------------------------------------------------------------------------------- telling folders apart


def is_tokenizer_dir(path: Path) -> bool:
    """Whether `path` holds a finished `train_tokenizer` output."""
    try:
        meta = json.loads((path / TOKENIZER_META_FILE).read_text())
        model = (path / MODEL_FILE).read_bytes()
        return hashlib.sha256(model).hexdigest() == meta["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def is_run_folder(path: Path) -> bool:
    """Whether `path` looks like a training run or checkpoint folder (its stored config, checkpoints/ or latest)."""
    return path.is_dir() and (
        (path / CONFIG_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir() or (path / LATEST_FILE).is_file())


def identify(path: Path) -> str:
    """What kind of folder `path` is: "data" or "sft" (complete prepared folders), "tokenizer" (holds a
    sentencepiece .model and no prepared data), "run" (a training run or checkpoint), "staging" (a writer's
    hidden staging folder), "partial" (only names of a prepared folder, incomplete), "empty", "missing", "file"
    or "other"."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    if STAGING_MARK in path.name and path.name.startswith("."):
        return "staging"
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty"
    if incomplete_reason(path) is None:
        return SFT_KIND if _read_json(path / META_FILE).get("kind") == SFT_KIND else "data"
    if is_run_folder(path):
        return "run"
    if any(n.endswith(".model") for n in names) and not names & {"train.bin", "val.bin", META_FILE}:
        return "tokenizer"
    if names & {"train.bin", "val.bin", META_FILE}:
        return "partial"
    return "other"


def describe(path: Path, kind: str | None = None) -> str:
    """`path`'s kind (`identify`) as words: "a tokenizer folder (tokenizer.model, tokenizer_meta.json)" ..."""
    path = Path(path)
    kind = kind or identify(path)
    if kind == "tokenizer":
        models = sorted(p.name for p in path.glob("*.model"))
        if is_tokenizer_dir(path):
            return f"a tokenizer folder ({MODEL_FILE}, {TOKENIZER_META_FILE})"
        if (path / "config.json").is_file():  # `pretrain export-hf`'s output, or another HF model with one
            return f"a Hugging Face model directory (config.json, {', '.join(models)})"
        return f"a folder holding a tokenizer ({', '.join(models)})"
    return {
        "data": "a prepared dataset", SFT_KIND: "a prepared SFT dataset", "run": "a training run folder",
        "staging": "the staging folder of a prepare or tokenizer training that is running or was interrupted",
        "partial": "an incomplete prepared folder", "empty": "an empty folder", "missing": "missing",
        "file": "a file", "other": "a folder of other files",
    }[kind]


# ---------------------------------------------------------------------------------------------- publishing


@contextmanager
def staging_dir(
    out: Path, overwrite: bool, is_complete: Callable[[Path], bool], what: str, known: set[str] = PREPARED_FILES,
    kind: str | None = None,
):
    """Yield a hidden sibling folder to write into; on success rename it to `out` atomically, else delete it.

    Raises OutputExists if `out` already holds a finished result (unless `overwrite`), also when a concurrent
    writer (another rank) published first; the caller may then simply use that folder. `kind` ("data", "sft" or
    "tokenizer": what is written) refuses, even with `overwrite`, an `out` that is another kind of folder.
    """
    out = Path(out).expanduser().absolute()
    _check_target(out, overwrite, is_complete, what, known, kind)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    published = False
    try:
        yield tmp
        _publish(tmp, out, overwrite, is_complete, what)
        published = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful publish
        if not published:  # a failure leaves no trace: also the parent folders made for `out`
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break


# Kinds of folder that are another writer's finished work: refused as the output of a different kind.
_FAMILY = {"data": "data", SFT_KIND: "data", "tokenizer": "tokenizer", "run": "run", "staging": "staging"}


def _check_target(out: Path, overwrite: bool, is_complete, what: str, known: set[str], kind: str | None) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if is_complete(out):
        if overwrite:
            return
        raise OutputExists(f"{out} already holds {what}; pass --overwrite to replace it, or choose another output folder")
    found = identify(out)
    if kind is not None and found in _FAMILY and _FAMILY[found] != _FAMILY[kind]:
        raise UserError(f"{out} is {describe(out, found)}, not {what}; choose another output folder")
    if not names <= known:
        raise UserError(f"{out} is a non-empty folder that is not {what}; choose another output folder")
    if overwrite:
        return
    if kind is not None and found in _FAMILY:  # a finished folder of the same family: SFT vs pretraining data ...
        raise UserError(f"{out} is {describe(out, found)}; pass --overwrite to replace it with {what}, or choose "
                        "another output folder")
    raise UserError(
        f"{out} holds {', '.join(sorted(names))} but is not {what} (no complete metadata, e.g. a copy cut short); "
        "pass --overwrite to replace it, or choose another output folder"
    )


def _publish(tmp: Path, out: Path, overwrite: bool, is_complete, what: str) -> None:
    """The finished staging folder `tmp` made durable and renamed to `out` (pretrain/files.py's folder publish)."""
    try:
        publish_folder(tmp, out, replace=overwrite)
    except FileExistsError:
        if is_complete(out):  # a concurrent writer won the race with an equal result
            raise OutputExists(f"{out} already holds {what} (written concurrently)") from None
        raise UserError(f"could not move the result into {out}: it exists and is not an empty folder") from None
    except OSError as e:
        raise UserError(f"could not move the result into {out}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------- prepared folders


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_meta(folder: Path, tokenizer: dict, dtype, tokens: dict, docs: dict, source: str, options: dict,
               val_fraction: float, seed: int) -> dict:
    meta = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source,
        "source_options": options,
        "tokenizer": {"file": MODEL_FILE, **tokenizer},
        "vocab_size": tokenizer["vocab_size"],
        "dtype": np.dtype(dtype).name,
        "eos_appended": True,
        "val_fraction": val_fraction,
        "seed": seed,
        "num_tokens": sum(tokens.values()),
        "num_documents": sum(docs.values()),
        "splits": {s: {"file": f"{s}.bin", "num_tokens": tokens[s], "num_documents": docs[s]} for s in SPLITS},
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a complete prepared folder, or None when it is."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return f"no {META_FILE}"
    except (OSError, ValueError):
        return f"unreadable {META_FILE}"
    if not isinstance(meta, dict) or not meta.get("complete"):
        return f"{META_FILE} is not marked complete"
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for name in SPLITS:
            info = meta["splits"][name]
            f = path / info["file"]
            if not f.is_file() or f.stat().st_size != info["num_tokens"] * itemsize:
                return f"{info['file']} is missing or does not hold {info['num_tokens']} tokens"
    except (KeyError, TypeError):
        return f"{META_FILE} lacks fields"
    return None


def is_prepared(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and incomplete_reason(path) is None


def read_meta(path: str | os.PathLike) -> dict:
    """The `meta.json` of a complete prepared folder; a one-line UserError, saying what `path` is instead and
    what to pass, for anything else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data {p}: no such folder; create it with `pretrain data prepare --out {p}`")
    kind = identify(p)
    if kind in ("data", SFT_KIND):
        meta = json.loads((p / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"data {p}: format version {meta.get('format_version')} but this version reads {FORMAT_VERSION}; "
                "re-run `pretrain data prepare`"
            )
        return meta
    raise UserError(f"data {p}: {not_data_message(p, kind)}")


def not_data_message(p: Path, kind: str) -> str:
    """What `p` (of `kind`, not a complete prepared folder) is, and what to pass instead of it as data."""
    prepare = "`pretrain data prepare --source TEXT --tokenizer TOKENIZER --out DIR`"
    if kind == "file":
        what = "a sentencepiece tokenizer file" if p.suffix == ".model" else "a file"
        return (f"{what}, not a prepared dataset folder (expected a folder with {META_FILE}, train.bin, val.bin); "
                f"tokenize text into one with {prepare}")
    if kind == "tokenizer":
        return (f"{describe(p, kind)}, not a prepared dataset; tokenize text with it "
                f"(`pretrain data prepare --source TEXT --tokenizer {p} --out DIR`) and pass DIR")
    if kind == "run":
        return ("a training run folder, not a prepared dataset; pass the prepared folder it trained on (data.paths "
                f"in its {CONFIG_FILE})")
    if kind == "staging":
        return ("the staging folder of a `pretrain data prepare` that is still running or was killed (a finished "
                "prepare renames it to its --out); pass the --out folder, and delete this one if no prepare is running")
    if kind == "partial":
        return (f"an incomplete prepared folder ({incomplete_reason(p)}); a prepare publishes only whole folders, "
                f"so this one was cut short while being copied or was changed since: copy it again, or re-create it "
                f"with `pretrain data prepare ... --out {p} --overwrite`")
    if kind == "empty":
        return f"an empty folder, not a prepared dataset; create one with {prepare}"
    return (f"not a prepared dataset folder (no {META_FILE}; expected {META_FILE}, train.bin, val.bin); create one "
            f"with {prepare}")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
