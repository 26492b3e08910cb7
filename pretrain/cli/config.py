"""`pretrain config [CONFIG] [OVERRIDES] [--docs]`: the resolved config as YAML, or the key reference."""

from __future__ import annotations

from pretrain.config import composition_reference, config_reference, dump_yaml, load_config


def register(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config as YAML (or the key reference)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: all defaults)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--docs", action="store_true", help="print every config key with its default and meaning, and which keys compose with which scheme")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.docs:
        print(config_reference())
        print("\nComposable model keys by norm scheme:\n")
        print(composition_reference())
    else:
        print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0
