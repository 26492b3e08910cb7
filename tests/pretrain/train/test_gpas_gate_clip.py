"""train.gpas_gate_clip clips the joint gradient norm of the GPAS gates inside the optimizer step, on the complete
gradients of a data-parallel ZeRO-1 run (pretrain/train/gate_clip.py), and is refused without GPAS."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import run_distributed_test
from helpers.train import random_lm_batches

from pretrain.config import load_config
from pretrain.errors import UserError


def _clipped_gate_gradients(max_norm: float):
    from deepspeed.utils import safe_get_full_grad

    from pretrain import compat
    from pretrain.train.distributed import init_distributed
    from pretrain.train.engine import build_engine
    from pretrain.train.gate_clip import ClipGateGradients
    from pretrain.train.steps import train_step

    cfg = load_config(None, ["model.gpas=true", "model.vocab_size=96", "model.d_model=32", "model.n_layers=3",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48", "model.max_seq_len=32",
                             "train.micro_batch_size=2", "train.global_batch_size=8", "parallel.zero_stage=1",
                             "data.seq_len=16", f"train.gpas_gate_clip={max_norm}"])
    topo = init_distributed(1, 1)
    built = build_engine(cfg, topo)
    gates = [p for n, p in built.engine.module.named_parameters() if n.endswith("residual.gate")]
    with torch.no_grad():
        for p in gates:
            p.fill_(0.5)  # away from 0, where g's gradient is small
    seen = {}
    compat.wrap_model_step(built.engine, lambda: seen.update(
        norm=float(torch.stack([safe_get_full_grad(p).double().norm() for p in gates]).norm())))
    hook = ClipGateGradients(max_norm)
    hook.on_start(type("Ctx", (), {"built": built, "topo": topo})())  # runs before the capture above
    train_step(built, random_lm_batches(cfg.model.vocab_size, built.gas, seed=topo.dp_rank), topo)
    return {"before": hook.last_norm, "after": seen["norm"], "gates": len(gates)}


@pytest.mark.processes
def test_gate_gradients_are_clipped_jointly_on_zero1():
    results = run_distributed_test(_clipped_gate_gradients, world_size=2, args=(1e-4,), timeout=300)
    for r in results:
        assert r["gates"] == 3 and r["before"] > 1e-3  # the clip had work to do
        assert r["after"] == pytest.approx(1e-4, rel=1e-3)
    assert results[0]["before"] == results[1]["before"]  # the averaged gradient, the same on both ranks


def test_gate_clip_without_gpas_is_refused():
    with pytest.raises(UserError, match="train.gpas_gate_clip=0.01: the model has no GPAS gates"):
        load_config(None, ["train.gpas_gate_clip=0.01"])
