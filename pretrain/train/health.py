"""Each step's loss and skip flag, kept on the device until the loop logs.

Reading a device value into Python (`float(loss)`, `bool(flag)`) makes the host wait for the GPU to finish all the
work queued so far, so the CPU cannot run ahead to queue the next step. The loop therefore keeps, per step, only
tensors: the loss, whether the step was bad (a non-finite loss, or an update skipped for a non-finite gradient), and
the number of bad steps in a row; `settle` reads them all at once when the loop logs, saves or stops
(pretrain/train/loop.py), and that is when a skipped step is reported and train.max_bad_steps is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.train.engine import Built, step_skipped
from pretrain.train.spikes import Spikes


@dataclass
class Settled:
    """What the steps since the last settle were, as Python values."""

    loss: float  # the last step's
    grad_norm: float  # the last step's global gradient norm (nan when the optimizer reports none)
    bad_steps: list[int] = field(default_factory=list)  # steps with a non-finite loss or a skipped update
    in_a_row: int = 0  # bad steps in a row ending at the last step
    stop_at: int | None = None  # the first step that made train.max_bad_steps bad steps in a row
    spikes: list[dict] = field(default_factory=list)  # spike events (pretrain/train/spikes.py) of these steps

    @property
    def spike_steps(self) -> list[int]:
        return sorted({e["step"] for e in self.spikes})


class StepHealth:
    def __init__(self, device: torch.device, max_bad_steps: int, spikes: Spikes | None = None):
        self.max_bad_steps = max_bad_steps
        self.run = torch.zeros((), dtype=torch.int32, device=device)  # bad steps in a row, on the device
        # (step, [bad, run after it, loss, spike row (pretrain/train/spikes.py) if detecting])
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.loss: torch.Tensor | None = None
        self.spikes = spikes if spikes is not None and spikes.enabled else None

    def record(self, step: int, loss: torch.Tensor, built: Built) -> None:
        """After optimizer step `step`: its loss (a device tensor), whether the update was skipped, and the spike
        checks of its loss and gradient norm."""
        bad = ~torch.isfinite(loss) | (step_skipped(built) > 0)
        self.run = (self.run + 1) * bad
        row = [torch.stack([bad.float().reshape(()), self.run.float().reshape(()), loss.detach().float().reshape(())])]
        if self.spikes is not None:
            row.append(self.spikes.check(loss, built.engine.get_global_grad_norm()))
        self.pending.append((step, torch.cat(row)))
        self.loss = loss

    def settle(self, grad_norm: torch.Tensor | float | None) -> Settled:
        """The steps recorded since the last call and the last step's gradient norm (a tensor, or the float a
        DeepSpeed optimizer already read), read from the device in one transfer."""
        if not self.pending:
            raise RuntimeError("settle() before any recorded step")
        steps = [s for s, _ in self.pending]
        last = self.loss.detach().float().reshape(())
        norm = grad_norm.detach().float().reshape(()) if isinstance(grad_norm, torch.Tensor) else torch.full_like(
            last, float("nan") if grad_norm is None else grad_norm)
        width = self.pending[0][1].numel()
        tail = torch.cat([torch.stack([last, norm.to(last.device)]), last.new_zeros(width - 2)])
        values = torch.stack([row for _, row in self.pending] + [tail]).tolist()  # the one transfer
        *rows, (loss, norm_value, *_) = values
        self.pending = []
        bad = [s for s, row in zip(steps, rows) if row[0]]
        stop_at = next((s for s, row in zip(steps, rows) if row[1] >= self.max_bad_steps), None)
        spikes = [e for s, row in zip(steps, rows) for e in Spikes.events(s, row[3:], row[2])] if self.spikes else []
        return Settled(loss=loss, grad_norm=norm_value, bad_steps=bad, in_a_row=int(rows[-1][1]), stop_at=stop_at,
                       spikes=spikes)
