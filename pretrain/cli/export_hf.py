"""`pretrain export-hf --checkpoint PATH --out DIR`: a checkpoint as a transformers LlamaForCausalLM directory."""

from __future__ import annotations

import os

from models.hf import save_hf
from pretrain.errors import UserError
from pretrain.state.checkpoint import find_checkpoint, load_model_state


def register(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a transformers LlamaForCausalLM directory")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_XXXXXXXX folder (or checkpoints/ for latest)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(func=run)


def run(args) -> int:
    folder = find_checkpoint(args.checkpoint)
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out directory")
    cfg, state = load_model_state(folder)
    try:
        save_hf(cfg.model, state, args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.out} (transformers LlamaForCausalLM, {cfg.model.norm_scheme}) from {folder}")
    return 0
