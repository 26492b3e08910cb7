"""Turn text into a prepared dataset folder (folders.py has the format): flat memory-mapped token arrays plus
`meta.json`, written into a staging folder and renamed into place at the end.

Documents come from sources.py (local files, `bundled:NAME`, a hub dataset); each becomes its tokens and EOS.
Each non-empty document goes to train or val by a hash of (seed, document index), the same with and without
streaming or worker processes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import deque
from contextlib import closing
from pathlib import Path

import numpy as np

from pretrain.data.backends import DEFAULT_BACKEND, encoder
from pretrain.data.folders import MODEL_FILE, SPLITS, is_prepared, staging_dir, token_dtype, write_meta
from pretrain.data.sources import (SampleBy, Source, check_field, check_text, check_utf8, load_source,
                                   reads_text_directly, resolve_source, text_pieces)
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.notice import Progress

# Documents per encode call: large enough for the tokenizers backend to spread over its threads (~1-3 MB of text).
ENCODE_BATCH = 16384


def prepare_dataset(
    source: str,
    tokenizer: str | Tokenizer,
    out_dir: str,
    text_field: str = "text",
    val_fraction: float = 0.05,
    num_proc: int | None = None,
    seed: int = 0,
    sample_by: SampleBy = "paragraph",
    *,
    streaming: bool = False,
    split: str = "train",
    subset: str | None = None,
    max_documents: int | None = None,
    overwrite: bool = False,
    backend: str = DEFAULT_BACKEND,
    progress: bool = True,
) -> str:
    """Tokenize `source` (EOS after every document) into a prepared folder at `out_dir`; return its path.

    `source` is a local .txt/.jsonl/.json/.parquet/.csv file or folder of them, `bundled:NAME`, or a hub
    dataset name (`subset`, `split`, `streaming` apply). For text files `sample_by` sets what one document
    is. Each non-empty document goes to val with probability `val_fraction`, decided by a hash of (seed,
    document index); the first goes to train and, when none was picked, the last goes to val.
    `backend` (backends.py) tokenizes: tokenizers or sentencepiece, the same ids and files. `num_proc` is the number
    of tokenizer threads (default: one per core, at most 16). `progress`: a line with MB/s once it takes over 2 s.
    """
    if sample_by not in ("line", "paragraph", "document"):
        raise UserError(f"--sample-by {sample_by!r} is not one of line, paragraph, document")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if num_proc is not None and num_proc < 1:
        raise UserError(f"--num-proc {num_proc} must be >= 1")
    if max_documents is not None and max_documents < 1:
        raise UserError(f"--max-docs {max_documents} must be >= 1")
    src = resolve_source(source, split=split, subset=subset)
    if src.local:
        if all(f.stat().st_size == 0 for f in src.files):
            raise UserError(f"{src.label}: empty dataset (the files hold no bytes)")
        check_utf8(src.files)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if tok.eos_id < 0:
        raise UserError(f"{tok.path}: the tokenizer has no EOS piece, which prepare appends to every document")
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir).expanduser().absolute()

    enc = encoder(tok, backend, threads=num_proc or min(os.cpu_count() or 1, 16))
    with staging_dir(out, overwrite, is_prepared, what="a prepared dataset", kind="data") as tmp:
        strip = src.builder == "text" and sample_by == "paragraph"
        # Local files get a throwaway datasets cache inside the staging folder; hub downloads keep the user's
        # cache so that they are not fetched again. Plain text read by paragraph needs no datasets at all.
        cache = tmp / ".hf_cache"
        if strip and reads_text_directly(src):
            rows = (([text], nbytes) for text, nbytes in text_pieces(src))
        else:
            cache.mkdir()
            ds = load_source(src, sample_by=sample_by, streaming=streaming, cache_dir=str(cache) if src.local else None)
            rows = _stream_rows(ds, src, text_field) if streaming else _arrow_rows(ds, src, text_field)
        total = sum(f.stat().st_size for f in src.files) if src.local else None
        meter = Progress("tokenizing", total, enabled=progress)
        with _SplitWriter(tmp, dtype) as writer:
            batches = _batches(rows, strip, max_documents)
            _write_documents(batches, enc, writer, val_fraction, seed, strip, meter, not streaming, max_documents)
        meter.close()
        rows = ds = None  # the datasets cache's files are closed before it goes
        shutil.rmtree(cache, ignore_errors=True)
        if writer.docs["train"] == 0:
            raise UserError(f"{src.label}: empty dataset (no non-empty text in field {text_field!r})")
        if val_fraction > 0 and writer.docs["val"] == 0:
            raise UserError(_empty_val_message(src, sample_by, val_fraction, writer.docs["train"], streaming))
        (tmp / MODEL_FILE).write_bytes(tok.model_bytes)
        # The backend is not recorded: both write the same files.
        options = dict(text_field=text_field, streaming=streaming, max_documents=max_documents)
        if src.builder == "text":
            options["sample_by"] = sample_by
        if not src.local:
            options.update(split=split, subset=subset)
        write_meta(tmp, tok.info(), dtype, writer.tokens, writer.docs, src.label, options, val_fraction, seed)
    return str(out)


def _empty_val_message(src: Source, sample_by: str, val_fraction: float, n_docs: int, streaming: bool) -> str:
    fixes = ["give more documents"]
    if src.builder == "text":
        finer = {"document": "--sample-by paragraph or line", "paragraph": "--sample-by line"}.get(sample_by)
        if finer:
            fixes.append(f"cut the text into more documents with {finer}")
    if streaming:
        fixes.append("a larger --val-fraction")
    fixes.append("pass --val-fraction 0 to have no validation split")
    return (
        f"{src.label}: the validation split came out empty ({n_docs} document{'s' if n_docs != 1 else ''}, "
        f"--val-fraction {val_fraction:g}); {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )


def save_arrays(
    out_dir: str,
    splits: dict[str, np.ndarray],
    vocab_size: int,
    *,
    num_documents: dict[str, int] | None = None,
    tokenizer: Tokenizer | None = None,
    source: str = "arrays",
    overwrite: bool = False,
) -> str:
    """Write already-tokenized arrays ({"train": ..., "val": ...}) as a prepared folder (tests, custom pipelines)."""
    dtype = token_dtype(vocab_size)
    arrays = {s: np.asarray(splits.get(s, np.zeros(0, np.int64))) for s in SPLITS}
    for s, a in arrays.items():
        if a.size and (a.min() < 0 or a.max() >= vocab_size):
            raise UserError(f"save_arrays: split {s} holds ids outside [0, {vocab_size})")
    with staging_dir(Path(out_dir), overwrite, is_prepared, what="a prepared dataset", kind="data") as tmp:
        for s, a in arrays.items():
            a.astype(dtype).tofile(tmp / f"{s}.bin")
        tok_info = tokenizer.info() if tokenizer else dict(path=None, sha256=None, vocab_size=vocab_size,
                                                           bos_id=-1, eos_id=-1, pad_id=-1, unk_id=-1)
        tok_info["vocab_size"] = vocab_size
        if tokenizer:
            (tmp / MODEL_FILE).write_bytes(tokenizer.model_bytes)
        docs = num_documents or {s: int(a.size > 0) for s, a in arrays.items()}
        write_meta(tmp, tok_info, dtype, {s: int(a.size) for s, a in arrays.items()}, docs, source, {}, 0.0, 0)
    return str(Path(out_dir).expanduser().absolute())


class _SplitWriter:
    """Appends token arrays to train.bin / val.bin and counts tokens and documents."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.dtype = dtype
        self.files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}
        self.docs = {s: 0 for s in SPLITS}

    def write(self, split: str, tokens: np.ndarray, num_docs: int) -> None:
        if tokens.size:
            tokens.astype(self.dtype, copy=False).tofile(self.files[split])
        self.tokens[split] += int(tokens.size)
        self.docs[split] += num_docs

    def move_last_to_val(self, tokens: np.ndarray) -> None:
        """Move the document just written to train (its `tokens`) to val: cut it off the end of train.bin."""
        f = self.files["train"]
        f.flush()
        f.truncate(f.tell() - tokens.size * np.dtype(self.dtype).itemsize)
        f.seek(0, os.SEEK_END)
        self.tokens["train"] -= int(tokens.size)
        self.docs["train"] -= 1
        self.write("val", tokens, 1)

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()


def _clean(text: str | None, strip_newlines: bool) -> str | None:
    """None for a blank document; paragraphs lose the newlines around them (EOS marks their end instead)."""
    if text is None or not text.strip():
        return None
    # The text builder leaves a trailing newline on a file's last paragraph and a leading one after "\n\n\n".
    return text.strip("\n") if strip_newlines else text


def split_paragraphs(text: str) -> list[str]:
    """The paragraphs of `text`: runs of lines separated by lines that are empty or hold only whitespace.

    WikiText-style text separates paragraphs with ' \\n' lines, not empty ones; the text builder splits on
    blank lines ("\\n\\n") only. The lines of a paragraph keep their text, spaces included; the newlines
    around paragraphs go (EOS marks their end instead).
    """
    return _PARAGRAPH(text)


# A run of lines that each hold a non-whitespace character (the regex's \s is str.isspace, as str.strip's).
_PARAGRAPH = re.compile(r"^[^\S\n]*\S[^\n]*(?:\n[^\S\n]*\S[^\n]*)*", re.MULTILINE).findall


def _batches(rows, strip: bool, max_documents: int | None):
    """(texts, UTF-8 bytes read for them) in order, in batches, from `rows`; a text is a str or None (no text), and a
    document, cut to `max_documents` here, unless `strip` (text files read by paragraph): then the encoder cuts each
    text into paragraphs (`split_paragraphs`) and `_write_documents` counts those."""
    left = None if strip else max_documents
    for texts, nbytes in rows:
        if left is not None:
            texts = texts[:left]
            left -= len(texts)
        yield texts, nbytes
        if left == 0:
            return


def _arrow_rows(ds, src: Source, text_field: str):
    """The text column of a cached dataset in batches of ENCODE_BATCH rows, read as arrow (no per-row python)."""
    import datasets  # 0.6 s to import: only tokenizing needs it, not the training runs that import this module
    import pyarrow.compute as pc  # as datasets: only tokenizing needs it

    check_field(src, text_field, ds.column_names)
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"{src.label}: field {text_field!r} holds {feature}, not text; pass --text-field")
    for batch in ds.select_columns([text_field]).with_format("arrow").iter(ENCODE_BATCH):
        column = batch.column(text_field)
        yield column.to_pylist(), pc.sum(pc.binary_length(column)).as_py() or 0


def _stream_rows(ds, src: Source, text_field: str):
    """The texts of a streamed dataset in batches of ENCODE_BATCH rows, each checked to be text."""
    batch: list[str | None] = []
    nbytes = 0
    for i, ex in enumerate(ds):
        if i == 0:
            check_field(src, text_field, list(ex))
        text = ex.get(text_field)
        batch.append(None if text is None else check_text(src, text_field, text))
        nbytes += len(text.encode("utf-8")) if text else 0
        if len(batch) == ENCODE_BATCH:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _write_documents(batches, enc, writer: _SplitWriter, val_fraction: float, seed: int, strip: bool,
                     meter: Progress, last_to_val: bool, max_documents: int | None = None) -> None:
    """Tokenize each batch of documents (blank ones are skipped but keep their index) and append each document's
    tokens and EOS to its split, as whole arrays. The split of document i is `assign_val`'s: hashed from (seed, i),
    the first document to train and, with `last_to_val` (all but streaming), the last to val if none went there.
    With `strip` the encoder cuts the texts into paragraphs (in its worker processes: the cut is a regex pass over
    the whole text), which are the documents, the first `max_documents` of them kept."""
    index, seen_train = 0, False
    left = max_documents if strip else None  # `_batches` cut the others
    last = np.zeros(0, np.int64)  # the tokens of the last non-empty document
    read = deque()  # (kept, documents, bytes) of each batch handed to the encoder, in order

    def documents():
        for texts, nbytes in batches:
            if strip:  # split_paragraphs' paragraphs, none blank, counted when they come back
                read.append((None, None, nbytes))
                yield [t for t in texts if t is not None]
                continue
            docs = [_clean(t, strip) for t in texts]
            kept = np.flatnonzero([d is not None for d in docs])
            read.append((kept, len(texts), nbytes))
            yield [d for d in docs if d is not None]

    with closing(enc.encode_stream(documents(), eos=True, split=split_paragraphs if strip else None)) as encoded:
        for flat, lengths in encoded:
            kept, n_texts, nbytes = read.popleft()
            if kept is None:
                if left is not None:
                    lengths = lengths[:left]
                    flat = flat[:int(lengths.sum())]
                    left -= len(lengths)
                kept, n_texts = np.arange(len(lengths)), len(lengths)
            val = _doc_uniform(seed, index + kept) < val_fraction
            if not seen_train and len(lengths):
                val[0], seen_train = False, True  # the first document always trains
            on_val = np.repeat(val, lengths)
            writer.write("train", flat[~on_val], int((~val).sum()))
            writer.write("val", flat[on_val], int(val.sum()))
            if len(lengths):
                last = flat[flat.size - lengths[-1]:]
            index += n_texts
            meter.add(nbytes)
            if left == 0:
                break
    if last_to_val and val_fraction > 0 and writer.docs["val"] == 0 and writer.docs["train"] >= 2:
        writer.move_last_to_val(last)


def assign_val(nonempty: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Per-document val flags: hashed coin flips, first non-empty doc to train, at least one val doc if asked."""
    is_val = (_doc_uniform(seed, np.arange(len(nonempty))) < val_fraction) & nonempty
    docs = np.flatnonzero(nonempty)
    if len(docs):
        is_val[docs[0]] = False
    if val_fraction > 0 and len(docs) >= 2 and not is_val.any():
        is_val[docs[-1]] = True
    return is_val


def _doc_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers from (seed, document index) alone, so chunking and streaming agree."""
    with np.errstate(over="ignore"):
        x = _splitmix64(index.astype(np.uint64) ^ _splitmix64(np.array([seed], np.uint64)))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
