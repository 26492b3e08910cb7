"""Turn text into a prepared dataset folder: flat memory-mapped token arrays plus `meta.json`.

Folder format (FORMAT_VERSION 1):
    train.bin, val.bin   every document's tokens followed by EOS, back to back, as raw uint16 (vocab <= 65536)
                         or uint32 little-endian; read with np.memmap(dtype=meta["dtype"])
    tokenizer.model      a copy of the tokenizer, so the folder alone can encode and decode
    meta.json            written last: tokenizer sha256/path/ids, vocab_size, dtype, token and document
                         counts per split, source and options, created_at, format_version

Everything is written into a hidden sibling folder and renamed into place at the end, so `out_dir` either
does not exist or is complete; a folder without a valid `meta.json` is refused as an interrupted prepare.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import itertools
import json
import lzma
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from pretrain.data.tokenizer import MODEL_FILE, Tokenizer
from pretrain.errors import UserError

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
SampleBy = Literal["line", "paragraph", "document"]

# File type -> `datasets` builder. Compressed variants (.jsonl.gz ...) are read through by datasets.
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# Names a prepare writes; a non-empty folder holding anything else is the user's, never overwritten.
PREPARED_FILES = {"train.bin", "val.bin", META_FILE, MODEL_FILE, ".hf_cache"}
ENCODE_BATCH = 1000
# Texts that ship in the package: `bundled:NAME` is corpora/NAME.txt. How such a text becomes the default
# prepared folder (tokenizer, options, cache) is bundled.py's business; bundled.py imports this module, never
# the reverse.
BUNDLED_PREFIX = "bundled:"
CORPORA_DIR = Path(__file__).resolve().parent / "corpora"


class OutputExists(UserError):
    """The output folder already holds a finished result and overwriting was not asked for."""


@dataclass
class Source:
    """Where documents come from: local files of one type, or a Hugging Face hub dataset."""

    label: str
    builder: str | None = None  # datasets builder for local files; None for a hub dataset
    files: list[Path] = field(default_factory=list)
    name: str | None = None  # hub dataset name
    subset: str | None = None
    split: str = "train"

    @property
    def local(self) -> bool:
        return self.builder is not None


# ---------------------------------------------------------------------------------------------- sources


def builder_for(path: Path) -> str | None:
    """The datasets builder that reads `path`, judged by its extension (compression suffix ignored)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def bundled_corpus_path(spec: str) -> str:
    """The text file of `bundled:NAME` (corpora/NAME.txt)."""
    name = spec[len(BUNDLED_PREFIX):] if spec.startswith(BUNDLED_PREFIX) else spec
    path = CORPORA_DIR / f"{name}.txt"
    if not name or Path(name).name != name or not path.is_file():
        names = ", ".join(BUNDLED_PREFIX + p.stem for p in sorted(CORPORA_DIR.glob("*.txt")))
        raise UserError(f"{spec}: no such bundled corpus; choose one of {names}")
    return str(path)


def resolve_local(spec: str) -> Source:
    """A local file or folder as a Source; folders contribute their data files (sorted, hidden ones skipped)."""
    if spec.startswith(BUNDLED_PREFIX):
        spec = bundled_corpus_path(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise UserError(f"{spec}: no such file or folder")
    if p.is_file():
        builder = builder_for(p)
        if builder is None:
            raise UserError(f"{p}: unsupported file type; use {', '.join(BUILDERS)} (optionally compressed)")
        return Source(label=str(p.resolve()), builder=builder, files=[p.resolve()])
    files = sorted(
        f for f in p.rglob("*")
        if f.is_file() and builder_for(f) and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise UserError(f"{p}: no data files ({', '.join(BUILDERS)}) in this folder")
    kinds = sorted({builder_for(f) for f in files})
    if len(kinds) > 1:
        raise UserError(f"{p}: the folder mixes file types ({', '.join(kinds)}); keep one type per folder")
    return Source(label=str(p.resolve()), builder=kinds[0], files=[f.resolve() for f in files])


def resolve_source(spec: str, split: str = "train", subset: str | None = None) -> Source:
    """A local path (file, folder, `bundled:NAME`) or else a hub dataset name."""
    if spec.startswith(BUNDLED_PREFIX) or os.path.exists(os.path.expanduser(spec)) or _looks_local(spec):
        return resolve_local(spec)
    return Source(label=spec, name=spec, subset=subset, split=split)


def _looks_local(spec: str) -> bool:
    # Hub names look like "owner/name"; anything path-like or with a data-file extension is a missing file.
    return spec.startswith(("/", "./", "../", "~", ".")) or builder_for(Path(spec)) is not None


def check_utf8(files: list[Path]) -> None:
    """Raise a UserError naming the first file (and byte offset) that is not valid UTF-8."""
    for f in files:
        if builder_for(f) == "parquet" or f.suffix.lower() in COMPRESSIONS:
            continue  # binary or compressed: the reader reports its own errors
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(f, "rb") as fh:
            while True:
                chunk = fh.read(1 << 22)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    # e.object is the decoder's pending bytes followed by this chunk.
                    at = offset - (len(e.object) - len(chunk)) + e.start
                    raise UserError(
                        f"{f}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {at}); "
                        "convert it first, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                if not chunk:
                    break
                offset += len(chunk)


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # the compressions Python reads itself


def check_json(files: list[Path]) -> None:
    """Raise a UserError naming the file and line of the first malformed record of a JSON / JSON Lines source
    (datasets would only say "An error occurred while generating the dataset"). A file whose first record is a
    whole line is JSON Lines and is checked line by line; anything else must be one JSON document. The pass
    costs a fraction of tokenizing the same bytes."""
    for f in files:
        suffix = f.suffix.lower()
        if suffix in COMPRESSIONS and suffix not in _OPENERS:
            continue  # zstd / lz4: left to datasets
        opener = _OPENERS.get(suffix, open)
        with opener(f, "rt", encoding="utf-8") as fh:
            lines = iter(enumerate(fh, start=1))
            first = next(((n, line) for n, line in lines if line.strip()), None)
            if first is None:
                continue
            try:
                json.loads(first[1])
            except json.JSONDecodeError:
                fh.seek(0)
                try:
                    json.load(fh)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix the "
                                    "file (JSON Lines: one JSON object per line)") from None
                continue
            for n, line in lines:
                if not line.strip():
                    continue
                try:
                    json.loads(line.rstrip("\r\n"))  # an error at the end of the line is in its last column
                except json.JSONDecodeError as e:
                    raise UserError(f"{f} line {n}: not valid JSON ({e.msg}, column {e.colno}); fix or delete that "
                                    "line (JSON Lines: one JSON object per line)") from None


def load_source(
    src: Source, sample_by: SampleBy = "paragraph", streaming: bool = False, cache_dir: str | None = None
):
    """`datasets.load_dataset` on a Source: a Dataset, or an IterableDataset when streaming."""
    import datasets

    if src.local and src.builder == "json":
        check_json(src.files)
    if src.local:
        kwargs = dict(path=src.builder, data_files=[str(f) for f in src.files], split="train")
        if src.builder == "text":
            kwargs["sample_by"] = sample_by
    else:
        kwargs = dict(path=src.name, name=src.subset, split=src.split)
    try:
        return datasets.load_dataset(**kwargs, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # network, missing hub dataset, malformed JSON/CSV/parquet: all the user's to fix
        hint = "" if src.local else " (it is not a local file or folder either)"
        raise UserError(f"could not load {src.label}{hint}: {_short(e)}") from None


def iter_source_texts(src: Source, text_field: str = "text") -> Iterator[str]:
    """Every text of a local Source, streamed without a datasets cache (for tokenizer training)."""
    if src.builder == "text" and all(f.suffix.lower() not in COMPRESSIONS for f in src.files):
        for f in src.files:
            with open(f, encoding="utf-8") as fh:
                yield from fh
        return
    ds = load_source(src, sample_by="line", streaming=True)
    for i, ex in enumerate(ds):
        if i == 0:
            _check_field(src, text_field, list(ex))
        text = ex[text_field]
        if text is not None:
            yield _check_text(src, text_field, text)


def _check_field(src: Source, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise UserError(
            f"{src.label}: no field {text_field!r}; the fields are {', '.join(map(repr, columns)) or 'none'}; "
            "pass --text-field"
        )


def _check_text(src: Source, text_field: str, text) -> str:
    if not isinstance(text, str):
        raise UserError(f"{src.label}: field {text_field!r} holds {type(text).__name__} values, not text; pass --text-field")
    return text


# ---------------------------------------------------------------------------------------------- output folders


@contextmanager
def staging_dir(
    out: Path, overwrite: bool, is_complete: Callable[[Path], bool], what: str, known: set[str] = PREPARED_FILES
):
    """Yield a hidden sibling folder to write into; on success rename it to `out` atomically, else delete it.

    Raises OutputExists if `out` already holds a finished result (unless `overwrite`), also when a concurrent
    writer (another rank) published first; the caller may then simply use that folder.
    """
    out = Path(out).expanduser().absolute()
    _check_target(out, overwrite, is_complete, what, known)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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


def _check_target(out: Path, overwrite: bool, is_complete, what: str, known: set[str]) -> None:
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
    if not names <= known:
        raise UserError(f"{out} is a non-empty folder that is not {what}; choose another output folder")
    if not overwrite:
        raise UserError(
            f"{out} looks like an interrupted run (no complete metadata); delete it and re-run, or pass --overwrite"
        )


def _publish(tmp: Path, out: Path, overwrite: bool, is_complete, what: str) -> None:
    try:
        out.rmdir()  # an empty folder the user made beforehand; rename cannot replace a non-empty one
    except OSError:
        pass
    if out.exists() and overwrite:
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as e:
        if is_complete(out):  # a concurrent writer won the race with an equal result
            raise OutputExists(f"{out} already holds {what} (written concurrently)") from None
        raise UserError(f"could not move the result into {out}: {e.strerror}") from None


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
    """The `meta.json` of a complete prepared folder; a one-line UserError for anything else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data {p}: no such folder; create it with `pretrain data prepare --out {p}`")
    if not p.is_dir():
        raise UserError(f"data {p}: not a prepared dataset folder (expected a folder with {META_FILE}, train.bin, val.bin)")
    reason = incomplete_reason(p)
    if reason:
        raise UserError(
            f"data {p}: looks like an interrupted prepare ({reason}); delete the folder and re-run `pretrain data prepare`"
        )
    meta = json.loads((p / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"data {p}: format version {meta.get('format_version')} but this version reads {FORMAT_VERSION}; "
            "re-run `pretrain data prepare`"
        )
    return meta


# ---------------------------------------------------------------------------------------------- prepare


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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

    with staging_dir(out, overwrite, is_prepared, what="a prepared dataset") as tmp:
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
    with staging_dir(Path(out_dir), overwrite, is_prepared, what="a prepared dataset") as tmp:
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
    import datasets

    return ds.map(
        _split_paragraph_rows, batched=True, batch_size=ENCODE_BATCH, num_proc=_num_proc(num_proc, len(ds)) or None,
        remove_columns=ds.column_names, features=datasets.Features({"text": datasets.Value("string")}),
        cache_file_name=cache_file, desc="Splitting paragraphs",
    )


def _write_mapped(ds, src, tok, text_field, writer, val_fraction, seed, num_proc, max_documents, strip, cache_file) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    _check_field(src, text_field, ds.column_names)
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
    is_val = _assign_val(lengths > 0, val_fraction, seed)
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
            val[0], seen_train = False, True  # the first document always trains, as in _assign_val
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
            _check_field(src, text_field, list(ex))
        text = ex.get(text_field)
        batch.append(None if text is None else _check_text(src, text_field, text))
        if len(batch) == ENCODE_BATCH:
            flush()
    if batch:
        flush()


def _assign_val(nonempty: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
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


def _short(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
