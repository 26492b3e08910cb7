"""Step time of compiled blocks (train.compile=true, inductor's C++ backend) against eager, CPU, same process.

    python benchmarks/bench_compile.py [--steps 20] [--seq-len 128] [--batch 16] [--layers 8] [--scheme pre_ln]
                                       [--threads N]

Two DeepSpeed engines of the tiny preset (fp32, ZeRO-0, one process), identical but for train.compile, train on the
same batch. The compiled one compiles during its first steps (the time is printed, inductor's on-disk cache
included: run twice to see a warm cache); then the steps are timed interleaved (A B A B ...) so background load hits
both alike, and the medians of wall and CPU time are compared (CPU time, with --threads 1, is the figure least moved
by other jobs on the machine). Prints the ratios compiled / eager (below 1 = compiled is faster) and the graphs
compiled after the warm-up (0 expected). Informative only: a CPU step of a tiny model is not a GPU step.
From a worktree whose package is not the installed one: PYTHONPATH=. python benchmarks/bench_compile.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from pretrain import compat  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.data.batches import LMBatch  # noqa: E402
from pretrain.train.distributed import init_distributed, shutdown  # noqa: E402
from pretrain.train.engine import build_engine  # noqa: E402
from pretrain.train.steps import train_step  # noqa: E402
from bench_train import Repeat  # noqa: E402  (benchmarks/ is the script's folder, first on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--scheme", default="pre_ln")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"data.seq_len={args.seq_len}", f"train.global_batch_size={args.batch}",
                 f"train.micro_batch_size={args.batch}", f"model.n_layers={args.layers}",
                 f"model.norm_scheme={args.scheme}"]
    topo = init_distributed(1, 1)
    cfg = load_config("configs/tiny.yaml", overrides)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    batches = Repeat(LMBatch(data[:, :-1], data[:, 1:]))
    eager = build_engine(cfg, topo)
    compiled = build_engine(load_config("configs/tiny.yaml", [*overrides, "train.compile=true"]), topo)

    def step(built):
        """(wall, CPU time of the process) of one step, in seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(built, batches, topo).item()  # the step finished, its loss read
        return time.perf_counter() - t0, time.process_time() - c0

    warmup = 3
    first = [step(compiled)[0] for _ in range(warmup)]  # compiles (forward at step 1, backward at its first backward)
    graphs = compat.compiled_graphs()
    for _ in range(warmup):
        step(eager)
    t_eager, t_compiled = [], []
    for _ in range(args.steps):
        t_eager.append(step(eager))
        t_compiled.append(step(compiled))
    recompiles = compat.compiled_graphs() - graphs
    shutdown()
    e, c = (statistics.median(t[0] for t in ts) for ts in (t_eager, t_compiled))
    e_cpu, c_cpu = (statistics.median(t[1] for t in ts) for ts in (t_eager, t_compiled))
    print(f"tiny preset ({args.scheme}, {args.layers} layers), fp32, CPU ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, batch {args.batch} x seq {args.seq_len}, median of {args.steps} interleaved steps")
    print(f"compiling (first step)  : {first[0]:8.1f} s, {graphs} graph(s); steps 2-{warmup}: "
          f"{', '.join(f'{1000 * t:.0f}' for t in first[1:])} ms")
    print(f"eager                   : {1000 * e:8.1f} ms/step wall, {1000 * e_cpu:8.1f} ms CPU time")
    print(f"compiled (inductor C++) : {1000 * c:8.1f} ms/step wall, {1000 * c_cpu:8.1f} ms CPU time")
    print(f"ratio compiled / eager = {c / e:.3f} wall, {c_cpu / e_cpu:.3f} CPU time; "
          f"graphs compiled after the warm-up: {recompiles}")


if __name__ == "__main__":
    main()
