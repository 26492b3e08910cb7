"""Where the first non-finite value of a bad step came from: `first non-finite: MODULE (forward|backward) at step N`.

Nothing runs on a finite step: the loop learns that a step was bad when it reads the step's flags at its record
(pretrain/train/health.py), and only then calls `locate`. That re-reads the step's micro-batches (the loaders are
positional: `consumed_samples` names a step's data) and runs the step's forward and backward once more with hooks on
every module, without touching the weights, their gradients or the optimizer:

* forward: a forward hook on every module; the first module, in the order their forwards finish (a sublayer before
  the block holding it), whose output holds a non-finite value;
* backward (when the forward and the loss were finite): a full backward hook on every leaf module (linears, norms,
  the embedding); the first, in backward order, whose gradient (into its input, or arriving at its output) holds a
  non-finite value; failing that, the first weight whose gradient does, from the loss backwards.

The backward is `torch.autograd.grad` over the weights: it fills no `.grad` and runs none of DeepSpeed's gradient
hooks, so the engine's state is as before. The re-run uses the weights as they are when the record is read: exact
when the step re-run is the last one before that record (a bad step's update was skipped), the usual case of a
diverging run; otherwise later finite updates may have moved the weights, and the finding says whether it
reproduced. The random state is saved and restored around it, so the run continues as it would have.

Pipeline-parallel runs are not located (a stage holds a part of the model; the re-run would need the pipeline
schedule): the loop says so once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.train.steps import to_device


@dataclass
class Finding:
    module: str  # the module's name in the model ("blocks.3.attn.qkv", "embed.embedding", ...), or "loss"
    direction: str  # "forward" or "backward"
    detail: str  # "output", "input gradient", "output gradient", "weight gradient", "loss"
    order: int  # its position in the order the hooks fired (forward first): the smallest is the first

    def event(self, step: int) -> dict:
        return {"step": step, "event": "non_finite", "module": self.module, "direction": self.direction,
                "detail": self.detail}

    def line(self, step: int) -> str:
        return f"first non-finite: {self.module} ({self.direction}) at step {step}"


def _non_finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point() and not bool(torch.isfinite(x).all())
    if isinstance(x, (tuple, list)):
        return any(_non_finite(t) for t in x)
    return False


def locate(model: torch.nn.Module, batches: list, device: torch.device) -> Finding | None:
    """Re-run one step's micro-batches through `model` (a `models.Llama`, TP or not) and return where the first
    non-finite value appeared, or None when the re-run stayed finite."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        for batch in batches:
            with warnings.catch_warnings():  # the embedding's full backward hook fires on its output only: as meant
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                found = _locate_one(model, batch, device)
            if found is not None:
                return found
        return None
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _locate_one(model: torch.nn.Module, batch, device: torch.device) -> Finding | None:
    fired: list[Finding] = []
    names = {m: n for n, m in model.named_modules() if n}

    def forward_hook(module, inputs, output):
        if not fired and _non_finite(output):
            fired.append(Finding(names[module], "forward", "output", 0))

    def backward_hook(module, grad_input, grad_output):
        if fired:
            return
        if _non_finite(grad_output):
            fired.append(Finding(names[module], "backward", "output gradient", 1))
        elif _non_finite(grad_input):
            fired.append(Finding(names[module], "backward", "input gradient", 1))

    # Backward hooks wrap a module's inputs and outputs as its forward runs: both kinds go on before it.
    handles = [m.register_forward_hook(forward_hook) for m in names]
    handles += [m.register_full_backward_hook(backward_hook) for m in names if not any(m.children())]
    try:
        loss = model(to_device(batch.tokens, device), to_device(batch.labels, device),
                     **to_device(batch.model_kwargs(), device))
        if fired:
            return fired[0]
        if _non_finite(loss):
            return Finding("loss", "forward", "loss", 0)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        if fired:
            return fired[0]
        for (name, _), g in reversed(list(zip(params, grads))):  # from the loss backwards
            if g is not None and _non_finite(g):
                return Finding(name.rpartition(".")[0] or name, "backward", "weight gradient", 2)
        return None
    finally:
        for h in handles:
            h.remove()


def first_across_ranks(found: Finding | None) -> Finding | None:
    """The finding of the lowest rank that has one (each data-parallel rank re-ran its own micro-batches)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return found
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, found)
    return next((f for f in everyone if f is not None), None)


def batches_at(loader, consumed_samples: int, count: int) -> list:
    """The `count` micro-batches a step starting at `consumed_samples` read (the loader is left where it was)."""
    saved = loader.consumed_samples
    loader.consumed_samples = consumed_samples
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.consumed_samples = saved


class NonFiniteLocator:
    """The loop's side: where each step's data starts (`stepping`), and at a record with bad steps
    (`after_record`) the re-run of one of them, once per stretch of bad steps (a run that stays bad is located at
    its first record, not at every one). Returns the log lines and metrics.jsonl events to write."""

    def __init__(self, built, topo, loader):
        self.built, self.topo, self.loader = built, topo, loader
        self.starts: dict[int, int] = {}  # step -> consumed_samples before it, since the last record
        self.in_bad_stretch = False
        self.said_pipeline = False

    def stepping(self, step: int, consumed_samples: int) -> None:
        self.starts[step] = consumed_samples

    def after_record(self, bad_steps: list[int], last_step: int) -> tuple[list[str], list[dict]]:
        starts, self.starts = self.starts, {}
        if not bad_steps:
            self.in_bad_stretch = False
            return [], []
        ended_bad = bad_steps[-1] == last_step
        if self.in_bad_stretch:
            self.in_bad_stretch = ended_bad
            return [], []
        self.in_bad_stretch = ended_bad
        if self.built.pipelined:
            if self.said_pipeline:
                return [], []
            self.said_pipeline = True
            return ["first non-finite: not located under pipeline parallelism (parallel.pp > 1); rerun the step "
                    "without it to locate"], []
        # The last bad step if it is the last step (its update was skipped: the weights are the ones it saw), else the
        # first of the window.
        step = last_step if ended_bad else bad_steps[0]
        found = first_across_ranks(locate(self.built.model, batches_at(self.loader, starts[step], self.built.gas),
                                          self.topo.device))
        if found is None:
            return [f"first non-finite: not reproduced by re-running step {step} (the weights have moved on since)"], [
                {"step": step, "event": "non_finite", "module": None, "direction": None, "detail": "not reproduced"}]
        return [found.line(step)], [found.event(step)]
