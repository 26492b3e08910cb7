"""Sweep launcher for norm ablations: one run per combination of a grid, each in its own run.dir.

    python -m launch.sweep configs/tiny.yaml --grid model.norm_scheme=pre_ln,lns,ln_free model.preset=130m,350m
    python -m launch.sweep configs/tiny.yaml train.steps=1000 --grid model.norm_scheme=pre_ln,lns --dry-run
    python -m launch.sweep configs/tiny.yaml --grid train.seed=0,1,2 --local
    python -m launch.sweep configs/tiny.yaml --grid model.norm_scheme=pre_ln,lns train.lr=1e-3,3e-3,1e-2 --local
    python -m launch.sweep configs/paper/350m_pre_ln.yaml --grid model.norm_scheme=pre_ln,lns \\
        --sbatch="--nodes=4 --time=24:00:00"

Positional `key=value` overrides apply to every run; each `--grid KEY=V1,V2,...` adds an axis (values are
split on commas outside brackets, so `train.betas=[0.9,0.95],[0.9,0.99]` is two values). Run folders are
ROOT/NAME/<key=value,...> (the grid keys' last component unless that is ambiguous), e.g.
runs/sweeps/tiny/norm_scheme=lns,preset=130m. Every combination's config is validated before anything
is submitted; bad input exits 2 with one `error: ...` line (also two combinations with the same config, e.g.
train.lr=1e-3,0.001). A grid with train.lr (and train.seed) is what `pretrain report` turns into its best
learning rate per scheme table.

Modes: submit each run with `sbatch launch/train.sbatch CONFIG ... run.dir=...` (default; prints the job ids),
`--dry-run` (print the commands), `--local` (run them one after another with `python -m pretrain train`).
Runs use train.resume=auto, so launching the same sweep again continues unfinished runs.

    python -m launch.sweep status NAME|ROOT [--json]

shows one row per run (launch/status.py): swept values, state, job id, step, tokens/s, ETA, losses, last
checkpoint, requeues, error line. A launch writes ROOT/NAME/sweep.json and each run's launch.jsonl
(pretrain/runs.py); `--local` also writes each run's output to RUN_DIR/train.log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python launch/sweep.py` puts launch/, not the repository, on sys.path
    sys.path.insert(0, REPO)

from launch.status import main as status_main  # noqa: E402
from pretrain import runs as run_folder  # noqa: E402
from pretrain.errors import EXIT_USER_ERROR, UserError  # noqa: E402

SCRIPT = os.path.join(REPO, "launch", "train.sbatch")
SAFE = re.compile(r"[^A-Za-z0-9._+=\-]")
LOCAL_LOG = "train.log"  # --local: each run's output, as slurm-<jobid>.out is for a submitted one


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        description="Launch one training run per combination of a grid of config overrides.",
        epilog="Example: python -m launch.sweep configs/tiny.yaml --grid model.norm_scheme=pre_ln,lns,ln_free "
               "model.preset=130m,350m --dry-run. Status of a sweep: python -m launch.sweep status NAME|ROOT [--json]",
    )
    p.add_argument("config", help="base experiment YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="fixed dotted overrides for every run, e.g. train.steps=1000")
    p.add_argument("--grid", action="extend", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="a sweep axis (repeatable; several may follow one --grid)")
    p.add_argument("--name", help="sweep name: runs go to ROOT/NAME/... (default: the config file's name)")
    p.add_argument("--root", default=os.path.join("runs", "sweeps"), help="parent of the sweep folder (default: runs/sweeps)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    mode.add_argument("--local", action="store_true", help="run the combinations here, one after another")
    p.add_argument("--sbatch", action="append", default=[], metavar="ARGS",
                   help='extra sbatch options, shell-split (repeatable), e.g. --sbatch="--nodes=2 --time=4:00:00"')
    p.add_argument("--script", default=SCRIPT, help="batch script to submit (default: launch/train.sbatch)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="--local only: ranks per run (pretrain train --nproc-per-node)")
    return p


def split_values(text: str) -> list[str]:
    """'a,b,[1,2]' -> ['a', 'b', '[1,2]']: commas inside brackets or braces do not split."""
    values, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    values.append(cur)
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--grid {item!r} is not of the form section.key=v1,v2 (e.g. model.norm_scheme=pre_ln,lns)")
        values = split_values(rest)
        if any(v == "" for v in values):
            raise UserError(f"--grid {item!r}: empty value; separate values with single commas")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r}: repeated value")
        if key in (k for k, _ in axes):
            raise UserError(f"--grid: {key} is given twice; list all its values in one --grid {key}=v1,v2")
        if key == "run.dir":
            raise UserError("--grid: run.dir is set by the sweep for each run; use --root and --name")
        axes.append((key, values))
    return axes


def short_keys(keys: list[str]) -> dict[str, str]:
    """Last dotted component of each key, or the full key where two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def label_value(value: str) -> str:
    """A value as it appears in a folder name: `[0.9, 0.95]` -> `0.9_0.95`, other odd characters -> `_`."""
    return SAFE.sub("_", re.sub(r"[\[\]{}'\" ]", "", value).replace(",", "_")) or "_"


def plan(args) -> tuple[str, list[tuple[str, list[str]]], list[tuple[str, list[str], dict[str, str]]]]:
    """(sweep folder, grid axes, [(run_dir, overrides, swept values)] for every combination), each combination
    validated with load_config."""
    # pretrain.config imports the model code (torch): `status` must start without it
    from pretrain.config import load_config, to_dict

    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=1000)")
        if item.partition("=")[0].strip() == "run.dir":
            raise UserError("run.dir is set by the sweep for each run; use --root and --name")
    axes = parse_grid(args.grid)
    load_config(args.config, args.overrides)  # the base alone first: a typo there is reported without a run name
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    if not name or SAFE.search(name) or name in (".", ".."):
        raise UserError(f"--name {name!r}: use letters, digits and . _ + - =")
    short = short_keys([k for k, _ in axes])
    runs, seen, same = [], {}, {}
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = [(key, value) for (key, _), value in zip(axes, combo)]
        label = ",".join(f"{short[k]}={label_value(v)}" for k, v in pairs) or "base"
        run_dir = os.path.join(args.root, name, label)
        if run_dir in seen:
            raise UserError(f"runs {seen[run_dir]} and {pairs} would share {run_dir}; rename the values")
        seen[run_dir] = pairs
        overrides = [*args.overrides, *(f"{k}={v}" for k, v in pairs), f"run.dir={run_dir}"]
        try:
            resolved = to_dict(load_config(args.config, overrides))
        except UserError as e:
            raise UserError(f"run {label}: {e}") from None
        # values written differently but read alike (train.lr=1e-3 and 0.001) would train one run twice
        resolved["run"] = {k: v for k, v in resolved["run"].items() if k != "dir"}
        key = json.dumps(resolved, sort_keys=True, default=str)
        if key in same:
            raise UserError(f"runs {same[key]} and {label} have the same config (their values are one value "
                            "written differently); list each value once")
        same[key] = label
        runs.append((run_dir, overrides, dict(pairs)))
    return os.path.join(args.root, name), axes, runs


def sbatch_command(args, run_dir: str, overrides: list[str]) -> list[str]:
    script = args.script
    rel = os.path.relpath(script)
    if not rel.startswith(".."):
        script = rel
    extra = sbatch_options(args)
    return ["sbatch", "--parsable", f"--job-name={os.path.basename(os.path.dirname(run_dir))}/{os.path.basename(run_dir)}",
            f"--output={os.path.join(run_dir, 'slurm-%j.out')}", *extra, script, args.config, *overrides]


def sbatch_options(args) -> list[str]:
    """The --sbatch options, shell-split (checked to split in main)."""
    return [a for chunk in args.sbatch for a in shlex.split(chunk)]


def local_command(args, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pretrain", "train", args.config, "train.resume=auto", *overrides]
    if args.nproc_per_node:
        cmd += ["--nproc-per-node", str(args.nproc_per_node)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.nproc_per_node is not None and (not args.local or args.nproc_per_node < 1):
            raise UserError("--nproc-per-node needs --local and a value >= 1")
        if args.sbatch and args.local:
            raise UserError("--sbatch options have no effect with --local")
        for chunk in args.sbatch:
            try:
                shlex.split(chunk)
            except ValueError as e:
                raise UserError(f"--sbatch {chunk!r}: {e}") from None
        if not (args.dry_run or args.local):
            if not os.path.isfile(args.script):
                raise UserError(f"batch script {args.script} does not exist")
            if shutil.which("sbatch") is None:
                raise UserError("sbatch is not on PATH; use --local to run here or --dry-run to print the commands")
        sweep_dir, axes, runs = plan(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR

    if not args.local:
        gpu_note = no_gpu_request(args)
        if gpu_note:
            print(gpu_note, file=sys.stderr if args.dry_run else sys.stdout, flush=True)
    if args.dry_run:
        for run_dir, overrides, _ in runs:
            print(shlex.join(sbatch_command(args, run_dir, overrides)))
        return 0
    if args.local:
        # sweep.json: what `status` lists, including the runs that have not started yet
        write_manifest(args, sweep_dir, axes, runs)
        return run_local(args, runs)
    return submit(args, sweep_dir, axes, runs)


def write_manifest(args, sweep_dir: str, axes, runs) -> None:
    run_folder.update_manifest(sweep_dir, os.path.basename(sweep_dir), args.config, args.overrides, axes,
                                [(run_dir, values) for run_dir, _, values in runs])


def cluster_has_gpus(partition: str | None) -> bool | None:
    """Whether any node (of `partition`) offers a GPU generic resource, from `sinfo`; None when sinfo cannot say."""
    cmd = ["sinfo", "--noheader", "--format=%G"] + ([f"--partition={partition}"] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return any("gpu" in line for line in out.stdout.split())


def no_gpu_request(args) -> str | None:
    """On a cluster without GPUs (sinfo), and unless --sbatch asks for GPUs itself, submit with --gpus-per-task=0
    (train.sbatch's default asks for one GPU per task, which such a cluster refuses); the line that says so."""
    extra = sbatch_options(args)
    if any(a.startswith(("--gpus", "--gres", "-G")) for a in extra):
        return None
    partition = next((a.split("=", 1)[1] for a in extra if a.startswith("--partition=")), None)
    if partition is None and "-p" in extra[:-1]:
        partition = extra[extra.index("-p") + 1]
    if cluster_has_gpus(partition) is not False:
        return None
    args.sbatch.append("--gpus-per-task=0")
    where = f"partition {partition}" if partition else "this cluster"
    return (f"{where} has no GPUs (sinfo lists no gpu resource): submitting with --gpus-per-task=0 (CPU ranks); "
            '--sbatch="--gpus-per-task=N" asks for GPUs anyway')


def submit(args, sweep_dir: str, axes, runs) -> int:
    """sbatch each run; sweep.json lists the runs once they are submitted. When sbatch refuses one, the runs
    submitted before it are listed (they are real jobs) and the folders made for the others are removed."""
    job_ids, submitted = [], []
    for run_dir, overrides, values in runs:
        made = not os.path.exists(run_dir)
        os.makedirs(run_dir, exist_ok=True)  # sbatch's --output folder must exist when the job starts
        cmd = sbatch_command(args, run_dir, overrides)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            if made:
                os.rmdir(run_dir)
            msg = (out.stderr.strip() or out.stdout.strip()).splitlines()
            reason = msg[-1] if msg else f"exit {out.returncode}"
            hint = ('; this cluster may have no GPUs: pass --sbatch="--gpus-per-task=0"' if "gres" in reason.lower()
                    or "generic resource" in reason.lower() else "; check the --sbatch options and the batch script")
            print(f"error: sbatch failed for {run_dir}: {reason}{hint}", file=sys.stderr)
            if job_ids:
                write_manifest(args, sweep_dir, axes, submitted)
                print(f"already submitted and listed in {os.path.join(sweep_dir, run_folder.MANIFEST_FILE)}: "
                      f"{' '.join(job_ids)} (scancel them, or fix the cause and rerun the sweep: runs resume)",
                      file=sys.stderr)
            return EXIT_USER_ERROR
        job_id = out.stdout.strip().split(";")[0]
        run_folder.append_event(run_dir, "submitted", launcher="slurm", job_id=job_id)
        job_ids.append(job_id)
        submitted.append((run_dir, overrides, values))
        print(f"submitted {job_id} {run_dir}", flush=True)
    write_manifest(args, sweep_dir, axes, submitted)  # what `status` lists
    print(f"{len(job_ids)} job(s): {' '.join(job_ids)}")
    return 0


def run_local(args, runs) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    failed = []
    for i, (run_dir, overrides, _) in enumerate(runs, 1):
        cmd = local_command(args, overrides)
        print(f"[{i}/{len(runs)}] {shlex.join(cmd)}", flush=True)
        try:
            rc = run_logged(cmd, env, run_dir)
        except KeyboardInterrupt:
            print(f"interrupted during {run_dir}", file=sys.stderr)
            return 130
        if rc != 0:
            print(f"[{i}/{len(runs)}] {run_dir} exited {rc}", file=sys.stderr)
            failed.append(run_dir)
    if failed:
        print(f"error: {len(failed)} of {len(runs)} run(s) failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(runs)} run(s) finished")
    return 0


def run_logged(cmd: list[str], env: dict, run_dir: str) -> int:
    """Run `cmd`, its output both here and appended to RUN_DIR/train.log, with start and exit events in
    RUN_DIR/launch.jsonl (pretrain/runs.py) for `status`."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.abspath(os.path.join(run_dir, LOCAL_LOG))
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        run_folder.append_event(run_dir, "start", launcher="local", pid=proc.pid, host=run_folder.hostname(),
                                 log=log_path)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            rc = proc.wait()
        except KeyboardInterrupt:
            rc = proc.wait()  # the trainer got the same SIGINT; let it finish
            run_folder.append_event(run_dir, "exit", launcher="local", pid=proc.pid, rc=rc)
            raise
    run_folder.append_event(run_dir, "exit", launcher="local", pid=proc.pid, rc=rc)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
