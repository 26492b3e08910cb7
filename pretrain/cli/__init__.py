"""`pretrain` and its subcommands (also `python -m pretrain`).

One module per top-level command in this package, each with `register(subparsers)`, which adds its parser and sets
`func(args) -> exit code`; `commands()` lists them in the order `pretrain --help` shows them. Command modules never
import each other: what two commands share is library code (pretrain/analysis/, pretrain/state/, ...) or the CLI's
own plumbing here, which registers no command: spawn.py (ranks for --nproc-per-node) and arguments.py (flags that
several commands share, and their checks). Every command turns
a `UserError` into one line on stderr and exit code 2. A command module imports what its parser needs at the
top; the heavy libraries its command runs on (DeepSpeed, megatron-core, transformers, matplotlib) it imports in
its `run`, so that `pretrain --help` and `pretrain config` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys

from pretrain.errors import EXIT_USER_ERROR, UserError


def commands() -> tuple:
    """The command modules, in `pretrain --help` order."""
    # Imported here, inside main's error handler: a command module that imports pretrain.compat runs its version
    # check, which must reach the user as main's one-line error, not as a traceback.
    from pretrain.cli import (analyze_depth, attribute, bench, config, coord_check, data, eval, eval_choices,
                              eval_downstream, eval_sft, export_hf, generate, params, plan, plot, remove_norms, report,
                              tokenizer, train)

    return (train, config, params, plan, export_hf, tokenizer, data, bench, coord_check, generate, eval_sft, eval,
            eval_choices, eval_downstream, report, plot, analyze_depth, attribute, remove_norms)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(dotted_overrides(sys.argv[1:] if argv is None else argv))
        if not hasattr(args, "func"):
            parser.print_help()
            return EXIT_USER_ERROR
        from pretrain.compat import check_versions  # as the command modules: see commands()

        check_versions()  # an untested package version: one line here, not a traceback from some import
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def dotted_overrides(argv: list[str]) -> list[str]:
    """Config overrides written as flags, the habit litgpt, torchtitan and OLMo-core users bring: `--train.lr=1e-3`
    and `--train.lr 1e-3` become `train.lr=1e-3` (no `pretrain` flag has a dot in its name)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and "." in name and not name.startswith("."):
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, eq, i = argv[i + 1], "=", i + 1
            if not eq:
                raise UserError(f"{arg} has no value: write {name}=VALUE (or --{name}=VALUE)")
            arg = f"{name}={value}"
        out.append(arg)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    command_modules = commands()
    from pretrain.compat import installed_version  # inside main's error handler, as check_versions in main

    parser = argparse.ArgumentParser(prog="pretrain", description="LLM pretraining for normalization research")
    parser.add_argument("--version", action="version",
                        version=f"normlab {installed_version('normlab') or 'unknown (not installed: pip install -e .)'}")
    sub = parser.add_subparsers(metavar="COMMAND")
    for command in command_modules:
        command.register(sub)
    return parser
