"""Sentencepiece tokenizers: train one from text files, or load an existing `.model` (Llama's included).

A trained tokenizer is a folder holding `tokenizer.model` and `tokenizer_meta.json` (ids, vocab size,
sha256, recipe). The meta file is not named `tokenizer.json` because Hugging Face folders already use that
name for their fast tokenizer; a Hugging Face Llama folder loads through its `tokenizer.model`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import sentencepiece as spm

from pretrain.data.folders import MODEL_FILE, SFT_KIND, describe, identify, is_tokenizer_dir, staging_dir
from pretrain.data.folders import TOKENIZER_META_FILE as META_FILE
from pretrain.data.sources import check_utf8, iter_source_texts, resolve_local
from pretrain.errors import UserError

ModelType = Literal["bpe", "unigram"]

# Fixed special ids for every tokenizer we train; a loaded `.model` keeps its own (Llama: unk=0 bos=1 eos=2, no pad).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Byte fallback needs its 256 byte pieces plus the 4 specials; below this sentencepiece cannot train.
MIN_VOCAB_SIZE = 256 + 4 + 16


@dataclass
class TokenizerMeta:
    """What `tokenizer_meta.json` records next to a trained model."""

    model_file: str
    sha256: str
    vocab_size: int
    model_type: str
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    byte_fallback: bool
    inputs: list[str]
    seed: int
    sentencepiece_version: str
    created_at: str


class Tokenizer:
    """A loaded sentencepiece model with its special ids and the sha256 of its file bytes."""

    def __init__(self, model_bytes: bytes, path: str):
        self.path = path
        self._bytes = model_bytes
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a parser message
            raise UserError(f"{path}: not a sentencepiece model file ({_short(e)})") from None
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a `.model` file, or a folder holding `tokenizer.model` (or exactly one `*.model`)."""
        file = find_model_file(path)
        return cls(file.read_bytes(), str(file))

    # Pickled by value so that `datasets.map` workers and its fingerprint see the model, not a path.
    def __getstate__(self) -> dict:
        return {"path": self.path, "model_bytes": self._bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["path"])

    @property
    def model_bytes(self) -> bytes:
        """The serialized model, as read from its file."""
        return self._bytes

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The pad id, or -1 when the model has none (Llama's); packed pretraining never pads."""
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = 1) -> list[list[int]]:
        # One thread by default: callers already run one process per core (datasets.map num_proc).
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def info(self) -> dict:
        """The fields a prepared dataset records about its tokenizer."""
        return dict(
            path=self.path, sha256=self.sha256, vocab_size=self.vocab_size,
            bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, unk_id=self.unk_id,
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def find_model_file(path: str | os.PathLike) -> Path:
    """The `.model` file that `path` names, directly or as the folder holding it."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return models[0]
        if not models:
            raise UserError(f"{p}: {_no_model_message(p)}")
        raise UserError(f"{p}: several .model files ({', '.join(m.name for m in models)}); pass the file itself")
    if not p.exists():
        raise UserError(f"tokenizer {p}: no such file or folder")
    return p


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    out_dir: str,
    model_type: ModelType = "bpe",
    *,
    text_field: str = "text",
    max_sentences: int = 5_000_000,
    seed: int = 0,
    num_threads: int = 16,
    overwrite: bool = False,
) -> str:
    """Train a byte-fallback sentencepiece model on text files; return the path of `out_dir/tokenizer.model`.

    Inputs are `.txt` files (one sentence per line) or `.jsonl/.json/.parquet` files (lines of `text_field`),
    or folders of them. The result is deterministic for a given input, recipe and sentencepiece version.
    `num_threads` is a fixed number, not the machine's core count: the model records it, and unigram
    results depend on it, so ranks on different machines would otherwise train different tokenizers.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"tokenizer model type {model_type!r} is not one of bpe, unigram")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte fallback needs at least {MIN_VOCAB_SIZE}")
    if not inputs:
        raise UserError("tokenizer train: give at least one --input file")
    sources = [resolve_local(str(path)) for path in inputs]
    for src in sources:
        check_utf8(src.files)

    def sentences() -> Iterator[str]:
        for src in sources:
            for text in iter_source_texts(src, text_field):
                for line in text.split("\n"):
                    # Sentencepiece trains on lines; blank ones carry nothing and would only be skipped later.
                    if line.strip():
                        yield line

    out = Path(out_dir).expanduser()
    with staging_dir(out, overwrite, is_tokenizer_dir, what="a trained tokenizer", known={MODEL_FILE, META_FILE},
                     kind="tokenizer") as tmp:
        model = io.BytesIO()
        it = sentences()
        first = next(it, None)
        if first is None:
            raise UserError(f"tokenizer train: the inputs hold no text ({', '.join(map(str, inputs))})")
        spm.set_random_generator_seed(seed)
        try:
            # A sentence iterator and a model writer keep file paths out of the model, so it hashes the
            # same wherever it was trained.
            spm.SentencePieceTrainer.train(
                sentence_iterator=_chain([first], it), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, byte_fallback=True, character_coverage=1.0,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                # Identity normalization keeps spaces, tabs and newlines, so decode(encode(x)) == x.
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, allow_whitespace_only_pieces=True,
                input_sentence_size=max_sentences, shuffle_input_sentence=True,
                num_threads=num_threads, minloglevel=2,
            )
        except RuntimeError as e:
            # e.g. "Vocabulary size too high (5000). Please set it to a value <= 1234." on a small corpus.
            raise UserError(f"tokenizer train: sentencepiece refused the inputs: {_short(e)}") from None
        data = model.getvalue()
        (tmp / MODEL_FILE).write_bytes(data)
        tok = Tokenizer(data, str(out / MODEL_FILE))
        meta = TokenizerMeta(
            model_file=MODEL_FILE, sha256=tok.sha256, vocab_size=tok.vocab_size, model_type=model_type,
            pad_id=tok.pad_id, unk_id=tok.unk_id, bos_id=tok.bos_id, eos_id=tok.eos_id, byte_fallback=True,
            inputs=[str(Path(p).expanduser().resolve()) for p in inputs], seed=seed,
            sentencepiece_version=spm.__version__, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return str(out / MODEL_FILE)


def _no_model_message(p: Path) -> str:
    """Why folder `p`, which holds no .model file, is not a tokenizer, and what to pass instead."""
    kind = identify(p)
    if kind in ("data", SFT_KIND):
        return (f"{describe(p, kind)} without a copy of its tokenizer (no {MODEL_FILE}); pass the tokenizer it was "
                "prepared with (a .model file or its folder)")
    if kind == "run":
        return ("a training run folder, not a tokenizer; pass a tokenizer (a .model file or its folder), e.g. the "
                "prepared data folder the run trained on, which holds a copy")
    return "no sentencepiece .model file in this folder; train one with `pretrain tokenizer train`"


def _chain(*iterables: Iterable[str]) -> Iterator[str]:
    for it in iterables:
        yield from it


def _short(e: BaseException) -> str:
    """The last line of a sentencepiece error, without its "INTERNAL: file.cc(123) [check]" prefix."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\]\s*", "", lines[-1]) if lines else type(e).__name__
