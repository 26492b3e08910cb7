"""Multiple-choice scoring by continuation log-likelihood, with lm-eval-harness's tokenization rule, so that
`pretrain eval-choices` on a checkpoint gives what `lm_eval --model hf` gives on its export.

The rule (lm-eval 0.4.13, `TemplateLM._encode_pair` and `HFLM.tok_encode` for a causal model whose tokenizer adds
BOS, as our exports' do): the continuation is `delimiter + choice`; whitespace at the end of the context moves to
the start of the continuation; whole = BOS + encode(context + continuation), context = BOS + encode(context), and the
continuation's tokens are whole[len(context):] (so a token that straddles the boundary counts as continuation).
The model reads (context + continuation)[:-1], its last max_len + 1 tokens when longer, as lm-eval truncates; the
log-likelihood is the sum of the continuation tokens' log-probabilities (log-softmax in float32 at least, as lm-eval).
acc: the gold choice has the highest log-likelihood; acc_norm: the highest per character of the choice (lm-eval's
`len(choice)`, without the delimiter; for Winogrande's partial scoring its per-choice context); acc_per_token: per
token of the continuation (OLMo's acc_per_token); acc_per_char: per character of the continuation, its leading space
counted (OLMo's acc_per_char, the OLMES standard); ties go to the first choice, as numpy's argmax.

The API a caller that is not a command uses (a training loop): `prepare(tok, questions)` once, then
`score_prepared(logits_fn, prepared, max_len, device, batch_size)` for the per-choice log-likelihoods of any slice
of them (data-parallel ranks: `prepared[rank::world]`, the results gathered back into order), then
`choice_metrics(prepared, lls)`. Batches hold `batch_size` (context, continuation) rows, longest first, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pretrain.data.choice_tasks import ChoiceTask, Question
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.state.sources import ModelSource

Logits = Callable[[torch.Tensor], torch.Tensor]  # (batch, T) token ids -> (batch, T, vocab) logits


def model_logits(source: ModelSource, tok: Tokenizer, device: torch.device) -> tuple[Logits, int]:
    """The source's model as a logits function and its context length: a checkpoint (any layout) as our model, an
    HF directory with transformers' AutoModelForCausalLM; refused when the tokenizer has more ids than the model."""
    if source.is_hf:
        model = source.hf_causal_lm(device)
        vocab, max_len = model.config.vocab_size, model.config.max_position_embeddings

        def logits(tokens):
            return model(input_ids=tokens).logits
    else:
        model = source.build(device)
        vocab, max_len = model.cfg.vocab_size, model.cfg.max_seq_len
        logits = model
    if tok.vocab_size > vocab:
        raise UserError(f"the tokenizer {tok.path} has {tok.vocab_size} ids but the model only {vocab}; "
                        "pass the model's --tokenizer")
    return logits, max_len


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    whole = bos + tok.encode(context + continuation)
    ctx = bos + tok.encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class Prepared:
    """A question tokenized once (for a whole run or evaluation): per choice the (context, continuation) token ids
    by `encode_pair`, the characters acc_norm divides by (lm-eval's choice text) and those OLMo's acc_per_char
    divides by (the continuation, its leading space counted), and the gold choice."""

    pairs: list[tuple[list[int], list[int]]]
    norm_chars: list[int]
    continuation_chars: list[int]
    gold: int


def prepare(tok: Tokenizer, questions: list[Question]) -> list[Prepared]:
    """Tokenize the questions; a list of these is what a data-parallel caller splits by index (`prepared[rank::n]`)."""
    return [Prepared([encode_pair(tok, ctx, cont) for ctx, cont in q.pairs], [len(t) for t in q.norm_texts],
                     [len(cont) for _, cont in q.pairs], q.gold) for q in questions]


@torch.no_grad()
def score_prepared(logits_fn: Logits, prepared: list[Prepared], max_len: int, device: torch.device,
                   batch_size: int = 32, progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Each question's per-choice log-likelihoods, every (context, continuation) pair of every question in batches
    of `batch_size` rows, longest first (so a batch pads little); `progress(n)` after each batch with its pairs."""
    flat = [(qi, ci, pair) for qi, p in enumerate(prepared) for ci, pair in enumerate(p.pairs)]
    order = sorted(range(len(flat)), key=lambda k: -len(flat[k][2][0]) - len(flat[k][2][1]))
    out: list[list[float]] = [[0.0] * len(p.pairs) for p in prepared]
    for start in range(0, len(order), batch_size):
        chunk = [flat[k] for k in order[start:start + batch_size]]
        for (qi, ci, _), ll in zip(chunk, loglikelihoods(logits_fn, [pair for _, _, pair in chunk], max_len, device)):
            out[qi][ci] = ll
        if progress:
            progress(len(chunk))
    return out


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
    logits = logits_fn(batch.to(device))
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least float32, as lm-eval; float64 stays float64
    out = []
    for i, ((_, cont), r) in enumerate(zip(pairs, rows)):
        n = len(cont)
        # the log-softmax of the continuation's positions only: each position's is its own, as over the whole row
        logp = torch.log_softmax(logits[i, len(r) - n:len(r)].to(dtype), dim=-1)
        picked = logp.gather(-1, torch.tensor(cont, device=logp.device).unsqueeze(-1))
        out.append(float(picked.sum()))
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))  # ties to the first, as numpy's argmax


# What each accuracy divides a choice's log-likelihood by before the argmax (module docstring).
NORMALIZERS: dict[str, Callable[[Prepared, int], float]] = {
    "acc": lambda p, j: 1.0,
    "acc_norm": lambda p, j: p.norm_chars[j],  # lm-eval: characters of the choice
    "acc_per_token": lambda p, j: len(p.pairs[j][1]),  # OLMo: tokens of the continuation
    "acc_per_char": lambda p, j: p.continuation_chars[j],  # OLMo: characters of the continuation
}
# OLMo's metric names (config.json's primary_metric) as ours
OLMO_METRICS = {"acc_raw": "acc", "acc_per_char": "acc_per_char", "acc_per_token": "acc_per_token"}


def choice_metrics(prepared: list[Prepared], lls: list[list[float]]) -> dict:
    """acc, acc_norm, acc_per_token and acc_per_char over the questions, and each question's picks (module
    docstring)."""
    per_item, totals = [], dict.fromkeys(NORMALIZERS, 0)
    for p, ll in zip(prepared, lls):
        picks = {name: _argmax([ll[j] / div(p, j) for j in range(len(ll))]) for name, div in NORMALIZERS.items()}
        for name, pick in picks.items():
            totals[name] += pick == p.gold
        per_item.append({"loglikelihoods": ll, "gold": p.gold, "pick": picks["acc"]})
    n = len(prepared)
    return {**{name: totals[name] / n for name in NORMALIZERS}, "items": n, "per_item": per_item}


def score_questions(questions: list[Question], tok: Tokenizer, logits_fn: Logits, max_len: int,
                    device: torch.device, batch_size: int = 32,
                    progress: Callable[[int], None] | None = None) -> dict:
    """`choice_metrics` of the questions, scored in batches."""
    prepared = prepare(tok, questions)
    return choice_metrics(prepared, score_prepared(logits_fn, prepared, max_len, device, batch_size, progress))


def score_task(task: ChoiceTask, tok: Tokenizer, logits_fn: Logits, max_len: int, device: torch.device,
               batch_size: int = 32) -> dict:
    """acc, acc_norm and per-item log-likelihoods of an eval-choices task (module docstring)."""
    result = score_questions(task.questions(), tok, logits_fn, max_len, device, batch_size)
    return {"task": task.name, "acc": result["acc"], "acc_norm": result["acc_norm"], "items": result["items"],
            "per_item": result["per_item"]}
