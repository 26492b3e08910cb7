"""Loss and gradient-norm spikes (pretrain/train/spikes.py): the running median/MAD on the device, and
train.on_spike's rollback, after which the run trains as a run that never saw the skipped batch."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
from helpers.train import REPO, metrics, train_cmd, train_env

from pretrain.train.distributed import free_port
from pretrain.train.spikes import SpikeDetector, SpikeResponse, Spikes
from pretrain.train.syncs import HostSyncs


def test_a_rise_far_above_the_running_median_is_a_spike_and_stays_out_of_the_window():
    d = SpikeDetector(window=5, threshold=6.0, device=torch.device("cpu"))
    values = [5.0, 4.9, 5.1, 4.8, 5.0, 5.05, 9.0, 5.0, float("nan"), 4.9]
    with HostSyncs() as s:
        rows = [d.check(torch.tensor(v)) for v in values]
    assert s.count == 0, s.sites  # all on the device: nothing read on a step
    flags = [bool(r[0]) for r in rows]
    assert flags == [False] * 6 + [True] + [False] * 3
    # the window before step 7 holds 5.0, 4.9, 5.1, 4.8, 5.0 (step 6's 5.05 replaced the oldest, 5.0)
    window = torch.tensor([5.05, 4.9, 5.1, 4.8, 5.0])
    median = window.median()
    mad = (window - median).abs().median()
    assert float(rows[6][1]) == pytest.approx(float(median))
    assert float(rows[6][2]) == pytest.approx(float(median + 6.0 * max(1.4826 * mad, 0.1 * median)))
    # the spike and the nan left holes in the window (it holds the last 5 steps' other values); a fall is no spike
    assert 9.0 not in d.history.tolist() and int(torch.isnan(d.history).sum()) == 2
    assert not bool(d.check(torch.tensor(0.1))[0])


def test_too_short_a_window_flags_nothing_and_a_flat_series_needs_a_relative_rise():
    d = SpikeDetector(window=20, threshold=6.0, device=torch.device("cpu"))
    assert not any(bool(d.check(torch.tensor(v))[0]) for v in [1.0] * 7 + [100.0])  # 7 values < min(20, 8)
    flat = SpikeDetector(window=8, threshold=6.0, device=torch.device("cpu"))
    for _ in range(8):
        flat.check(torch.tensor(2.0))
    assert not bool(flat.check(torch.tensor(3.19))[0])  # MAD 0: the floor 0.1 * median * 6 = 1.2
    assert bool(flat.check(torch.tensor(3.21))[0])
    # a healthy run's gradient norm: a rise of 1.25x over a smooth median is noise (the quick start once logged it)
    smooth = SpikeDetector(window=50, threshold=6.0, device=torch.device("cpu"))
    for v in [0.50, 0.51, 0.505, 0.52, 0.50, 0.51, 0.49, 0.515, 0.50, 0.506]:
        smooth.check(torch.tensor(v))
    assert not bool(smooth.check(torch.tensor(0.63))[0]) and bool(smooth.check(torch.tensor(0.85))[0])


def test_events_name_the_series_with_value_median_and_threshold():
    spikes = Spikes(window=4, threshold=3.0, device=torch.device("cpu"))
    rows = [spikes.check(torch.tensor(loss), torch.tensor(norm)).tolist()
            for loss, norm in [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (3.0, 1.0), (3.0, 50.0)]]
    assert [Spikes.events(s, r, 3.0) for s, r in enumerate(rows, 1)][:4] == [[]] * 4
    (event,) = Spikes.events(5, rows[4], 3.0)
    assert event["series"] == "grad_norm" and event["value"] == 50.0 and event["median"] == pytest.approx(1.0)
    assert event["step"] == 5 and event["event"] == "spike" and event["threshold"] < 50.0


def _response(mode: str, max_rollbacks: int, snapshot_interval: int = 2):
    from types import SimpleNamespace

    train = SimpleNamespace(on_spike=mode, max_rollbacks=max_rollbacks, snapshot_interval=snapshot_interval,
                            global_batch_size=8)
    loader = SimpleNamespace(consumed_samples=0)
    cfg = SimpleNamespace(train=train, checkpoint=SimpleNamespace(interval=0), logging=SimpleNamespace(interval=1))
    return SpikeResponse(cfg, built=None, topo=None, loader=loader,
                         spikes=Spikes(0, 6.0, torch.device("cpu")), skipped_batches=[16, 24]), loader


def test_skipped_data_positions_are_stepped_over_and_max_rollbacks_ends_the_run():
    response, loader = _response("rollback", max_rollbacks=0)
    assert response.skip(8) == 8 and response.skip(16) == 32 and loader.consumed_samples == 32
    assert response.trainer_state() == {"skipped_batches": [16, 24]}
    stop = response.respond([5, 6], step=7)
    assert stop.startswith("a spike at step 5 after train.max_rollbacks=0 rollbacks; stopping.")
    log_only, _ = _response("log", max_rollbacks=3, snapshot_interval=0)
    assert log_only.respond([5], step=7) is None


SCRIPT = [os.path.join(REPO, "tests", "helpers", "scripts", "spiky_data.py")]
# 8 steps of one global batch of 8 samples; batch 1 (step 2) turns inf in blocks.1.mlp.up, batch 5 (step 6) spikes
COMMON = ["train.steps=8", "train.spike_window=3", "train.spike_threshold=50", "train.warmup_steps=2"]


def _start(run: str, overrides: list[str], env: dict, cache: str, nproc: int | None = None) -> subprocess.Popen:
    python, *cmd = train_cmd(run, *COMMON, *overrides, script=SCRIPT)
    if nproc:  # the ranks themselves run the script (`--nproc-per-node` would start `-m pretrain` in them)
        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()), *cmd]
    return subprocess.Popen([python, *cmd], cwd=REPO,
                            env={**train_env(cache), "PYTHONPATH": REPO, "GBS": "8", "INF_BATCHES": "1", "INF_MODULE": "blocks.1.mlp.up",
                                 **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}  # the last record of a step wins


def _rolled_back_equals_never_seen(tmp_path, data_cache, layout: list[str], nproc: int | None, state: list[str],
                                   where: str, mode: str = "skip_batch", inf: bool = True):
    """`inf`: batch 1 also turns inf (step 2), and its first non-finite module is named."""
    spiky, never = str(tmp_path / "spiky"), str(tmp_path / "never")
    procs = [
        _start(spiky, [*layout, f"train.on_spike={mode}", *state],
               {"SPIKE_BATCHES": "5", **({} if inf else {"INF_BATCHES": ""})}, data_cache, nproc),
        _start(never, layout, {"SHIFT_FROM": "5", **({} if inf else {"INF_BATCHES": ""})}, data_cache,
               nproc),  # batch 5 never read
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    log = outs[0]
    assert re.search(r"step 6: loss spike \d{4} ", log), log[-3000:]  # the loss times 1000
    assert f"spike at step 6: rolled back to step 4 ({where}), skipping the data of step 6 (rollback 1 of at most " \
           "3)" in log, log[-3000:]
    events = [m for m in metrics(spiky) if "event" in m]
    assert {(e["event"], e["step"]) for e in events} >= {("spike", 6), ("rollback", 4)}
    if inf:
        assert "first non-finite: blocks.1.mlp.up (forward) at step 2" in log, log[-3000:]
        assert next(e for e in events if e["event"] == "non_finite")["module"] == "blocks.1.mlp.up"
    assert not [m for m in metrics(never) if m.get("event") == "spike"]
    ours, theirs = _losses(spiky), _losses(never)
    assert ours == theirs, (ours, theirs)  # steps 5 to 8 trained again: the same numbers, bit for bit
    with open(os.path.join(spiky, "checkpoints", "step_00000008", "trainer_state.json")) as f:
        assert json.load(f)["skipped_batches"] == [40]  # batch 5's data position: a resume skips it again
    return ours


@pytest.mark.processes
def test_rollback_trains_as_a_run_that_never_saw_the_spiking_batch(tmp_path, data_cache):
    # to the in-memory snapshot of step 4 (taken every 2 steps)
    _rolled_back_equals_never_seen(tmp_path, data_cache, [], None, ["train.snapshot_interval=2"], "in-memory snapshot")


@pytest.mark.processes
def test_rollback_under_tensor_parallelism_trains_as_a_run_that_never_saw_the_spiking_batch(tmp_path, data_cache):
    # to the last checkpoint, step 4's (saved every 2 steps), on two tensor-parallel ranks
    checkpoint = os.path.join(tmp_path, "spiky", "checkpoints", "step_00000004")
    _rolled_back_equals_never_seen(tmp_path, data_cache, ["parallel.tp=2"], 2, ["checkpoint.interval=2"],
                                   f"checkpoint {checkpoint}")


@pytest.mark.processes
def test_rollback_under_pipeline_parallelism_trains_as_a_run_that_never_saw_the_spiking_batch(tmp_path, data_cache):
    # to the last checkpoint (step 4's) on two pipeline stages, train.on_spike=rollback; the spike enters through the
    # pipeline's loss function (its stages never call Llama.forward), and no batch turns inf: pipelined runs' first
    # non-finite values are not located
    checkpoint = os.path.join(tmp_path, "spiky", "checkpoints", "step_00000004")
    _rolled_back_equals_never_seen(tmp_path, data_cache, ["parallel.pp=2"], 2, ["checkpoint.interval=2"],
                                   f"checkpoint {checkpoint}", mode="rollback", inf=False)


def test_per_layer_gradient_norms_are_checked_by_the_same_rule_on_the_host():
    from pretrain.train.spikes import HostSpikes

    spikes = HostSpikes(window=8, threshold=6.0)
    for step in range(1, 9):
        assert spikes.check(step, {"grad_norm/l01": 1.0 + 0.01 * (step % 3), "grad_norm/l02": 2.0}) == []
    (event,) = spikes.check(9, {"grad_norm/l01": 1.0, "grad_norm/l02": 9.0})
    assert (event["series"], event["step"], event["value"], event["median"]) == ("grad_norm/l02", 9, 9.0, 2.0)
    assert spikes.history["grad_norm/l02"] == [2.0] * 8  # the spike stays out of the window
    assert HostSpikes(window=0, threshold=6.0).check(1, {"grad_norm/l01": 1e9}) == []
