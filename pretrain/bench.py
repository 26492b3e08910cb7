"""`pretrain bench`: training throughput (tokens/s) and MFU of model presets through the real engine.

It builds the same DeepSpeed engine `pretrain train` uses (single process; bf16 on a GPU, fp32 on CPU), feeds
random tokens, and times optimizer steps after a warm-up. MFU = achieved model FLOP/s (6N + attention, see
`Llama.flops_per_token`) / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import statistics
import time

import torch

from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s and MFU of model presets (bf16 on GPU)")
    p.add_argument("--presets", nargs="+", default=["130m", "350m", "1b"])
    p.add_argument("--norm-scheme", default="pre_ln")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: 32 for <= 350m, 16 for 1b")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per preset (after 3 warm-up steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (train.compile)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--diagnostics-interval", type=int, default=0,
                   help="measure per-layer diagnostics every N steps while timing (0 = off), to see their cost")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from pretrain.config import load_config
    from pretrain.distributed import init_distributed, shutdown

    import tempfile

    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.diagnostics_interval < 0:
        raise UserError(f"--diagnostics-interval must be >= 0, got {args.diagnostics_interval}")
    topo = init_distributed(1, 1)
    try:
        rows = []
        for preset in args.presets:
            micro = args.micro_batch_size or (16 if preset == "1b" else 32)
            scratch = tempfile.mkdtemp(prefix="pretrain-bench-")  # layer_stats.jsonl of --diagnostics-interval
            cfg = load_config(None, [f"run.dir={scratch}", f"diagnostics.interval={args.diagnostics_interval}",
                f"model.preset={preset}", f"model.norm_scheme={args.norm_scheme}", f"data.seq_len={args.seq_len}",
                f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", f"train.precision={precision}",
                f"parallel.zero_stage={1 if precision == 'bf16' else 0}",  # DeepSpeed's bf16 optimizer
                f"train.compile={str(args.compile).lower()}", "train.warmup_steps=1",
            ])
            rows.append(bench_preset(cfg, topo, args.steps))
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"\n{device}, {precision}, seq_len {args.seq_len}, compile={args.compile}, "
              f"diagnostics every {args.diagnostics_interval or 'never'} step(s)")
        print(f"{'preset':<7}{'micro':>6}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['preset']:<7}{r['micro']:>6}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
                  f"{r['tflops']:>9.1f}{mfu:>7}{r['mem_gib']:>9.1f}")
    finally:
        shutdown()
    return 0


def bench_preset(cfg, topo, steps: int) -> dict:
    import shutil

    from pretrain.analysis import diagnostics
    from pretrain.engine import build_engine
    from pretrain.metrics import peak_flops
    from pretrain.train import train_step

    if steps < 1:
        raise UserError("--steps must be >= 1")
    built = build_engine(cfg, topo)
    t = cfg.train
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
            yield tokens[:, :-1], tokens[:, 1:]

    it = batches()
    layer_stats = diagnostics.setup(cfg, built, topo)  # no-op unless --diagnostics-interval
    times = []
    if topo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(3 + steps):
        _sync(topo.device)
        t0 = time.perf_counter()
        layer_stats.begin_step(i + 1)
        train_step(built, it, topo)
        layer_stats.end_step(i + 1)
        _sync(topo.device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_s = t.global_batch_size * cfg.data.seq_len / step_s
    flops = built.model.flops_per_token(cfg.data.seq_len) * tokens_per_s
    peak = peak_flops(topo.device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if topo.device.type == "cuda" else 0.0
    layer_stats.close()
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    del built
    return {"preset": cfg.model.preset, "micro": t.micro_batch_size, "step_ms": 1000 * step_s,
            "tokens_per_s": tokens_per_s, "tflops": flops / 1e12, "mfu": flops / peak if peak else None, "mem_gib": mem}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
