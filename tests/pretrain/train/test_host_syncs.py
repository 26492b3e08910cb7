"""Host synchronisations per training step (issue 28): a step that logs nothing reads nothing from the device.

`pretrain.train.syncs.HostSyncs` counts the reads (a dispatch mode and a torch-function mode, so it sees them on CPU
too); `logging.host_syncs=true` makes the loop record, at each logged step, that step's count and the most of any
quiet step since the last record, with the sites. On our own paths (fp32 ZeRO-0 through GuardedAdamW, SFT's
token-weighted step, the pipeline) a quiet step makes none and a logged step one (the settle's single transfer).
DeepSpeed's ZeRO and bf16 optimizers decide on the host whether to skip an update; those reads are theirs, named
here and in docs/training.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.train import REPO, metrics, run_train, train_env

from pretrain.train.syncs import HostSyncs


def test_counter_sees_every_kind_of_device_read():
    t = torch.arange(6.0)
    with HostSyncs() as s:
        t.sum().item()
        float(t[1])
        bool(t[2] > 0)
        int(t[3])
        t.tolist()
        t.nonzero()
        t[t > 2]  # boolean indexing: the output size depends on the data
    assert s.count == 7, s.sites
    assert all("test_host_syncs.py" in site for site in s.sites)


def test_counter_ignores_device_work_and_host_memory():
    t = torch.arange(6.0)
    with HostSyncs() as s:
        u = (t * 2).cumsum(0).clamp(max=5.0)
        torch.where(torch.isfinite(u), u, 0.0).sum()
        t.numpy()  # refuses a device tensor: always host memory
    assert s.count == 0, s.sites


# DeepSpeed's reads (DeepSpeed 0.19): the ZeRO 1-2 step reads its overflow flag (has_overflow) and checks the norm
# for inf/nan three times (is_invalid_grad_norm); the bf16 optimizer of a pipeline checks the norm once and compares
# the clip factor with 1 on the host (clip_tensors_by_global_norm). All sit in the optimizer step at the end of the
# step: the first waits for the backward to finish, the rest find the queue nearly empty. Removing them would mean
# replacing DeepSpeed's optimizers.
DEEPSPEED_READS = {"has_overflow", "is_invalid_grad_norm", "clip_tensors_by_global_norm"}

COUNTED = ["train.steps=6", "logging.interval=3", "logging.host_syncs=true"]
LAYOUTS = {  # id: (overrides, nproc, DeepSpeed's reads on a quiet step at most); "sft" trains configs/sft/tiny.yaml
    "fp32": ([], None, 0),
    "sft": ([], None, 0),
    "pp2": (["parallel.pp=2"], 2, 0),
    "bf16-zero1": (["train.precision=bf16", "parallel.zero_stage=1"], None, 4),
    "bf16-pp2": (["train.precision=bf16", "parallel.pp=2"], 2, 2),
}


@pytest.mark.processes
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_quiet_steps_read_nothing_from_the_device(tmp_path, data_cache, name):
    overrides, nproc, deepspeed_reads = LAYOUTS[name]
    run = str(tmp_path)
    if name == "sft":  # packed rows, the token-weighted step
        cmd = [sys.executable, "-m", "pretrain", "train", os.path.join(REPO, "configs", "sft", "tiny.yaml"),
               f"run.dir={run}", "data.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
               "train.init_from=null", "train.warmup_steps=2", "eval.interval=0", "checkpoint.interval=0",
               "diagnostics.interval=0",
               "logging.progress_bar=false", *COUNTED]
        proc = subprocess.run(cmd, cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        run_train(run, *COUNTED, *overrides, nproc=nproc, cache_dir=data_cache)
    records = [m for m in metrics(run) if "host_syncs" in m]
    assert [m["step"] for m in records] == [3, 6]
    for m in records:
        sites = m["host_sync_sites"]
        if deepspeed_reads == 0:
            assert m["host_syncs_quiet"] == 0, sites
            assert m["host_syncs"] == 1, sites  # the settle: losses, skip flags and grad norm in one transfer
            assert list(sites) == [next(s for s in sites if "pretrain/train/health.py" in s)]
        else:
            assert 0 < m["host_syncs_quiet"] <= deepspeed_reads, sites
            assert all("/deepspeed/" in s and s.rsplit(" in ", 1)[1] in DEEPSPEED_READS for s in sites), sites
            assert m["host_syncs"] == m["host_syncs_quiet"] + 1  # theirs and the settle


def test_guarded_adamw_clips_and_skips_on_the_device():
    """ZeRO-0's optimizer: a non-finite gradient norm leaves weights, moments and Adam's step count as they were
    (the fused kernel's found_inf), without a read; a finite one clips to train.grad_clip as torch's clip does."""
    from pretrain.train.engine import GuardedAdamW

    def params():
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))]

    ours, ref = params(), params()
    opt = GuardedAdamW([{"params": ours, "weight_decay": 0.1}], clip=0.5, model_parallel_group=None,
                       replicated_owner=True, lr=1e-2)
    ref_opt = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2, fused=True)
    for step, bad in enumerate([False, True, False]):
        grads = [torch.full_like(p, 0.3 * (step + 1)) for p in ours]
        if bad:
            grads[1][0] = float("inf")
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        with HostSyncs() as s:
            opt.step()
        assert s.count == 0, s.sites
        assert float(opt.skipped) == float(bad)
        if not bad:
            torch.nn.utils.clip_grad_norm_(ref, 0.5)
            ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(int(opt.state[p]["step"]) == 2 for p in ours)
