"""The coordinate check (`pretrain coord-check`, pretrain/cli/coord_check.py): a few training steps of the config's
model at several widths and depths, recording the mean |coordinate| of each activation at every step (the µP
papers' check: under a parametrization that transfers, the curves against width and depth are flat).

A width variant keeps the head dim, the query/key-value head ratio and ffn_hidden / d_model of the config; a depth
variant keeps the width. Under mup and completep the base shape (model.base_d_model, model.base_n_layers) is the
config's own shape where those keys are null, so every variant is scaled from the config's model. Training is
in-process on the CPU (or the GPU), fp32, AdamW with the run's parameter groups (pretrain/train/param_groups.py) at a
constant train.lr (no warm-up, no clipping), on one batch of seeded uniform random tokens (train.micro_batch_size x
data.seq_len), the same at every step; step t is the forward pass after t updates (t = 0..steps).

Activations (forward hooks): `embedding` (the embedding's output, after the scheme's part on it), per block
`blockL.attn` and `blockL.mlp` (the attention's and the MLP's outputs, before any output norm or branch multiplier)
and `blockL.residual` (the stream after the block), and `logits`. Summaries across blocks, compared across sizes:
`attn` and `mlp` (mean over blocks), `residual` (the stream after the last block).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from models.config import ModelConfig
from models.llama import Llama
from models.parametrization import table_rows
from pretrain.config import ExperimentConfig
from pretrain.errors import UserError
from pretrain.config.param_groups import param_groups

SUMMARIES = ("embedding", "attn", "mlp", "residual", "logits")


def width_variant(m: ModelConfig, width: int) -> ModelConfig:
    """The config's model at d_model = `width` (head dim, head ratio and MLP ratio kept)."""
    if width % m.head_dim:
        raise UserError(f"--widths: {width} is not a multiple of the head dim {m.head_dim} (d_model / n_heads)")
    heads = width // m.head_dim
    kv_heads = heads * m.n_kv_heads // m.n_heads
    if kv_heads < 1 or heads % kv_heads:
        raise UserError(f"--widths: {width} gives {heads} heads, which the query/key-value ratio "
                        f"{m.n_heads // m.n_kv_heads} does not divide")
    ffn = round(m.ffn_hidden * width / m.d_model)
    return dataclasses.replace(m, d_model=width, n_heads=heads, n_kv_heads=kv_heads, ffn_hidden=ffn,
                               **base_keys(m))


def depth_variant(m: ModelConfig, depth: int) -> ModelConfig:
    return dataclasses.replace(m, n_layers=depth, **base_keys(m))


def base_keys(m: ModelConfig) -> dict:
    """The base shape every variant is scaled from: the config's keys, or its own shape where they are null."""
    if m.parametrization == "standard":
        return {}
    keys = {"base_d_model": m.base_d_model or m.d_model}
    if m.parametrization == "completep":
        keys["base_n_layers"] = m.base_n_layers or m.n_layers
    return keys


def record(cfg: ExperimentConfig, model_cfg: ModelConfig, steps: int, device: torch.device) -> dict[str, list]:
    """{activation: [mean |coordinate| at step 0..steps]} of `model_cfg` trained as the module docstring says."""
    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(cfg.train.seed)
    model = Llama(model_cfg, seed=cfg.train.seed).to(device)
    model.fused_loss = False  # the logits are a tensor the hook sees
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, run_cfg), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    values: dict[str, list] = {}
    current: dict[str, float] = {}

    def hook(name):
        def save(module, inputs, output):
            current[name] = output.detach().abs().mean().item()
        return save

    handles = [model.emb_out.register_forward_hook(hook("embedding")),
               model.logit_scale.register_forward_hook(hook("logits"))]
    for l, block in enumerate(model.blocks, start=1):
        handles += [block.attn.register_forward_hook(hook(f"block{l}.attn")),
                    block.mlp.register_forward_hook(hook(f"block{l}.mlp")),
                    block.register_forward_hook(hook(f"block{l}.residual"))]
    gen = torch.Generator().manual_seed(t.seed)
    # One batch, every step: the updates then line up with the activations they act on, as they do on real text
    # (fresh uniform random tokens would give updates uncorrelated with the next batch, and a width slope of -1/2
    # under µP that only says the data has no structure).
    tokens = torch.randint(0, model_cfg.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
    tokens = tokens.to(device)
    try:
        for step in range(steps + 1):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            if not math.isfinite(loss.item()):
                raise UserError(f"coord-check: the loss of d_model={model_cfg.d_model}, n_layers="
                                f"{model_cfg.n_layers} is {loss.item()} at step {step}; lower train.lr")
            L = model_cfg.n_layers
            current["attn"] = sum(current[f"block{l}.attn"] for l in range(1, L + 1)) / L
            current["mlp"] = sum(current[f"block{l}.mlp"] for l in range(1, L + 1)) / L
            current["residual"] = current[f"block{L}.residual"]
            for name, value in current.items():
                values.setdefault(name, []).append(value)
            if step < steps:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return values


def log_log_slope(sizes: list[int], values: list[float]) -> float:
    """The least-squares slope of log(value) against log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def sweep(cfg: ExperimentConfig, axis: str, sizes: list[int], steps: int, device: torch.device) -> dict[int, dict]:
    """{size: `record` of the config's model at that width (`axis` "width") or depth ("depth")}."""
    variant = width_variant if axis == "width" else depth_variant
    try:
        return {size: record(cfg, variant(cfg.model, size), steps, device) for size in sizes}
    except ValueError as e:  # a variant the model config refuses
        raise UserError(f"coord-check: {e}") from None


def slopes(by_size: dict[int, dict]) -> dict[str, float]:
    """{summary activation: log-log slope of its mean |coordinate| at the last step against the size}."""
    sizes = sorted(by_size)
    return {a: log_log_slope(sizes, [by_size[s][a][-1] for s in sizes]) for a in SUMMARIES}


def coord_check(cfg: ExperimentConfig, widths: list[int], depths: list[int], steps: int,
                device: torch.device | None = None) -> dict:
    """The result `pretrain coord-check` writes (coord_check.json): per width and depth, per activation and step,
    the mean |coordinate|; per summary activation the log-log slope at the last step against width and depth, and
    their largest magnitudes (`max_abs_slope_width`, `max_abs_slope_depth`)."""
    device = device or torch.device("cpu")
    m = cfg.model
    by_width = sweep(cfg, "width", widths, steps, device)
    by_depth = sweep(cfg, "depth", depths, steps, device)
    slopes_width, slopes_depth = slopes(by_width), slopes(by_depth)
    return {
        "norm_scheme": m.norm_scheme, "parametrization": m.parametrization,
        "base": base_keys(m), "d_model": m.d_model, "n_layers": m.n_layers, "lr": cfg.train.lr, "steps": steps,
        "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.data.seq_len,
        "multipliers": {group: dataclasses.asdict(factors) for group, factors in table_rows(m)},
        "widths": widths, "depths": depths, "summaries": list(SUMMARIES),
        "width": {str(w): by_width[w] for w in widths}, "depth": {str(d): by_depth[d] for d in depths},
        "slopes_width": slopes_width, "slopes_depth": slopes_depth,
        "max_abs_slope_width": max(abs(s) for s in slopes_width.values()),
        "max_abs_slope_depth": max(abs(s) for s in slopes_depth.values()),
    }
