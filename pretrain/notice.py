"""One line on stdout, with the run's other log lines, for a set-up step that turns out slow: `with when_slow("loading DeepSpeed"):` says
"pretrain: loading DeepSpeed ..." once the block has run for 2 s, and nothing when it is faster, so a quick start stays
quiet and a slow one (a cold file cache, a busy node, a large corpus to tokenize) never looks hung. Not stderr:
there an error is the one line a user (and a script) reads."""

from __future__ import annotations

import threading
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
