"""`pretrain attribute --checkpoint PATH --data DATA --out DIR`: exact direct logit attribution of an ln_free
model (pretrain/analysis/attribution.py)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("attribute", help="exact direct logit attribution per block of a norm-free (ln_free) model")
    p.add_argument("--checkpoint", required=True,
                   help="an ln_free checkpoint (e.g. RUN_DIR/ln_free of remove-norms), step/checkpoints/run folder")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help="output directory (must not exist): attribution.json and .png")
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches to evaluate (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the run's train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--split", default="val", help="data split to evaluate (default val)")
    p.set_defaults(func=run)


def run(args) -> int:
    # matplotlib and torch load only for the command that draws
    from pretrain.analysis.attribution import cmd_attribute

    return cmd_attribute(args)
