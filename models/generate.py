"""Autoregressive sampling from a (TP = 1) `Llama`, with a key/value cache.

    completions = generate(model, [prompt_ids, ...], max_new_tokens=64, eos_id=3)   # greedy

Prompts of different lengths run together, left-padded: each row's positions start at 0 at its first real token
and padded keys are masked out, so a row's tokens are those it gets alone. The cache holds each layer's keys and
values after RoPE; the first forward fills it with the prompts, every later one adds one token per row and
attends to everything cached. `use_cache=False` recomputes the whole sequence at every step instead (the
reference the cache is tested against). Sampling: greedy at temperature 0 (the default), otherwise softmax at
that temperature restricted to the smallest set of tokens whose probability reaches `top_p`, drawn from one
generator per prompt seeded by (seed, prompt index), so a prompt's completion does not depend on its batch.
A row stops at EOS (not returned), after `max_new_tokens` or at the model's `max_seq_len`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.llama import Llama


class LayerCache:
    """Keys and values of one attention layer, [B, K, S, E] each, grown by `append`."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys and values ([B, K, T, E]); return all of them so far."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """One `LayerCache` per block, passed to `Llama.forward(cache=...)`."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _pick(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """The next token of each row from its last-position logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # probability of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs.cpu()
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)]).to(logits.device)


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], eos_id: int, sampling: Sampling | None = None,
             use_cache: bool = True, max_new_tokens: list[int] | None = None, first_index: int = 0) -> list[list[int]]:
    """The completion (token ids, EOS excluded) of each prompt; `max_new_tokens` optionally caps each row on its
    own (at most `sampling.max_new_tokens`). `first_index`: the index of prompts[0] in the caller's list, which
    seeds the per-prompt generators."""
    sampling = sampling or Sampling()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.rope_cos.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    limit = model.cfg.max_seq_len
    if longest > limit:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's max_seq_len={limit}")
    caps = [min(sampling.max_new_tokens, m) for m in (max_new_tokens or [sampling.max_new_tokens] * B)]
    steps = min(max(caps), limit - longest + 1)
    pad = [longest - len(p) for p in prompts]
    tokens = torch.tensor([[0] * n + list(p) for n, p in zip(pad, prompts)], dtype=torch.long, device=device)
    valid = torch.arange(longest, device=device)[None, :] >= torch.tensor(pad, device=device)[:, None]  # [B, L]
    offset = torch.tensor(pad, device=device)
    generators = [torch.Generator().manual_seed(sampling.seed * 1_000_003 + first_index + i) for i in range(B)]
    cache = KVCache(len(model.blocks)) if use_cache else None
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seq, keys_valid = tokens, valid
    for step in range(steps):
        S = seq.shape[1]
        if cache is None or step == 0:  # the whole (padded) sequence
            new = seq
            positions = (torch.arange(S, device=device)[None, :] - offset[:, None]).clamp(min=0)
            causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
            # padded queries see themselves, so that no row of the mask is empty
            mask = (causal & keys_valid[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
        else:  # one new token per row, which sees every valid cached key
            new = seq[:, -1:]
            positions = (S - 1 - offset)[:, None]
            mask = keys_valid[:, None, :]
        logits = model(new, positions=positions, mask=mask.unsqueeze(1), cache=cache)[:, -1].float()
        nxt = _pick(logits, sampling, generators)
        for b in range(B):
            if done[b]:
                continue
            if int(nxt[b]) == eos_id:
                done[b] = True
            else:
                out[b].append(int(nxt[b]))
                done[b] = len(out[b]) >= caps[b]
        if bool(done.all()) or S + 1 > limit:
            break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        keys_valid = torch.cat([keys_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
    return out
