"""Supported versions: one list in pretrain/compat.py, the same as setup.cfg's, checked before any command runs; the
private DeepSpeed / megatron-core / torch / TensorBoard APIs live in pretrain/compat.py and nowhere else."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys

import pytest
from helpers.train import REPO

from pretrain import compat
from pretrain.errors import UserError

pytestmark = pytest.mark.compat


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    return parser


def test_installed_versions_are_the_tested_ones():
    assert compat.version_problems() == []  # what CI installs on each of its stacks passes
    compat.check_versions()


def test_untested_version_is_a_one_line_error_naming_package_range_and_fix(monkeypatch):
    real = compat.metadata.version
    monkeypatch.setattr(compat.metadata, "version", lambda p: "0.21.0" if p == "deepspeed" else real(p))
    monkeypatch.delenv("NORMLAB_ALLOW_UNTESTED", raising=False)
    with pytest.raises(UserError) as e:
        compat.check_versions()
    message = str(e.value)
    assert "deepspeed 0.21.0 is outside the tested range >=0.19.3,<0.20 (pip install 'deepspeed>=0.19.3,<0.20')" \
        in message and "\n" not in message
    monkeypatch.setenv("NORMLAB_ALLOW_UNTESTED", "1")
    with pytest.warns(UserWarning, match="untested versions"):
        compat.check_versions()


def test_missing_package_and_python_outside_the_range_are_named(monkeypatch):
    real = compat.metadata.version

    def version(package):
        if package == "megatron-core":
            raise compat.metadata.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(compat.metadata, "version", version)
    monkeypatch.setattr(compat.sys, "version_info", (3, 9, 18, "final", 0))
    problems = compat.version_problems()
    assert problems[0] == "Python 3.9.18 is outside >=3.10,<3.14 (use a Python in that range)"
    assert problems[1].startswith("megatron-core is not installed (pip install 'megatron-core>=0.16,<0.20'")
    assert len(problems) == 2


def test_local_and_prerelease_builds_compare_by_release():
    assert compat._parse("2.11.0+cu130") == (2, 11, 0)
    assert compat._parse("2.8.0a0+5228986c39.nv25.06") == (2, 8, 0)  # an NGC container's torch
    assert compat._parse("0.19.2") < compat._parse("0.20")


@pytest.mark.processes
def test_cli_reports_an_untested_version_in_one_line_before_any_command():
    # A fresh interpreter, as a user's `pretrain` is: the check runs in cli.main, not as a traceback at import.
    code = ("import sys; from importlib import metadata; real = metadata.version; "
            "metadata.version = lambda p: '0.15.0' if p == 'megatron-core' else real(p); "
            "from pretrain.cli import main; sys.exit(main(['params']))")
    env = {k: v for k, v in os.environ.items() if k != "NORMLAB_ALLOW_UNTESTED"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: untested versions: megatron-core 0.15.0 is outside"), lines
    assert proc.stdout == ""


def test_setup_cfg_pins_the_tested_ranges():
    cfg = _setup_cfg()
    requires = {re.split(r"[<>=]", line)[0]: line for line in cfg["options"]["install_requires"].split() if line}
    assert set(requires) == set(compat.TESTED)
    for package, (low, high) in compat.TESTED.items():
        assert requires[package] == f"{package}>={low},<{high}", requires[package]
    assert cfg["options"]["python_requires"] == f">={compat.PYTHON[0]},<{compat.PYTHON[1]}"


@pytest.mark.processes
def test_private_apis_are_only_used_in_compat():
    # The internals compat.py wraps must not be reached for anywhere else.
    patterns = ["_take_model_step", "_compiled_call_impl", "_get_file_writer", "_hp_mapping", "optim_states.pt",
                "param_slice_mappings", "clip_grad =", "build_shm_op",
                # branching on a version happens in compat.py only (recording one, as bench does, is fine)
                r"__version__ *([<>!]|==)", r"metadata\.version\(", r"packaging\.version", r"version_info *[<>=!\[]"]
    out = subprocess.run(["git", "grep", "-n", "--untracked", "-e", "|".join(patterns), "-E", "--", "pretrain", "models", "launch"],
                         cwd=REPO, capture_output=True, text=True).stdout
    offenders = [line for line in out.splitlines()
                 if not line.startswith("pretrain/compat.py") and not line.split(":", 2)[2].lstrip().startswith(("#", "*"))]
    assert not offenders, offenders
