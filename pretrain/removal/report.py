"""RUN_DIR/removal.json: the cross-entropies of the source, the control and the folded ln_free model on the same
validation tokens, and the schedule as it ran."""

from __future__ import annotations

import json
import os

from pretrain.config import ExperimentConfig
from pretrain.files import atomic_write
from pretrain.removal import LN_FREE_DIR, REPORT
from pretrain.runs import read_metrics


def _records(run_dir: str) -> list[dict]:
    return read_metrics(run_dir)


def _val_at(records: list[dict], step: int) -> float | None:
    values = [r["val_loss"] for r in records if r.get("step") == step and "val_loss" in r]
    return values[-1] if values else None


def write_report(removal: ExperimentConfig, control: ExperimentConfig | None) -> dict:
    """RUN_DIR/removal.json from the runs' metrics: cross-entropies on the same validation tokens, the switches."""
    records = _records(removal.run.dir)
    steps = removal.train.steps
    folded = [r["ce_ln_free"] for r in records if "ce_ln_free" in r]
    report = {
        "ce_original": _val_at(records, 0),
        "ce_control": _val_at(_records(control.run.dir), steps) if control is not None else None,
        "ce_ln_free": folded[-1] if folded else None,
        "ce_fixed_sigma": _val_at(records, steps),  # the fine-tuned model before the fold (same function)
        "steps": steps,
        "eval_tokens": removal.eval.tokens,
        "data": removal.data.paths,
        "source": removal.train.init_from,
        "norm_scheme": removal.model.norm_scheme,
        "method": "taper" if removal.model.taper_norms else "fixed",
        "ln_free_checkpoint": os.path.join(removal.run.dir, LN_FREE_DIR),
        "control_run": control.run.dir if control is not None else None,
        "schedule": [{"step": r["step"], "site": r["removed"], "sigma": r["sigma"]} for r in records if "removed" in r],
    }
    if removal.model.taper_norms:  # one gate: every site calibrated at removal.start, fixed at the taper's end
        report["schedule"] = [{"step": r["step"], "site": r["tapered"], "c": r["c"], "sigma": r["sigma"]}
                              for r in records if "tapered" in r]
        report["taper_end"] = removal.removal.taper_end()
    if report["ce_control"] is not None and report["ce_ln_free"] is not None:
        report["gap_vs_control"] = report["ce_ln_free"] - report["ce_control"]
    atomic_write(os.path.join(removal.run.dir, REPORT), json.dumps(report, indent=1))
    return report


def report_line(report: dict) -> str:
    def show(x):
        return "n/a" if x is None else f"{x:.4f}"

    gap = report.get("gap_vs_control")
    tail = f" ({gap:+.4f} vs control)" if gap is not None else ""
    method = " (taper)" if report.get("method") == "taper" else ""
    return (f"removal{method}: ce_original {show(report['ce_original'])} | ce_control {show(report['ce_control'])} | "
            f"ce_ln_free {show(report['ce_ln_free'])}{tail}")
