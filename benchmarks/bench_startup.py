"""Start-up: how long a command takes before it does anything, against the interpreter and `import torch` timed in
the same run (the floor every command that touches a model pays).

    python benchmarks/bench_startup.py [--repeat 3]

Prints the median wall time of: `python -c pass`, `python -c "import torch"`, `pretrain --help`, a config error
(`pretrain train configs/tiny.yaml model.norm_scheme=nope`), and `pretrain train configs/tiny.yaml` from the command
to its first logged step (the run in a temporary folder, stopped there; the bundled data prepared before timing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def wall(cmd: list[str], env: dict, until: str | None = None, expect: int = 0) -> float:
    """Seconds from starting `cmd` to its exit, or to the first line of its stdout that starts with `until` (then it
    is killed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if until is not None and line.lstrip().startswith(until):
            took = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return took
    code = proc.wait()
    if until is not None or code != expect:
        raise SystemExit(f"{' '.join(cmd)} exited {code} (expected {expect}{' and ' + until if until else ''}):\n"
                         + "".join(lines[-20:]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    py, pretrain = sys.executable, [sys.executable, "-m", "pretrain"]
    scratch = tempfile.mkdtemp(prefix="bench-startup-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        run = os.path.join(scratch, "run")
        first_step = [*pretrain, "train", TINY, f"run.dir={run}", "logging.interval=1", "logging.progress_bar=false"]
        wall(first_step, env, until="step      1/")  # prepares the bundled data (cached) and warms the file cache
        cases = [
            ("python -c pass", [py, "-c", "pass"], None, 0),
            ("python -c 'import torch'", [py, "-c", "import torch"], None, 0),
            ("pretrain --help", [*pretrain, "--help"], None, 0),
            ("config error (train)", [*pretrain, "train", TINY, f"run.dir={run}-x", "model.norm_scheme=nope"], None, 2),
            ("train tiny: command -> step 1", first_step, "step      1/", 0),
        ]
        results = {}
        for name, cmd, until, expect in cases:
            times = []
            for _ in range(args.repeat):
                shutil.rmtree(run, ignore_errors=True)
                times.append(wall(cmd, env, until, expect))
            results[name] = statistics.median(times)
        torch_s = results["python -c 'import torch'"]
        print(f"{'':<32}{'median s':>9}{'x import torch':>16}   ({args.repeat} runs each)")
        for name, s in results.items():
            print(f"{name:<32}{s:>9.2f}{s / torch_s:>16.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
