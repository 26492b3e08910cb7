"""`pretrain config [CONFIG] [OVERRIDES] [--docs [--markdown | --write [PAGE]]]`: the resolved config as YAML, or the
docs' generated reference tables (printed for reading or as Markdown, or written into their pages in place:
pretrain/docs.py)."""

from __future__ import annotations

import os
import shutil

from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config as YAML (or the key reference)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: all defaults)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--docs", action="store_true", help="print the docs' generated tables for reading: every config "
                   "key with its default and meaning, which keys compose with which scheme, the training settings a "
                   "scheme brings, what a resume does with each key, and the stock transformers class of each scheme")
    p.add_argument("--markdown", action="store_true", help="with --docs: print the tables as the Markdown of the docs")
    p.add_argument("--write", metavar="PAGE", nargs="?", const="", default=None,
                   help="with --docs: write the tables into their pages' generated blocks (<!-- NAME:start --> ... "
                        "<!-- NAME:end -->: docs/configuration.md, docs/schemes.md, docs/training.md, docs/interop.md) "
                        "instead of printing them; PAGE: only the blocks that file holds")
    p.set_defaults(func=run)


def run(args) -> int:
    if (args.write is not None or args.markdown) and not args.docs:
        raise UserError("--write and --markdown take the tables of --docs: run `pretrain config --docs --write`")
    if not args.docs:
        # the resolved config needs neither torch nor the docs' tables (which read the models: torch)
        from pretrain.config import dump_yaml, load_config

        config, overrides = args.config, args.overrides
        if config is not None and "=" in config and not os.path.exists(config):  # no file given, overrides only
            config, overrides = None, [config, *overrides]
        print(dump_yaml(load_config(config, overrides), say_scheme_defaults=True), end="")
        return 0
    # the tables' libraries (torch and up) load here, so that `pretrain --help` and the plain config start without them
    from pretrain.docs import GENERATED, TITLES, as_text, write_docs, write_page

    if args.write is not None:
        try:
            pages = {args.write: write_page(args.write)} if args.write else write_docs()
        except (OSError, ValueError) as e:
            raise UserError(f"--write {args.write or '(every page)'}: {e}") from None
        for page, changed in pages.items():
            print(f"{page}: regenerated {', '.join(changed)}" if changed else f"{page}: already current")
    elif args.markdown:
        print("\n\n".join(f"<!-- {name} -->\n{make().strip()}" for name, make in GENERATED.items()))
    else:
        width = min(100, shutil.get_terminal_size().columns)
        print("\n\n".join(f"{TITLES[name]}\n\n{as_text(make(), width)}" for name, make in GENERATED.items()))
    return 0
