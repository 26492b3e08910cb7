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


@dataclass
class Settled:
    """What the steps since the last settle were, as Python values."""

    loss: float  # the last step's
    grad_norm: float  # the last step's global gradient norm (nan when the optimizer reports none)
    bad_steps: list[int] = field(default_factory=list)  # steps with a non-finite loss or a skipped update
    in_a_row: int = 0  # bad steps in a row ending at the last step
    stop_at: int | None = None  # the first step that made train.max_bad_steps bad steps in a row


class StepHealth:
    def __init__(self, device: torch.device, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.run = torch.zeros((), dtype=torch.int32, device=device)  # bad steps in a row, on the device
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, bad, run after it)
        self.loss: torch.Tensor | None = None

    def record(self, step: int, loss: torch.Tensor, built: Built) -> None:
        """After optimizer step `step`: its loss (a device tensor) and whether the update was skipped."""
        bad = ~torch.isfinite(loss) | (step_skipped(built) > 0)
        self.run = (self.run + 1) * bad
        self.pending.append((step, bad, self.run))
        self.loss = loss

    def settle(self, grad_norm: torch.Tensor | float | None) -> Settled:
        """The steps recorded since the last call and the last step's gradient norm (a tensor, or the float a
        DeepSpeed optimizer already read), read from the device in one transfer."""
        if not self.pending:
            raise RuntimeError("settle() before any recorded step")
        steps = [s for s, _, _ in self.pending]
        last = self.loss.detach().float().reshape(())
        norm = grad_norm.detach().float().reshape(()) if isinstance(grad_norm, torch.Tensor) else torch.full_like(
            last, float("nan") if grad_norm is None else grad_norm)
        values = torch.stack([torch.stack([b.float(), r.float()]) for _, b, r in self.pending] +
                             [torch.stack([last, norm.to(last.device)])]).tolist()
        *rows, (loss, norm_value) = values
        self.pending = []
        bad = [s for s, (b, _) in zip(steps, rows) if b]
        stop_at = next((s for s, (_, r) in zip(steps, rows) if r >= self.max_bad_steps), None)
        return Settled(loss=loss, grad_norm=norm_value, bad_steps=bad, in_a_row=int(rows[-1][1]), stop_at=stop_at)
