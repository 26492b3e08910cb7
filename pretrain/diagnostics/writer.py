"""layer_stats.jsonl and the trackers' layers/* (rank 0 only); the record format is documented in
pretrain/diagnostics/__init__.py."""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from tqdm import tqdm

from pretrain.diagnostics.measures import LAYER_STATS, PER_STREAM
from pretrain.diagnostics.stats import ACTIVATION_STATS, GRADIENT_GROUPS, STREAM_ROWS
from pretrain.runs import LAYER_STATS_FILE, torn_line_message, truncate_jsonl


def tracked(record: dict) -> dict:
    """A layer_stats.jsonl record as the trackers log it (under layers/): {"<stat>/lNN": value} per layer (1-based,
    one panel group per statistic), {"<stat>/lNN/sK": value} per layer and stream of a per-stream statistic (where the
    record has it: n > 1 streams) and {"grad_norm_<part>": value}."""
    flat = {f"{s.name}/l{l:02d}": v for s in LAYER_STATS if s.shape != PER_STREAM
            for l, v in enumerate(record[s.name], start=1)}
    flat.update({f"{s.name}/l{l:02d}/s{k}": v for s in LAYER_STATS if s.shape == PER_STREAM and s.name in record
                 for l, row in enumerate(record[s.name], start=1) for k, v in enumerate(row, start=1)})
    flat.update({f"grad_norm_{name}": record[f"grad_norm_{name}"] for name in (*GRADIENT_GROUPS, "global")})
    return flat


def make_record(step: int, n_layers: int, norm_scheme: str, act: torch.Tensor, grad_sq: torch.Tensor,
                counts: torch.Tensor, streams: torch.Tensor | None = None) -> dict:
    """The layer_stats.jsonl object from the reduced tensors (act [len(ACTIVATION_STATS), L], grad_sq/counts
    [L + groups], and with n > 1 residual streams `streams` [len(STREAM_ROWS), L, n]; None: no per-stream keys)."""
    device = grad_sq.device
    per_stream = [] if streams is None else [streams.flatten().double().to(device)]
    values = torch.cat([act.flatten().double().to(device), grad_sq.double(), counts.double().to(device),
                        *per_stream]).tolist()
    width = act.shape[1]  # one read of the device above, sliced here
    act_rows = [values[i * width:(i + 1) * width] for i in range(act.shape[0])]
    start, groups = act.numel(), grad_sq.numel()
    sq, n = values[start:start + groups], values[start + groups:start + 2 * groups]
    record = {"step": step, "layers": n_layers, "norm_scheme": norm_scheme}
    record.update({s.name: row for s, row in zip(ACTIVATION_STATS, act_rows)})
    record["grad_norm"] = [math.sqrt(v) for v in sq[:n_layers]]
    for i, name in enumerate(GRADIENT_GROUPS):
        record[f"grad_norm_{name}"] = math.sqrt(sq[n_layers + i]) if n[n_layers + i] > 0 else None
    record["grad_norm_global"] = math.sqrt(sum(sq))
    if streams is not None:  # after the per-block keys, in table order; stream k of layer l at [l - 1][k - 1]
        rows = iter(values[start + 2 * groups:])
        for name in STREAM_ROWS:
            record[name] = [[next(rows) for _ in range(streams.shape[2])] for _ in range(streams.shape[1])]
    return record


class LayerStatsWriter:
    """layer_stats.jsonl and the run's trackers (pretrain/train/trackers.py; rank 0 only): every tracker gets the
    record's numbers as layers/<stat>/lNN and layers/grad_norm_<part>; TensorBoard (`tb`, its SummaryWriter, None
    without it) also a variance-against-depth histogram per step and, from `figure(history)`, an end-of-run image
    (None: no image)."""

    def __init__(self, run_dir: str, start_step: int, trackers=(), tb=None, say=None, figure=None):
        self.path = os.path.join(run_dir, LAYER_STATS_FILE)
        self.trackers, self.tb, self.figure = list(trackers), tb, figure
        self.history: list[dict] = []
        torn = truncate_jsonl(self.path, start_step)  # a torn last line (a write cut off) is dropped, and said
        if torn is not None:
            (say or self._say)(torn_line_message(self.path, torn))

    @staticmethod
    def _say(line: str) -> None:
        """A log line that does not break the progress bar (tqdm.write prints above an active bar)."""
        tqdm.write(line, file=sys.stdout)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.history.append({"step": record["step"], "variance": record["variance"]})
        step, n = record["step"], record["layers"]
        if self.trackers:
            flat = tracked(record)
            for tracker in self.trackers:
                tracker.log(flat, "layers", step)
        if self.tb is None:
            return
        variance = record["variance"]
        if all(math.isfinite(v) for v in variance):
            # A "histogram" whose bucket l spans (l - 1/2, l + 1/2] and holds layer l's variance: TensorBoard's
            # histogram tab draws variance against depth, one curve per measured step.
            self.tb.add_histogram_raw(
                "layers/variance_vs_depth", min=0.5, max=n + 0.5, num=n, sum=sum(variance),
                sum_squares=sum(v * v for v in variance), bucket_limits=[l + 0.5 for l in range(1, n + 1)],
                bucket_counts=variance, global_step=step,
            )

    def close(self) -> None:
        if self.tb is None or not self.history or self.figure is None:
            return
        picked = self.history if len(self.history) <= 8 else [
            self.history[round(i * (len(self.history) - 1) / 7)] for i in range(8)
        ]
        self.tb.add_figure("layers/variance_vs_depth_image", self.figure(picked), self.history[-1]["step"])
