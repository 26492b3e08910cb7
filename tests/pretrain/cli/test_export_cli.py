"""`pretrain export-hf` on a checkpoint trained with TP = 2 x PP = 2: transformers gives our logits."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.train import REPO, run_train

from models import Llama
from pretrain.state.checkpoint import load_model_state
from pretrain.cli import main

pytestmark = [pytest.mark.processes, pytest.mark.compat]


def test_export_hf_from_tensor_and_pipeline_parallel_lns_checkpoint(tmp_path, capsys):
    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    run_train(run, "train.steps=2", "parallel.tp=2", "parallel.pp=2", "model.norm_scheme=lns",
              nproc=4, cache_dir=str(tmp_path / "cache"))
    assert main(["export-hf", "--checkpoint", run, "--out", out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))  # the rest: test_hf_export_files.py

    from transformers import LlamaForCausalLM

    cfg, state = load_model_state(os.path.join(run, "checkpoints", "step_00000002"))
    ours = Llama(cfg.model)
    ours.load_state_dict(state)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(tokens), hf(tokens).logits, atol=1e-4)

    # an existing --out and a scheme Llama cannot express are one-line errors
    capsys.readouterr()
    assert main(["export-hf", "--checkpoint", run, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_refuses_post_ln(tmp_path, capsys):
    run = str(tmp_path / "run")
    run_train(run, "train.steps=1", "model.norm_scheme=post_ln", cache_dir=str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["export-hf", "--checkpoint", run, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "post_ln" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("path, message", [("/nonexistent/run", "does not exist"), (REPO, "is incomplete")])
def test_export_bad_checkpoint_path(tmp_path, capsys, path, message):
    assert main(["export-hf", "--checkpoint", path, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
