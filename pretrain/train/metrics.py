"""Where training numbers go (rank 0 only): metrics.jsonl, the trackers of logging.backends, a log line, a progress
bar.

metrics.jsonl holds one JSON object per logged step:
    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_tokens", "step_time", "skipped_steps", ...}
and validation entries {"step", "val_loss", "val_ppl", "val_bpb"} (bits per byte: pretrain/train/evaluate.py; null
when the data has no tokenizer), and with eval.downstream downstream entries {"step", "down_TASK_acc", ...,
"down_avg_primary", "down_items", "down_time"} (pretrain/analysis/downstream_loop.py). Every tracker (TensorBoard in
run.dir/tb, W&B, trackio: pretrain/train/trackers.py) gets the same numbers as train/<name>, val/<name> and
down/<name>. A resumed run drops the entries after its checkpoint's step, so every curve continues from there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import torch
from tqdm import tqdm

from pretrain.gpus import for_device_name
from pretrain.runs import METRICS_FILE, read_metrics, torn_line_message, truncate_jsonl
from pretrain.train.trackers import TensorBoardTracker, Tracker, close_all


def peak_flops_for(name: str) -> float | None:
    """Dense bf16 peak of the GPU whose torch device name is `name` (None: unknown, MFU is not reported); the table is
    pretrain/gpus.py's, which `pretrain plan` reads too."""
    gpu = for_device_name(name)
    return None if gpu is None else gpu.peak_bf16_flops


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


class MetricsWriter:
    """metrics.jsonl and `trackers` (pretrain/train/trackers.py: opened by the loop, closed here) on rank 0; nothing
    when not `enabled`."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, trackers: Sequence[Tracker],
                 progress_bar: bool | None, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.trackers: list[Tracker] = list(trackers) if enabled else []
        self.bar = None
        if not enabled:
            return
        torn = truncate_jsonl(self.path, start_step)
        if progress_bar or (progress_bar is None and sys.stderr.isatty()):
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if torn is not None:
            self.say(torn_line_message(self.path, torn))

    @property
    def tb(self):
        """TensorBoard's SummaryWriter (None when logging.backends has no tensorboard, or not rank 0): for what only
        TensorBoard shows (the variance-against-depth histogram and image, removal/switched texts)."""
        return next((t.writer for t in self.trackers if isinstance(t, TensorBoardTracker)), None)

    def write(self, record: dict, prefix: str) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record, prefix, record["step"])

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        for line in close_all(self.trackers):
            self.say(line)
        self.trackers = []
        if self.bar is not None:
            self.bar.close()


def log_line(r: dict, total_steps: int, eta_s: float) -> str:
    mfu = f" | mfu {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0, eta_s)))
    return (
        f"step {r['step']:>6}/{total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad_norm {r['grad_norm']:.3f}"
        f" | {r['tokens_per_s']:,.0f} tok/s{mfu} | eta {eta}"
    )


def closing_summary(cfg, seconds: float) -> list[str]:
    """What a finished `pretrain train` prints last: the final losses (read back from metrics.jsonl, every rank's
    figures being rank 0's there) and the three commands that look at the run, each of which works on it as it is."""
    run = cfg.run.dir
    records = read_metrics(run)
    train = next((r for r in reversed(records) if "loss" in r), None)
    val = next((r for r in reversed(records) if "val_loss" in r), None)
    took = f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    losses = f"train loss {train['loss']:.4f} at step {train['step']}" if train else "no step logged"
    if val is not None:
        bpb = f", {val['val_bpb']:.3f} bits per byte" if val.get("val_bpb") is not None else ""
        losses += f"; val loss {val['val_loss']:.4f} (perplexity {val['val_ppl']:.1f}{bpb}) at step {val['step']}"
    what = f"{cfg.model.norm_scheme} ({cfg.model.preset or 'custom'})"
    if train and train["step"] < cfg.train.steps:  # train.stop_at_step
        return [f"stopped at step {train['step']} of {cfg.train.steps} after {took} (train.stop_at_step): {what}, "
                f"{losses}; run the same command without train.stop_at_step to continue"]
    lines = [f"done: {what} trained in {took}, {losses}", "next:"]
    if cfg.diagnostics.interval > 0:
        lines.append(f"  pretrain plot {run} --out {run}/depth_stats.png    # variance and gradient norm per layer")
    else:
        lines.append("  (no per-layer plot: diagnostics.interval=0; train with diagnostics.interval=N to get one)")
    data = cfg.data.paths[0] if len(cfg.data.paths) == 1 else "DATA"
    lines += [f"  pretrain report {run} --out {run}/report    # REPORT.md and report.html: the loss table and curves",
              f"  pretrain analyze-depth --checkpoint {run} --data {data} --out {run}/depth    # what each block does"]
    return lines
