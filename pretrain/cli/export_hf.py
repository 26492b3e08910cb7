"""`pretrain export-hf --checkpoint PATH --out DIR`: a checkpoint as a transformers LlamaForCausalLM directory."""

from __future__ import annotations

import os

from models.hf import save_hf
from pretrain.errors import UserError
from pretrain.state.sources import open_source


def register(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a transformers LlamaForCausalLM directory")
    p.add_argument("--checkpoint", required=True,
                   help="a step folder, checkpoints/ folder or run folder (their latest; any TP/PP layout)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(func=run)


def run(args) -> int:
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out directory")
    source = open_source(args.checkpoint, "--checkpoint")
    model_cfg = source.model_config
    try:
        save_hf(model_cfg, source.weights(), args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.out} (transformers LlamaForCausalLM, {model_cfg.norm_scheme}) from {source.folder}")
    return 0
