"""model.parametrization (models/parametrization.py): the one table of multipliers per parameter group, what the
model and the optimizer read from it, the refusals, and that `standard` (ln_free's multipliers included) is the model
it always was."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import models.llama
import models.norms
from models.config import ModelConfig
from models.llama import Llama
from models.norm_layers import Scale
from models.norms import NORM_SCHEMES, BlockParts
from models.parametrization import GROUPS, REFUSED, Multipliers, ln_free_multipliers, multipliers, param_group
from pretrain.config import load_config
from pretrain.config.param_groups import grouped, param_groups

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(vocab_size=256, d_model=32, n_layers=8, n_heads=2, n_kv_heads=1, ffn_hidden=96, max_seq_len=32)


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def _losses(model: torch.nn.Module, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _main_ln_free(cfg: ModelConfig, layer: int) -> BlockParts:
    # models/norms.py `_ln_free` before the parametrization table, verbatim in what it builds
    c_in, c_out = ln_free_multipliers(cfg)
    gain = 1.0 / math.sqrt(2 * cfg.n_layers)
    if c_in == c_out == 1.0:
        return BlockParts(init_gain_attn_out=gain, init_gain_mlp_out=gain)
    return BlockParts(
        attn_norm=lambda: Scale(c_in), mlp_norm=lambda: Scale(c_in),
        attn_out_norm=lambda: Scale(c_out), mlp_out_norm=lambda: Scale(c_out),
        init_gain_qkv=1.0 / c_in, init_gain_gate=1.0 / c_in, init_gain_up=1.0 / c_in,
        init_gain_attn_out=gain / c_out, init_gain_mlp_out=gain / c_out,
    )


@pytest.mark.parametrize("overrides", [dict(), dict(n_layers=12, ln_free_base_depth=8), dict(n_layers=2),
                                       dict(attn_gate="headwise")], ids=["default", "12-layers-base-8", "shallow",
                                                                         "gated"])
def test_ln_free_multipliers_through_the_table_are_the_old_model_bit_for_bit(monkeypatch, overrides):
    cfg = _cfg(norm_scheme="ln_free", **overrides)
    new = Llama(cfg, seed=0)
    with monkeypatch.context() as m:
        m.setitem(NORM_SCHEMES, "ln_free", dataclasses.replace(NORM_SCHEMES["ln_free"], block=_main_ln_free))
        m.setattr(models.norms, "multipliers", lambda cfg: Multipliers())
        m.setattr(models.llama, "multipliers", lambda cfg: Multipliers())
        old = Llama(cfg, seed=0)
    assert [type(b.attn_norm) for b in new.blocks] == [type(b.attn_norm) for b in old.blocks]
    for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), name
    assert _losses(new) == _losses(old)


@pytest.mark.parametrize("scheme", ["pre_ln", "lns", "peri_ln", "deepnorm", "ln_free", "dyt", "ngpt"])
def test_standard_is_the_identity_table(scheme):
    table = multipliers(_cfg(norm_scheme=scheme))
    assert all(f.init == f.lr == f.weight_decay == f.eps == 1.0 for f in table.groups.values())
    assert table.logits == 1.0 and table.softmax_scale is None
    if scheme != "ln_free":
        assert table.branch_in == table.branch_out == 1.0


def test_the_factors_of_mup_and_completep():
    """m_d = 2, m_L = 4: the factors of the module docstring (TP V Table 3; CompleteP Table 1, nanoGPT-mup)."""
    mup = multipliers(_cfg(d_model=64, n_heads=4, n_kv_heads=2, parametrization="mup", base_d_model=32))
    assert mup.groups["hidden"] == mup.groups["branch_out"]
    h = mup.groups["hidden"]
    assert (h.init, h.lr, h.weight_decay, h.eps) == (pytest.approx(2 ** -0.5), 0.5, 1.0, 0.5)
    assert mup.groups["embedding"].lr == mup.groups["head"].lr == mup.groups["norm"].lr == 1.0
    assert mup.groups["embedding"].init == mup.groups["head"].init == 1.0
    assert (mup.logits, mup.softmax_scale, mup.branch_out) == (0.5, 1 / 16, 1.0)
    cp = multipliers(_cfg(d_model=64, n_heads=4, n_kv_heads=2, n_layers=16, parametrization="completep",
                          base_d_model=32, base_n_layers=4))
    h = cp.groups["hidden"]
    assert (h.init, h.lr, h.weight_decay, h.eps) == (pytest.approx(2 ** -0.5), 0.5, 2.0, 0.125)
    assert cp.groups["norm"].lr == 1.0 and cp.groups["norm"].eps == 0.125  # m_L^(α-1) = 1; ε / (m_d m_L)
    assert cp.groups["embedding"].eps == cp.groups["head"].eps == 0.5
    assert (cp.logits, cp.branch_out, cp.branch_in) == (0.5, 0.25, 1.0)
    at_base = multipliers(_cfg(parametrization="completep", base_d_model=32, base_n_layers=8))
    assert all(f.init == f.lr == f.weight_decay == f.eps == 1.0 for f in at_base.groups.values())


def test_every_parameter_has_its_group():
    cfg = _cfg(norm_scheme="peri_ln", gpas=True, attn_gate="headwise", qk_norm="head")
    groups = {name: param_group(name, p.ndim) for name, p in Llama(cfg).named_parameters()}
    assert groups["tok_emb.weight"] == "embedding" and groups["emb_out.weight"] == "embedding"
    assert groups["head.weight"] == "head" and groups["final_norm.weight"] == "head"
    for name in ("attn.qkv.weight", "mlp.gate.weight", "mlp.up.weight", "attn.out_gate.proj.weight"):
        assert groups.get(f"blocks.0.{name}", "hidden") == "hidden", name
    assert groups["blocks.3.attn.o.weight"] == groups["blocks.3.mlp.down.weight"] == "branch_out"
    for name in ("attn_norm.weight", "attn_out_norm.weight", "residual.gate", "attn.q_norm.weight"):
        assert groups[f"blocks.1.{name}"] == "norm", name
    assert set(groups.values()) == set(GROUPS)
    # DeepSpeed's PipelineModule names end as the model's
    assert param_group("4.attn.o.weight", 2) == "branch_out" and param_group("tied_modules.embed.tok_emb.weight",
                                                                               2) == "embedding"
    assert param_group("10.final_norm.weight", 1) == "head" and param_group("11.head.weight", 2) == "head"


def test_the_model_reads_its_forward_multipliers():
    pre = Llama(_cfg(parametrization="completep", base_d_model=16, base_n_layers=2, n_layers=4))
    assert all(type(b.attn_out_norm) is Scale and b.attn_out_norm.scale == 0.5 for b in pre.blocks)  # 1/m_L
    assert type(pre.logit_scale) is Scale and pre.logit_scale.scale == 0.5  # 1/m_d
    assert pre.blocks[0].attn.softmax_scale == 1 / 16
    peri = Llama(_cfg(norm_scheme="peri_ln", parametrization="completep", base_n_layers=2, n_layers=4))
    assert all(b.residual.branch_scale == 0.5 for b in peri.blocks)  # its output slots hold norms
    # µP init: hidden and branch-output weights at std / sqrt(m_d), the embedding at std
    wide = Llama(_cfg(d_model=128, n_heads=8, n_kv_heads=4, ffn_hidden=384, parametrization="mup", base_d_model=32))
    assert wide.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert wide.blocks[0].attn.o.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert wide.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_at_the_base_shape_mup_is_standard_but_for_the_attention_scale():
    torch.manual_seed(0)
    standard = Llama(_cfg(), seed=0)
    mup = Llama(_cfg(parametrization="mup", base_d_model=32), seed=0)
    for (name, a), (_, b) in zip(standard.state_dict().items(), mup.state_dict().items()):
        assert torch.equal(a, b), name
    for block in standard.blocks:
        block.attn.softmax_scale = 1 / 16
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.equal(standard(tokens), mup(tokens))


def _experiment(*overrides: str):
    model = [f"model.{k}={v}" for k, v in SMALL.items()]
    return load_config(None, [*model, "data.seq_len=16", "train.weight_decay=0.1", "train.lr=1e-3", *overrides])


def test_standard_keeps_the_two_optimizer_groups():
    cfg = _experiment("model.norm_scheme=ln_free")
    model = Llama(cfg.model)
    groups = grouped(model, cfg)
    matrices = [n for n, p in model.named_parameters() if p.ndim >= 2 and "tok_emb" not in n]
    assert [[n for n, _ in pairs] for _, pairs in groups] == [matrices, ["tok_emb.weight"]]
    built = param_groups(model, cfg)
    assert [(g["lr"], g["weight_decay"], g["eps"]) for g in built] == [(1e-3, 0.1, 1e-8), (1e-3, 0.0, 1e-8)]


def test_completep_groups_carry_the_table():
    cfg = _experiment("model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.parametrization=completep",
                      "model.base_d_model=32", "model.base_n_layers=4")
    model = Llama(cfg.model)
    table = multipliers(cfg.model)
    seen = 0
    for group in param_groups(model, cfg):
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            f = table.groups[param_group(name, p.ndim)]
            decays = p.ndim >= 2 and "tok_emb" not in name
            assert group["lr"] == pytest.approx(1e-3 * f.lr) and group["eps"] == pytest.approx(1e-8 * f.eps)
            assert group["weight_decay"] == pytest.approx(0.1 * f.weight_decay if decays else 0.0)
            seen += 1
    assert seen == len(list(model.parameters()))
    hidden = next(g for g in param_groups(model, cfg) if g["lr"] == pytest.approx(5e-4))
    assert hidden["weight_decay"] == pytest.approx(0.2)  # λ m_d: lr λ constant in width


@pytest.mark.parametrize("overrides, words", [
    (dict(norm_scheme="ngpt", parametrization="mup"), "nGPT has its own parametrization"),
    (dict(norm_scheme="lns", parametrization="completep"), "depth scaling"),
    (dict(norm_scheme="deepnorm", parametrization="completep"), "DeepNorm"),
    (dict(norm_scheme="hybridnorm", parametrization="mup"), "width rule"),
    (dict(norm_scheme="post_ln", parametrization="completep"), "pre-norm"),
    (dict(norm_scheme="ln_free", parametrization="completep"), "model.ln_free_base_depth=0"),
    (dict(base_d_model=16), "read by model.parametrization=mup or completep only"),
    (dict(parametrization="mup", base_n_layers=4), "completep only"),
    (dict(parametrization="mup", base_d_model=0), "positive"),
    (dict(parametrization="completep", residual="mhc"), "one residual stream"),
])
def test_refusals(overrides, words):
    with pytest.raises(ValueError, match=words) as e:
        _cfg(**overrides)
    assert "\n" not in str(e.value)


def test_what_composes():
    for (scheme, parametrization) in REFUSED:
        assert scheme in NORM_SCHEMES
    for scheme in ("pre_ln", "peri_ln", "reordered", "dyt", "derf"):
        for parametrization in ("mup", "completep"):
            _cfg(norm_scheme=scheme, parametrization=parametrization)
    _cfg(norm_scheme="ln_free", parametrization="completep", ln_free_base_depth=0)
    _cfg(norm_scheme="lns", parametrization="mup")
    _cfg(norm_scheme="deepnorm", parametrization="mup")


@pytest.mark.parametrize("parametrization, extra", [("mup", dict(base_d_model=16)),
                                                    ("completep", dict(base_n_layers=2, ln_free_base_depth=0))])
def test_direct_logit_attribution_stays_exact(parametrization, extra):
    from pretrain.analysis.attribution import logit_attribution  # a consumer of the logit multiplier, in pretrain/

    model = Llama(_cfg(norm_scheme="ln_free", n_layers=4, parametrization=parametrization, **extra))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    result = logit_attribution(model, [(tokens[:, :-1], tokens[:, 1:])])
    assert result["max_abs_error"] < 1e-5
