"""Arguments that several commands share, and their checks: plumbing of the CLI, not a command.

It has no `register` and is not in `commands()`; command modules import it as they import `pretrain.cli.spawn`,
and never each other (tests/test_architecture.py). What the shared arguments feed is library code:
pretrain/analysis/generation.py (generate, eval-sft) and pretrain/analysis/batches.py and outputs.py
(analyze-depth, attribute).
"""

from __future__ import annotations

import argparse

from pretrain.errors import UserError


def add_generation_args(p: argparse.ArgumentParser, template_help: str, template: str | None = "default") -> None:
    """The prompt, tokenizer and device flags of `generate` and `eval-sft`."""
    p.add_argument("--template", default=template, metavar="NAME", help=template_help)
    p.add_argument("--format", default="auto", choices=("auto", "alpaca", "prompt-response", "messages"),
                   help="record format of a file (default: auto, from the fields)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="tokenizer (default: the checkpoint's training data's, or the HF directory's tokenizer.model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when there is one)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per forward (default 16)")


def add_analysis_args(p: argparse.ArgumentParser, checkpoint_help: str, out_help: str) -> None:
    """The model, data and output flags of `analyze-depth` and `attribute`."""
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches to evaluate (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the run's train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--split", default="val", help="data split to evaluate (default val)")


def check_counts(args: argparse.Namespace, *flags: str) -> None:
    """Each of the count `flags` (names without the dashes: "batch-size") is unset or >= 1."""
    for flag in flags:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
