"""The first non-finite value of a bad step, located by re-running the step with hooks (pretrain/train/provenance.py):
an inf put into one module's forward output, or into the gradient arriving at its output, is named."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import one_rank  # noqa: F401 (a fixture)
from helpers.train import random_lm_batches

from pretrain.config import load_config
from pretrain.train.provenance import locate

TINY = ["model.vocab_size=96", "model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_hidden=48", "model.max_seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2",
        "data.seq_len=16"]



@pytest.fixture(scope="module")
def built(one_rank):
    from pretrain.train.engine import build_engine

    return build_engine(load_config(None, TINY), one_rank)


def _inf_output(module, inputs, output):
    return output * float("inf")


def _inf_gradient(module, inputs, output):
    output.register_hook(lambda g: g * float("inf"))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("module, inject, direction", [
    ("blocks.1.mlp.up", _inf_output, "forward"),
    ("blocks.2.attn_norm", _inf_output, "forward"),
    ("blocks.1.mlp.down", _inf_gradient, "backward"),
])
def test_the_first_non_finite_module_is_named(built, one_rank, module, inject, direction):
    batches = list(random_lm_batches(96, 1, seed=0).batches)
    model = built.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.get_submodule(module).register_forward_hook(inject)
    try:
        found = locate(model, batches, one_rank.device)
    finally:
        handle.remove()
    assert (found.module, found.direction) == (module, direction), found
    assert found.line(7) == f"first non-finite: {module} ({direction}) at step 7"
    # the re-run leaves the weights and their gradients alone, and a finite step is found finite
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters())
    assert locate(model, batches, one_rank.device) is None
