"""Shared helpers of the data tests: generated corpora, a tiny tokenizer, a CLI harness, the bundled build."""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


WORDS = [
    "the", "king", "queen", "crown", "sword", "night", "day", "love", "hate", "death", "life", "rose", "thorn",
    "river", "stone", "wind", "fire", "water", "earth", "sky", "gold", "silver", "blood", "heart", "mind",
    "speak", "hear", "see", "go", "come", "stay", "fly", "run", "sleep", "dream", "weep", "laugh", "sing",
]


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 30) -> list[str]:
    """`n` deterministic documents of random words, some spread over several lines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        lines = [" ".join(words[j:j + 8]) for j in range(0, len(words), 8)]
        docs.append(f"Doc {i}: " + "\n".join(lines) + ("." if i % 3 else "!"))
    return docs


def write_txt(path: Path, docs: list[str]) -> Path:
    """Documents as paragraphs (blank-line separated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text", extra: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d, **(extra or {})}) + "\n")
    return path


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_dir(vocab_size: int = 320) -> str:
    """A small BPE tokenizer trained once per test process on generated text."""
    from pretrain.data.tokenizer import train_tokenizer

    root = Path(_scratch()) / f"tok{vocab_size}"
    corpus = write_txt(root / "corpus.txt", make_docs(400, seed=123))
    train_tokenizer([str(corpus)], vocab_size, str(root / "tok"))
    return str(root / "tok")


@functools.lru_cache(maxsize=None)
def bundled_dir() -> str:
    """The bundled corpus prepared once per test process into a scratch cache."""
    from pretrain.data.resolve import resolve_data_path

    return resolve_data_path("bundled:tinyshakespeare", cache_dir=str(Path(_scratch()) / "cache"))


def big_vocab_model(model_file: str, out_file: Path, extra: int = 66000) -> Path:
    """A copy of a model whose ordinary pieces get ids above 65535 (unused pieces are inserted before them)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(model_file).read_bytes())
    pieces = list(m.pieces)
    head = [p for p in pieces if p.type != pb.ModelProto.SentencePiece.NORMAL]
    normal = [p for p in pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    del m.pieces[:]
    for p in head:
        m.pieces.add().CopyFrom(p)
    for i in range(extra):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<unused_{i}>", -1e9, pb.ModelProto.SentencePiece.UNUSED
    for p in normal:
        m.pieces.add().CopyFrom(p)
    out_file.write_bytes(m.SerializeToString())
    return out_file


def run_cli(argv: list[str]) -> int:
    """`pretrain ARGV` in this process (the real CLI: parsing, UserError -> one line and exit 2)."""
    from pretrain.cli import main

    return main(argv)


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """A flat token array cut after every EOS."""
    docs, cur = [], []
    for t in tokens.tolist():
        cur.append(t)
        if t == eos:
            docs.append(cur)
            cur = []
    assert not cur, "token stream does not end with EOS"
    return docs


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): compare before and after to see it was left alone."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def run_module(argv: list[str]):
    """`python -m pretrain ARGV` in a child process: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "pretrain", *argv], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    return p.returncode, p.stdout, p.stderr


def leftovers(folder: Path) -> list[str]:
    """Staging folders left next to an output."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@functools.lru_cache(maxsize=None)
def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="pretrain-data-tests-")
    atexit.register(shutil.rmtree, path, True)
    return path
