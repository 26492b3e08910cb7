"""The loss of a model on token batches, for `pretrain eval`: one full model in one process (no torch.distributed),
our checkpoint (`ModelSource.build`) or any Hugging Face causal LM (`ModelSource.hf_causal_lm`), summed over label
tokens in float64 so that the mean does not depend on the micro-batch size, with the bytes of the text they cover
(bits per byte)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.data.batches import IGNORE_INDEX
from pretrain.state.sources import ModelSource
from pretrain.train.evaluate import Validation


@torch.no_grad()
def mean_loss(loss_sum_fn, batches, device: torch.device, token_bytes=None) -> Validation:
    """The mean loss over `batches` with its label tokens and, given the data's `token_bytes`
    (pretrain/data/text_bytes.py), the bytes of the text they cover; `loss_sum_fn(tokens, labels)` returns a
    batch's loss sum."""
    total, count, nbytes = 0.0, 0, 0
    for tokens, labels in batches:
        total += float(loss_sum_fn(tokens.to(device), labels.to(device)).double())
        count += int((labels != IGNORE_INDEX).sum())
        if token_bytes is not None:
            nbytes += token_bytes.count(tokens, labels)
    return Validation(total / count if count else math.nan, count, nbytes if token_bytes is not None else None)


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
