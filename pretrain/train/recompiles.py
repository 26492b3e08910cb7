"""train.compile: how many graphs torch.compile compiled, and how many of them after the warm-up (recompilations).

The first steps of a process compile each block's graph (forward at its first call, backward at its first
backward); after them a compiled run should compile nothing: a recompilation costs seconds to minutes and
means a guard failed (a changed Python value, shape or global state such as grad mode) every so often. The
loop records both counts in every logged metrics.jsonl entry of a compiled run and says so at the end of the run
when a graph was compiled after the warm-up. `TORCH_LOGS=recompiles` names the guard that failed.
"""

from __future__ import annotations

from pretrain import compat

WARMUP_STEPS = 2  # steps of this process that may compile (the first of a fresh or a resumed run)


class CompileCount:
    """Counts dynamo's compiled graphs of this process (`compat.compiled_graphs`) from the loop's first step."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.steps = 0  # steps this process ran
        self.at_warmup: int | None = None  # graphs compiled when the warm-up ended

    def stepped(self) -> None:
        """After each optimizer step."""
        self.steps += 1
        if self.enabled and self.steps == WARMUP_STEPS:
            self.at_warmup = compat.compiled_graphs()

    @property
    def recompiles(self) -> int:
        """Graphs compiled after the warm-up (0 until it ends)."""
        return 0 if self.at_warmup is None else compat.compiled_graphs() - self.at_warmup

    def logged(self) -> dict:
        """The counts for a logged metrics.jsonl entry: {} without train.compile."""
        if not self.enabled:
            return {}
        return {"compiled_graphs": compat.compiled_graphs(), "recompiles": self.recompiles}

    def closing_line(self) -> str | None:
        """One line for the end of the run if graphs were compiled after the warm-up, else None."""
        if not self.enabled or not self.recompiles:
            return None
        return (f"train.compile: {self.recompiles} graph(s) compiled after the first {WARMUP_STEPS} steps "
                f"(recompilations, {compat.compiled_graphs()} in all); run with TORCH_LOGS=recompiles to see "
                "which guard failed")
