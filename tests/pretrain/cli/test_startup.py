"""Start-up: `pretrain --help` and every command's help load neither torch nor DeepSpeed, a config error is answered
before DeepSpeed and megatron-core load, and training builds no C++ extension (DeepSpeed's shm comm op,
pretrain/compat.py `skip_shm_comm_op`). Each check runs in a fresh interpreter: what an import loads is only visible
there. benchmarks/bench_startup.py times the same paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.train import REPO, TINY, train_env

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


def test_a_config_error_is_answered_before_deepspeed_and_megatron_load(tmp_path):
    result = loaded_after(["train", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={tmp_path}/r",
                           "model.norm_scheme=nope"])
    assert result["rc"] == 2 and "model.norm_scheme: 'nope'" in result["stderr"]
    # torch still loads: the scheme table the config is checked against builds modules (models/norms.py)
    assert not {"deepspeed", "megatron"} & set(result["loaded"]), result


def test_training_builds_no_cpp_extension(tmp_path, data_cache):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {**train_env(data_cache), "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", os.path.join(REPO, "configs", "tiny.yaml"),
                           f"run.dir={tmp_path}/run", *TINY, "train.steps=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step      1/1" in proc.stdout
    assert "built successfully" not in proc.stdout + proc.stderr
    assert list(extensions.iterdir()) == []  # nothing compiled, nothing cached
