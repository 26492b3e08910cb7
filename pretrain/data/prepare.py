"""Turn text into a prepared dataset folder (folders.py has the format): flat memory-mapped token arrays plus
`meta.json`, written into a staging folder and renamed into place at the end.

Documents come from sources.py (local files, `bundled:NAME`, a hub dataset); each becomes its tokens and EOS.
Each non-empty document goes to train or val by a hash of (seed, document index), the same with and without
streaming or worker processes.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import numpy as np

from pretrain.data.folders import MODEL_FILE, SPLITS, is_prepared, staging_dir, token_dtype, write_meta
from pretrain.data.sources import SampleBy, Source, check_field, check_text, check_utf8, load_source, resolve_source
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

ENCODE_BATCH = 1000


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
) -> str:
    """Tokenize `source` (EOS after every document) into a prepared folder at `out_dir`; return its path.

    `source` is a local .txt/.jsonl/.json/.parquet/.csv file or folder of them, `bundled:NAME`, or a hub
    dataset name (`subset`, `split`, `streaming` apply). For text files `sample_by` sets what one document
    is. Each non-empty document goes to val with probability `val_fraction`, decided by a hash of (seed,
    document index); the first goes to train and, when none was picked, the last goes to val.
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

    with staging_dir(out, overwrite, is_prepared, what="a prepared dataset", kind="data") as tmp:
        # Local files and the tokenized intermediate get a throwaway datasets cache inside the staging
        # folder; hub downloads keep the user's cache so that they are not fetched again.
        cache = tmp / ".hf_cache"
        cache.mkdir()
        ds = load_source(src, sample_by=sample_by, streaming=streaming, cache_dir=str(cache) if src.local else None)
        strip = src.builder == "text" and sample_by == "paragraph"
        if strip:
            ds = _split_whitespace_paragraphs(ds, streaming, num_proc, cache_file=str(cache / "paragraphs.arrow"))
        with _SplitWriter(tmp, dtype) as writer:
            if streaming:
                _write_streaming(ds, src, tok, text_field, writer, val_fraction, seed, num_proc, max_documents, strip)
            else:
                _write_mapped(ds, src, tok, text_field, writer, val_fraction, seed, num_proc, max_documents, strip,
                              cache_file=str(cache / "tokens.arrow"))
        del ds
        shutil.rmtree(cache, ignore_errors=True)
        if writer.docs["train"] == 0:
            raise UserError(f"{src.label}: empty dataset (no non-empty text in field {text_field!r})")
        if val_fraction > 0 and writer.docs["val"] == 0:
            raise UserError(_empty_val_message(src, sample_by, val_fraction, writer.docs["train"], streaming))
        (tmp / MODEL_FILE).write_bytes(tok.model_bytes)
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

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()


class _Encode:
    """datasets.map function: texts -> token ids + EOS; blank documents give [] and are dropped later."""

    def __init__(self, tok: Tokenizer, text_field: str, strip_newlines: bool):
        self.tok, self.text_field, self.strip_newlines = tok, text_field, strip_newlines

    def __call__(self, batch: dict) -> dict:
        texts = [_clean(t, self.strip_newlines) for t in batch[self.text_field]]
        keep = [i for i, t in enumerate(texts) if t is not None]
        ids: list[list[int]] = [[] for _ in texts]
        for i, row in zip(keep, self.tok.encode_batch([texts[i] for i in keep], eos=True)):
            ids[i] = row
        return {"ids": ids}


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
    paragraphs, lines = [], []
    for line in text.split("\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    if lines:
        paragraphs.append("\n".join(lines))
    return paragraphs


def _split_paragraph_rows(batch: dict) -> dict:
    """datasets.map function: every row of the text builder's paragraph mode -> its paragraphs, one per row."""
    return {"text": [p for text in batch["text"] if text is not None for p in split_paragraphs(text)]}


def _split_whitespace_paragraphs(ds, streaming: bool, num_proc: int | None, cache_file: str):
    """`ds` (the text builder, sample_by="paragraph") with its rows cut at whitespace-only lines too."""
    if streaming:
        return ds.map(_split_paragraph_rows, batched=True, batch_size=ENCODE_BATCH, remove_columns=["text"])
    import datasets  # 0.6 s to import: only tokenizing needs it, not the training runs that import this module

    return ds.map(
        _split_paragraph_rows, batched=True, batch_size=ENCODE_BATCH, num_proc=_num_proc(num_proc, len(ds)) or None,
        remove_columns=ds.column_names, features=datasets.Features({"text": datasets.Value("string")}),
        cache_file_name=cache_file, desc="Splitting paragraphs",
    )


def _write_mapped(ds, src, tok, text_field, writer, val_fraction, seed, num_proc, max_documents, strip, cache_file) -> None:
    import datasets  # 0.6 s to import: only tokenizing needs it, not the training runs that import this module
    import pyarrow as pa  # as datasets: only tokenizing needs it
    import pyarrow.compute as pc  # as datasets: only tokenizing needs it

    check_field(src, text_field, ds.column_names)
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"{src.label}: field {text_field!r} holds {feature}, not text; pass --text-field")
    if max_documents is not None and len(ds) > max_documents:
        ds = ds.select(range(max_documents))
    ids = ds.map(
        _Encode(tok, text_field, strip), batched=True, batch_size=ENCODE_BATCH,
        num_proc=_num_proc(num_proc, len(ds)) or None,
        remove_columns=ds.column_names, features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
        cache_file_name=cache_file, desc="Tokenizing",
    ).with_format("arrow")
    batch_rows = 1 << 16
    lengths = np.concatenate(  # no rows at all: a text file of whitespace only is caught as empty below
        [np.zeros(0, np.int64)]
        + [pc.list_value_length(b.column("ids")).to_numpy(zero_copy_only=False) for b in ids.iter(batch_rows)]
    )
    is_val = assign_val(lengths > 0, val_fraction, seed)
    start = 0
    for b in ids.iter(batch_rows):
        col, n = b.column("ids"), b.num_rows
        val, nonempty = is_val[start:start + n], lengths[start:start + n] > 0
        for split, mask in (("train", ~val), ("val", val)):
            rows = col.filter(pa.array(mask))
            writer.write(split, pc.list_flatten(rows).to_numpy(), int((mask & nonempty).sum()))
        start += n


def _write_streaming(ds, src, tok, text_field, writer, val_fraction, seed, num_proc, max_documents, strip) -> None:
    threads = num_proc or min(os.cpu_count() or 1, 16)
    seen_train = False
    index = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal seen_train, index
        texts = [_clean(t, strip) for t in batch]
        keep = [t is not None for t in texts]
        rows = tok.encode_batch([t for t in texts if t is not None], eos=True, num_threads=threads)
        doc_ids = index + np.arange(len(batch))
        val = (_doc_uniform(seed, doc_ids) < val_fraction)[np.array(keep, bool)]
        if not seen_train and len(rows):
            val[0], seen_train = False, True  # the first document always trains, as in assign_val
        for split, flag in (("train", False), ("val", True)):
            chosen = [r for r, v in zip(rows, val) if v == flag]
            flat = np.fromiter(itertools.chain.from_iterable(chosen), np.int64, count=sum(map(len, chosen)))
            writer.write(split, flat, len(chosen))
        index += len(batch)
        batch.clear()

    for i, ex in enumerate(ds):
        if max_documents is not None and i >= max_documents:
            break
        if i == 0:
            check_field(src, text_field, list(ex))
        text = ex.get(text_field)
        batch.append(None if text is None else check_text(src, text_field, text))
        if len(batch) == ENCODE_BATCH:
            flush()
    if batch:
        flush()


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


def _num_proc(requested: int | None, n_docs: int) -> int:
    """Worker processes for datasets.map; 0 means none (datasets forks a pool even for num_proc=1)."""
    if requested is not None:
        n = min(requested, n_docs)
    else:  # a worker costs a few tenths of a second to start; small inputs are faster in this process
        n = min(os.cpu_count() or 1, 16, n_docs // 2000)
    return n if n > 1 else 0

