"""`pretrain plan CONFIG [OVERRIDES] --gpu NAME [--gpus N] [--mfu F] [--json]`: whether a config and its layout
fit a GPU, and how fast they should train, before a job is submitted (the estimate: pretrain/analysis/plan.py)."""

from __future__ import annotations

import json
import os

from pretrain.gpus import GPUS


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU and tokens/s of a config's layout on a GPU, before training",
                       epilog="The config and overrides are those of `pretrain train` (parallel.tp, parallel.pp, "
                              "parallel.zero_stage, train.micro_batch_size, data.seq_len, train.precision, "
                              "train.activation_checkpointing, train.fused_loss); data parallel = --gpus / (tp * pp). "
                              "What is assumed: docs/training.md, \"Planning a run\".")
    p.add_argument("config", help="experiment YAML, e.g. configs/paper/1b_pre_ln.yaml, or a preset name (130m, 1b, "
                                  "...: the default config with that model)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=2048 train.micro_batch_size=8")
    p.add_argument("--gpu", required=True, metavar="NAME", help=f"one of {', '.join(g.name for g in GPUS)} "
                                                                "(any case and spacing: h100-sxm, A100-80GB)")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs of the run (default 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed for tokens/s (default 0.4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    # the config and the GPU table first (no torch), so that their one-line errors come at once
    from models.config import PRESETS
    from pretrain.config import load_config
    from pretrain.gpus import find

    gpu = find(args.gpu)
    if args.config in PRESETS and not os.path.exists(args.config):
        cfg = load_config(None, [f"model.preset={args.config}", *args.overrides])
    else:
        cfg = load_config(args.config, args.overrides)
    from pretrain.analysis.plan import plan, render  # torch (the model on the meta device): when the command runs

    result = plan(cfg, gpu, args.gpus, args.mfu)
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0
