"""What a parallel layout allows, checked from the config alone (no torch, no DeepSpeed): `pretrain train` checks it
when it builds the engine (pretrain/train/engine.py), `pretrain plan` before it estimates anything, with the same
one-line errors."""

from __future__ import annotations

from pretrain.config.sections import ExperimentConfig
from pretrain.errors import UserError


def gradient_accumulation_steps(cfg: ExperimentConfig, dp: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank: global batch / (micro-batch * dp)."""
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size * data-parallel size = {cfg.train.micro_batch_size} * {dp}"
        )
    return cfg.train.global_batch_size // per_step


def check_parallel_support(cfg: ExperimentConfig) -> None:
    """The ZeRO stage, pipeline depth and precision combinations the engine trains."""
    zero, pp = cfg.parallel.zero_stage, cfg.parallel.pp
    if pp > 1 and zero > 1:
        raise UserError(f"parallel.zero_stage={zero} does not work with pipeline parallelism (DeepSpeed); use 0 or 1")
    if zero == 3:
        raise UserError(
            "parallel.zero_stage=3 is not supported: its parameter partitioning conflicts with the megatron-core "
            "tensor-parallel layers and the per-layer diagnostics; use zero_stage 0-2"
        )
    if cfg.train.precision == "bf16" and zero == 0 and pp == 1:
        # DeepSpeed's only bf16 optimizer without ZeRO or a pipeline accumulates gradients in bf16.
        raise UserError(
            "train.precision=bf16 needs parallel.zero_stage >= 1 (or pipeline parallelism): without them DeepSpeed "
            "accumulates gradients in bf16; zero_stage=1 keeps fp32 gradients and master weights and costs nothing "
            "on one GPU"
        )
    if pp > cfg.model.n_layers:
        raise UserError(f"parallel.pp={pp} exceeds model.n_layers={cfg.model.n_layers}")
