"""Running `pretrain train` for real (subprocess, optionally several ranks) and reading its run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tiny preset on short sequences and small batches: a step takes a fraction of a second on 2 cores.
TINY = [
    "data.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=2",
    "eval.interval=0", "eval.tokens=2048", "logging.interval=1", "logging.progress_bar=false", "checkpoint.interval=0",
]


def train_env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    env.update(PRETRAIN_CACHE=cache_dir, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def train_cmd(run_dir: str, *overrides: str, nproc: int | None = None, script: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, *(script or ["-m", "pretrain"]), "train"]
    if nproc:
        cmd += ["--nproc-per-node", str(nproc)]
    return cmd + [os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={run_dir}", *TINY, *overrides]


def run_train(run_dir: str, *overrides: str, cache_dir: str, nproc: int | None = None, timeout: float = 400,
              expect: int = 0, script: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`env`: more environment variables for the run (over `train_env`'s)."""
    proc = subprocess.run(
        train_cmd(run_dir, *overrides, nproc=nproc, script=script), cwd=REPO, env={**train_env(cache_dir), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != expect:
        raise AssertionError(
            f"pretrain train exited {proc.returncode}, expected {expect}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(run_dir: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def latest(run_dir: str) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


class BatchIter:
    """What `pretrain.train.steps.train_step` reads from a loader, for in-process engine tests: next() gives the
    next micro-batch; `token_weighted` says how the step weighs them."""

    def __init__(self, batches, token_weighted: bool = False):
        self.batches, self.token_weighted = iter(batches), token_weighted

    def __next__(self):
        return next(self.batches)


def random_lm_batches(vocab_size: int, n: int, seed: int, rows: int = 2, seq_len: int = 16) -> BatchIter:
    """`n` random pretraining micro-batches of `rows` x `seq_len` tokens."""
    from pretrain.data.batches import LMBatch  # tests that spawn ranks import this module before torch.distributed starts

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        t = torch.randint(vocab_size, (rows, seq_len + 1), generator=gen)
        batches.append(LMBatch(t[:, :-1], t[:, 1:]))
    return BatchIter(batches)
