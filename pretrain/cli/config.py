"""`pretrain config [CONFIG] [OVERRIDES] [--docs [--write README.md]]`: the resolved config as YAML, or the README's
generated reference tables (printed, or written into the README in place)."""

from __future__ import annotations

import os

from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config as YAML (or the key reference)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: all defaults)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--docs", action="store_true", help="print the README's generated tables: every config key with its "
                   "default and meaning, which keys compose with which scheme, what a resume does with each key, and "
                   "the stock transformers class of each scheme")
    p.add_argument("--write", metavar="README", help="with --docs: write the tables into this README's generated "
                   "blocks (<!-- NAME:start --> ... <!-- NAME:end -->) instead of printing them")
    p.set_defaults(func=run)


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    from pretrain.config import dump_yaml, load_config
    from pretrain.docs import GENERATED, write_readme

    if args.write and not args.docs:
        raise UserError("--write takes the tables of --docs: run `pretrain config --docs --write README.md`")
    if args.write:
        try:
            changed = write_readme(args.write)
        except (OSError, ValueError) as e:
            raise UserError(f"--write {args.write}: {e}") from None
        print(f"{args.write}: regenerated {', '.join(changed)}" if changed else f"{args.write}: already current")
    elif args.docs:
        print("\n\n".join(f"<!-- {name} -->\n{make().strip()}" for name, make in GENERATED.items()))
    else:
        config, overrides = args.config, args.overrides
        if config is not None and "=" in config and not os.path.exists(config):  # no file given, overrides only
            config, overrides = None, [config, *overrides]
        print(dump_yaml(load_config(config, overrides)), end="")
    return 0
