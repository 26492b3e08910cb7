"""Where documents come from: local text / JSON / parquet / CSV files and folders, `bundled:NAME` texts, or a
Hugging Face hub dataset; checked (UTF-8, JSON) and read through `datasets`, or streamed without a cache.

Used by `train_tokenizer` (tokenizer.py), `prepare_dataset` (prepare.py) and the SFT records (sft_format.py,
sft_prepare.py); it knows nothing of tokens or output folders.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from pretrain.errors import UserError

SampleBy = Literal["line", "paragraph", "document"]
# File type -> `datasets` builder. Compressed variants (.jsonl.gz ...) are read through by datasets.
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# Texts that ship in the package: `bundled:NAME` is corpora/NAME.txt. How such a text becomes the default
# prepared folder (tokenizer, options, cache) is resolve.py's business.
BUNDLED_PREFIX = "bundled:"
CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
# Instruction sets that ship in the package, as SFT records: `bundled:NAME` is corpora/FILE (resolve.py prepares
# them). scripts/make_tiny_instruct.py writes both files; the test file is the held-out split.
BUNDLED_RECORDS = {"tiny-instruct": "tiny_instruct_train.jsonl", "tiny-instruct-test": "tiny_instruct_test.jsonl"}


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


def bundled_records_name(spec) -> str | None:
    """NAME when `spec` is `bundled:NAME` of a bundled instruction set, else None."""
    if isinstance(spec, str) and spec.startswith(BUNDLED_PREFIX) and spec[len(BUNDLED_PREFIX):] in BUNDLED_RECORDS:
        return spec[len(BUNDLED_PREFIX):]
    return None


def records_spec(spec: str) -> str:
    """The JSONL file of a bundled instruction set for `bundled:NAME`, else `spec` unchanged."""
    name = bundled_records_name(spec)
    return str(CORPORA_DIR / BUNDLED_RECORDS[name]) if name else spec


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
    import datasets  # 0.6 s to import; only reading a source needs it, never loading prepared data or training

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
            check_field(src, text_field, list(ex))
        text = ex[text_field]
        if text is not None:
            yield check_text(src, text_field, text)


# Characters of text read at a time by `text_pieces` (~1 MB: 4 MB gave the first batch, encoded alone, too much).
TEXT_PIECE = 1 << 20
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")  # a line of whitespace only (str.isspace, as str.strip's), with its newlines


def reads_text_directly(src: Source) -> bool:
    """Whether `text_pieces` reads `src`: local text files, none compressed (those go through `datasets`)."""
    return src.builder == "text" and all(f.suffix.lower() not in COMPRESSIONS for f in src.files)


def text_pieces(src: Source, chars: int | None = None) -> Iterator[tuple[str, int]]:
    """The text of the files of `src` (`reads_text_directly`), as datasets' text builder reads it (UTF-8, "\\r\\n" and
    "\\r" made "\\n"), in pieces of `chars` (default TEXT_PIECE) characters or more but the last, each cut just before a
    line of whitespace only, so that no paragraph spans two pieces; files one after another with a blank line between
    them (a paragraph ends with its file); with the file bytes read for each piece.

    `data prepare` splits these into paragraphs itself: the text builder's arrow cache and per-row split cost 1.5 s
    of one core per 100 MB, more than tokenizing it (docs/PERFORMANCE.md)."""
    chars = chars or TEXT_PIECE
    parts, size, nbytes = [], 0, 0
    for f in src.files:
        if parts:
            parts.append("\n\n")
        for text, n in _file_sections(f, chars):
            parts.append(text)
            size, nbytes = size + len(text), nbytes + n
            if size >= chars:
                yield "".join(parts), nbytes
                parts, size, nbytes = [], 0, 0
    if parts:
        yield "".join(parts), nbytes


def _file_sections(path: Path, chars: int) -> Iterator[tuple[str, int]]:
    """The text of one file in sections that end where it does or just before a line of whitespace only."""
    with open(path, encoding="utf-8") as fh:
        carry, position = [], 0
        while True:
            text = fh.read(chars)
            if len(text) < chars:  # the end of the file
                break
            cut = text.rfind("\n\n") + 1
            if not cut:  # no empty line: the last line of whitespace only (WikiText's " " lines), if any
                last = None
                for last in _BLANK_LINE.finditer(text):
                    pass
                cut = last.start() + 1 if last else 0
            if not cut:  # one paragraph goes on: read on before cutting
                carry.append(text)
                continue
            now = fh.buffer.tell()
            yield "".join(carry) + text[:cut], now - position
            carry, position = [text[cut:]], now
        yield "".join(carry) + text, fh.buffer.tell() - position


def check_field(src: Source, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise UserError(
            f"{src.label}: no field {text_field!r}; the fields are {', '.join(map(repr, columns)) or 'none'}; "
            "pass --text-field"
        )


def check_text(src: Source, text_field: str, text) -> str:
    if not isinstance(text, str):
        raise UserError(f"{src.label}: field {text_field!r} holds {type(text).__name__} values, not text; pass --text-field")
    return text


def _short(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
