"""The loss of a model on token batches, for `pretrain eval`: one full model in one process (no torch.distributed),
our checkpoint (`ModelSource.build`) or any Hugging Face causal LM (`ModelSource.hf_causal_lm`), summed over label
tokens in float64 so that the mean does not depend on the micro-batch size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.data.batches import IGNORE_INDEX
from pretrain.state.sources import ModelSource


@torch.no_grad()
def mean_loss(loss_sum_fn, batches, device: torch.device) -> tuple[float, int]:
    """(mean loss, label tokens) over `batches`; `loss_sum_fn(tokens, labels)` returns a batch's loss sum."""
    total, count = 0.0, 0
    for tokens, labels in batches:
        total += float(loss_sum_fn(tokens.to(device), labels.to(device)).double())
        count += int((labels != IGNORE_INDEX).sum())
    return (total / count if count else math.nan), count


def checkpoint_loss_sum(source: ModelSource, device: torch.device):
    """(loss-sum function, vocab size, max positions) of a training checkpoint."""
    model = source.build(device)
    return (lambda tokens, labels: model(tokens, labels, reduction="sum")), model.cfg.vocab_size, model.cfg.max_seq_len


def hf_loss_sum(source: ModelSource, device: torch.device):
    """(loss-sum function, vocab size, max positions) of a Hugging Face causal LM directory."""
    model = source.hf_causal_lm(device)

    def loss_sum(tokens, labels):
        logits = model(input_ids=tokens).logits
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    c = model.config
    return loss_sum, c.vocab_size, getattr(c, "max_position_embeddings", None)
