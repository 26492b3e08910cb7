"""Packed SFT rows by hand, for the model-level SFT tests (tests/models/test_sft_model.py, tests/test_cuda.py)."""

from __future__ import annotations

import torch

from pretrain.data.loader import IGNORE_INDEX
from pretrain.data.sft_loader import SFTBatch


def pack(rows: list[list[tuple]], T: int) -> SFTBatch:
    """Rows of (inputs, labels) examples packed as pretrain/data/sft_loader.py packs them: positions restart at every
    example, one document id each, the rest of a row padding (ignored labels, a document of its own)."""
    B = len(rows)
    tokens, labels = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), IGNORE_INDEX)
    positions, docs = torch.arange(T).repeat(B, 1), torch.zeros(B, T, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, (x, y) in enumerate(row):
            n = len(x)
            tokens[r, t:t + n], labels[r, t:t + n] = x, y
            positions[r, t:t + n], docs[r, t:t + n] = torch.arange(n), d
            t += n
        positions[r, t:], docs[r, t:] = torch.arange(T - t), len(row)
    return SFTBatch(tokens, labels, positions, docs)
