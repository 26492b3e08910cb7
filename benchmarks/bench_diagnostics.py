"""Step-time overhead of the per-layer diagnostics (pretrain/diagnostics/) on the tiny preset, in-process.

    python benchmarks/bench_diagnostics.py [--rounds 12] [--steps 5] [--config configs/tiny.yaml]

Three variants of the training loop's step (`pretrain.train.steps.train_step`, the DeepSpeed engine `pretrain train`
builds, the config's batch and sequence length, random tokens):

    baseline  no diagnostics code at all (engine never wrapped, no calls)
    off       diagnostics.interval=0: the hooks `pretrain.features.hooks_for` gives (none but the signal's, which
              runs once per step after it; left out here), called as the loop calls them
    every     diagnostics.interval=1: `LayerStatsHooks`: slot taps, gradient norms, layer_stats.jsonl and
              TensorBoard every step

The machine may be shared, so the variants are interleaved round by round (baseline, off, every, then rotated)
and each one's median step time is compared. Prints off/baseline (target ~1.00) and every/baseline (target
<= 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.train.distributed import use_cpu_accelerator_without_gpu

use_cpu_accelerator_without_gpu()

import torch


from pretrain.analysis.throughput import RandomTokens  # noqa: E402


def random_batches(cfg, device):
    return RandomTokens(cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=12,
                        help="interleaved rounds (each times --steps steps per variant)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine OpenMP spin-waits make 2+ threads erratic)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.norm_scheme=lns")
    args = parser.parse_args()

    from pretrain.config import load_config
    from pretrain.diagnostics.hooks import LayerStatsHooks
    from pretrain.features import hooks_for
    from pretrain.runs import LAYER_STATS_FILE
    from pretrain.train.hooks import TrainContext
    from pretrain.train.metrics import MetricsWriter
    from pretrain.train.trackers import TensorBoardTracker
    from pretrain.train.signals import StopOnSignal
    from pretrain.train.distributed import init_distributed, shutdown
    from pretrain.train.engine import build_engine
    from pretrain.train.steps import train_step

    torch.set_num_threads(args.threads)
    topo = init_distributed(1, 1)
    tmp = tempfile.mkdtemp(prefix="bench-diagnostics-")
    try:
        variants = {}
        for name, interval in (("baseline", None), ("off", 0), ("every", 1)):
            cfg = load_config(args.config, [*args.overrides, f"run.dir={os.path.join(tmp, name)}",
                                            f"diagnostics.interval={interval or 0}"])
            os.makedirs(cfg.run.dir)
            torch.manual_seed(cfg.train.seed)
            built = build_engine(cfg, topo)
            hooks = [] if interval is None else [h for h in hooks_for(cfg, StopOnSignal())
                                                 if not isinstance(h, StopOnSignal)]
            assert all(isinstance(h, LayerStatsHooks) for h in hooks)
            out = MetricsWriter(cfg.run.dir, 10**6, 0, trackers=(), progress_bar=False, enabled=False)
            out.trackers = [TensorBoardTracker(cfg.run.dir, 0)] if interval else []  # the hooks' writer logs there
            ctx = TrainContext(cfg, topo, built, out, None, "", 0)
            for hook in hooks:
                hook.on_start(ctx)
            variants[name] = {"built": built, "hooks": hooks, "ctx": ctx, "data": random_batches(cfg, topo.device),
                              "step": 0, "times": []}
        print(f"tiny preset ({cfg.model.norm_scheme}): micro-batch {cfg.train.micro_batch_size} x seq_len "
              f"{cfg.data.seq_len}, grad accum {variants['baseline']['built'].gas}, torch threads "
              f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps per variant")

        def run(v, n, record):
            for _ in range(n):
                v["step"] += 1
                t0 = time.perf_counter()
                for hook in v["hooks"]:
                    hook.before_step(v["ctx"], v["step"])
                train_step(v["built"], v["data"], topo)
                v["ctx"].step = v["step"]
                for hook in v["hooks"]:
                    hook.after_step(v["ctx"], v["step"])
                if record:
                    v["times"].append(time.perf_counter() - t0)

        for v in variants.values():
            run(v, args.warmup, record=False)
        names = list(variants)
        for r in range(args.rounds):
            order = names[r % 3:] + names[: r % 3]  # rotate, so no variant always follows the same one
            for name in order:
                run(variants[name], args.steps, record=True)
        med = {name: statistics.median(v["times"]) for name, v in variants.items()}
        for name in names:
            print(f"  {name:<9} median step {1000 * med[name]:7.1f} ms  ({len(variants[name]['times'])} steps)")
        print(f"off / baseline   = {med['off'] / med['baseline']:.3f}   (diagnostics.interval=0)")
        print(f"every / baseline = {med['every'] / med['baseline']:.3f}   (diagnostics.interval=1, target <= 1.05)")
        for v in variants.values():
            for hook in v["hooks"]:
                hook.on_finish(v["ctx"], 0)
        with open(os.path.join(tmp, "every", LAYER_STATS_FILE)) as f:
            lines = sum(1 for _ in f)
        assert lines == variants["every"]["step"], "every step should have written one layer_stats.jsonl line"
    finally:
        shutdown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
