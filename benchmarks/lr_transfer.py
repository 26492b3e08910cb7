"""Learning-rate transfer on CPU: the best train.lr of a small model at several widths and depths, per scheme and
parametrization (docs/parametrization.md).

    python benchmarks/lr_transfer.py [--out runs/lr_transfer.json] [--png runs/lr_transfer.png] [--steps 80]
                                     [--widths 64,128,256] [--depths 2,4,8] [--lrs 8] [--entries pre_ln:standard ...]
                                     [--table-only]

The base model is configs/tiny.yaml at width 64 (2 heads of 32, MLP 3x) and depth 2, on bundled tiny-Shakespeare
(seq 64, micro-batch 16); each point is `--steps` AdamW steps (linear warm-up over the first 10%, then constant) from
the same seed with the run's optimizer groups (pretrain/config/param_groups.py), scored by the validation loss on 8
fixed micro-batches of the val split. A width variant keeps the base depth, a depth variant the base width
(pretrain/analysis/coord_check.py's variants); under mup and completep the base shape is the base model. Prints one
Markdown table of the best lr per entry and size (and how many grid steps it moves), writes the losses as JSON and
the loss-vs-lr curves as a PNG. In-process, one thread: a few minutes per entry on an idle core. Points already in
--out are kept (a stopped run continues; the base model, both the first width and the first depth, trains once);
--table-only prints the table and draws the PNG from them without training, a size not measured shown as "-".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from models.llama import Llama  # noqa: E402
from pretrain.analysis.coord_check import depth_variant, width_variant  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.config.param_groups import param_groups  # noqa: E402
from pretrain.data.loader import DataLoader, TokenDataset  # noqa: E402
from pretrain.data.resolve import resolve_data_path  # noqa: E402

BASE = ["model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=192", "model.n_layers=2",
        "data.seq_len=64", "train.micro_batch_size=16", "train.global_batch_size=16"]
# lns takes no completep (its 1/sqrt(l) is a depth scaling: models/parametrization.py REFUSED); its width transfer is µP's
ENTRIES = ["pre_ln:standard", "pre_ln:completep", "lns:standard", "lns:mup"]


def batches(cfg, split: str, n: int | None, seed: int = 0):
    path = resolve_data_path(cfg.data.paths[0], cfg.data.cache_dir)
    loader = DataLoader(TokenDataset(path, cfg.data.seq_len, split), cfg.train.micro_batch_size, seed=seed,
                        shuffle=split == "train")
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((b.tokens, b.labels))
    return out


def train_point(cfg, model_cfg, lr: float, steps: int, train, val) -> float:
    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(0)
    model = Llama(model_cfg, seed=0)
    groups = param_groups(model, run_cfg)
    for g in groups:  # the group's factor times this point's lr
        g["lr"] *= lr / cfg.train.lr
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    base = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, steps // 10)
    for step in range(steps):
        for g, b in zip(optimizer.param_groups, base):
            g["lr"] = b * min(1.0, (step + 1) / warmup)
        tokens, labels = train[step % len(train)]
        loss = model(tokens, labels)
        if not math.isfinite(loss.item()):
            return float("inf")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        return sum(model(t, l).item() for t, l in val) / len(val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lr_transfer.json")
    p.add_argument("--png", default="runs/lr_transfer.png")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--lrs", type=int, default=8, help="log-spaced learning rates from 5e-4 to 6.4e-2 (2x apart at 8)")
    p.add_argument("--entries", nargs="+", default=ENTRIES, help="scheme:parametrization pairs")
    p.add_argument("--table-only", action="store_true", help="no training: the table and PNG of the points in --out")
    args = p.parse_args()
    torch.set_num_threads(1)
    widths = [int(w) for w in args.widths.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    lrs = [float(f"{5e-4 * (128 ** (i / (args.lrs - 1))):.3g}") for i in range(args.lrs)]
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    started = time.time()
    for entry in [] if args.table_only else args.entries:
        scheme, parametrization = entry.split(":")
        cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                          [*BASE, f"model.norm_scheme={scheme}", f"model.parametrization={parametrization}"])
        train, val = batches(cfg, "train", args.steps), batches(cfg, "val", 8)
        done = {}  # the base model is both the first width and the first depth: trained once
        for axis, sizes, variant in (("width", widths, width_variant), ("depth", depths, depth_variant)):
            for size in sizes:
                key = f"{entry}/{axis}/{size}"
                model_cfg = variant(cfg.model, size)
                if key in results and len(results[key]) == len(lrs):
                    done[repr(model_cfg)] = results[key]
                    continue
                results[key] = done.get(repr(model_cfg)) or [train_point(cfg, model_cfg, lr, args.steps, train, val)
                                                             for lr in lrs]
                done[repr(model_cfg)] = results[key]
                with open(args.out, "w") as f:
                    json.dump({**results, "lrs": lrs}, f, indent=1)
                print(f"{key}: best lr {lrs[min(range(len(lrs)), key=results[key].__getitem__)]:.3g} "
                      f"({time.time() - started:.0f} s)", flush=True)
    results["lrs"] = lrs
    print(table(results, args.entries, widths, depths, lrs))
    figure(results, args.entries, widths, depths, lrs, args.png)


def table(results: dict, entries: list[str], widths: list[int], depths: list[int], lrs: list[float]) -> str:
    rows = ["| scheme, parametrization | " + " | ".join([f"d {w}" for w in widths] + [f"L {d}" for d in depths])
            + " | moves (grid steps): width, depth |", "| --- |" + " ---: |" * (len(widths) + len(depths) + 1)]
    for entry in entries:
        cells, moves = [], []
        for axis, sizes in (("width", widths), ("depth", depths)):
            best = [min(range(len(lrs)), key=results[f"{entry}/{axis}/{s}"].__getitem__)
                    if f"{entry}/{axis}/{s}" in results else None for s in sizes]
            cells += [f"{lrs[i]:.3g}" if i is not None else "-" for i in best]
            found = [i for i in best if i is not None]
            moves.append(str(max(found) - min(found)) if found else "-")
        rows.append(f"| {entry.replace(':', ', ')} | " + " | ".join(cells) + f" | {', '.join(moves)} |")
    return "\n".join(rows)


def figure(results: dict, entries, widths, depths, lrs, png: str) -> None:
    import matplotlib  # only for the figure

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(entries), 7), layout="constrained")
    axes = fig.subplots(2, len(entries), squeeze=False)
    for col, entry in enumerate(entries):
        for row, (axis, sizes) in enumerate((("width", widths), ("depth", depths))):
            ax = axes[row][col]
            for s in sizes:
                if f"{entry}/{axis}/{s}" not in results:  # not measured (--table-only of a stopped run)
                    continue
                losses = [v if math.isfinite(v) else float("nan") for v in results[f"{entry}/{axis}/{s}"]]
                ax.plot(lrs, losses, marker="o", ms=3, label=f"{'d' if axis == 'width' else 'L'} {s}")
            ax.set_xscale("log")
            ax.set_xlabel("train.lr")
            ax.set_title(f"{entry.replace(':', ', ')}: {axis}", fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7)
            if col == 0:
                ax.set_ylabel("validation loss")
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
