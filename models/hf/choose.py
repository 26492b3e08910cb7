"""Which stock transformers class a model exports to, or why none can hold it: each scheme's entry
(models/norms.py `hf_exports`, `no_hf_class`) and `KEY_REFUSALS` are behind both the export's refusals and the
per-scheme table of docs/interop.md (`export_reference`, kept current by
tests/pretrain/cli/test_hf_stock_classes.py)."""

from __future__ import annotations

import math

from torch import nn

from models.config import ModelConfig
from models.hf.gemma4 import GEMMA4
from models.hf.llama import LLAMA
from models.hf.olmo2 import OLMO2
from models.hf.qwen3 import QWEN3
from models.hf.target import Target
from models.llama import Llama
from models.norm_layers import LayerScalar, RMSNorm, Scale, ScalelessRMSNorm
from models.norms import ATTN_POST, MLP_POST, NORM_SCHEMES, SLOTS
from models.parallel import HeadNorm, WidthNorm
from models.parts import Residual, Ungated

TARGETS = {t.model_type: t for t in (LLAMA, QWEN3, OLMO2, GEMMA4)}

# (scheme, model.qk_norm) -> the class it exports to and what the export does on the way: read from each scheme's
# entry (models/norms.py NormScheme.hf_exports), where the reason a scheme has no stock class lives too.
EXPORTS: dict[tuple[str, str], tuple[Target, str]] = {
    (name, qk): (TARGETS[export.model_type], export.how)
    for name, scheme in NORM_SCHEMES.items() for qk, export in scheme.hf_exports.items()
}


def import_schemes(target: Target) -> tuple[str, ...]:
    """Our schemes an import of `target`'s class may give: those that export to it (the first, in the table's order,
    is the default)."""
    return tuple(dict.fromkeys(scheme for (scheme, _), (t, _) in EXPORTS.items() if t is target))


# Model keys off their default that no stock class expresses, whatever the scheme: key -> (value to show, why).
KEY_REFUSALS: dict[str, tuple[str, str]] = {
    "norm_type": ("layernorm", "the stock classes use RMSNorm"),
    "attn_gate": ("headwise/elementwise", "Llama, Qwen3, OLMo 2 and Gemma 4 have no attention output gate"),
    "gpas": ("true", "no stock class scales the residual stream's activations"),
    "removable_norms": ("true", "a model in norm removal holds its σ state; export the ln_free checkpoint "
                                "`pretrain remove-norms` writes at the end"),
    # transformers 5.25 models/deepseek_v4: DeepseekV4Config has no dense MLP (mlp_layer_types: hash_moe, moe),
    # always a sliding window (every layer type's attention has one), low-rank q (q_lora_rank), per-head sinks,
    # partial RoPE and a grouped low-rank output projection (o_groups, o_lora_rank).
    "residual": ("mhc/hc/hc_static/attn_res/siamese",
                 "no stock class has residual streams around Llama's attention and MLP: DeepSeek-V4, the one with "
                 "mHC, always routes its MLP through experts and windows, compresses and sinks its attention; "
                 "hyper-connections, Attention Residuals and SiameseNorm have none"),
    "qk_norm_scale": ("learned/none", "Qwen3's q/k norms have gains at attention scale 1/√head_dim; Gemma 4's "
                                      "(attention scale 1) come with its whole block: model.norm_scheme=gemma4"),
    "v_norm": ("true", "only Gemma 4 normalizes v, with its whole block: model.norm_scheme=gemma4"),
    "layer_scalar": ("true", "only Gemma 4 scales a layer's output, with its whole block: model.norm_scheme=gemma4"),
}
_KEY_DEFAULTS = {"norm_type": "rmsnorm", "attn_gate": "none", "gpas": False, "removable_norms": False,
                 "residual": "single", "qk_norm_scale": None, "v_norm": False, "layer_scalar": False}


class NotExportable(ValueError):
    """A model no stock class computes; the message is one line that says why and what exports."""


def _exportable() -> str:
    by_class: dict[str, list[str]] = {}
    for (scheme, qk), (target, _) in EXPORTS.items():
        by_class.setdefault(target.architecture, []).append(scheme + ("" if qk == "none" else f"+qk_norm={qk}"))
    return "; ".join(f"{cls}: {', '.join(v)}" for cls, v in by_class.items())


def refusal(what: str, why: str) -> NotExportable:
    return NotExportable(f"{what} cannot be exported to a stock transformers class ({why}); exportable: "
                         f"{_exportable()}")


def export_target(cfg: ModelConfig) -> tuple[Target, str]:
    """The stock class `cfg` exports to and what the export does, or a one-line `NotExportable` saying why not."""
    for key, (_, why) in KEY_REFUSALS.items():
        value = getattr(cfg, key)
        if key == "norm_type" and NORM_SCHEMES[cfg.norm_scheme].norm_free:
            continue  # a norm-free model builds no norm of that type
        if value != _KEY_DEFAULTS[key]:
            raise refusal(f"model.{key}={str(value).lower() if isinstance(value, bool) else value}", why)
    found = EXPORTS.get((cfg.norm_scheme, cfg.qk_norm))
    if found is not None:
        return found
    what = f"model.norm_scheme={cfg.norm_scheme}"
    what += "" if cfg.qk_norm == "none" else f" with model.qk_norm={cfg.qk_norm}"
    raise refusal(what, NORM_SCHEMES[cfg.norm_scheme].why_no_hf_class(cfg.qk_norm))


def check_structure(cfg: ModelConfig, target: Target, model: Llama | None = None) -> None:
    """The table says "exports"; check the built structure too, so that a scheme changed in models/norms.py without
    this table is refused instead of silently exported as a different function."""
    model = Llama.meta(cfg) if model is None else model
    linear = NORM_SCHEMES[cfg.norm_scheme].norm_free
    what = f"model.norm_scheme={cfg.norm_scheme}"

    def bad(where: str, module: nn.Module) -> NotExportable:
        return refusal(what, f"{where} is a {type(module).__name__}, which {target.architecture} does not hold there")

    qk_type = {"none": nn.Identity, "head": HeadNorm, "full": WidthNorm}[target.qk_norm]
    for l, block in enumerate(model.blocks, start=1):
        for slot in SLOTS:
            module = getattr(block, slot)
            if linear:  # every slot a fixed multiplier, folded into the next or previous matrix; none after an add
                ok = type(module) is nn.Identity or (type(module) is Scale and slot not in (ATTN_POST, MLP_POST))
            else:
                ok = type(module) is (RMSNorm if slot in target.block_norms else nn.Identity)
            if not ok:
                raise bad(f"block {l}'s {slot}", module)
        v_type = ScalelessRMSNorm if target.v_norm else nn.Identity
        for slot, expected in (("q_norm", qk_type), ("k_norm", qk_type), ("v_norm", v_type),
                               ("q_scale", nn.Identity), ("k_scale", nn.Identity), ("out_gate", Ungated)):
            if type(getattr(block.attn, slot)) is not expected:
                raise bad(f"block {l}'s attention {slot}", getattr(block.attn, slot))
        for slot in ("gate_scale", "up_scale"):
            if type(getattr(block.mlp, slot)) is not nn.Identity:
                raise bad(f"block {l}'s MLP {slot}", getattr(block.mlp, slot))
        if type(block.residual) is not Residual or block.residual_alpha != 1.0 or block.residual.branch_scale != 1.0:
            raise refusal(what, f"block {l}'s residual update is not x + F")
        if block.attn.softmax_scale != target.softmax_scale:
            want = "1/√head_dim" if target.softmax_scale is None else target.softmax_scale
            raise refusal(what, f"block {l}'s softmax scale is not {want}, as in {target.architecture}")
        for module in (block.attn.v_norm, block.attn.q_norm, block.attn.k_norm):
            if isinstance(module, ScalelessRMSNorm) and (module.eps != cfg.norm_eps or module.factor != 1.0):
                raise bad(f"block {l}'s attention norm", module)
        if type(block.layer_scalar) is not (LayerScalar if target.layer_scalar else nn.Identity):
            raise bad(f"block {l}'s layer_scalar", block.layer_scalar)
    final_ok = type(model.final_norm) is (nn.Identity if linear else RMSNorm)
    if not final_ok:
        raise bad("the final norm", model.final_norm)
    emb_ok = (type(model.emb_out) is Scale and model.emb_out.scale == math.sqrt(cfg.d_model) if target.embedding_scale
              else type(model.emb_out) is nn.Identity)
    if not emb_ok:
        raise bad("emb_out", model.emb_out)
    if type(model.logit_scale) is not nn.Identity:
        raise bad("logit_scale", model.logit_scale)
    for name in ("streams_in", "streams_out"):
        if type(getattr(model, name)) is not nn.Identity:
            raise bad(name, getattr(model, name))


def export_reference() -> str:
    """The per-scheme export table of docs/interop.md (markdown), from the scheme entries and `KEY_REFUSALS`."""
    rows = ["| scheme | `model.qk_norm` | exports as | how, or why not |", "| --- | --- | --- | --- |"]
    for scheme, entry in NORM_SCHEMES.items():
        variants = ("none", "head", "full") if "qk_norm" in entry.options else ("none",)
        results = []
        for qk in variants:
            found = EXPORTS.get((scheme, qk))
            if found is not None:
                results.append((qk, f"`{found[0].architecture}`", found[1]))
            else:
                results.append((qk, "refused", entry.why_no_hf_class(qk)))
        if len({(r[1], r[2]) for r in results}) == 1:  # one answer whatever qk_norm: one row
            results = [("any" if len(variants) > 1 else "none", results[0][1], results[0][2])]
        rows += [f"| `{scheme}` | {qk} | {cls} | {how} |" for qk, cls, how in results]
    rows.append("| any, `model.norm_gain=zero_centered` | | as the scheme | gains folded as 1 + w |")
    for key, (value, why) in KEY_REFUSALS.items():
        rows.append(f"| any, `model.{key}={value}` | | refused | {why} |")
    return "\n".join(rows)
