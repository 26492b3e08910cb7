"""`pretrain bench`: training throughput (tokens/s) and MFU of model presets through the real engine.

It builds the same DeepSpeed engine `pretrain train` uses (single process; bf16 on a GPU, fp32 on CPU), feeds
random tokens, and times optimizer steps after a warm-up. MFU = achieved model FLOP/s (6N + attention, see
`Llama.flops_per_token`) / the GPU's dense bf16 peak.

`--json PATH` writes the rows as numbers (rewritten after every preset, so an out-of-memory error or a hang in a
later preset leaves the earlier rows). `--profile DIR` traces one training step of the first preset with
torch.profiler, after the warm-up and outside the timed steps: DIR/profile.txt (the operator table), DIR/profile.json
(top kernels and operators, host synchronisations, peak memory) and DIR/trace.json.gz (chrome://tracing, Perfetto).
Every row also counts the host synchronisations of one more step (pretrain/train/syncs.py; `host_sync_sites` in
--json), after the timed ones, since counting slows a step.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s and MFU of model presets (bf16 on GPU)")
    p.add_argument("--presets", nargs="+", default=["130m", "350m", "1b"])
    p.add_argument("--norm-scheme", default="pre_ln")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: 32 for <= 350m, 16 for 1b and 1b-aligned")
    p.add_argument("--steps", type=int, default=10,
                   help="timed optimizer steps per preset, after untimed warm-up steps (default 10)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (train.compile)")
    p.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="the chunked head + cross-entropy (train.fused_loss; default on)")
    p.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="none",
                   help="recompute in backward (train.activation_checkpointing; default none)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--diagnostics-interval", type=int, default=0,
                   help="measure per-layer diagnostics every N steps while timing (0 = off), to see their cost")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the rows as a JSON list (rewritten after each preset)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="torch.profiler trace of one step of the first preset, after warm-up, into DIR "
                        "(profile.txt, profile.json, trace.json.gz)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    # torch, DeepSpeed and megatron-core load here, for the command that trains
    import torch
    from models.config import PRESETS, ModelConfig
    from pretrain.analysis.throughput import bench_preset, write_json
    from pretrain.config import load_config
    from pretrain.train.distributed import init_distributed, shutdown

    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.diagnostics_interval < 0:
        raise UserError(f"--diagnostics-interval must be >= 0, got {args.diagnostics_interval}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"--json {args.json}: its folder does not exist; create it or choose another path")
    if args.profile:
        if os.path.exists(args.profile) and not os.path.isdir(args.profile):
            raise UserError(f"--profile {args.profile} is a file; give a folder (created if missing)")
        os.makedirs(args.profile, exist_ok=True)
    topo = init_distributed(1, 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    # What every row of --json carries besides its own figures: enough to tell two runs' rows apart.
    common = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "precision": precision,
              "seq_len": args.seq_len, "compile": args.compile, "diagnostics_interval": args.diagnostics_interval,
              "norm_scheme": args.norm_scheme, "fused_loss": args.fused_loss,
              "activation_checkpointing": args.activation_checkpointing}
    try:
        rows = []
        for i, preset in enumerate(args.presets):
            micro = args.micro_batch_size or (16 if preset.startswith("1b") else 32)  # 1b-aligned: as 1b
            # a longer sequence than the preset's RoPE tables: tables for it (the weights do not change)
            max_seq_len = max(args.seq_len, PRESETS.get(preset, {}).get("max_seq_len", ModelConfig.max_seq_len))
            scratch = tempfile.mkdtemp(prefix="pretrain-bench-")  # layer_stats.jsonl of --diagnostics-interval
            cfg = load_config(None, [f"run.dir={scratch}", f"diagnostics.interval={args.diagnostics_interval}",
                f"model.preset={preset}", f"model.norm_scheme={args.norm_scheme}", f"data.seq_len={args.seq_len}",
                f"model.max_seq_len={max_seq_len}",
                f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", f"train.precision={precision}",
                f"parallel.zero_stage={1 if precision == 'bf16' else 0}",  # DeepSpeed's bf16 optimizer
                f"train.compile={str(args.compile).lower()}", "train.warmup_steps=1",
                f"train.fused_loss={str(args.fused_loss).lower()}",
                f"train.activation_checkpointing={args.activation_checkpointing}",
            ])
            rows.append(bench_preset(cfg, topo, args.steps, profile_dir=args.profile if i == 0 else None))
            if args.json:
                write_json(args.json, [{**common, **r} for r in rows])
        print(f"\n{device}, {precision}, seq_len {args.seq_len}, compile={args.compile}, "
              f"fused_loss={args.fused_loss}, activation_checkpointing={args.activation_checkpointing}, "
              f"diagnostics every {args.diagnostics_interval or 'never'} step(s)")
        print(f"{'preset':<7}{'micro':>6}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}"
              f"{'syncs':>7}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['preset']:<7}{r['micro']:>6}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
                  f"{r['tflops']:>9.1f}{mfu:>7}{r['mem_gib']:>9.1f}{r['host_syncs']:>7}")
    finally:
        shutdown()
    return 0
