"""Training under TP, PP and DP, with and without the fused loss and activation checkpointing, gives the single-process
losses; megatron and DeepSpeed agree on topology."""

from __future__ import annotations

import pytest

from helpers.distributed import run_distributed_test
from helpers.train import run_train, train_losses

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

STEPS = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run = str(tmp_path_factory.mktemp("single"))
    run_train(run, f"train.steps={STEPS}", cache_dir=data_cache)
    return train_losses(run)


@pytest.mark.parametrize(
    "layout, nproc",
    [
        pytest.param(["parallel.tp=2"], 2, id="tp2", marks=pytest.mark.compat),
        pytest.param(["parallel.pp=2"], 2, id="pp2"),
        pytest.param(["parallel.zero_stage=1"], 2, id="dp2-zero1"),  # DP = 2 with ZeRO-1
        pytest.param(["parallel.tp=2", "parallel.pp=2"], 4, id="tp2xpp2", marks=pytest.mark.compat),
        # the memory savers change what a step holds, not its losses (the reference: fused loss, no checkpointing)
        pytest.param(["train.fused_loss=false"], None, id="unfused"),
        pytest.param(["parallel.tp=2", "train.activation_checkpointing=full", "train.fused_loss=false"], 2,
                     id="tp2-full-unfused"),
        pytest.param(["parallel.pp=2", "train.activation_checkpointing=selective"], 2, id="pp2-selective"),
    ],
)
def test_loss_matches_single_process(tmp_path, data_cache, reference, layout, nproc):
    run_train(str(tmp_path), f"train.steps={STEPS}", *layout, nproc=nproc, cache_dir=data_cache)
    losses = train_losses(str(tmp_path))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it trains
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-4), f"step {step}: {losses[step]} vs single-process {ref}"


def test_a_checkpointed_run_resumes_to_the_same_losses(tmp_path, data_cache, reference):
    """Activation checkpointing and the fused loss are free to change on resume (pretrain/state/resume.py): stopped
    at step 2 with them on, resumed with them off, the losses are the reference's."""
    run = str(tmp_path)
    run_train(run, f"train.steps={STEPS}", "checkpoint.interval=2", "train.stop_at_step=2",
              "train.activation_checkpointing=full", cache_dir=data_cache)
    run_train(run, f"train.steps={STEPS}", "checkpoint.interval=2", "train.resume=auto", "train.fused_loss=false",
              cache_dir=data_cache)
    losses = train_losses(run)
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), f"step {step}: {losses[step]} vs {ref}"


# Not in the compatibility set: a tied pipeline is there in test_diagnostics.py, bf16 PP -> ZeRO-2 in test_resume_layouts.py.
def test_tied_embeddings_pipeline_and_zero2_match_single_process(tmp_path, data_cache):
    tied = ["model.tie_embeddings=true", f"train.steps={STEPS}"]
    run_train(str(tmp_path / "single"), *tied, cache_dir=data_cache)
    run_train(str(tmp_path / "pp2"), *tied, "parallel.pp=2", nproc=2, cache_dir=data_cache)
    run_train(str(tmp_path / "zero2"), *tied, "parallel.zero_stage=2", nproc=2, cache_dir=data_cache)
    ref = train_losses(str(tmp_path / "single"))
    for name in ("pp2", "zero2"):
        got = train_losses(str(tmp_path / name))
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-4), f"{name} step {step}: {got[step]} vs {ref[step]}"


def _coordinates(tp: int, pp: int):
    from pretrain.train.distributed import deepspeed_topology, init_distributed

    topo = init_distributed(tp, pp)  # raises if megatron and DeepSpeed disagree
    coord = deepspeed_topology(topo).get_coord(topo.rank)
    return (topo.tp_rank, topo.pp_rank, topo.dp_rank), (coord.model, coord.pipe, coord.data)


@pytest.mark.compat
def test_megatron_and_deepspeed_topologies_agree():
    results = run_distributed_test(_coordinates, world_size=8, args=(2, 2), timeout=240)
    megatron = [r[0] for r in results]
    assert megatron == [r[1] for r in results]
    # tp fastest, then dp, then pp (megatron's tp-cp-ep-dp-pp == DeepSpeed's pipe/data/model axes)
    assert megatron == [(r % 2, r // 4, (r // 2) % 2) for r in range(8)]


def test_completep_groups_under_tp_zero_pp_and_resume_match_single_process(tmp_path, data_cache, reference):
    """model.parametrization=completep's per-group learning rates, weight decays and epsilons (one optimizer group per
    set of factors, pretrain/config/param_groups.py) reach DeepSpeed's ZeRO-1 optimizer over TP = 2 shards and the
    pipeline engine's over PP = 2 stages as they reach the single-process AdamW, and a resumed run rebuilds them
    from its checkpoint: the same losses, and not the standard model's."""
    completep = ["model.parametrization=completep", "model.base_d_model=64", "model.base_n_layers=4",
                 "train.weight_decay=0.1", f"train.steps={STEPS}"]
    run_train(str(tmp_path / "single"), *completep, cache_dir=data_cache)
    run_train(str(tmp_path / "tp2"), *completep, "parallel.tp=2", "parallel.zero_stage=1", nproc=2,
              cache_dir=data_cache)
    run_train(str(tmp_path / "pp2"), *completep, "parallel.pp=2", nproc=2, cache_dir=data_cache)
    run_train(str(tmp_path / "resumed"), *completep, "train.stop_at_step=2", cache_dir=data_cache)
    run_train(str(tmp_path / "resumed"), *completep, "train.resume=auto", cache_dir=data_cache)
    single = train_losses(str(tmp_path / "single"))
    for name in ("tp2", "pp2", "resumed"):
        got = train_losses(str(tmp_path / name))
        assert sorted(got) == sorted(single) == list(range(1, STEPS + 1)), name
        for step in single:
            assert got[step] == pytest.approx(single[step], rel=1e-4), f"{name} {step}: {got[step]} vs {single[step]}"
    assert single[STEPS] != pytest.approx(reference[STEPS], rel=1e-3)  # the parametrization is in effect
