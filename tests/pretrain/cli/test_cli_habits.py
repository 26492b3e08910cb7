"""The command-line habits users bring from litgpt, torchtitan and OLMo-core: config overrides written as flags
(`--train.lr=1e-3`, `--train.lr 1e-3`), and `pretrain --version`. In-process (`pretrain.cli.main`)."""

from __future__ import annotations

import importlib.metadata

import pytest
import yaml

from pretrain.cli import dotted_overrides, main


def test_flag_overrides_become_dotted_overrides():
    assert dotted_overrides(["train", "c.yaml", "--train.lr=1e-3", "--model.norm_scheme", "lns", "--nproc-per-node",
                             "2", "run.dir=x"]) == ["train", "c.yaml", "train.lr=1e-3", "model.norm_scheme=lns",
                                                    "--nproc-per-node", "2", "run.dir=x"]


def test_flag_overrides_reach_the_config(capsys):
    assert main(["config", "--train.lr=3e-4", "--model.norm_scheme", "lns", "train.steps=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["train"]["lr"], cfg["model"]["norm_scheme"], cfg["train"]["steps"]) == (3e-4, "lns", 7)


def test_a_flag_override_without_value_is_one_line(capsys):
    assert main(["config", "--train.lr"]) == 2
    assert capsys.readouterr().err.strip() == "error: --train.lr has no value: write train.lr=VALUE (or --train.lr=VALUE)"


def test_an_unknown_flag_key_is_the_config_error(capsys):
    assert main(["config", "--train.nope=1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key train.nope; valid keys: train.steps")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"normlab {importlib.metadata.version('normlab')}"
