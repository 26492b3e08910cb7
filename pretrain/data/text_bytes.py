"""Bits per byte: how many UTF-8 bytes of text the next-token targets of a batch cover, from the data's tokenizer.

bpb = (the loss summed over the targets, in nats) / (ln 2 * the UTF-8 bytes of the text those targets cover). Unlike
the loss per token it does not depend on the tokenizer, so runs on one text tokenized two ways compare by it.

The bytes come from a table over the token ids (`TokenBytes`), built from the sentencepiece model a prepared folder
holds a copy of (folders.py: tokenizer.model):

    a normal or user-defined piece   the UTF-8 length of its text, each "▁" (sentencepiece's space) one byte
    a byte-fallback piece <0xAB>     1
    control pieces (BOS, EOS, pad)   0: no text; an unused or unknown piece also 0 (an <unk> covers text whose length
                                     is lost: byte fallback, on in every tokenizer `pretrain tokenizer train` makes,
                                     leaves none)
and sentencepiece's dummy prefix, the "▁" it puts before every text it encodes (add_dummy_prefix, also before a
text that starts with a space), which is in no text: a target that starts a text is counted one byte less when its
piece starts with "▁". A target starts a text when its input token is EOS or BOS (prepare.py writes every document
followed by EOS, so a document's first token follows the previous one's EOS; an SFT example starts with BOS and each
of its responses ends with EOS), or when it is trained and the target before it is not (an SFT response, encoded on
its own, after its masked prompt). The first token of a split is never a target: the targets of a whole split cover
the text of its documents less that token's, exactly, for tokenizers with the identity normalizer and byte fallback
(ours; tests/pretrain/data/test_text_bytes.py checks it on two of them, byte-fallback and space-edged documents
included). Two texts lose bytes to sentencepiece itself, here as in decoding: a literal "▁" reads as a space (3 bytes
counted 1), and a normalizer other than identity (e.g. Llama 1's NFKC) counts the bytes of the normalized text. An
SFT example trained on its prompt too (train_on_prompt) counts each response's dummy prefix as the space it decodes
to (one byte per turn).

`count` works on host arrays (a loader's batches are host memory), so counting, like counting the trained tokens
(batches.py), never waits for a device; pretrain/train/evaluate.py sums the counts with the loss.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from pretrain.data.batches import IGNORE_INDEX
from pretrain.data.tokenizer import Tokenizer

SPACE = "\u2581"  # sentencepiece's whitespace symbol


class TokenBytes:
    """Per-token-id byte counts of one tokenizer: `table[id]` inside a text, `first[id]` at the start of one."""

    def __init__(self, table: np.ndarray, first: np.ndarray, boundary: Sequence[int]):
        self.table = np.asarray(table, np.int64)
        self.first = np.asarray(first, np.int64)
        self.boundary = np.array(sorted({int(i) for i in boundary if i >= 0}), np.int64)  # EOS, BOS

    @classmethod
    def from_pieces(cls, pieces: Sequence[str], *, empty: Sequence[int] = (), byte: Sequence[int] = (),
                    boundary: Sequence[int] = (), dummy_prefix: bool = True) -> "TokenBytes":
        """The table of a vocabulary given as its pieces: ids in `empty` (control, unknown, unused) count 0, ids in
        `byte` (byte fallback) 1, every other piece its UTF-8 length with "▁" as one byte; with `dummy_prefix`, a
        piece starting with "▁" counts one less at the start of a text. `boundary`: EOS and BOS."""
        table = np.array([len(p.replace(SPACE, " ").encode("utf-8")) for p in pieces], np.int64)
        leading = np.array([p.startswith(SPACE) for p in pieces], bool)
        table[list(byte)] = 1
        leading[list(byte)] = False
        table[list(empty)] = 0
        leading[list(empty)] = False
        return cls(table, table - (leading & dummy_prefix), boundary)

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "TokenBytes":
        sp = tok.sp
        ids = range(tok.vocab_size)
        return cls.from_pieces(
            [sp.id_to_piece(i) for i in ids],
            empty=[i for i in ids if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)],
            byte=[i for i in ids if sp.is_byte(i)],
            boundary=[tok.eos_id, tok.bos_id], dummy_prefix=dummy_prefix(tok))

    def count(self, tokens, labels) -> int:
        """UTF-8 bytes of the text that the trained targets of a batch cover: `tokens` (inputs) and `labels`
        (targets, IGNORE_INDEX where no loss is taken), [B, T] host arrays or CPU tensors."""
        tokens, labels = _host(tokens), _host(labels)
        trained = labels != IGNORE_INDEX
        ids = np.where(trained, labels, 0)
        starts = np.isin(tokens, self.boundary)
        starts[..., 1:] |= ~trained[..., :-1]  # a response after its masked prompt (trained[..., 1:] applies below)
        counts = np.where(starts, self.first[ids], self.table[ids])
        return int(counts[trained].sum())

    def stream(self, tokens) -> int:
        """UTF-8 bytes of the text of a flat token stream (a split: its first token starts a text; every target
        after it is counted as `count` counts it)."""
        tokens = _host(tokens).astype(np.int64).reshape(-1)
        if not tokens.size:
            return 0
        return int(self.first[tokens[0]]) + self.count(tokens[None, :-1], tokens[None, 1:])


def _host(x) -> np.ndarray:
    # numpy() refuses a device tensor: what is counted is host memory, never a read from a device
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def dummy_prefix(tok: Tokenizer) -> bool:
    """Whether `tok` puts a "▁" before every text it encodes (sentencepiece's add_dummy_prefix)."""
    pieces = tok.sp.encode("a", out_type=str)
    return bool(pieces) and pieces[0].startswith(SPACE)


_LOADED: dict[tuple[str, float], TokenBytes] = {}


def token_bytes(tokenizer_file: str | None) -> TokenBytes | None:
    """The table of the sentencepiece model at `tokenizer_file` (a prepared folder's copy), built once per process;
    None when there is none (a folder written by `save_arrays` without a tokenizer): no bits per byte then."""
    if tokenizer_file is None or not os.path.isfile(tokenizer_file):
        return None
    key = (os.path.abspath(tokenizer_file), os.path.getmtime(tokenizer_file))
    if key not in _LOADED:
        _LOADED[key] = TokenBytes.from_tokenizer(Tokenizer.load(tokenizer_file))
    return _LOADED[key]


def bits_per_byte(loss_sum: float, num_bytes: float | None) -> float | None:
    """Nats summed over the targets / (ln 2 * the bytes they cover); None without a byte count (or with 0 bytes)."""
    if not num_bytes:
        return None
    return loss_sum / (math.log(2) * num_bytes)
