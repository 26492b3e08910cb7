"""Counting the host synchronisations of a training step (logging.host_syncs).

On a GPU every read of a tensor's value into Python (`.item()`, `float(t)`, `bool(t)`, `int(t)`, `.tolist()`) and
every op whose output size depends on the data (`nonzero`, boolean indexing) waits for the device to finish all
queued work: the CPU stops feeding kernels and the GPU idles until it does. Each is one `aten::_local_scalar_dense`
(or a data-dependent op) at the dispatcher, so a `TorchDispatchMode` sees them on any device, CPU included, in our
code and in DeepSpeed's alike. `HostSyncs` counts them per step and remembers where the first few came from.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# The ops that read device values into the host: a scalar read, and ops whose output shape depends on the data.
SYNC_OPS = frozenset({
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
})


# Indexing with a boolean mask: on a GPU its output size (or the positions written) needs the mask's nonzero count.
MASK_INDEXING = frozenset({torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                           torch.ops.aten.index_put_.default})


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


class HostSyncs:
    """Counts the host synchronisations while active: `with HostSyncs() as s: ...; s.count`. `sites` holds the
    innermost frames of our code (or, outside it, the library's) for the first `keep` of them.

    Two modes see them: the dispatcher's (scalar reads and data-dependent ops, wherever they come from) and the
    torch-function one for `Tensor.tolist()`, which reads a CPU tensor without a dispatched op (on a GPU it copies
    to the host first; on CPU that copy is a no-op and would go unseen). `Tensor.numpy()` is not counted: it refuses
    a device tensor, so what it reads is host memory on every machine (pretrain/train/signals.py relies on that)."""

    def __init__(self, keep: int = 5):
        self.count, self.keep, self.sites = 0, keep, []
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))

    def saw(self) -> None:
        self.count += 1
        if len(self.sites) < self.keep:
            self.sites.append(_site())

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: HostSyncs):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or (func in MASK_INDEXING and any(_is_mask(i) for i in args[1])):
            self.counter.saw()
        return func(*args, **(kwargs or {}))


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counter: HostSyncs):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counter.saw()
        return func(*args, **(kwargs or {}))


def _site() -> str:
    """`file:line in function` of the frame that asked for the value: the innermost one outside torch."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"



class StepSyncs:
    """The loop's counter (logging.host_syncs): `with syncs.step():` around each step; `logged()` when the step
    writes its metrics record gives what the record carries:

        host_syncs              this step's count up to its record (the step, its hooks, the log's own reads)
        host_syncs_quiet        the most any step since the last record made (steps that log nothing: 0 is the goal)
        host_sync_sites         where those came from, `file:line in function` -> count (the quiet steps' if any)

    Off, it does nothing (no dispatch mode: counting costs a Python call per op)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.mode: HostSyncs | None = None
        self.quiet_max: int | None = None
        self.quiet_sites: dict[str, int] = {}
        self.was_logged = False

    @contextlib.contextmanager
    def step(self):
        if not self.enabled:
            yield
            return
        self.was_logged = False
        with HostSyncs(keep=1000) as self.mode:
            yield
        if not self.was_logged:
            self.quiet_max = max(self.quiet_max or 0, self.mode.count)
            for site in self.mode.sites:
                self.quiet_sites[site] = self.quiet_sites.get(site, 0) + 1

    def busy(self) -> None:
        """This step writes a record of its own (diagnostics): not a quiet step."""
        self.was_logged = True

    def logged(self) -> dict:
        if not self.enabled:
            return {}
        self.was_logged = True
        sites = self.quiet_sites if self.quiet_max else _counted(self.mode.sites)
        record = {"host_syncs": self.mode.count, "host_syncs_quiet": self.quiet_max, "host_sync_sites": sites}
        self.quiet_max, self.quiet_sites = None, {}
        return record


def _counted(sites: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for site in sites:
        out[site] = out.get(site, 0) + 1
    return out
