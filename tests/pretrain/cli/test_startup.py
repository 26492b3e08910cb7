"""Start-up: `pretrain --help` and every command's help load neither torch nor DeepSpeed, a config error is answered
before torch loads, a run-folder error before DeepSpeed and megatron-core do, and training builds no C++ extension
(DeepSpeed's shm comm op, pretrain/compat.py `skip_shm_comm_op`). Each check runs in a fresh interpreter: what an import loads is only visible
there. benchmarks/bench_startup.py times the same paths."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from helpers.train import REPO, TINY, train_env

from pretrain.cli import main

pytestmark = pytest.mark.processes  # starts fresh interpreters and a training run (tests/conftest.py: tiers)

HEAVY = ("torch", "deepspeed", "megatron", "transformers", "matplotlib", "datasets")


def loaded_after(argv: list[str]) -> dict:
    """Run `pretrain.cli.main(argv)` in a fresh interpreter: its exit code, stderr and which HEAVY libraries it loaded."""
    code = f"""
import contextlib, io, json, sys
from pretrain.cli import main
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    try:
        rc = main({argv!r})
    except SystemExit as e:
        rc = e.code
print(json.dumps({{"rc": rc, "stderr": err.getvalue(), "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_of_every_command_loads_neither_torch_nor_deepspeed():
    from pretrain.cli import commands

    names = ["--help"] + [command.__name__.rsplit(".", 1)[1].replace("_", "-") for command in commands()]
    for name in names:
        argv = [name] if name == "--help" else [name, "--help"]
        result = loaded_after(argv)
        assert result["rc"] == 0 and result["loaded"] == [], (argv, result)


@pytest.mark.parametrize("override, error", [
    ("model.norm_scheme=nope", "model.norm_scheme: 'nope'"),
    ("train.lr=-1", "train.lr"),
    ("model.qk_norm=head", "does not compose"),  # ln_free: the scheme table's refusal
    ("removal.start=100000", "switches its last site"),  # a removal run: its sites come from the model on the meta device
])
def test_a_config_error_is_answered_before_torch_loads(tmp_path, override, error):
    scheme = ["model.norm_scheme=ln_free"] if "qk_norm" in override else []
    removal = ["model.removable_norms=true"] if override.startswith("removal") else []
    result = loaded_after(["train", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={tmp_path}/r", *scheme,
                           *removal, override])
    assert result["rc"] == 2 and error in result["stderr"], result
    # the scheme table is read without its layers (models/norms.py loads models/norm_layers.py on first use); a
    # removal run's check builds the model on the meta device, so torch loads there, DeepSpeed still not
    heavy = {"torch"} if removal else set()
    assert set(result["loaded"]) == heavy, result


def test_a_run_folder_error_is_answered_before_deepspeed_and_megatron_load(tmp_path):
    os.makedirs(tmp_path / "r" / "checkpoints")
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step_00000010")
    result = loaded_after(["train", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={tmp_path}/r"])
    assert result["rc"] == 2 and "already holds checkpoints; pass train.resume=auto" in result["stderr"], result
    assert not {"deepspeed", "megatron"} & set(result["loaded"]), result


@pytest.fixture
def umask(request):
    """The process umask for the test (inherited by the processes it starts), restored afterwards."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes_off(folder, mask: int) -> list[str]:
    """Every file and folder under `folder` whose mode is not what `open`/`mkdir` give under `mask`."""
    off = []
    for base, dirs, files in os.walk(folder):
        for name, full in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(base, name)
            mode = os.stat(path).st_mode & 0o777
            if mode != full & ~mask:
                off.append(f"{os.path.relpath(path, folder)} {oct(mode)}")
    return off


# 022 (the usual) in the default run; 077 repeats the whole path for a private umask, so it is slow.
@pytest.mark.parametrize("umask", [pytest.param(0o022, id="umask022"),
                                   pytest.param(0o077, id="umask077", marks=pytest.mark.slow)], indirect=True)
def test_training_builds_no_cpp_extension_and_ends_with_next_commands_that_work(tmp_path, data_cache, umask):
    """The quick start's path: no C++ build on the way to the first step, and the closing summary's final losses and
    next commands (plot, report, analyze-depth), each of which then runs on the run as printed; every file and
    folder of the run, and of the three commands' outputs, has the mode the umask gives (readable by colleagues
    under 022, private under 077)."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    run = tmp_path / "run"
    env = {**train_env(data_cache), "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", os.path.join(REPO, "configs", "tiny.yaml"),
                           f"run.dir={run}", *TINY, "train.steps=2", "eval.interval=2", "diagnostics.interval=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step      1/2" in proc.stdout
    assert "built successfully" not in proc.stdout + proc.stderr
    assert list(extensions.iterdir()) == []  # nothing compiled, nothing cached

    summary = proc.stdout[proc.stdout.index("done: "):].splitlines()
    val = [json.loads(line) for line in open(run / "metrics.jsonl") if "val_loss" in line][-1]
    assert (f"val loss {val['val_loss']:.4f} (perplexity {val['val_ppl']:.1f}, {val['val_bpb']:.3f} bits per byte) "
            "at step 2") in summary[0]
    assert summary[1] == "next:"
    commands = [shlex.split(line.split("#")[0]) for line in summary[2:]]
    assert [c[:2] for c in commands] == [["pretrain", "plot"], ["pretrain", "report"], ["pretrain", "analyze-depth"]]
    for command in commands:  # in-process: what the user would type
        assert main(command[1:]) == 0, command
    assert (run / "depth_stats.png").exists() and (run / "report" / "REPORT.md").exists()
    assert (run / "depth" / "depth.json").exists()
    assert main(["export-hf", "--checkpoint", str(run), "--out", str(run / "hf")]) == 0
    assert modes_off(run, umask) == []
