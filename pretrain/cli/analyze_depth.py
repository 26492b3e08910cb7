"""`pretrain analyze-depth --checkpoint PATH --data DATA --out DIR`: per-layer analyses of a checkpoint
(pretrain/analysis/depth.py)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("analyze-depth", help="per-layer angular distance and skip-one-block loss of a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoints/step_XXXXXXXX folder, a checkpoints/ folder or a run folder (its latest)")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help="output directory (must not exist): depth.json and depth.png")
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches to evaluate (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the run's train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--split", default="val", help="data split to evaluate (default val)")
    p.set_defaults(func=run)


def run(args) -> int:
    # matplotlib and torch load only for the command that draws
    from pretrain.analysis.depth import cmd_analyze_depth

    return cmd_analyze_depth(args)
