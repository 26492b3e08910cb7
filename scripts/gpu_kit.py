#!/usr/bin/env python3
"""The GPU kit: what a short, offline loan of one GPU machine should run, prepared in two commands.

    python scripts/gpu_kit.py wheels                    # any machine with PyPI: the wheels the GPU image lacks
    python3 scripts/gpu_kit.py run --out DIR [--cpu]    # the GPU machine, repository root, no network

The GPU machines we are lent have Python 3.12 with torch, transformers and most of our dependencies, but no
DeepSpeed, megatron-core or datasets, and no network; a copy of the working tree (plus ignored paths we name, 64
MiB at most) arrives there and one shell command runs. `wheels` therefore puts the missing packages into the
git-ignored `.whl/` (carry it along), and `run` installs them beside the image's packages (`.whl/site`, never over
them) and runs the stages below as subprocesses, each with a time limit, writing everything into DIR:

    install        the wheels of .whl/ whose distribution the interpreter lacks, into .whl/site
    env            versions (Python, torch, CUDA, packages), the GPU, nvidia-smi, pretrain.compat's untested versions
    cuda-tests     pytest -m cuda tests/test_cuda.py (junit XML)
    bench          pretrain bench, one process per preset, eager
    memory         the 1b preset at seq 2048: fused loss on and off, activation checkpointing none, full, selective
                   (peak memory, tokens/s, host syncs per step; beside `pretrain plan`'s prediction for each)
    diagnostics    the cost of per-layer diagnostics: one preset at interval 0, 100 and 1, 120 timed steps each
    profile        pretrain bench --profile: one training step of the 1b preset under torch.profiler
    bench-compile  pretrain bench --compile, one process per preset (last: compiling is the slowest and riskiest)

DIR receives results.json (every figure; rewritten after every run, so a hang leaves what came before), kit.log
(every stage's output under a header), table.md (the tables for docs/PERFORMANCE.md) and each stage's own files.
A run that exceeds its limit has its process group killed and is recorded as "timeout"; the kit goes on. The whole
run stops starting new work at the deadline (8 minutes), so it fits one device call. The exit status is the number
of stages that failed, timed out or found no time left (0: all passed).

`--cpu` rehearses the same stages on the CPU (the `tiny` preset, short sequences; DeepSpeed's CPU accelerator, no
GPU visible) in about three minutes on 2 cores: CI runs it, so a GPU loan is never spent on a broken kit.
docs/PERFORMANCE.md ("GPU kit") has the how-to.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `python scripts/gpu_kit.py` puts scripts/, not the repository, on the path. The kit's outputs go through the
# project's one atomic write, pretrain/files.py: the standard library only, so it imports before anything is installed.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
from pretrain.files import atomic_write  # noqa: E402
from pretrain.gpus import for_device_name  # noqa: E402  (the GPU table: the standard library only, as files.py)
WHEEL_DIR = REPO / ".whl"
SITE = WHEEL_DIR / "site"
MAX_WHEEL_BYTES = 64 * 2**20  # all the ignored paths the device tool carries, together


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    build: bool = False  # PyPI has only the source: build a wheel here


# Exactly what the GPU image lacks for `pretrain` and its tests (measured: these are needed and they suffice), for
# Python 3.12 on manylinux x86_64. Each one is installed only where the interpreter has no such distribution.
PINS = (
    # The training engine. PyPI has only its source; DS_BUILD_OPS=0 builds a py3-none-any wheel without compiled
    # ops (we use torch's fused AdamW and none of DeepSpeed's kernels). >= 0.19.3: see pretrain/compat.py.
    Pin("deepspeed", "0.19.8", build=True),
    # Tensor-parallel layers and parallel_state; 0.17 and later need Python >= 3.12, which the GPU image has.
    Pin("megatron-core", "0.19.2"),
    # Data preparation (pretrain/data); the data and training tests import it.
    Pin("datasets", "5.2.0"),
    # Liger's fused linear cross-entropy, train.fused_loss's kernel on a GPU (pure Python; Triton comes with torch).
    Pin("liger-kernel", "0.8.5"),
    # setup.cfg's pytest options pass --timeout, which pytest refuses without this plugin.
    Pin("pytest-timeout", "2.4.0"),
    # DeepSpeed's imports that the image lacks: its config parser, and pydantic >= 2 for its config classes (the
    # image may have pydantic already; then these four are skipped). pydantic-core must be the exact release
    # pydantic 2.14.4 names.
    Pin("hjson", "3.1.0"),
    Pin("pydantic", "2.14.4"),
    Pin("pydantic-core", "2.50.5"),
    Pin("annotated-types", "0.8.0"),
    Pin("typing-inspection", "0.4.5"),
    # datasets' imports that the image lacks (datasets 5.2 caps dill < 0.4.2 and multiprocess < 0.70.20).
    Pin("dill", "0.4.1"),
    Pin("multiprocess", "0.70.19"),
    Pin("xxhash", "4.1.0"),
)
# The GPU image's interpreter, for `pip download` on whatever machine builds the kit.
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any"]

# Seconds each run may take (a stage of several runs gives each run this limit). "gpu": one H100 or H200 on a
# fresh machine, so nothing is cached: a process start with DeepSpeed and megatron imports and NCCL is ~15-25 s,
# a 1b eager run ~30-40 s, compiling the blocks ~1 min for 1b. "cpu": the --cpu rehearsal on 2 shared cores, with
# room for a loaded machine (a 120-step run took 12 s at load 3 and 108 s at load 8) and for the first run's JIT
# build of DeepSpeed's CPU communication op (~40 s after every fresh install: its sources are new files).
LIMITS = {
    "gpu": {"install": 60, "env": 60, "cuda-tests": 180, "bench": 90, "memory": 75, "diagnostics": 60,
            "profile": 90, "bench-compile": 150},
    "cpu": {"install": 120, "env": 90, "cuda-tests": 180, "bench": 180, "memory": 120, "diagnostics": 180,
            "profile": 120, "bench-compile": 240},
}
DEADLINE_S = 480  # no new run starts after this, and a running one is cut at it: one device call is 10 minutes
MIN_START_S = 15  # a run with less time than this left is not started ("out of time")
FAILED = ("timeout", "failed", "out of time")  # a stage of several runs shows the first of these it met

GPU_PRESETS = ("130m", "350m", "1b", "1b-aligned")
# Compiled rows by what they tell us, in case the deadline cuts the stage short: 1b carries the 50% MFU target,
# 130m the 35% one, 1b-aligned is 1b's shape with ffn 5504.
GPU_COMPILE_ORDER = ("1b", "130m", "1b-aligned", "350m")
DIAGNOSTICS_INTERVALS = (0, 100, 1)
# The memory stage's variants (train.fused_loss, train.activation_checkpointing), the default first, and its shape:
# at seq 2048 and micro-batch 8 the unfused loss holds 2 GiB of fp32 logits and as much again for their gradient.
MEMORY_VARIANTS = ((True, "none"), (False, "none"), (True, "full"), (True, "selective"))
MEMORY_SHAPE = {"gpu": ("1b", ["--seq-len", "2048", "--micro-batch-size", "8", "--steps", "5"]),
                "cpu": ("tiny", ["--seq-len", "64", "--micro-batch-size", "4", "--steps", "3"])}
DIAGNOSTICS_STEPS = 120  # interval 100 must fire inside the timed steps (steps 4..123 after 3 warm-up steps)


class KitError(Exception):
    """A problem the user can fix; printed as one line, exit 2."""


# ----------------------------------------------------------------------------------------------------------
# Wheels


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (Megatron_Core == megatron-core)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_key(filename: str) -> tuple[str, str]:
    """(normalized distribution, version) of a wheel file name (PEP 427: name-version[-build]-py-abi-platform)."""
    parts = Path(filename).name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise KitError(f"{filename} is not a wheel file name (name-version-python-abi-platform.whl)")
    return normalize(parts[0]), parts[1]


def pinned_wheels(folder: Path) -> tuple[dict[Pin, Path], list[Path]]:
    """The pinned wheels present in `folder`, and the other wheels there (stale versions, strays)."""
    by_key = {(normalize(p.name), p.version): p for p in PINS}
    found, others = {}, []
    for path in sorted(folder.glob("*.whl")):
        pin = by_key.get(wheel_key(path.name))
        if pin is None:
            others.append(path)
        else:
            found[pin] = path
    return found, others


def fetch_wheel(pin: Pin, folder: Path) -> None:
    """Download (or build) one pinned wheel into `folder`, or a one-line KitError."""
    env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # lift a global torch cap
    spec = f"{pin.name}=={pin.version}"
    if pin.build:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder), spec]
        env["DS_BUILD_OPS"] = "0"
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *TARGET, "-d", str(folder),
               spec]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1])
        raise KitError(f"pip could not get {spec} (exit {proc.returncode}): {reason.strip()}")


def size_report(folder: Path) -> tuple[list[str], int]:
    """One line per wheel in `folder` with its size, and the total in bytes; a KitError over MAX_WHEEL_BYTES."""
    wheels = sorted(folder.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    lines = [f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}" for w in wheels]
    lines.append(f"{total / 2**20:8.2f} MiB  total ({len(wheels)} wheels)")
    if total > MAX_WHEEL_BYTES:
        raise KitError(f"{folder} holds {total / 2**20:.1f} MiB of wheels, over the {MAX_WHEEL_BYTES // 2**20} MiB the "
                       "device tool carries; drop a pin or move stray wheels out")
    return lines, total


def cmd_wheels(args) -> int:
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "site").exists():  # a local rehearsal's install: not to be carried, the GPU machine makes its own
        shutil.rmtree(folder / "site")
        print(f"removed {folder / 'site'} (a local `run` installed it; the GPU machine installs its own)")
    found, others = pinned_wheels(folder)
    for path in others:  # another version of a pin, or something pinned no more: it would be installed too
        path.unlink()
        print(f"removed {path.name} (not pinned in scripts/gpu_kit.py)")
    for pin in PINS:
        if pin in found:
            print(f"have  {found[pin].name}")
            continue
        print(f"{'build' if pin.build else 'get'}   {pin.name}=={pin.version}", flush=True)
        fetch_wheel(pin, folder)
        got = pinned_wheels(folder)[0].get(pin)
        if got is None:
            raise KitError(f"pip ran for {pin.name}=={pin.version} but left no matching wheel in {folder}")
        if pin.build and not got.name.endswith("-py3-none-any.whl"):
            raise KitError(f"{got.name} was built for this machine only; the GPU machine needs a py3-none-any wheel")
    lines, _ = size_report(folder)
    print("\n".join(lines))
    print(f"carry {folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder} to the GPU machine, then: "
          "python3 scripts/gpu_kit.py run --out $OUT")
    return 0


def installed_version(name: str) -> str | None:
    """The version of distribution `name` this interpreter sees (None: not installed)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan_install(folder: Path, lookup=installed_version) -> tuple[list[Path], list[dict], list[str]]:
    """Which pinned wheels of `folder` to install: those whose distribution the interpreter lacks, so the image's
    own packages are never shadowed. Returns (wheels to install, pins skipped as installed already, pins that are
    neither installed nor in `folder`)."""
    found, _ = pinned_wheels(folder)
    install, skipped, missing = [], [], []
    for pin in PINS:
        have = lookup(pin.name)
        if have is not None:
            skipped.append({"name": pin.name, "shipped": pin.version if pin in found else None, "installed": have})
        elif pin in found:
            install.append(found[pin])
        else:
            missing.append(f"{pin.name}=={pin.version}")
    return install, skipped, missing


# ----------------------------------------------------------------------------------------------------------
# Running stages


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal every process left in a run's process group (no-op when none is left)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Kit:
    """Runs commands with time limits under a common deadline, logs their output and keeps results.json current."""

    def __init__(self, out: Path, cpu: bool, limits: dict[str, float], deadline_s: float, env: dict[str, str],
                 echo=print):
        self.out, self.cpu, self.limits, self.env, self.echo = out, cpu, limits, env, echo
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.log_path = out / "kit.log"
        self.results: dict = {"kit": {"mode": "cpu" if cpu else "gpu", "deadline_s": deadline_s,
                                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                              "stages": {}, "bench": []}
        self.stage_name: str | None = None

    # -- bookkeeping

    def say(self, line: str) -> None:
        stamped = f"[{time.monotonic() - self.t0:6.1f}s] {line}"
        self.echo(stamped, flush=True)
        with open(self.log_path, "a") as log:
            log.write(stamped + "\n")

    def save(self) -> None:
        atomic_write(self.out / "results.json", json.dumps(self.results, indent=1) + "\n")  # never half a file

    def stage(self, name: str, fn) -> dict:
        """Run stage `name` (fn(kit) issues its runs); record its status and time; save results.json."""
        self.stage_name = name
        record = self.results["stages"][name] = {"status": "running", "seconds": 0.0, "returncode": None, "runs": []}
        self.say(f"=== {name}")
        t = time.monotonic()
        try:
            note = fn(self)
        except Exception as e:  # a bug in the kit's own reading of a stage's files: that stage fails, not the kit
            record["runs"].append({"label": name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            self.say(f"--- {name}: the kit failed reading its results: {type(e).__name__}: {e}")
            note = None
        record["seconds"] = round(time.monotonic() - t, 1)
        statuses = [r["status"] for r in record["runs"]]
        if isinstance(note, str):  # a stage with nothing to run says why ("missing")
            record["status"], record["note"] = "missing", note
        else:
            record["status"] = next((s for s in FAILED if s in statuses), "ok")
        record["returncode"] = next((r["returncode"] for r in record["runs"] if r.get("returncode")), 0)
        self.say(f"=== {name}: {record['status']} ({record['seconds']} s)")
        self.save()
        return record

    # -- one command

    def run(self, label: str, cmd: list[str], shown: str | None = None, stdout: Path | None = None) -> dict:
        """Run `cmd` in its own process group, output to kit.log (standard output to `stdout` if given), within this
        stage's limit and the deadline."""
        record = {"label": label, "command": shown or shlex.join(cmd)}
        self.results["stages"][self.stage_name]["runs"].append(record)
        left = self.deadline - time.monotonic()
        if left < MIN_START_S:
            record.update(status="out of time", returncode=None, seconds=0.0, limit_s=0)
            self.say(f"--- {label}: out of time ({left:.0f} s left before the deadline)")
            self.save()
            return record
        limit = min(self.limits[self.stage_name], left)
        self.say(f"--- {label}: {record['command']}  (limit {limit:.0f} s)")
        start = self.log_path.stat().st_size
        t = time.monotonic()
        with open(self.log_path, "ab") as log, open(stdout or os.devnull, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out if stdout else log,
                                    stderr=subprocess.STDOUT if stdout is None else log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, signal.SIGTERM)  # let it flush; then nothing of the group survives
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                kill_group(proc.pid)
                rc, status = proc.wait(), "timeout"
            except BaseException:  # the kit itself interrupted: leave nothing running
                kill_group(proc.pid)
                proc.wait()
                raise
            kill_group(proc.pid)  # stray workers (compile pools) must not outlive their run
        record.update(status=status, returncode=rc, seconds=round(time.monotonic() - t, 1), limit_s=round(limit))
        if status != "ok":  # the reason, where a device call's output tail shows it
            with open(self.log_path, "rb") as log:
                log.seek(start)
                tail = log.read().decode(errors="replace").splitlines()[-25:]
            if tail:
                self.echo("\n".join(f"    | {line}" for line in tail), flush=True)
        self.say(f"--- {label}: {status} (exit {rc}, {record['seconds']} s)")
        self.save()
        return record


def child_env(cpu: bool, scratch: Path) -> dict[str, str]:
    """The environment of every stage: the kit's wheels and the repository importable (nothing is pip-installed
    on the GPU machine), untested versions of minor packages warned about instead of refused (the env stage
    records them), nothing online, and compile caches that start empty, as on a fresh GPU machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}  # one process each
    env.update(PYTHONPATH=os.pathsep.join([str(SITE), str(REPO)]), NORMLAB_ALLOW_UNTESTED="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PRETRAIN_CACHE=str(scratch / "pretrain-cache"), TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
               TRITON_CACHE_DIR=str(scratch / "triton"))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("DS_ACCELERATOR", None)  # DeepSpeed finds the GPU itself
        # DeepSpeed's CUDA version check knows no CUDA 13 yet; it matters only if an op is JIT-built, where torch's
        # cu130 and the machine's nvcc (another 13.x) would otherwise be refused as a mismatch.
        env.setdefault("DS_SKIP_CUDA_CHECK", "1")
    return env


# ----------------------------------------------------------------------------------------------------------
# Stages


def stage_install(kit: Kit):
    if SITE.exists():
        shutil.rmtree(SITE)  # a fresh install every time: a stale one would hide a missing or changed wheel
    install, skipped, missing = plan_install(WHEEL_DIR)
    record = kit.results["stages"]["install"]
    record.update(installed=[w.name for w in install], skipped=skipped, missing=missing)
    for s in skipped:
        kit.say(f"skip {s['name']} {s['shipped'] or '(no wheel)'}: the interpreter has {s['installed']}")
    for name in missing:
        kit.say(f"{name}: not installed and no wheel in .whl/ (make it with `python scripts/gpu_kit.py wheels` on a "
                "machine with PyPI and carry .whl)")
        record["runs"].append({"label": name, "status": "failed", "returncode": None, "error": "no wheel"})
    if install:
        kit.run("pip install", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target",
                                str(SITE), *map(str, install)])


def stage_env(kit: Kit):
    cmd = [sys.executable, str(Path(__file__).resolve()), "_env", "--out", str(kit.out)]
    kit.run("env", cmd + (["--cpu"] if kit.cpu else []), shown="python3 scripts/gpu_kit.py _env")
    path = kit.out / "env.json"
    if path.is_file():
        env = json.loads(path.read_text())
        kit.results["env"] = env
        kit.results["version_problems"] = env.get("version_problems")


def stage_cuda_tests(kit: Kit):
    if not (REPO / "tests" / "test_cuda.py").is_file():
        return "tests/test_cuda.py does not exist yet"
    xml = kit.out / "cuda-tests.xml"
    kit.run("pytest -m cuda", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                    "tests/test_cuda.py", f"--junitxml={xml}"])
    if xml.is_file():
        kit.results["stages"]["cuda-tests"]["junit"] = junit_counts(xml)


def junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def bench_args(kit: Kit, steps: int | None = None) -> list[str]:
    """--cpu: short sequences and small batches (a tiny step is tens of milliseconds on 2 cores), 5 timed steps;
    bench's own defaults otherwise (seq_len 256, micro-batch 32, 16 for 1b and 1b-aligned, 10 timed steps, bf16
    on a GPU)."""
    args = ["--seq-len", "64", "--micro-batch-size", "4"] if kit.cpu else []
    steps = steps or (5 if kit.cpu else None)
    return args + (["--steps", str(steps)] if steps else [])


def run_bench(kit: Kit, label: str, args: list[str], json_path: Path) -> list[dict]:
    """One `pretrain bench` process; its --json rows (what it wrote before a failure too), each with its command."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    shown = shlex.join(["pretrain", "bench", *args])
    run = kit.run(label, [sys.executable, "-m", "pretrain", "bench", *args, "--json", str(json_path)], shown=shown)
    rows = json.loads(json_path.read_text()) if json_path.is_file() else []
    for row in rows:
        row.update(command=shown, run_status=run["status"])
    return rows


def bench_stage(compile: bool):
    def stage(kit: Kit):
        presets = ("tiny",) if kit.cpu else (GPU_COMPILE_ORDER if compile else GPU_PRESETS)
        for preset in presets:
            args = ["--presets", preset, *(["--compile"] if compile else []), *bench_args(kit)]
            label = f"{preset} {'compiled' if compile else 'eager'}"
            rows = run_bench(kit, label, args, kit.out / "bench" / f"{preset}-{'compile' if compile else 'eager'}.json")
            if not rows:  # the table still shows that this row was tried and how it ended
                rows = [{"preset": preset, "compile": compile, "command": shlex.join(["pretrain", "bench", *args]),
                         "run_status": kit.results["stages"][kit.stage_name]["runs"][-1]["status"]}]
            kit.results["bench"].extend(rows)
            kit.save()
    return stage


def stage_memory(kit: Kit):
    preset, shape = MEMORY_SHAPE["cpu" if kit.cpu else "gpu"]
    rows = []
    for fused, checkpointing in MEMORY_VARIANTS:
        args = ["--presets", preset, *shape, "--fused-loss" if fused else "--no-fused-loss",
                "--activation-checkpointing", checkpointing]
        name = f"{'fused' if fused else 'unfused'}-{checkpointing}"
        got = run_bench(kit, f"{preset} {name}", args, kit.out / "memory" / f"{name}.json")
        rows.append(got[0] if got else {"preset": preset, "fused_loss": fused, "activation_checkpointing": checkpointing,
                                        "command": shlex.join(["pretrain", "bench", *args]),
                                        "run_status": kit.results["stages"]["memory"]["runs"][-1]["status"]})
        if got:
            add_plan(kit, rows[-1], kit.out / "memory" / f"{name}.plan.json")
        kit.results["memory"] = rows
        kit.save()


# The GPU `pretrain plan` predicts for in a --cpu rehearsal (its memory does not depend on the GPU; its tokens/s do,
# and are not recorded there).
CPU_STAND_IN_GPU = "H100 SXM"


def plan_args(row: dict, gpu: str) -> list[str]:
    """`pretrain plan`'s arguments for the shape and layout a `pretrain bench` row ran: bench's config (one process,
    ZeRO 1 in bf16, 0 in fp32, global batch = micro-batch; pretrain/cli/bench.py)."""
    return [row["preset"], f"data.seq_len={row['seq_len']}", f"model.max_seq_len={row['seq_len']}",
            f"train.micro_batch_size={row['micro']}", f"train.global_batch_size={row['micro']}",
            f"train.precision={row['precision']}", f"parallel.zero_stage={1 if row['precision'] == 'bf16' else 0}",
            f"train.fused_loss={str(row['fused_loss']).lower()}",
            f"train.activation_checkpointing={row['activation_checkpointing']}", "--gpu", gpu, "--json"]


def add_plan(kit: Kit, row: dict, json_path: Path) -> None:
    """`pretrain plan`'s prediction beside a memory row: plan_mem_gib, the memory of its tensors (its total less the
    fixed reserve, what torch.cuda.max_memory_allocated counts too), and plan_tokens_per_s (at its default MFU, 40%;
    on a GPU only)."""
    device = ((kit.results.get("env") or {}).get("device") or {}).get("name", "")
    gpu = CPU_STAND_IN_GPU if kit.cpu else device
    if not kit.cpu and for_device_name(device) is None:
        row["plan_note"] = f"no plan: {device or 'the device'} is not in pretrain/gpus.py"
        return
    args = plan_args(row, gpu)
    run = kit.run(f"{row['preset']} plan", [sys.executable, "-m", "pretrain", "plan", *args],
                  shown=shlex.join(["pretrain", "plan", *args]), stdout=json_path)
    if run["status"] != "ok":
        return
    planned = json.loads(json_path.read_text())
    row.update(plan_mem_gib=planned["allocated_gib"], plan_fits=planned["fits"], plan_gpu=planned["gpu"]["name"],
               plan_tokens_per_s=None if kit.cpu else planned["tokens_per_s"])


def stage_diagnostics(kit: Kit):
    preset = "tiny" if kit.cpu else "130m"
    rows = {}
    for interval in DIAGNOSTICS_INTERVALS:
        args = ["--presets", preset, *bench_args(kit, DIAGNOSTICS_STEPS), "--diagnostics-interval", str(interval)]
        json_path = kit.out / "diagnostics" / f"interval-{interval}.json"
        got = run_bench(kit, f"{preset} interval {interval}", args, json_path)
        if got:
            rows[interval] = got[0]
    kit.results["diagnostics"] = {"preset": preset, "steps": DIAGNOSTICS_STEPS, "rows": diagnostics_summary(rows)}


def diagnostics_summary(rows: dict[int, dict]) -> list[dict]:
    """The cost of diagnostics at each interval, against interval 0 measured in the same stage.

    A measured step costs extra once per `interval` steps, which the median of the timed steps never shows for
    interval > 1; so besides the median and mean ratios, `per_measured_step_ms` is the measured steps' extra time
    over the same run's unmeasured steps (no noise between processes), and `amortized` that extra time spread over
    `interval` steps, relative to an unmeasured step: the fraction the issue's targets speak of (interval 100 <= 1%).
    """
    import statistics

    off = rows.get(0)
    out = []
    for interval, r in sorted(rows.items()):
        entry = {"interval": interval, "step_ms": r["step_ms"], "mean_step_ms": r["mean_step_ms"],
                 "median_ratio": r["step_ms"] / off["step_ms"] if off else None,
                 "mean_ratio": r["mean_step_ms"] / off["mean_step_ms"] if off else None,
                 "measured_steps": 0, "per_measured_step_ms": None, "amortized": None}
        if interval > 1:
            first = r["first_timed_step"]
            times = r["step_times_ms"]
            measured = [t for i, t in enumerate(times) if (first + i) % interval == 0]
            plain = [t for i, t in enumerate(times) if (first + i) % interval != 0]
            entry["measured_steps"] = len(measured)
            if measured and plain:
                base = statistics.median(plain)
                extra = statistics.fmean(measured) - base
                entry.update(per_measured_step_ms=extra, amortized=extra / (interval * base))
        elif interval == 1 and off:
            entry.update(measured_steps=len(r["step_times_ms"]), per_measured_step_ms=r["step_ms"] - off["step_ms"],
                         amortized=r["step_ms"] / off["step_ms"] - 1)
        out.append(entry)
    return out


def stage_profile(kit: Kit):
    preset = "tiny" if kit.cpu else "1b"
    folder = kit.out / "profile"
    args = ["--presets", preset, *bench_args(kit, steps=1), "--profile", str(folder)]
    run_bench(kit, f"{preset} profile", args, folder / "bench.json")
    summary = folder / "profile.json"
    if summary.is_file():
        kit.results["profile"] = json.loads(summary.read_text())


STAGES = {
    "env": stage_env,
    "cuda-tests": stage_cuda_tests,
    "bench": bench_stage(compile=False),
    "memory": stage_memory,
    "diagnostics": stage_diagnostics,
    "profile": stage_profile,
    "bench-compile": bench_stage(compile=True),
}


# ----------------------------------------------------------------------------------------------------------
# The env stage's own process (it imports what the other stages import, under the same environment)

PACKAGES = ("torch", "triton", "deepspeed", "megatron-core", "transformers", "tokenizers", "safetensors", "datasets",
            "sentencepiece", "numpy", "pyyaml", "tensorboard", "matplotlib", "tqdm", "ninja", "einops", "psutil",
            "msgpack", "py-cpuinfo", "nvidia-ml-py", "pyarrow", "pandas", "hjson", "pydantic", "pydantic-core",
            "dill", "multiprocess", "xxhash", "liger-kernel", "pytest", "pytest-timeout")
IMPORTS = ("torch", "deepspeed", "megatron.core", "transformers", "datasets", "sentencepiece", "pretrain.train.engine")


def cmd_env_report(args) -> int:
    import platform
    from importlib import import_module, metadata

    out = Path(args.out)
    report: dict = {"python": platform.python_version(), "executable": sys.executable,
                    "platform": platform.platform(), "packages": {}, "imports": {}}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
            home = Path(str(dist.locate_file(""))).resolve()
            report["packages"][name] = {"version": dist.version, "from": "kit" if home == SITE.resolve() else "image"}
        except metadata.PackageNotFoundError:
            report["packages"][name] = None
    for module in IMPORTS:
        try:
            import_module(module)
            report["imports"][module] = "ok"
        except Exception as e:  # what breaks here breaks every later stage: say it once, plainly
            report["imports"][module] = f"{type(e).__name__}: {e}".splitlines()[0]
    problems = []
    if report["imports"]["torch"] == "ok":
        import torch

        cuda = torch.cuda.is_available()
        report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
                           "devices": torch.cuda.device_count() if cuda else 0}
        if cuda:
            props = torch.cuda.get_device_properties(0)
            report["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(props.total_memory / 2**30, 1),
                                "bf16": torch.cuda.is_bf16_supported(), "nccl": str(torch.cuda.nccl.version())}
        else:
            report["device"] = {"name": "CPU", "cores": os.cpu_count()}
            if not args.cpu:
                problems.append(f"no CUDA device visible (torch {torch.__version__}, CUDA {torch.version.cuda})")
    try:
        from pretrain.compat import version_problems

        report["version_problems"] = version_problems()
    except Exception as e:
        report["version_problems"] = None
        problems.append(f"pretrain.compat: {type(e).__name__}: {e}")
    problems += [f"import {m}: {r}" for m, r in report["imports"].items() if r != "ok"]
    # torch.compile's Triton kernels need a C compiler for their launchers; DeepSpeed's JIT ops need nvcc and ninja
    report["tools"] = {tool: shutil.which(tool) for tool in ("cc", "gcc", "nvcc", "ninja", "nvidia-smi")}
    listing = subprocess.run([sys.executable, "-m", "pip", "list"], capture_output=True, text=True)
    atomic_write(out / "pip-list.txt", listing.stdout + listing.stderr)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
        atomic_write(out / "nvidia-smi.txt", smi.stdout + smi.stderr)
        report["nvidia_smi"] = "nvidia-smi.txt"
    report["problems"] = problems
    atomic_write(out / "env.json", json.dumps(report, indent=1) + "\n")
    shown = ("python", "torch", "device", "imports", "version_problems")
    print(json.dumps({k: report.get(k) for k in shown}, indent=1))
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------------------
# table.md


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def render_table(results: dict) -> str:
    env = results.get("env") or {}
    device = (env.get("device") or {}).get("name", "unknown device")
    torch_info = env.get("torch") or {}
    date = results["kit"]["started"][:10]
    rows = results.get("bench") or []
    first = next((r for r in rows if "step_ms" in r), {})
    lines = [f"<!-- scripts/gpu_kit.py run ({results['kit']['mode']}), {results['kit']['started']}: "
             "results.json holds every figure -->",
             f"{device}, {date}, torch {torch_info.get('version', '?')} (CUDA {torch_info.get('cuda')}), "
             f"{first.get('precision', '?')}, seq_len {first.get('seq_len', '?')}, median of the timed steps after "
             "3 warm-up steps, one process per row:", "",
             "| command | preset | compile | micro | step ms | tokens/s | TFLOP/s | MFU | mem GiB | syncs/step |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if not rows:
        lines[-2:] = ["(no bench rows: see the stages in results.json)"]
    order = {p: i for i, p in enumerate(("tiny", *GPU_PRESETS))}
    for r in sorted(rows, key=lambda r: (r.get("compile", False), order.get(r.get("preset"), 99))):
        compiled = "yes" if r.get("compile") else "no"
        if "step_ms" not in r:
            lines.append(f"| `{r['command']}` | {r.get('preset')} | {compiled} | | {r['run_status']} | | | | | |")
            continue
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| `{r['command']}` | {r['preset']} | {compiled} | {r['micro']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {r['mem_gib']:.1f} | "
                     f"{_num(r.get('host_syncs'), 'd')} |")
    memory = results.get("memory")
    if memory:
        lines += ["", "Memory stage: fused loss and activation checkpointing, one process per row (plan: `pretrain "
                  "plan`'s prediction for the same shape, where the row has one: its tensors, i.e. its total less the "
                  "2 GiB reserve, against peak GiB = torch.cuda.max_memory_allocated; tokens/s at MFU 40%):", "",
                  "| fused loss | checkpointing | micro | seq | step ms | tokens/s | MFU | peak GiB | plan GiB | "
                  "plan tokens/s | syncs/step |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in memory:
            head = f"| {'on' if r['fused_loss'] else 'off'} | {r['activation_checkpointing']} |"
            if "step_ms" not in r:
                lines.append(f"{head} | | {r['run_status']} | | | | | | |")
                continue
            mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"{head} {r['micro']} | {r['seq_len']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{mfu} | {r['mem_gib']:.1f} | {_num(r.get('plan_mem_gib'), '.1f')} | "
                         f"{_num(r.get('plan_tokens_per_s'), ',.0f')} | {_num(r.get('host_syncs'), 'd')} |")
    diag = results.get("diagnostics")
    if diag and diag["rows"]:
        lines += ["", f"Diagnostics cost, `{diag['preset']}`, {diag['steps']} timed steps per interval, same stage:",
                  "",
                  "| interval | step ms (median) | mean step ms | median / off | mean / off | extra ms per measured "
                  "step | amortized cost |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for d in diag["rows"]:
            amortized = "" if d["amortized"] is None else f"{100 * d['amortized']:.2f}%"
            lines.append(f"| {d['interval'] or 'off'} | {d['step_ms']:.1f} | {d['mean_step_ms']:.1f} | "
                         f"{_num(d['median_ratio'], '.3f')} | {_num(d['mean_ratio'], '.3f')} | "
                         f"{_num(d['per_measured_step_ms'], '.1f')} | {amortized} |")
    prof = results.get("profile")
    if prof:
        events = ", ".join(f"{k} {v}" for k, v in prof["sync_events"].items() if v)
        busy = "" if prof.get("device_busy_ms") is None else f", device busy {prof['device_busy_ms']:.1f} ms"
        peak = "" if prof.get("peak_mem_gib") is None else f", peak memory {prof['peak_mem_gib']:.1f} GiB"
        lines += ["", f"Profile, `{prof['preset']}`, step {prof['step']} (after warm-up): wall "
                  f"{prof['step_wall_ms']:.1f} ms under the profiler{busy}; host synchronisations "
                  f"{prof['host_syncs']} ({events or 'none'}){peak}. Top by {'device' if busy else 'CPU'} time:", "",
                  "| op or kernel | calls | ms |", "| --- | ---: | ---: |"]
        if busy:
            top = [(k["name"], k["calls"], k["device_ms"]) for k in prof["top_kernels"][:10]]
        else:
            top = [(o["name"], o["calls"], o["self_cpu_ms"]) for o in prof["top_ops"][:10]]
        lines += [f"| `{name[:90]}` | {calls} | {ms:.2f} |" for name, calls, ms in top]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Command line


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None  # the GPU machine gets the working tree without .git
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def parse_timeouts(items: list[str], limits: dict[str, float]) -> dict[str, float]:
    out = dict(limits)
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in out or not re.fullmatch(r"\d+(\.\d*)?", seconds):
            raise KitError(f"--timeout {item}: expected STAGE=SECONDS with STAGE one of {', '.join(out)}")
        out[name] = float(seconds)
    return out


def failed_stages(results: dict) -> list[str]:
    """The stages that count against the exit status (one still "running" was interrupted)."""
    return [n for n, s in results["stages"].items() if s["status"] in FAILED + ("running",)]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args) -> int:
    out = Path(args.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"--out {args.out} is not an empty folder; give a new or empty one")
    for name in args.stage or []:
        if name not in STAGES:
            raise KitError(f"--stage {name}: unknown; the stages are {', '.join(STAGES)}")
    if args.budget_scale <= 0:
        raise KitError(f"--budget-scale must be > 0, got {args.budget_scale}")
    mode = "cpu" if args.cpu else "gpu"
    limits = {k: v * args.budget_scale for k, v in LIMITS[mode].items()}
    limits = parse_timeouts(args.timeout or [], limits)
    deadline = args.deadline if args.deadline is not None else DEADLINE_S * args.budget_scale
    if deadline <= 0:
        raise KitError(f"--deadline must be > 0, got {args.deadline}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-kit-"))
    kit = Kit(out, args.cpu, limits, deadline, child_env(args.cpu, scratch))
    kit.results["kit"].update(command=shlex.join(["python3", "scripts/gpu_kit.py", *sys.argv[1:]]),
                              commit=git_commit(), limits_s=limits, python=sys.version.split()[0])
    selected = [s for s in STAGES if not args.stage or s in args.stage]
    # SIGTERM (a device call running out) ends the kit like Ctrl-C: the running stage's group is killed and the
    # results so far are kept.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        install = kit.stage("install", stage_install)
        if install["status"] != "ok":
            # every later stage imports what is missing: it would end in an import traceback, minutes each
            what = ", ".join(install["missing"]) or "pip install failed"
            kit.say(f"error: stopping after the install stage: {what} (run `python scripts/gpu_kit.py wheels` on a "
                    "machine with PyPI and carry .whl)")
            selected = []
        for name in selected:
            kit.stage(name, STAGES[name])
    except KeyboardInterrupt:
        kit.results["kit"]["interrupted"] = True
        kit.say("interrupted: results so far are in results.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        failed = failed_stages(kit.results)
        kit.results["kit"].update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  seconds=round(time.monotonic() - kit.t0, 1), failed_stages=failed)
        kit.save()
        atomic_write(out / "table.md", render_table(kit.results))
    summary = ", ".join(f"{n} {s['status']} {s['seconds']:.0f}s" for n, s in kit.results["stages"].items())
    print(f"\n{summary}\n{len(failed)} stage(s) failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{kit.results['kit']['seconds']:.0f} s in all; {out}/results.json, kit.log, table.md\n")
    print((out / "table.md").read_text())
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_kit.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("wheels", help="download and build the wheels the GPU image lacks into .whl/ (needs PyPI)")
    p.add_argument("--dir", default=str(WHEEL_DIR), help=argparse.SUPPRESS)  # the tests' scratch folder
    p.set_defaults(func=cmd_wheels)
    p = sub.add_parser("run", help="install the wheels and run the stages (the GPU machine; --cpu: a rehearsal)")
    p.add_argument("--out", required=True, help="an empty or new folder for results.json, kit.log, table.md, ...")
    p.add_argument("--cpu", action="store_true", help="rehearse on the CPU: tiny preset, DS_ACCELERATOR=cpu, no GPU")
    p.add_argument("--stage", action="append", metavar="NAME", help=f"run only these ({', '.join(STAGES)}); repeatable")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time limit and the deadline")
    p.add_argument("--timeout", action="append", metavar="STAGE=SECONDS", help="one stage's limit per run; repeatable")
    p.add_argument("--deadline", type=float, default=None, help=f"seconds for the whole run (default {DEADLINE_S})")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("_env", help="(the env stage's own process)")
    p.add_argument("--out", required=True)
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=cmd_env_report)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
