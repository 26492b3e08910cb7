"""TaperNorm, the taper route of norm removal (model.taper_norms, `pretrain remove-norms --method taper`).

The paper (Kanavalau, Amo Alonso and Lall, "Gated Removal of Normalization in Transformers Enables Stable Training
and Efficient Inference", arXiv 2602.10408), h a token's row vector, D = diag:

    TaperNorm(h; g) = g * h / r(h) * D_gamma + (1 - g) * c * h * D_gamma~,          r(h) = sqrt(||h||^2 / d + eps)
    g(k) = 1 (k <= k_w);  1/2 (1 + cos(pi (k - k_w) / (k_t - k_w))) (k_w < k <= k_t);  0 (k > k_t)
    c* = argmin_c E || h / r(h) D_gamma - c h D_gamma ||^2 = E[ ||h D_gamma||^2 / r(h) ] / E[ ||h D_gamma||^2 ]
    gamma~ = gamma at the calibration (the taper start), trained from there;  at g = 0: h W -> h (c D_gamma~ W)

Checked here by hand in float64: the formula (RMSNorm and LayerNorm, lns's 1/sqrt(l)), c*'s statistic and its EMAs,
the gate schedule, the fold (the tapered-to-zero model and the folded ln_free model give the same logits within
1e-9) and the refusals. The end-to-end runs (the folded result, a resume in the middle of the taper) are in
test_remove_norms.py, beside the source model they share.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig
from models.llama import Llama
from models.norm_layers import TaperLayerNorm, TaperNorm, TaperRMSNorm
from pretrain.config import RemovalConfig, load_config
from pretrain.errors import UserError
from pretrain.removal.fold import fold_norms
from pretrain.removal.schedule import taper_gate

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.compat]
SMALL = dict(vocab_size=64, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=32, max_seq_len=32)


def _site(cls, gen, scale=0.5, offset=0.0):
    m = cls(16, 1e-6, output_scale=scale, gain_offset=offset).double()
    with torch.no_grad():
        m.weight.copy_(1 - offset + 0.3 * torch.randn(16, generator=gen, dtype=torch.float64))
    return m


@pytest.mark.parametrize("cls", [TaperRMSNorm, TaperLayerNorm], ids=["rmsnorm", "layernorm"])
def test_taper_formula_by_hand(cls):
    gen = torch.Generator().manual_seed(0)
    m = _site(cls, gen, offset=1.0)  # zero-centred gain: gamma = 1 + weight
    x = 3 * torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) + 0.7
    h = x - x.mean(-1, keepdim=True) if cls is TaperLayerNorm else x
    r = h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    gamma = m.weight + 1.0
    with torch.no_grad():
        assert (m(x) - h / r * gamma * 0.5).abs().max().item() <= 1e-12  # g = 1: the norm itself
        m.sigma.fill_(1 / 0.8)  # c = 0.8
        m.taper_weight.copy_(1 + 0.2 * torch.randn(16, generator=gen, dtype=torch.float64))
        for g in (0.7, 0.25):
            m.set_gate(g)
            want = g * h / r * gamma * 0.5 + (1 - g) * 0.8 * h * m.taper_weight * 0.5
            assert (m(x) - want).abs().max().item() <= 1e-10
        m.set_gate(0.0)
        assert m.is_fixed and bool(m.fixed)
        assert (m(x) - 0.8 * h * m.taper_weight * 0.5).abs().max().item() <= 1e-10
        m.set_gate(0.5)  # back (a resume before the end sets the gate of its step)
        assert not m.is_fixed


def test_taper_calibration_is_the_least_squares_c_of_the_ema():
    """c* = E[||h D_gamma||^2 / r(h)] / E[||h D_gamma||^2], each an EMA (momentum m) of its per-step mean over the
    tokens, position 0 left out; at the taper start gamma~ = gamma."""
    gen = torch.Generator().manual_seed(1)
    m = _site(TaperRMSNorm, gen)
    m.tracking = True
    m.train()
    steps = [2 * torch.randn(3, 6, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    ema = None
    for x in steps:
        spiked = x.clone()
        spiked[:, 0] *= 100.0  # position 0 does not enter the statistic
        m(spiked)
        total, count = m.take_statistic()
        m.absorb(total, count, 0.9)
        h = x[:, 1:]
        weighted = (h * m.weight).pow(2).sum(-1)
        r = h.pow(2).mean(-1).add(1e-6).sqrt()
        step = torch.stack([(weighted / r).mean(), weighted.mean(), r.mean()])  # c*'s two means, s(h) for s_tgt
        ema = step if ema is None else 0.9 * ema + 0.1 * step
        assert m.measuring
    c = (ema[0] / ema[1]).item()
    assert 1 / m.sigma.item() == pytest.approx(c, rel=1e-6)  # sigma is float32 (a statistic)
    assert m.calibration.tolist() == pytest.approx(ema.tolist(), rel=1e-6)
    # on one step's tokens c* is the least-squares scalar: a small change of c only moves the branches apart
    h = steps[-1][:, 1:]
    norm, branch = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * m.weight, h * m.weight
    step_c = ((norm * branch).sum() / branch.pow(2).sum()).item()
    assert step_c == pytest.approx(((h * m.weight).pow(2).sum(-1) / h.pow(2).mean(-1).add(1e-6).sqrt()).sum().item()
                                   / (h * m.weight).pow(2).sum().item(), rel=1e-12)
    misfit = [(norm - k * branch).pow(2).sum().item() for k in (step_c * 0.99, step_c, step_c * 1.01)]
    assert misfit[1] < min(misfit[0], misfit[2])
    m.calibrate()  # the taper start: gamma~ = gamma, no more statistics
    assert torch.equal(m.taper_weight, m.gain())
    m.set_gate(0.9)
    assert not m.measuring


@pytest.mark.parametrize("cls", [TaperRMSNorm, TaperLayerNorm], ids=["rmsnorm", "layernorm"])
def test_scale_anchor_adds_the_scale_loss_gradient(cls):
    """The fixed-target scale loss L_aux = lambda * E_{b,t} (s(h_{b,t}) - s_tgt)^2 (s = r, or the standard deviation
    for LayerNorm) on the final norm's input, taken as a gradient from the taper start on: the forward is unchanged,
    the gradient is that of loss + weight * L_aux (weight = lambda / gas), checked against autograd on the sum."""
    gen = torch.Generator().manual_seed(2)
    m = _site(cls, gen, scale=1.0)
    with torch.no_grad():
        m.sigma.fill_(0.9)
        m.calibration.copy_(torch.tensor([1.0, 0.9, 2.5]))  # s_tgt = 2.5
    m.set_gate(0.4)
    m.train()
    x = (2 * torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) + 0.3).requires_grad_(True)
    probe = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    plain = (m(x) * probe).sum()
    (want_plain,) = torch.autograd.grad(plain, x, retain_graph=True)
    m.scale_loss = 0.05
    y = m(x)
    (got,) = torch.autograd.grad((y * probe).sum(), x)
    h = x - x.mean(-1, keepdim=True) if cls is TaperLayerNorm else x
    aux = 0.05 * (h.pow(2).mean(-1).add(1e-6).sqrt() - 2.5).pow(2).mean()
    (want,) = torch.autograd.grad(plain + aux, x)
    assert (got - want).abs().max().item() <= 1e-12 and (got - want_plain).abs().max().item() > 1e-4
    assert torch.equal(y.detach(), m(x.detach()))  # the forward is the site's own
    m.set_gate(1.0)  # before the taper start: no scale loss
    (before,) = torch.autograd.grad((m(x) * probe).sum(), x)
    m.scale_loss = 0.0
    (norm_only,) = torch.autograd.grad((m(x) * probe).sum(), x)
    m.scale_loss = 0.05
    assert torch.equal(before, norm_only)
    m.eval()
    m.set_gate(0.4)
    (evaluated,) = torch.autograd.grad((m(x) * probe).sum(), x)
    assert (evaluated - want_plain).abs().max().item() <= 1e-12  # evaluation: the plain gradient


def test_gate_schedule():
    removal = RemovalConfig(start=5, taper_steps=4)  # k_w = 4, k_t = 8
    got = [taper_gate(removal, k) for k in range(0, 11)]
    want = [1.0] * 5 + [0.5 * (1 + math.cos(math.pi * j / 4)) for j in (1, 2, 3)] + [0.0] * 3
    assert got == pytest.approx(want, abs=1e-15)
    assert got[6] == pytest.approx(0.5) and removal.taper_end() == 8 and got[8] == 0.0 and got[7] > 0
    assert all(a >= b for a, b in zip(got, got[1:]))


def _tapered_model(seed: int = 0, **overrides) -> tuple[ModelConfig, Llama]:
    """A float64 taper model with gains off 1, every site calibrated on a random batch, gamma~ moved off gamma (as
    training does), gate 0."""
    cfg = ModelConfig(**{**SMALL, "removable_norms": True, "taper_norms": True, "init_std": 0.05, **overrides})
    model = Llama(cfg, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    sites = [m for m in model.modules() if isinstance(m, TaperNorm)]
    tokens = torch.randint(cfg.vocab_size, (4, 16), generator=gen)
    with torch.no_grad():
        for module in sites:
            module.weight.copy_(module.weight + 0.3 * torch.randn(module.weight.shape, generator=gen))
            module.tracking = True
        model(tokens)
        for module in sites:
            module.absorb(*module.take_statistic(), 0.9)
            module.calibrate()
            module.taper_weight.mul_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen, dtype=torch.float64))
            module.set_gate(0.0)
    return cfg, model


TAPER_FOLD_CASES = {"pre_ln": {}, "lns": {"norm_scheme": "lns"}, "tied": {"tie_embeddings": True},
                    "layernorm": {"norm_type": "layernorm"}, "lns-zero_centered": {"norm_scheme": "lns",
                                                                                  "norm_gain": "zero_centered"}}


@pytest.mark.parametrize("overrides", list(TAPER_FOLD_CASES.values()), ids=list(TAPER_FOLD_CASES))
def test_taper_fold_is_exact(overrides):
    """At g = 0 every site is h -> c h D_gamma~ (* 1/sqrt(l)); folded into the next weights (W' = c D_gamma~ W,
    with LayerNorm's centring), the ln_free model gives the same logits within 1e-9 in float64."""
    cfg, model = _tapered_model(**overrides)
    ln_cfg, folded = fold_norms(cfg, model.state_dict())
    assert ln_cfg.norm_scheme == "ln_free" and not ln_cfg.taper_norms and not ln_cfg.removable_norms
    ln = Llama(ln_cfg).double()
    ln.load_state_dict(folded, strict=True)
    assert not any("norm" in name for name in ln.state_dict())
    tokens = torch.randint(cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got = model(tokens), ln(tokens)
    assert (got - want).abs().max().item() <= 1e-9 and want.abs().max() > 1.0


def test_taper_fold_refuses_a_site_before_gate_zero():
    cfg, model = _tapered_model()
    model.blocks[1].attn_norm.set_gate(0.1)
    with pytest.raises(UserError, match="cannot fold blocks.1.attn_norm"):
        fold_norms(cfg, model.state_dict())


@pytest.mark.parametrize("overrides,message", [
    (["model.taper_norms=true"], "model.taper_norms: TaperNorm sites are norm-removal sites; set model.removable_norms"),
    (["model.removable_norms=true", "model.taper_norms=true", "model.norm_scheme=reordered"],
     "the taper covers the input and final norms of pre_ln and lns models without q/k norms, not reordered"),
    (["model.removable_norms=true", "model.taper_norms=true", "model.qk_norm=head"], "model.qk_norm=head"),
    (["model.removable_norms=true", "model.taper_norms=true", "train.steps=100"],
     "the taper's gate reaches 0 at step 119"),
    (["removal.taper_steps=0"], "removal.taper_steps: must be >= 1"),
    (["model.removable_norms=true", "removal.scale_loss=0.01"], "removal.scale_loss=0.01: the scale loss anchors a "
                                                                "tapered final norm; set model.taper_norms=true"),
    (["removal.scale_loss=-1"], "removal.scale_loss: must be a finite number >= 0"),
])
def test_taper_config_errors_are_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_from_scratch_config_takes_the_taper_hooks():
    """Training with tapering norms from step 0 is `pretrain train` with the two model keys: the taper hooks, the
    gate from removal.start, the fold at train.steps."""
    from pretrain.features import hooks_for
    from pretrain.removal.taper import TaperHooks

    cfg = load_config(None, ["model.preset=tiny", "model.removable_norms=true", "model.taper_norms=true",
                             "train.steps=300"])
    hooks = hooks_for(cfg, stop=None)  # (the signal hook is not what this looks at)
    taper = [h for h in hooks if isinstance(h, TaperHooks)]
    assert len(taper) == 1 and len(taper[0].sites) == 17
    assert taper[0].removed_by(118) == 0 and taper[0].removed_by(119) == 17
