"""ln_free's stabiliser (models/norms.py `_ln_free`): a unit-variance token embedding and fixed depth-muP multipliers.

The (untied) embedding starts at std 1, the scale a norm would hand each branch, instead of init_std: the model
starts in its active regime instead of a near-zero one that Adam leaves with a loss spike. Each branch reads
c_in * x and adds c_out * F, c_in = min(1, sqrt(B/L)), c_out = min(1, B/L) (B = model.ln_free_base_depth), with
the init divided by the same constants: the model at step 0 is unchanged, only Adam's steps on the blocks shrink
with depth. A deep, narrow ln_free model at a high learning rate diverges without them within a few dozen steps
and trains with them (docs/schemes.md, "LN-free stabiliser", gives the 400-step runs at 16 and 24 layers).
"""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig
from models.llama import Llama
from models.norm_layers import Scale
from models.parametrization import ln_free_multipliers
from pretrain.config import load_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=256, d_model=32, n_layers=16, n_heads=2, n_kv_heads=1, ffn_hidden=96,
                                 max_seq_len=32, norm_scheme="ln_free"), **overrides})


@pytest.mark.parametrize("layers,base,c_in,c_out", [(16, 4, 0.5, 0.25), (24, 4, math.sqrt(1 / 6), 1 / 6),
                                                    (8, 4, math.sqrt(0.5), 0.5), (4, 4, 1.0, 1.0), (2, 4, 1.0, 1.0),
                                                    (16, 0, 1.0, 1.0), (16, 8, math.sqrt(0.5), 0.5)])
def test_multipliers(layers, base, c_in, c_out):
    cfg = _cfg(n_layers=layers, ln_free_base_depth=base)
    assert ln_free_multipliers(cfg) == pytest.approx((c_in, c_out), rel=1e-12)
    assert ModelConfig().ln_free_base_depth == 4


def test_blocks_compute_x_plus_c_out_f_of_c_in_x_and_hold_no_statistic():
    cfg = _cfg()
    model = Llama(cfg, seed=0).double()
    x = torch.randn(2, 7, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos, sin = model.rope_cos, model.rope_sin
    with torch.no_grad():
        for block in model.blocks:
            h = x + 0.25 * block.attn(0.5 * x, cos, sin)
            want = h + 0.25 * block.mlp(0.5 * h)
            torch.testing.assert_close(block(x, cos, sin), want, rtol=1e-12, atol=1e-12)
            for part in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"):
                module = getattr(block, part)
                assert isinstance(module, Scale) and not list(module.parameters()) and not list(module.buffers())
    assert not any("norm" in name for name, _ in model.named_parameters())
    assert isinstance(model.final_norm, torch.nn.Identity)


def test_init_is_compensated_so_step_zero_is_the_plain_model():
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = Llama(_cfg(n_layers=24), seed=3)(tokens)
        b = Llama(_cfg(n_layers=24, ln_free_base_depth=0), seed=3)(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unit_embedding_for_untied_ln_free_only():
    def std(**overrides):
        return Llama(_cfg(**overrides), seed=0).tok_emb.weight.double().std().item()

    assert std() == pytest.approx(1.0, rel=0.02)
    assert std(tie_embeddings=True) == pytest.approx(0.02, rel=0.02)  # the head would start at std 1 too
    assert std(norm_scheme="pre_ln") == pytest.approx(0.02, rel=0.02)


def test_a_config_stored_before_the_multipliers_keeps_its_plain_model(tmp_path):
    """A run or checkpoint config written before model.ln_free_base_depth existed describes plain x + F(x)."""
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  norm_scheme: ln_free\n  n_layers: 16\n")
    assert load_config(str(path), stored=True).model.ln_free_base_depth == 0
    assert load_config(str(path)).model.ln_free_base_depth == 4  # a user's experiment file gets the new default


def _train(stabilised: bool, lr: float, steps: int = 40) -> list[float]:
    """Losses of AdamW (betas 0.9/0.95, clip 1, warm-up 10) on tiny-Shakespeare for a 16-layer, width-32 ln_free,
    with the stabiliser or as ln_free was before it (no multipliers, embedding at init_std)."""
    from pretrain.data.resolve import resolve_data_path
    from pretrain.data.loader import DataLoader, TokenDataset

    cfg = _cfg(vocab_size=2048, ln_free_base_depth=4 if stabilised else 0)
    model = Llama(cfg, seed=0)
    if not stabilised:
        with torch.no_grad():
            model.tok_emb.weight.mul_(cfg.weight_std)
    loader = DataLoader(TokenDataset(resolve_data_path("bundled:tinyshakespeare"), 32, "train"), micro_batch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        tokens, labels = next(loader)
        loss = model(tokens, labels)
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        losses.append(loss.item())
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
            break
        opt.step()
    return losses


def test_the_stabiliser_keeps_a_deep_ln_free_model_trainable(data_cache, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE", data_cache)
    plain = _train(stabilised=False, lr=5e-3)
    assert not all(math.isfinite(x) and x < 50 for x in plain), "the plain model no longer diverges: the test is moot"
    for lr in (5e-3, 1e-2):
        losses = _train(stabilised=True, lr=lr)
        assert len(losses) == 40 and all(math.isfinite(x) and x < 2 * losses[0] for x in losses), lr
        assert losses[-1] < losses[0] - 1.0, lr
