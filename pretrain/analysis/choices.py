"""Multiple-choice scoring by continuation log-likelihood, with lm-eval-harness's tokenization rule, so that
`pretrain eval-choices` on a checkpoint gives what `lm_eval --model hf` gives on its export.

The rule (lm-eval 0.4.13, `TemplateLM._encode_pair` and `HFLM.tok_encode` for a causal model whose tokenizer adds
BOS, as our exports' do): the continuation is `delimiter + choice`; whitespace at the end of the context moves to
the start of the continuation; whole = BOS + encode(context + continuation), context = BOS + encode(context), and the
continuation's tokens are whole[len(context):] (so a token that straddles the boundary counts as continuation).
The model reads (context + continuation)[:-1], its last max_len + 1 tokens when longer, as lm-eval truncates; the
log-likelihood is the sum of the continuation tokens' log-probabilities (float32 log-softmax, as lm-eval).
acc: the gold choice has the highest log-likelihood; acc_norm: the highest per character of the choice (lm-eval's
`len(choice)`); ties go to the first choice, as numpy's argmax.
"""

from __future__ import annotations

from typing import Callable

import torch

from pretrain.data.choice_tasks import ChoiceTask
from pretrain.data.tokenizer import Tokenizer

Logits = Callable[[torch.Tensor], torch.Tensor]  # (batch, T) token ids -> (batch, T, vocab) logits


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    whole = bos + tok.encode(context + continuation)
    ctx = bos + tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(logits_fn: Logits, pairs: list[tuple[list[int], list[int]]], max_len: int,
                   device: torch.device) -> list[float]:
    """Sum of log p(continuation | context) per (context, continuation) pair, in one right-padded batch (causal
    attention: the padding after a sequence changes none of its logits)."""
    rows = [(ctx + cont)[-(max_len + 1):][:-1] for ctx, cont in pairs]
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
    logp = torch.log_softmax(logits_fn(batch.to(device)).float(), dim=-1).cpu()
    out = []
    for i, ((_, cont), r) in enumerate(zip(pairs, rows)):
        n = len(cont)
        picked = logp[i, len(r) - n:len(r)].gather(-1, torch.tensor(cont).unsqueeze(-1))
        out.append(float(picked.sum()))
    return out


def score_task(task: ChoiceTask, tok: Tokenizer, logits_fn: Logits, max_len: int, device: torch.device) -> dict:
    """acc, acc_norm and per-item log-likelihoods of `task` (module docstring)."""
    items, correct, correct_norm = [], 0, 0
    for item in task.items:
        pairs = [encode_pair(tok, item.context, task.delimiter + choice) for choice in item.choices]
        lls = loglikelihoods(logits_fn, pairs, max_len, device)
        pick = max(range(len(lls)), key=lambda j: (lls[j], -j))
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
        pick_norm = max(range(len(norm)), key=lambda j: (norm[j], -j))
        correct += pick == item.gold
        correct_norm += pick_norm == item.gold
        items.append({"loglikelihoods": lls, "gold": item.gold, "pick": pick})
    n = len(task.items)
    return {"task": task.name, "acc": correct / n, "acc_norm": correct_norm / n, "items": n, "per_item": items}
