"""`pretrain coord-check CONFIG [OVERRIDES] --widths 64,128,256 --depths 2,4,8 --steps N --out DIR`: the coordinate
check of a config's scheme and parametrization (pretrain/analysis/coord_check.py): a few in-process training steps
at each width and depth, the mean |coordinate| of the embedding output, each block's attention and MLP outputs and
residual stream, and the logits per step; DIR/coord_check.json (with the largest log-log slope against width and
against depth at the last step, `max_abs_slope_width` / `max_abs_slope_depth`) and DIR/coord_check.png. The config
and overrides are those `pretrain train` takes; under mup and completep the config's shape is the base shape where
model.base_d_model / model.base_n_layers are null. Flat (slopes near 0) is what a parametrization that transfers gives.
"""

from __future__ import annotations

from pretrain.errors import UserError


def sizes(text: str, flag: str) -> list[int]:
    """'64,128,256' -> [64, 128, 256]: at least two distinct positive integers, ascending."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: give comma-separated integers, e.g. 64,128,256") from None
    if len(set(values)) < 2 or min(values) <= 0:
        raise UserError(f"{flag} {text}: give at least two distinct positive sizes (a slope needs two)")
    return sorted(set(values))


def register(sub) -> None:
    p = sub.add_parser("coord-check", help="coordinate check: activation sizes against width and depth after a few "
                                           "training steps (flat under a parametrization that transfers)")
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.parametrization=mup train.lr=1e-2")
    p.add_argument("--widths", default="64,128,256", help="d_model values, comma-separated (default 64,128,256)")
    p.add_argument("--depths", default="2,4,8", help="n_layers values, comma-separated (default 2,4,8)")
    p.add_argument("--steps", type=int, default=5, help="training steps per model (default 5)")
    p.add_argument("--out", required=True, help="output directory (must not exist): coord_check.json and .png")
    p.set_defaults(func=run)


def run(args) -> int:
    from pretrain.config import load_config  # as `pretrain train`: the config is checked before torch loads

    cfg = load_config(args.config, args.overrides)
    widths, depths = sizes(args.widths, "--widths"), sizes(args.depths, "--depths")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    import torch
    from pretrain.analysis.coord_check import coord_check
    from pretrain.analysis.figures import coord_check_figure
    from pretrain.analysis.outputs import new_output_folder, publish

    out = new_output_folder(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = coord_check(cfg, widths, depths, args.steps, device)
    publish(out, args.out, "coord_check", result, coord_check_figure)
    print(f"wrote {args.out}/coord_check.json and coord_check.png: {result['norm_scheme']}, "
          f"{result['parametrization']}; largest |log-log slope| at step {args.steps}: width "
          f"{result['max_abs_slope_width']:.2f} ({_worst(result['slopes_width'])}), depth "
          f"{result['max_abs_slope_depth']:.2f} ({_worst(result['slopes_depth'])})")
    return 0


def _worst(slopes: dict[str, float]) -> str:
    return max(slopes, key=lambda name: abs(slopes[name]))
