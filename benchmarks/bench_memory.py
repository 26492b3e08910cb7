"""Peak memory of one training step on CPU: the fused loss against the unfused one, and activation checkpointing
(full, selective) against none, each measured in a fresh interpreter (the step's rise of the process's peak RSS
over what the model, its gradients and the optimizer state already hold), with the ratios of the same run.

    python benchmarks/bench_memory.py

Two shapes: the loss at V = 32,000, T = 1,024 (a 2-block, d 64 model whose logits dwarf everything else), and
checkpointing on a 16-block model (d 256, V 256, T 1,024) whose activations do. tests/models/test_memory_savers.py
runs the same child (`--child JSON`) for its bounds; docs/PERFORMANCE.md gives the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The loss dominates: 4 x 1,024 tokens at V = 32,000 is 0.5 GB of fp32 logits, their log-softmax and gradient as much.
LOSS_SHAPE = dict(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=176, max_seq_len=1024)
# The blocks dominate: 16 blocks of 4 x 1,024 tokens at d 256, a small vocabulary.
BLOCKS_SHAPE = dict(vocab_size=256, d_model=256, n_layers=16, n_heads=4, n_kv_heads=4, ffn_hidden=688,
                    max_seq_len=1024)
CASES = {
    "loss unfused": dict(shape=LOSS_SHAPE, fused_loss=False, recompute="none"),
    "loss fused": dict(shape=LOSS_SHAPE, fused_loss=True, recompute="none"),
    "blocks plain": dict(shape=BLOCKS_SHAPE, fused_loss=True, recompute="none"),
    "blocks selective": dict(shape=BLOCKS_SHAPE, fused_loss=True, recompute="selective"),
    "blocks full": dict(shape=BLOCKS_SHAPE, fused_loss=True, recompute="full"),
}


def rss_peak_bytes() -> int:
    import resource  # POSIX only, like the rest of the benchmark's child

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(case: dict, seq: int = 1024) -> dict:
    """One AdamW step of the case's model in this (fresh) process: the rise of the peak RSS during the step's
    forward and backward over the RSS right before it (model, gradients and optimizer state already allocated by a
    first step, so only what the step itself holds counts)."""
    import torch

    from models.config import ModelConfig
    from models.llama import Llama, recompute

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Llama(ModelConfig(**case["shape"]), seed=0)
    recompute(model, case["recompute"], case["fused_loss"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vocab = case["shape"]["vocab_size"]
    tokens = torch.randint(vocab, (case.get("batch", 4), seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)

    def step() -> float:
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated: the step adds only activations
        loss = model(tokens, labels)
        loss.backward()
        opt.step()
        return loss.item()

    step()  # gradients and Adam moments now exist
    before_peak, before = rss_peak_bytes(), rss_now_bytes()
    loss = step()
    return dict(step_peak_bytes=max(0, rss_peak_bytes() - before), held_bytes=before, loss=loss,
                peak_was_already=before_peak)


def measure(case: dict) -> dict:
    """`child(case)` in a fresh interpreter (so no earlier step's high-water mark hides this one)."""
    # glibc serves blocks of 64 KiB and more by mmap and returns them when freed, so the RSS follows the live
    # tensors instead of keeping an earlier step's freed activations (its default threshold adapts upward)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{case}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    got = {name: measure(case) for name, case in CASES.items()}
    mib = {name: r["step_peak_bytes"] / 2**20 for name, r in got.items()}
    for name, r in got.items():
        print(f"{name:18s} step peak +{mib[name]:8.1f} MiB over {r['held_bytes'] / 2**20:7.1f} MiB held "
              f"(loss {r['loss']:.4f})")
    print(f"fused / unfused loss step peak:       {mib['loss fused'] / mib['loss unfused']:.2f}")
    print(f"selective / plain blocks step peak:   {mib['blocks selective'] / mib['blocks plain']:.2f}")
    print(f"full / plain blocks step peak:        {mib['blocks full'] / mib['blocks plain']:.2f}")


if __name__ == "__main__":
    main()
