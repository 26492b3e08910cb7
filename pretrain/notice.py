"""One line on stdout, with the run's other log lines, for a set-up step that turns out slow: `with when_slow("loading DeepSpeed"):` says
"pretrain: loading DeepSpeed ..." once the block has run for 2 s, and nothing when it is faster, so a quick start stays
quiet and a slow one (a cold file cache, a busy node, a large corpus to tokenize) never looks hung. Not stderr:
there an error is the one line a user (and a script) reads."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

AFTER_S = 2.0


@contextmanager
def when_slow(what: str, enabled: bool = True, after: float = AFTER_S) -> Iterator[None]:
    """Say `what` is being done if the block is still running after `after` seconds (`enabled`: e.g. rank 0 only)."""
    if not enabled:
        yield
        return
    timer = threading.Timer(after, lambda: print(f"pretrain: {what} ...", flush=True))
    timer.daemon = True  # never keeps a failing process alive
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class Progress:
    """A progress line with MB/s for a long loop over bytes (`data prepare` tokenizing; other counts with `unit` and
    `scale`: eval-downstream's requests): nothing for the first
    `after` seconds, so a quick run (and a test) stays quiet; then on a terminal one line rewritten in place every
    second, elsewhere (a log file) a new line every `every` seconds; `close()` ends with the total and the rate."""

    def __init__(self, what: str, total_bytes: int | None = None, enabled: bool = True, after: float = AFTER_S,
                 every: float = 30.0, unit: str = "MB", scale: float = 1e6):
        self.what, self.total, self.enabled, self.after = what, total_bytes, enabled, after
        # counted things other than bytes (eval-downstream's requests): unit="requests", scale=1
        self.unit, self.scale, self.digits = unit, scale, 1 if scale != 1 else 0
        self.tty = sys.stdout.isatty()
        self.every = 1.0 if self.tty else every
        self.start = time.perf_counter()
        self.done = 0
        self.last = None  # when the last line was printed

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if not self.enabled or now - self.start < self.after or (self.last and now - self.last < self.every):
            return
        self.last = now
        total = f" / {self._n(self.total)}" if self.total else ""
        line = f"pretrain: {self.what} {self._n(self.done)}{total} {self.unit}, {self.rate(now):.1f} {self.unit}/s"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def _n(self, count: float) -> str:
        return f"{count / self.scale:,.{self.digits}f}"

    def rate(self, now: float | None = None) -> float:
        return self.done / self.scale / max((now or time.perf_counter()) - self.start, 1e-9)

    def close(self) -> None:
        if self.last is not None:
            now = time.perf_counter()
            line = (f"pretrain: {self.what} {self._n(self.done)} {self.unit} in {now - self.start:.1f} s, "
                    f"{self.rate(now):.1f} {self.unit}/s")
            print(f"\r{line}" if self.tty else line, flush=True)
