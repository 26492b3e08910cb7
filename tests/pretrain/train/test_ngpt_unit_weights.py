"""nGPT keeps its matrices on the unit sphere exactly under tensor parallelism x ZeRO-1: after every optimizer step
each full row (column for the output projections) has norm 1 in the model *and* in the optimizer's fp32 master copy,
which ZeRO partitions across data-parallel ranks without regard to rows (pretrain/train/unit_weights.py)."""

from __future__ import annotations

import torch
import pytest

from helpers.distributed import run_distributed_test
from helpers.train import random_lm_batches

from models.norms import NGPT_UNIT_WEIGHTS

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)


def _full_norms(p: torch.Tensor, dim: int, tp_group, split_dim: int | None) -> torch.Tensor:
    """Norms along `dim` of the full (TP = 1) tensor of shard `p`."""
    if split_dim is not None:
        shards = [torch.empty_like(p) for _ in range(torch.distributed.get_world_size(tp_group))]
        torch.distributed.all_gather(shards, p.contiguous(), group=tp_group)
        p = torch.cat(shards, dim=split_dim)
    return p.double().norm(dim=dim)


def _steps_keep_unit_rows():
    from deepspeed.utils import safe_get_full_fp32_param
    from megatron.core import parallel_state

    from models.parts import unit_weight_norms
    from pretrain.config import load_config
    from pretrain.train.distributed import init_distributed
    from pretrain.train.engine import build_engine
    from pretrain.train.steps import train_step
    from pretrain.train.unit_weights import KeepUnitWeights

    cfg = load_config(None, ["model.norm_scheme=ngpt", "model.vocab_size=96", "model.d_model=32", "model.n_layers=2",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48", "model.max_seq_len=64",
                             "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=0.01",
                             "parallel.tp=2", "parallel.zero_stage=1", "data.seq_len=16"])
    topo = init_distributed(2, 1)
    built = build_engine(cfg, topo)
    hook = KeepUnitWeights(NGPT_UNIT_WEIGHTS)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    drift = []
    for step in range(3):
        train_step(built, random_lm_batches(cfg.model.vocab_size, built.gas, seed=10 * step + topo.dp_rank), topo)
        weights = unit_weight_norms(built.engine.module, NGPT_UNIT_WEIGHTS)
        # Before the hook: the step moved the master rows off the sphere (so the checks below can fail).
        drift.append(max((safe_get_full_fp32_param(p).double().norm(dim=d) - 1).abs().max().item()
                         for p, d in weights.values()))
        hook.after_step(type("Ctx", (), {"built": built})(), 0)
        for name, (p, dim) in weights.items():
            split = getattr(p, "tp_split", None)
            split_dim = split.dim if split is not None and split.size > 1 else None
            master = safe_get_full_fp32_param(p)
            assert torch.equal(master.to(p.dtype), p.detach()), name
            for what, t in (("model", p.detach()), ("fp32 master", master)):
                err = (_full_norms(t, dim, tp_group, split_dim) - 1).abs().max().item()
                assert err < 1e-6, f"{name} {what}: a full vector has norm 1 + {err:.2g}"
    assert min(drift) > 1e-4, drift
    return {"drift": drift, "n": len(weights)}


def test_unit_rows_after_every_step_on_tp2_x_zero1():
    results = run_distributed_test(_steps_keep_unit_rows, world_size=4, timeout=300)
    assert all(r["n"] == 2 + 5 * 2 for r in results)  # tok_emb, head; qkv, o, gate, up, down per block
