"""The output folder of an analysis (`pretrain analyze-depth`, `pretrain attribute`): refused when it exists, then
written whole or not at all, so an interrupted analysis leaves no --out behind."""

from __future__ import annotations

import json
import os
from typing import Callable

from pretrain.errors import UserError
from pretrain.files import atomic_folder


def new_output_folder(out_arg: str) -> str:
    """The absolute --out, which must not exist and whose parent must."""
    out = os.path.abspath(out_arg)
    if os.path.exists(out):
        raise UserError(f"{out_arg} already exists; choose a new --out directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out {out_arg}: folder {os.path.dirname(out)} does not exist")
    return out


def publish(out: str, out_arg: str, name: str, result: dict, figure: Callable) -> None:
    """NAME.json (`result`) and NAME.png (`figure(result)`) into a temporary folder next to `out`, then renamed to
    `out` (all or nothing: pretrain/files.py)."""
    import matplotlib  # the headless backend, chosen before the figure draws; matplotlib only for these commands

    matplotlib.use("Agg")
    try:
        with atomic_folder(out) as tmp:
            with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                json.dump(result, f, indent=1)
            figure(result).savefig(os.path.join(tmp, f"{name}.png"), dpi=120)
    except FileExistsError:
        raise UserError(f"{out_arg} appeared while analyzing; choose a new --out directory") from None
