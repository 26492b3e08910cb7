"""Loss and gradient-norm spikes: detected on the device, answered by train.on_spike (log, skip_batch, rollback).

Detection (train.spike_window > 0). Each step's loss and global gradient norm is compared with the running median and
MAD (median absolute deviation) of its series' finite, non-spike values among the last train.spike_window steps: a spike is a
value above median + train.spike_threshold * max(1.4826 * MAD, 0.1 * |median|) (1.4826 * MAD is the standard
deviation of normal noise; the floor keeps a smooth series from calling noise a spike: the gradient norm of a healthy
tiny run moves by 0.1-0.3 of its median from step to step while its MAD is a few percent, so with a 0.001 floor the
quick start logged rises of 1.25x as spikes; with 0.1 and the default threshold 6 a spike is at least 1.6x the median), once the window holds at least
min(window, 8) values. Only rises count: a falling loss is not a spike. All of it is a few tensor ops per step on the
device: the flags are read with the step's other numbers at the next record (pretrain/train/health.py), so a step
that logs nothing reads nothing from the device. Each spike is an event in metrics.jsonl
(`{"step", "event": "spike", "series": "loss" | "grad_norm", "value", "median", "threshold"}`), a log line and a
TensorBoard scalar. The window starts empty at every start of the process (a resume): it is not checkpointed.
With per-layer diagnostics on (diagnostics.interval > 0), each block's gradient norm is checked the same way at
every diagnostics record (`HostSpikes`: the window counts records), series `grad_norm/lNN`: logged only, never
rolled back.

Response (train.on_spike), at the record that finds the spike:

* log: nothing more;
* skip_batch: roll back (below) and skip the global batches of the spiking steps only: the steps after them are
  trained again on their own data;
* rollback: roll back and skip the global batches of every step from the first spike to the record that found it
  (PaLM's recipe: the batches around the spike go).

Rolling back restores the in-memory snapshot taken every train.snapshot_interval steps (weights, AdamW's state, the
learning-rate schedule, the data position; fp32 with parallel.zero_stage=0, where the optimizer is ours), or with
train.snapshot_interval=0 the last checkpoint. The skipped batches are named by their data position (the
`consumed_samples` a step starts at, so a global batch on every layout), kept in the trainer state of every later
checkpoint (`skipped_batches`) and skipped again by a resumed run: the data order stays reproducible. After
train.max_rollbacks rollbacks a further spike ends the run (exit 3) with one line.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass

import torch

from pretrain.runs import CHECKPOINTS_DIR, find_checkpoint
from pretrain.state import checkpoint
from pretrain.train.engine import GuardedAdamW

SERIES = ("loss", "grad_norm")
MAD_TO_STD = 1.4826  # the standard deviation of normal noise is 1.4826 times its MAD
RELATIVE_FLOOR = 0.1  # the spread is at least this fraction of the median (module docstring)


class SpikeDetector:
    """The running median/MAD of one series on the device (`check` per step: no host read)."""

    def __init__(self, window: int, threshold: float, device: torch.device):
        self.window, self.threshold = window, threshold
        self.history = torch.full((window,), math.nan, device=device)
        self.count = 0  # values offered so far (the next slot); the window holds the finite, non-spike ones
        self.min_values = min(window, 8)

    def check(self, value: torch.Tensor) -> torch.Tensor:
        """[spike (0/1), median, threshold] of `value` against the window before it; then the value joins the window
        unless it is non-finite or a spike."""
        x = value.detach().float().reshape(()).to(self.history.device)
        median = torch.nanmedian(self.history)
        spread = torch.maximum(MAD_TO_STD * torch.nanmedian((self.history - median).abs()),
                               RELATIVE_FLOOR * median.abs())
        limit = median + self.threshold * spread
        enough = torch.isfinite(self.history).sum() >= self.min_values
        spike = enough & torch.isfinite(x) & (x > limit)
        self.history[self.count % self.window] = torch.where(torch.isfinite(x) & ~spike, x, math.nan)
        self.count += 1
        return torch.stack([spike.float(), median, limit])

    def state(self) -> tuple[torch.Tensor, int]:
        return self.history.clone(), self.count

    def restore(self, state: tuple[torch.Tensor, int] | None) -> None:
        """Back to a `state()` (None: empty)."""
        if state is None:
            self.history.fill_(math.nan)
            self.count = 0
        else:
            self.history.copy_(state[0])
            self.count = state[1]


class Spikes:
    """Both series' detectors; `check(loss, grad_norm)` gives one device row of 7 numbers per step, which
    pretrain/train/health.py reads with the step's flags, and `events` turns read rows into metrics.jsonl events."""

    def __init__(self, window: int, threshold: float, device: torch.device):
        self.enabled = window > 0
        self.detectors = [SpikeDetector(window, threshold, device) for _ in SERIES] if self.enabled else []

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> torch.Tensor | None:
        """The step's row: [loss spike, median, threshold, grad-norm spike, median, threshold, grad norm]."""
        if not self.enabled:
            return None
        loss_row = self.detectors[0].check(loss)
        if isinstance(grad_norm, torch.Tensor):
            norm = grad_norm
        else:  # a DeepSpeed optimizer's norm is a float it already read (None: the optimizer reports none)
            norm = torch.full((), math.nan if grad_norm is None else grad_norm, device=loss_row.device)
        norm = norm.detach().float().reshape(()).to(loss_row.device)
        return torch.cat([loss_row, self.detectors[1].check(norm), norm.reshape(1)])

    @staticmethod
    def events(step: int, row: list[float], loss: float) -> list[dict]:
        """The spike events of step `step` from its read row (`check`'s 7 numbers) and its loss."""
        out = []
        for i, (series, value) in enumerate(zip(SERIES, (loss, row[6]))):
            spike, median, limit = row[3 * i: 3 * i + 3]
            if spike:
                out.append({"step": step, "event": "spike", "series": series, "value": value, "median": median,
                            "threshold": limit})
        return out

    def state(self):
        return [d.state() for d in self.detectors]

    def restore(self, state) -> None:
        for d, s in zip(self.detectors, state or [None] * len(self.detectors)):
            d.restore(s)


class HostSpikes:
    """The same rule on values already read into Python (per-layer gradient norms, which the diagnostics read at
    their interval): one window per named series, counted in records rather than steps."""

    def __init__(self, window: int, threshold: float):
        self.window, self.threshold = window, threshold
        self.history: dict[str, list[float]] = {}

    def check(self, step: int, values: dict[str, float]) -> list[dict]:
        """Spike events of `values` ({series: value}) against each series' window; then the values join it."""
        events = []
        if self.window <= 0:
            return events
        for series, x in values.items():
            past = self.history.setdefault(series, [])
            if x is None or not math.isfinite(x):
                continue
            spike = False
            if len(past) >= min(self.window, 8):
                median = statistics.median(past)
                mad = statistics.median(abs(v - median) for v in past)
                limit = median + self.threshold * max(MAD_TO_STD * mad, RELATIVE_FLOOR * abs(median))
                spike = x > limit
                if spike:
                    events.append({"step": step, "event": "spike", "series": series, "value": x, "median": median,
                                   "threshold": limit})
            if not spike:
                past.append(x)
                del past[:-self.window]
        return events


@dataclass
class Snapshot:
    """The training state at the end of step `step` (in memory, on the device)."""

    step: int
    consumed_samples: int
    model: dict
    optimizer: dict
    scheduler: dict
    engine_counters: tuple
    rng: torch.Tensor
    spikes: list


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    return x


ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps")


@dataclass
class Rewind:
    """Where the loop continues after a rollback: the step it restored, its data position, what was skipped."""

    step: int
    consumed_samples: int
    line: str
    event: dict


class SpikeResponse:
    """train.on_spike's skip_batch and rollback: snapshots (`at_record`), the rollback (`respond`) and the skipped
    data positions (`skip`)."""

    def __init__(self, cfg, built, topo, loader, spikes: Spikes, skipped_batches: list[int]):
        self.cfg, self.built, self.topo, self.loader, self.spikes = cfg, built, topo, loader, spikes
        self.mode = cfg.train.on_spike
        self.interval = cfg.train.snapshot_interval
        self.skipped = set(skipped_batches)  # data positions (consumed_samples at a step's start) never trained on
        self.rollbacks = 0
        self.snapshot: Snapshot | None = None
        self.starts: dict[int, int] = {}  # step -> its data position, back to the oldest possible rollback target
        # the steps a rollback can reach back: to the snapshot or last checkpoint, found at a record after it
        self.horizon = (self.interval or cfg.checkpoint.interval) + cfg.logging.interval
        self.where = ""  # what the last rollback restored, for its line

    def skip(self, consumed_samples: int) -> int:
        """The data position the next step starts at: `consumed_samples`, past any skipped global batches (the
        loader follows)."""
        while consumed_samples in self.skipped:
            consumed_samples += self.cfg.train.global_batch_size
        self.loader.consumed_samples = consumed_samples
        return consumed_samples

    def stepping(self, step: int, consumed_samples: int) -> None:
        if self.mode != "log":
            self.starts[step] = consumed_samples
            self.starts.pop(step - self.horizon, None)

    def at_record(self, step: int, consumed_samples: int, first: bool = False) -> None:
        """A record without spikes at `step` (or the start, `first`): take the snapshot when one is due."""
        if self.mode == "log" or self.interval == 0 or not (first or step % self.interval == 0):
            return
        optimizer = self.built.engine.optimizer
        if not isinstance(optimizer, GuardedAdamW):  # the config refuses this: ZeRO and bf16 optimizers are DeepSpeed's
            raise RuntimeError("in-memory snapshots need the fp32 ZeRO-0 optimizer")
        self.snapshot = Snapshot(
            step, consumed_samples, _clone(self.built.model.state_dict()), _clone(optimizer.state_dict()),
            self.built.engine.lr_scheduler.state_dict(),
            tuple(getattr(self.built.engine, k) for k in ENGINE_COUNTERS), torch.get_rng_state(),
            [(h.clone(), n) for h, n in self.spikes.state()])
        self.starts = {s: c for s, c in self.starts.items() if s > step}

    def respond(self, spike_steps: list[int], step: int) -> Rewind | str | None:
        """After a record found spikes at `spike_steps` (the last step run is `step`): roll back and return where to
        continue; a one-line reason to stop (train.max_rollbacks reached); None under on_spike=log."""
        if self.mode == "log" or not spike_steps:
            return None
        if self.rollbacks >= self.cfg.train.max_rollbacks:
            return (f"a spike at step {spike_steps[0]} after train.max_rollbacks={self.cfg.train.max_rollbacks} "
                    f"rollbacks; stopping. Lower train.lr, raise train.warmup_steps or check the data at these steps; "
                    "resume from the last checkpoint")
        target = self._restore()
        if target is None:
            return None  # nothing to return to yet: the caller says so
        back_to, consumed = target
        skipped_steps = spike_steps if self.mode == "skip_batch" else list(range(spike_steps[0], step + 1))
        positions = [self.starts[s] for s in skipped_steps if s in self.starts]
        self.skipped.update(positions)
        self.rollbacks += 1
        self.starts = {s: c for s, c in self.starts.items() if s <= back_to}
        self.loader.consumed_samples = consumed
        what = "skipping the data of " + (f"step {skipped_steps[0]}" if len(skipped_steps) == 1 else
                                           f"steps {skipped_steps[0]}-{skipped_steps[-1]}")
        line = (f"spike at step {spike_steps[0]}: rolled back to step {back_to} ({self.where}), {what} "
                f"(rollback {self.rollbacks} of at most {self.cfg.train.max_rollbacks})")
        event = {"step": back_to, "event": "rollback", "from_step": step, "spike_steps": spike_steps,
                 "skipped_steps": skipped_steps, "skipped_batches": positions, "rollbacks": self.rollbacks}
        return Rewind(back_to, consumed, line, event)

    def _restore(self) -> tuple[int, int] | None:
        if self.interval > 0:
            s = self.snapshot
            if s is None:
                return None
            self.built.model.load_state_dict(s.model)
            self.built.engine.optimizer.load_state_dict(_clone(s.optimizer))  # it keeps the tensors it is given
            self.built.engine.lr_scheduler.load_state_dict(s.scheduler)
            for k, v in zip(ENGINE_COUNTERS, s.engine_counters):
                setattr(self.built.engine, k, v)
            torch.set_rng_state(s.rng)
            self.spikes.restore([(h.clone(), n) for h, n in s.spikes])
            self.where = "in-memory snapshot"
            return s.step, s.consumed_samples
        folder = find_checkpoint(os.path.join(self.cfg.run.dir, CHECKPOINTS_DIR))
        if not os.path.isfile(os.path.join(folder, checkpoint.STATE_FILE)):
            return None
        state = checkpoint.load(self.built.engine, folder, self.topo.rank)
        self.spikes.restore(None)  # the window is not in the checkpoint: it starts again
        self.where = f"checkpoint {folder}"
        return state["step"], state["consumed_samples"]

    def trainer_state(self) -> dict:
        return {"skipped_batches": sorted(self.skipped)}
