"""Hugging Face interop: our pre_ln / lns models equal transformers' LlamaForCausalLM after export,
HF -> ours -> HF round-trips exactly, and schemes Llama cannot express are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.hf import (  # noqa: E402
    from_hf_config,
    from_hf_state_dict,
    load_hf,
    load_hf_state,
    save_hf,
    to_hf_config,
    to_hf_state_dict,
)
from models.llama import Llama  # noqa: E402
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
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # in [0.5, 1.5)
    return model.eval()


def tokens(seed: int = 0, batch: int = 2, length: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_from_dir(path, attn: str = "eager"):
    model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def max_diff(ours: Llama, hf, x: torch.Tensor) -> float:
    return (ours(x) - hf(input_ids=x).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# ours -> HF


EXPORT_CASES = [
    pytest.param("pre_ln", dict(), "eager", id="pre_ln-gqa"),
    pytest.param("pre_ln", dict(n_kv_heads=4, tie_embeddings=True), "sdpa", id="pre_ln-mha-tied-sdpa"),
    pytest.param("lns", dict(), "eager", id="lns-gqa"),
    pytest.param("lns", dict(tie_embeddings=True), "sdpa", id="lns-gqa-tied-sdpa"),
    pytest.param("lns", dict(n_kv_heads=1, n_layers=3), "eager", id="lns-mqa"),
    pytest.param("lns", dict(norm_gain="zero_centered"), "eager", id="lns-zero_centered"),  # 1 + w folded too
]


@pytest.mark.parametrize("scheme,overrides,attn", EXPORT_CASES)
def test_export_logits_match_transformers(tmp_path, scheme, overrides, attn):
    cfg = small_cfg(norm_scheme=scheme, **overrides)
    ours = random_model(cfg, seed=3)
    out = save_hf(cfg, ours.state_dict(), tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    hf = hf_from_dir(out, attn)
    assert hf.config.num_key_value_heads == cfg.n_kv_heads and hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    x = tokens(seed=1)
    assert max_diff(ours, hf, x) <= TOL
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


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


@pytest.mark.parametrize("n_kv_heads,tied", [(2, False), (4, True), (1, False)])
def test_hf_round_trip(tmp_path, n_kv_heads, tied):
    torch.manual_seed(11)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, initializer_range=0.05,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "src")

    ours = load_hf(tmp_path / "src")
    assert ours.cfg.norm_scheme == "pre_ln" and ours.cfg.tie_embeddings == tied and ours.cfg.n_kv_heads == n_kv_heads
    x = tokens(seed=6)
    assert max_diff(ours.eval(), hf, x) <= TOL

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
    assert back_cfg["model_type"] == "llama" and back_cfg["architectures"] == ["LlamaForCausalLM"]

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


NOT_EXPORTABLE = [name for name, s in NORM_SCHEMES.items() if not s.llama_compatible]


def test_scheme_table_has_refusals():
    assert {"pre_ln", "lns"} <= {name for name, s in NORM_SCHEMES.items() if s.llama_compatible}
    assert NOT_EXPORTABLE


@pytest.mark.parametrize("scheme", NOT_EXPORTABLE)
def test_export_refuses_non_llama_schemes(tmp_path, scheme):
    cfg = small_cfg(norm_scheme=scheme)
    sd = Llama(cfg).state_dict()
    with pytest.raises(ValueError, match=rf"^model\.norm_scheme={scheme} cannot be expressed as a transformers "
                                         r"LlamaForCausalLM .*pre_ln and lns") as err:
        save_hf(cfg, sd, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir()), "a refused export must not leave anything on disk"
    with pytest.raises(ValueError, match="cannot be expressed"):
        to_hf_config(cfg)
    with pytest.raises(ValueError, match="cannot be expressed"):
        to_hf_state_dict(cfg, sd)


@pytest.mark.parametrize("scheme", ["pre_ln", "lns"])
def test_export_refuses_layernorm(tmp_path, scheme):
    cfg = small_cfg(norm_scheme=scheme, norm_type="layernorm")
    with pytest.raises(ValueError, match=r"^model\.norm_type=layernorm cannot be expressed"):
        save_hf(cfg, Llama(cfg).state_dict(), tmp_path / "out")
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


def test_import_refuses_other_model_types_and_schemes():
    with pytest.raises(ValueError, match="model_type='mistral'"):
        from_hf_config({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="norm_scheme=post_ln"):
        from_hf_config(to_hf_config(small_cfg()), norm_scheme="post_ln")


def test_save_hf_refuses_existing_dir_unless_overwrite(tmp_path):
    cfg = small_cfg()
    sd = random_model(cfg).state_dict()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_hf(cfg, sd, out)
    assert (out / "keep.txt").exists()
    save_hf(cfg, sd, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
