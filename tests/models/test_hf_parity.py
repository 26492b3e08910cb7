"""Hugging Face interop: our pre_ln / lns models equal transformers' LlamaForCausalLM after export,
HF -> ours -> HF round-trips exactly, and schemes Llama cannot express are refused."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.hf import (  # noqa: E402
    LINEAR_EPS,
    LINEAR_GAIN,
    from_hf_config,
    from_hf_state_dict,
    load_hf,
    load_hf_state,
    save_hf,
    to_hf_config,
    to_hf_state_dict,
)
from models.llama import Llama  # noqa: E402
from models.hf.choose import EXPORTS  # noqa: E402
from models.norms import NORM_SCHEMES  # noqa: E402

pytestmark = pytest.mark.compat

TOL = 1e-4
VOCAB, T = 128, 48


def small_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
                rope_theta=5000.0, norm_eps=1e-5)
    return ModelConfig(**{**base, **overrides})


def random_model(cfg: ModelConfig, seed: int = 0) -> Llama:
    """Our model with random weights and norm gains away from 1, so a missing LNS fold would show."""
    model = Llama(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # gains in [0.5, 1.5): w there, or 1 + w with zero-centred gains
                p.copy_(torch.rand(p.shape, generator=gen) + (-0.5 if cfg.norm_gain == "zero_centered" else 0.5))
            if name.endswith("layer_scalar.scale"):  # Gemma 4's scalar, away from its init 1
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model.eval()


def tokens(seed: int = 0, batch: int = 2, length: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_from_dir(path, attn: str = "eager"):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def max_diff(ours: Llama, hf, x: torch.Tensor) -> float:
    return (ours(x) - hf(input_ids=x).logits).abs().max().item()


@torch.no_grad()
def logit_diff(ours: Llama, hf, x: torch.Tensor) -> tuple[float, float]:
    """(max |ours - HF| over every logit, that divided by max |ours|): the relative figure is against the logit
    scale, so it does not depend on how large a random model's logits happen to be."""
    a, b = ours(x), hf(input_ids=x).logits
    diff = (a - b).abs().max().item()
    return diff, diff / a.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# ours -> HF


EXPORT_CASES = [
    pytest.param("pre_ln", dict(), "eager", "LlamaForCausalLM", id="pre_ln-gqa"),
    pytest.param("pre_ln", dict(n_kv_heads=4, tie_embeddings=True), "sdpa", "LlamaForCausalLM",
                 id="pre_ln-mha-tied-sdpa"),
    pytest.param("lns", dict(), "eager", "LlamaForCausalLM", id="lns-gqa"),
    pytest.param("lns", dict(tie_embeddings=True), "sdpa", "LlamaForCausalLM", id="lns-gqa-tied-sdpa"),
    pytest.param("lns", dict(n_kv_heads=1, n_layers=3), "eager", "LlamaForCausalLM", id="lns-mqa"),
    pytest.param("lns", dict(norm_gain="zero_centered"), "eager", "LlamaForCausalLM", id="lns-zero_centered"),
    # ln_free: norms made linear; base depth 0 (plain x + F(x), as remove-norms writes it) and > 0 (multipliers
    # folded: L 3, B 2 gives c_in = sqrt(2/3), c_out = 2/3, neither a power of two; L 4, B 1: 1/2, 1/4)
    pytest.param("ln_free", dict(ln_free_base_depth=0), "eager", "LlamaForCausalLM", id="ln_free-b0-gqa"),
    pytest.param("ln_free", dict(ln_free_base_depth=2, n_layers=3), "sdpa", "LlamaForCausalLM",
                 id="ln_free-b2-gqa-sdpa"),
    pytest.param("ln_free", dict(ln_free_base_depth=1, n_kv_heads=4, tie_embeddings=True, norm_type="layernorm"),
                 "eager", "LlamaForCausalLM", id="ln_free-b1-mha-tied"),  # (norm_type: unused without norms)
    # Qwen3: per-head q/k norms
    pytest.param("pre_ln", dict(qk_norm="head"), "eager", "Qwen3ForCausalLM", id="qwen3-gqa"),
    pytest.param("pre_ln", dict(qk_norm="head", n_kv_heads=4, tie_embeddings=True), "sdpa", "Qwen3ForCausalLM",
                 id="qwen3-mha-tied-sdpa"),
    pytest.param("lns", dict(qk_norm="head", norm_gain="zero_centered"), "sdpa", "Qwen3ForCausalLM",
                 id="qwen3-lns-zero_centered-sdpa"),
    # OLMo 2: reordered blocks, full-width q/k norms
    pytest.param("reordered", dict(qk_norm="full"), "eager", "Olmo2ForCausalLM", id="olmo2-gqa"),
    pytest.param("reordered", dict(qk_norm="full", n_kv_heads=4, tie_embeddings=True), "sdpa", "Olmo2ForCausalLM",
                 id="olmo2-mha-tied-sdpa"),
    pytest.param("reordered", dict(qk_norm="full", norm_gain="zero_centered", n_kv_heads=1), "eager",
                 "Olmo2ForCausalLM", id="olmo2-mqa-zero_centered"),
    # Gemma 4's text model: pre and post norms, q/k norms with gains at attention scale 1, v norm without gain, the
    # layer scalar, the embedding times sqrt(d); its sliding window, per-layer inputs, softcap, MoE off
    pytest.param("gemma4", dict(), "eager", "Gemma4ForCausalLM", id="gemma4-gqa"),
    pytest.param("gemma4", dict(n_kv_heads=4, tie_embeddings=True, norm_gain="zero_centered"), "sdpa",
                 "Gemma4ForCausalLM", id="gemma4-mha-tied-zero_centered-sdpa"),
]


@pytest.mark.parametrize("scheme,overrides,attn,cls", EXPORT_CASES)
def test_export_logits_match_transformers(tmp_path, scheme, overrides, attn, cls):
    cfg = small_cfg(norm_scheme=scheme, **overrides)
    ours = random_model(cfg, seed=3)
    out = save_hf(cfg, ours.state_dict(), tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    hf = hf_from_dir(out, attn)
    assert type(hf).__name__ == cls
    assert hf.config.num_key_value_heads == cfg.n_kv_heads and hf.config.tie_word_embeddings == cfg.tie_embeddings
    rope = hf.config.rope_parameters
    assert rope.get("full_attention", rope)["rope_theta"] == cfg.rope_theta  # (Gemma 4: per layer type)
    x = tokens(seed=1)
    diff, rel = logit_diff(ours, hf, x)
    print(f"PARITY {scheme} {overrides} {attn} {cls}: max abs {diff:.2e}, relative {rel:.2e}")
    assert rel <= 1e-5 and diff <= TOL
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))

    # and back: the same function, as the scheme the class stands for (lns as pre_ln with its fold kept, ln_free with
    # its multipliers folded, zero-centred gains as plain ones)
    back = load_hf(out)
    assert (back.cfg.norm_scheme, back.cfg.qk_norm) == ("pre_ln" if scheme == "lns" else scheme, cfg.qk_norm)
    assert back.cfg.ln_free_base_depth == 0 or scheme != "ln_free"
    with torch.no_grad():
        assert (back.eval()(x) - ours(x)).abs().max().item() <= 1e-5 * ours(x).abs().max().item()
    save_hf(back.cfg, back.state_dict(), tmp_path / "again")  # an exact fixed point after one export
    first, again = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_ln_free_export_is_a_llama_with_linear_norms(tmp_path):
    """The export's norms are linear: eps 2^40, every gain exactly 2^20; the multipliers sit in the projections."""
    cfg = small_cfg(norm_scheme="ln_free", ln_free_base_depth=1)  # L 4: c_in 1/2, c_out 1/4, exact in any float
    ours = random_model(cfg, seed=2)
    out = save_hf(cfg, ours.state_dict(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rms_norm_eps"] == LINEAR_EPS == 2.0**40
    hf_sd = load_file(str(out / "model.safetensors"))
    norms = [k for k in hf_sd if k.endswith("layernorm.weight") or k == "model.norm.weight"]
    assert len(norms) == 2 * cfg.n_layers + 1 and all(torch.all(hf_sd[k] == LINEAR_GAIN) for k in norms)
    sd = ours.state_dict()
    assert torch.equal(hf_sd["model.layers.0.mlp.gate_proj.weight"], sd["blocks.0.mlp.gate.weight"] / 2)
    assert torch.equal(hf_sd["model.layers.0.mlp.down_proj.weight"], sd["blocks.0.mlp.down.weight"] / 4)

    # bf16: transformers' model with the linear norms is ours in bf16, up to bf16's own rounding (on CPU bit for bit)
    x = tokens(seed=5)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours32, ours16, theirs16 = ours(x), ours.to(torch.bfloat16)(x).float(), hf16(input_ids=x).logits.float()
    ours.float()
    export_error, bf16_error = (theirs16 - ours16).abs().max().item(), (ours16 - ours32).abs().max().item()
    print(f"BF16 ln_free: |HF bf16 - ours bf16| {export_error:.2e}, |ours bf16 - ours fp32| {bf16_error:.2e}")
    assert 0 < bf16_error and export_error <= bf16_error

    # Import: eps >= 2^30 with every gain sqrt(eps) reads as ln_free (base depth 0); gains off sqrt(eps) are refused
    # as ln_free, and norm_scheme=pre_ln keeps them as norms (the same function HF computes).
    hf_sd["model.layers.1.input_layernorm.weight"][3] = LINEAR_GAIN * 1.5
    with pytest.raises(ValueError, match=r"input_layernorm.weight is not sqrt\(rms_norm_eps\).*norm_scheme=pre_ln"):
        from_hf_state_dict(config, hf_sd)
    as_pre_ln, pre_sd = from_hf_state_dict(config, hf_sd, norm_scheme="pre_ln")
    assert as_pre_ln.norm_scheme == "pre_ln" and as_pre_ln.norm_eps == LINEAR_EPS
    assert torch.all(pre_sd["blocks.1.attn_norm.weight"][3] == LINEAR_GAIN * 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rmsnorm_is_the_identity_in_fp32_and_bf16(dtype):
    """transformers' own RMSNorm with eps 2^40 and gain 2^20 returns its input bit for bit for per-token mean squares
    up to 2^16 (mean(x^2) + 2^40 rounds to 2^40 in the fp32 statistic, and 2^+-20 scale exactly) and within the
    first-order bound mean(x^2) / (2 eps) beyond. Trained ln_free models sit far below 2^16
    (tests/pretrain/cli/test_hf_stock_classes.py measures a trained one)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    D = 64
    norm = LlamaRMSNorm(D, eps=LINEAR_EPS).to(dtype)
    with torch.no_grad():
        norm.weight.fill_(LINEAR_GAIN)
    assert norm.weight.dtype == dtype and torch.all(norm.weight == 2.0**20)  # exact in bf16 too
    gen = torch.Generator().manual_seed(0)
    rms = torch.logspace(-4, 2.5, 40)  # per-token RMS 1e-4 .. 316: mean squares 1e-8 .. 1e5 (> 2^16 at the top)
    x = (torch.randn(40, D, generator=gen) * rms[:, None]).to(dtype)
    with torch.no_grad():
        y = norm(x)
    ms = x.float().pow(2).mean(-1)
    exact = ms < 2.0**16
    assert exact.sum() >= 30 and torch.equal(y[exact], x[exact])
    rel = ((y.float() - x.float()).norm(dim=-1) / x.float().norm(dim=-1))[~exact]
    bound = ms[~exact] / (2 * LINEAR_EPS)
    print(f"LINEAR-NORM {dtype}: max relative error above 2^16: {rel.max().item():.2e} "
          f"(bound {bound.max().item():.2e})")
    assert torch.all(rel <= 2 * bound + (2.0**-8 if dtype == torch.bfloat16 else 2.0**-23))


def test_lns_fold_is_what_makes_export_match(tmp_path):
    """The same weights exported as pre_ln (no 1/sqrt(l) fold) give far different logits: the fold matters."""
    cfg = small_cfg(norm_scheme="lns")
    ours = random_model(cfg, seed=5)
    sd = ours.state_dict()
    x = tokens(seed=2)

    folded = to_hf_state_dict(cfg, sd)
    unfolded = to_hf_state_dict(small_cfg(norm_scheme="pre_ln"), sd)
    for i in range(cfg.n_layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{name}.weight"
            torch.testing.assert_close(folded[key], unfolded[key] / (i + 1) ** 0.5, rtol=1e-6, atol=0)
    assert torch.equal(folded["model.norm.weight"], unfolded["model.norm.weight"])  # final norm is unscaled

    save_hf(cfg, sd, tmp_path / "lns")
    save_hf(small_cfg(norm_scheme="pre_ln"), sd, tmp_path / "unfolded")
    assert max_diff(ours, hf_from_dir(tmp_path / "lns"), x) <= TOL
    assert max_diff(ours, hf_from_dir(tmp_path / "unfolded"), x) > 100 * TOL


def test_lns_import_unfolds_back(tmp_path):
    cfg = small_cfg(norm_scheme="lns")
    ours = random_model(cfg, seed=7)
    save_hf(cfg, ours.state_dict(), tmp_path / "hf")

    back_cfg, back_sd = load_hf_state(tmp_path / "hf", norm_scheme="lns")
    assert back_cfg == dataclasses.replace(cfg, init_std=cfg.weight_std)  # HF stores the std it resolved to
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back_sd[k], v, rtol=1e-6, atol=0)

    as_pre_ln = load_hf(tmp_path / "hf")  # the default: a plain pre_ln model computing the same function
    assert as_pre_ln.cfg.norm_scheme == "pre_ln"
    x = tokens(seed=4)
    with torch.no_grad():
        assert (as_pre_ln(x) - ours(x)).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------------------
# HF -> ours -> HF

ARCH_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_bias", "mlp_bias", "initializer_range",
)


@pytest.mark.parametrize("model_type,n_kv_heads,tied", [
    ("llama", 2, False), ("llama", 4, True), ("llama", 1, False),
    ("qwen3", 2, False), ("olmo2", 4, True),  # (Qwen3 MHA tied: the export cases' round trip)
])
def test_hf_round_trip(tmp_path, model_type, n_kv_heads, tied):
    torch.manual_seed(11)
    cls, scheme, qk = {"llama": ("Llama", "pre_ln", "none"), "qwen3": ("Qwen3", "pre_ln", "head"),
                       "olmo2": ("Olmo2", "reordered", "full")}[model_type]
    extra = {"head_dim": 16} if model_type != "olmo2" else {}
    hf_cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, initializer_range=0.05,
        pad_token_id=None, eos_token_id=None, **extra,
    )
    hf = getattr(transformers, f"{cls}ForCausalLM")(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "src")

    ours = load_hf(tmp_path / "src")
    assert (ours.cfg.norm_scheme, ours.cfg.qk_norm) == (scheme, qk)
    assert ours.cfg.tie_embeddings == tied and ours.cfg.n_kv_heads == n_kv_heads
    x = tokens(seed=6)
    diff, rel = logit_diff(ours.eval(), hf, x)
    print(f"PARITY import {model_type} kv{n_kv_heads} tied={tied}: max abs {diff:.2e}, relative {rel:.2e}")
    assert diff <= TOL and rel <= 1e-5

    save_hf(ours.cfg, ours.state_dict(), tmp_path / "back")
    src_sd = load_file(str(tmp_path / "src" / "model.safetensors"))
    back_sd = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back_sd) == sorted(src_sd)
    for k in src_sd:
        assert torch.equal(back_sd[k], src_sd[k]), k

    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    for k in ARCH_KEYS:
        assert back_cfg.get(k) == src_cfg.get(k), k
    assert back_cfg["model_type"] == model_type and back_cfg["architectures"] == [f"{cls}ForCausalLM"]

    again = hf_from_dir(tmp_path / "back", "sdpa")
    assert max_diff(ours, again, x) <= TOL


def test_from_hf_state_dict_ignores_inv_freq_and_checks_keys():
    cfg = small_cfg()
    hf_cfg = to_hf_config(cfg)
    hf_sd = to_hf_state_dict(cfg, random_model(cfg).state_dict())
    hf_sd["model.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
    back_cfg, _ = from_hf_state_dict(hf_cfg, hf_sd)
    assert back_cfg == dataclasses.replace(cfg, init_std=cfg.weight_std)  # HF stores the std it resolved to
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing model.layers.1.mlp.up_proj.weight"):
        from_hf_state_dict(hf_cfg, hf_sd)


# ---------------------------------------------------------------------------------------------------------
# Refusals


def _variants():
    """Every (scheme, model.qk_norm) our config accepts."""
    for name, s in NORM_SCHEMES.items():
        for qk in (("none", "head", "full") if "qk_norm" in s.options else ("none",)):
            yield name, qk


NOT_EXPORTABLE = [pytest.param(s, qk, id=f"{s}-{qk}") for s, qk in _variants() if (s, qk) not in EXPORTS]


def test_export_table_covers_the_issue():
    issue = {("pre_ln", "none"): "LlamaForCausalLM", ("lns", "none"): "LlamaForCausalLM",
             ("ln_free", "none"): "LlamaForCausalLM", ("pre_ln", "head"): "Qwen3ForCausalLM",
             ("lns", "head"): "Qwen3ForCausalLM", ("reordered", "full"): "Olmo2ForCausalLM"}
    exports = {k: t.architecture for k, (t, _) in EXPORTS.items()}
    assert issue.items() <= exports.items()
    # Every other export is one a scheme's entry declares (`hf_exports`; a scheme added since has none by default).
    assert exports.keys() == {(name, qk) for name, s in NORM_SCHEMES.items() for qk in s.hf_exports}
    assert len(NOT_EXPORTABLE) >= 15


@pytest.mark.parametrize("scheme,qk", NOT_EXPORTABLE)
def test_export_refuses_schemes_no_stock_class_has(tmp_path, scheme, qk):
    cfg = small_cfg(norm_scheme=scheme, qk_norm=qk)
    sd = Llama(cfg).state_dict()
    why = re.escape(NORM_SCHEMES[scheme].why_no_hf_class(qk))  # the entry's reason (`no_hf_class`, or the default)
    with pytest.raises(ValueError, match=rf"^model\.norm_scheme={scheme}.* cannot be exported to a stock transformers "
                                         rf"class \({why}\); exportable: LlamaForCausalLM: pre_ln") as err:
        save_hf(cfg, sd, tmp_path / "out")
    assert "\n" not in str(err.value) and "no entry" not in str(err.value)
    assert not list(tmp_path.iterdir()), "a refused export must not leave anything on disk"
    with pytest.raises(ValueError, match="cannot be exported"):
        to_hf_config(cfg)
    with pytest.raises(ValueError, match="cannot be exported"):
        to_hf_state_dict(cfg, sd)


@pytest.mark.parametrize("overrides,shown", [
    (dict(norm_scheme="pre_ln", norm_type="layernorm"), "norm_type=layernorm"),
    (dict(norm_scheme="lns", norm_type="layernorm", qk_norm="head"), "norm_type=layernorm"),
    (dict(norm_scheme="pre_ln", attn_gate="headwise"), "attn_gate=headwise"),
    (dict(norm_scheme="ln_free", attn_gate="elementwise"), "attn_gate=elementwise"),  # Llama has no gate
    (dict(norm_scheme="reordered", qk_norm="full", attn_gate="headwise"), "attn_gate=headwise"),
    (dict(norm_scheme="pre_ln", gpas=True), "gpas=true"),
    (dict(norm_scheme="pre_ln", removable_norms=True), "removable_norms=true"),
    (dict(norm_scheme="pre_ln", qk_norm="head", qk_norm_scale="learned"), "qk_norm_scale=learned"),
    (dict(norm_scheme="lns", qk_norm="head", qk_norm_scale="none"), "qk_norm_scale=none"),
    (dict(norm_scheme="pre_ln", v_norm=True), "v_norm=true"),
    (dict(norm_scheme="peri_ln", layer_scalar=True), "layer_scalar=true"),
    (dict(norm_scheme="gemma4", attn_gate="elementwise"), "attn_gate=elementwise"),
])
def test_export_refuses_keys_no_stock_class_has(tmp_path, overrides, shown):
    cfg = small_cfg(**overrides)
    with pytest.raises(ValueError, match=rf"^model\.{shown} cannot be exported") as err:
        save_hf(cfg, Llama(cfg).state_dict(), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type"),
        (dict(head_dim=32), "head_dim"),
    ],
)
def test_import_refuses_unrepresentable_configs(change, field):
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, **change)
    with pytest.raises(ValueError, match=field) as err:
        from_hf_config(hf_cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cls,change,field",
    [
        ("Qwen3Config", dict(use_sliding_window=True), "use_sliding_window"),
        ("Qwen3Config", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
        ("Qwen3Config", dict(attention_bias=True), "attention_bias"),
        ("Qwen3Config", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
        ("Qwen3Config", dict(head_dim=32), "head_dim"),
        ("Qwen3Config", dict(hidden_act="gelu"), "hidden_act"),
        ("Olmo2Config", dict(attention_bias=True), "attention_bias"),
        ("Olmo2Config", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
        ("Olmo2Config", dict(attention_dropout=0.1), "attention_dropout"),
    ],
)
def test_import_refuses_unsupported_qwen3_and_olmo2_fields(cls, change, field):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    if cls == "Qwen3Config":
        base["head_dim"] = 16
    hf_cfg = getattr(transformers, cls)(**{**base, **change})
    with pytest.raises(ValueError, match=rf"^HF config (rope_parameters\.)?{field}=.* is not supported: ") as err:
        from_hf_config(hf_cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=field):
        from_hf_config(hf_cfg.to_dict())  # config.json's form


def test_import_refuses_other_model_types_and_schemes():
    with pytest.raises(ValueError, match="model_type='mistral'.*'llama', 'qwen3', 'olmo2'"):
        from_hf_config({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="norm_scheme=post_ln"):
        from_hf_config(to_hf_config(small_cfg()), norm_scheme="post_ln")
    with pytest.raises(ValueError, match=r"norm_scheme=pre_ln: an HF Olmo2ForCausalLM can only be imported as "
                                         r"reordered"):
        from_hf_config(to_hf_config(small_cfg(norm_scheme="reordered", qk_norm="full")), norm_scheme="pre_ln")
    with pytest.raises(ValueError, match=r"norm_scheme=ln_free: .* is a real norm's"):
        from_hf_config(to_hf_config(small_cfg()), norm_scheme="ln_free")


def test_save_hf_refuses_a_non_empty_dir(tmp_path):
    """(Publishing an export all-or-nothing, replacing an earlier one, is pretrain/files.py's: tests/pretrain/test_files.py.)"""
    cfg = small_cfg()
    sd = random_model(cfg).state_dict()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_hf(cfg, sd, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    save_hf(cfg, sd, out)  # an empty folder made beforehand is written into
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
