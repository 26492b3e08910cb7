"""Fidelity on CPU: every norm scheme and composable key at depth, on one corpus, against its unigram level.

    python benchmarks/fidelity.py --out runs/fidelity [--data bundled:tinyshakespeare] [--layers 16] [--steps 400]
                                  [--jobs 2] [--only pre_ln dyt ...] [--extra model.x=y ...]

Each entry is a real `pretrain train` of configs/tiny.yaml (width 128, the default lr) at `--layers` blocks for
`--steps` steps with the same seed and data, with per-layer diagnostics and validation at the last step. Runs that
already finished in --out are reused (the script can be stopped and restarted). Prints one Markdown table: validation
loss, skipped steps, the last block's residual variance over the first's, and, per run, whether it collapsed: a
validation loss within `--margin` nats of the corpus's unigram cross-entropy (the validation tokens' entropy under the
training tokens' add-one-smoothed unigram distribution, printed above the table) is the constant predictor's, a
failure, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models.norms import NORM_SCHEMES, OPTIONS  # noqa: E402
from pretrain.data.resolve import resolve_data_path  # noqa: E402
from pretrain.data.loader import unigram_cross_entropy  # noqa: E402

# Every scheme at its defaults, then each composable key set on pre_ln (and GPAS also on lns, the combination the
# GPAS paper leads with).
ENTRIES: dict[str, list[str]] = {name: [f"model.norm_scheme={name}"] for name in NORM_SCHEMES}
ENTRIES.update({
    "pre_ln+qk_norm=head": ["model.qk_norm=head"],
    "pre_ln+qk_norm=full": ["model.qk_norm=full"],
    "pre_ln+attn_gate=headwise": ["model.attn_gate=headwise"],
    "pre_ln+attn_gate=elementwise": ["model.attn_gate=elementwise"],
    "pre_ln+gpas": ["model.gpas=true"],
    "lns+gpas": ["model.norm_scheme=lns", "model.gpas=true"],
    "pre_ln+norm_gain=zero_centered": ["model.norm_gain=zero_centered"],
    "pre_ln+qk_norm_scale=learned": ["model.qk_norm=head", "model.qk_norm_scale=learned"],
    "pre_ln+qk_norm_scale=none": ["model.qk_norm=head", "model.qk_norm_scale=none"],
    "pre_ln+v_norm": ["model.v_norm=true"],
    "pre_ln+layer_scalar": ["model.layer_scalar=true"],
    # model.residual: the residual as a state of streams, each at its paper's defaults (models/streams.py)
    "pre_ln+residual=mhc": ["model.residual=mhc"],
    "pre_ln+residual=hc": ["model.residual=hc"],
    "pre_ln+residual=attn_res": ["model.residual=attn_res"],
    "pre_ln+residual=siamese": ["model.residual=siamese"],
})
assert set(OPTIONS) <= {e.split("+")[1].split("=")[0] for e in ENTRIES if "+" in e}, "a composable key has no entry"


def read_run(run_dir: str, steps: int) -> dict | None:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(run_dir, "layer_stats.jsonl")) as f:
            stats = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    val = [r["val_loss"] for r in rows if r.get("step") == steps and "val_loss" in r]
    last = [r for r in rows if r.get("step") == steps and "loss" in r]
    final = [s for s in stats if s["step"] == steps]
    if not (val and last and final):
        return None
    var = final[-1]["variance"]
    return {"val_loss": val[-1], "train_loss": last[-1]["loss"], "skipped": last[-1].get("skipped_steps", 0),
            "var_first": var[0], "var_last": var[-1]}


def run_one(name: str, overrides: list[str], args) -> tuple[str, dict | None, str]:
    run_dir = os.path.join(args.out, name)
    done = read_run(run_dir, args.steps)
    if done is not None:
        return name, done, "reused"
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run of this script: start it again
    cmd = [sys.executable, "-m", "pretrain", "train", os.path.join(REPO, "configs", "tiny.yaml"),
           f"run.dir={run_dir}", f"model.n_layers={args.layers}", f"train.steps={args.steps}",
           f"data.paths=[{args.data}]", f"diagnostics.interval={args.steps}", f"eval.interval={args.steps}",
           "checkpoint.interval=0", "logging.interval=50", "logging.progress_bar=false", *overrides, *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if proc.returncode else []
    return name, read_run(run_dir, args.steps), f"exit {proc.returncode} {' '.join(tail)}".strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="bundled:tinyshakespeare")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.5, help="collapse: val loss within this of the unigram CE")
    parser.add_argument("--only", nargs="*", help="entry names (default: all)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every entry")
    args = parser.parse_args()
    entries = {k: v for k, v in ENTRIES.items() if not args.only or k in args.only}
    unigram = unigram_cross_entropy(resolve_data_path(args.data))
    print(f"{args.data}: unigram cross-entropy {unigram:.3f} nats/token; {args.layers} layers, {args.steps} steps"
          + (f", {' '.join(args.extra)}" if args.extra else ""), flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda kv: run_one(kv[0], kv[1], args), entries.items()))
    print("\n| entry | val loss | below unigram | skipped steps | last/first variance | verdict |")
    print("| --- | --- | --- | --- | --- | --- |")
    failed = 0
    for name, r, status in results:
        if r is None:
            failed += 1
            print(f"| {name} | - | - | - | - | failed ({status}) |")
            continue
        below = unigram - r["val_loss"]
        ok = below > args.margin and r["skipped"] == 0
        failed += not ok
        print(f"| {name} | {r['val_loss']:.3f} | {below:.3f} | {r['skipped']} | {r['var_last'] / r['var_first']:.3g} "
              f"({r['var_first']:.3g} to {r['var_last']:.3g}) | {'ok' if ok else 'COLLAPSED' if below <= args.margin else 'skipped steps'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
