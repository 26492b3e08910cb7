"""Folding fixed norm sites into the weights that read them: the ln_free model of a finished removal run."""

from __future__ import annotations

import dataclasses

import torch

from models import Llama
from models.config import ModelConfig
from models.norm_layers import TAPER_GAIN, RemovableNorm
from models.norms import REMOVAL_GROUPS
from pretrain.config import RemovalConfig
from pretrain.errors import UserError
from pretrain.removal.schedule import schedule


def site_scales(model_cfg: ModelConfig) -> dict[str, tuple[float, float, bool]]:
    """{site name: (the norm's gain offset, its fixed output_scale, whether it centres)}: its gain is
    (weight + offset) * output_scale (offset 1 with model.norm_gain=zero_centered; output_scale 1/sqrt(l) for lns
    blocks); centred for LayerNorm."""
    model = Llama.meta(model_cfg)
    return {name: (float(m.gain_offset), float(m.output_scale), bool(m.centred))
            for name, m in model.named_modules() if isinstance(m, RemovableNorm)}


def sigma_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{site name: the shape of its sigma}: (1,), or (heads,) for a per-head q/k norm; the same on every rank."""
    model = Llama.meta(model_cfg)
    return {name: tuple(m.sigma.shape) for name, m in model.named_modules() if isinstance(m, RemovableNorm)}


def ln_free_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config of the folded result: ln_free, plain x + F(x) (no depth-muP multipliers: they are for
    training from scratch), untied (the head carries the final norm's scale), no gains (a zero-centred 1 + w is
    folded like any gain)."""
    return dataclasses.replace(model_cfg, norm_scheme="ln_free", removable_norms=False, taper_norms=False,
                               tie_embeddings=False,
                               ln_free_base_depth=0, norm_gain="one", qk_norm="none")


@torch.no_grad()
def fold_norms(model_cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ln_free model config, its weights) from the full (TP = 1) weights of a removal model whose sites are all
    fixed. Computed in float64, returned in the dtype of the weights.

    A fixed site computes c * (x / sigma) * g, c the centring of LayerNorm (identity for RMSNorm), g its gain: a
    constant linear map. An input norm (`columns`) folds into the input columns of the weights that read it
    (W c diag(g / sigma)); a norm on a projection's output -- q/k norms before RoPE, post-sublayer norms after the
    output projection -- folds into that projection's output rows (diag(g / sigma) c W). Either way the folded model
    computes the same function; RoPE then acts on the same q and k as before."""
    out = dict(weights)
    scales = site_scales(model_cfg)
    for site in schedule(model_cfg, RemovalConfig(order=list(REMOVAL_GROUPS))):
        fixed = out.pop(f"{site.name}.fixed")
        sigma = out.pop(f"{site.name}.sigma").double()
        gamma = out.pop(f"{site.name}.weight").double()
        if not bool(fixed.reshape(-1)[0]) or not bool((sigma > 0).all()):
            raise UserError(f"cannot fold {site.name}: it was never switched to its fixed scale (the removal run did "
                            "not reach the end of its schedule)")
        offset, output_scale, centred = scales[site.name]
        taper = out.pop(f"{site.name}.{TAPER_GAIN}", None)
        if taper is not None:  # a TaperNorm at g = 0: its scaling branch's own gain gamma~ (no offset), c = 1 / sigma
            gamma, offset = taper.double(), 0.0
            out.pop(f"{site.name}.gate")
            out.pop(f"{site.name}.calibration")
        # [sigmas, normalized width]: one row per sigma (one per head for a per-head q/k norm), the gain along it
        scale = (gamma + offset).reshape(1, -1) * output_scale / sigma.reshape(-1, 1)
        prefix = "" if site.layer is None else site.name[:-len(site.kind.module)]
        for consumer in site.kind.weights:
            key = prefix + consumer
            if key == "head.weight" and model_cfg.tie_embeddings:
                source = out["tok_emb.weight"]  # untie: the input embedding keeps its weights
            else:
                source = out[key]
            w = source.double()
            if site.kind.fold == "columns":
                w = w * scale.reshape(-1)
                if centred:  # fixed LayerNorm centres first: W (diag(scale) (I - 11^T / D)) = W' - rowmean(W')
                    w = w - w.mean(dim=1, keepdim=True)
            else:
                w = _fold_rows(model_cfg, site.kind.fold, w, scale, centred)
            out[key] = w.to(source.dtype)
    return ln_free_model_config(model_cfg), out


def _fold_rows(cfg: ModelConfig, fold: str, w: torch.Tensor, scale: torch.Tensor, centred: bool) -> torch.Tensor:
    """diag(scale) (centring) applied to the rows of `w` that produce the norm's input: all of them, or the q (k)
    rows of the fused qkv weight. `scale` is [vectors, width]: the norm normalizes each `width` rows together."""
    K, Q, E = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    rows = {"rows": lambda v: v, "q_rows": lambda v: v.view(K, Q + 2, E, -1)[:, :Q],
            "k_rows": lambda v: v.view(K, Q + 2, E, -1)[:, Q]}[fold]
    w = w.clone()
    part = rows(w)  # a view into w, rows in the order the norm sees them (q: head h = kv * Q + i)
    vectors, width = scale.shape
    r = part.reshape(-1, width, w.shape[-1]) if vectors > 1 else part.reshape(1, -1, w.shape[-1])
    if centred:  # (I - 11^T / width) on each normalized vector's rows
        r = r - r.mean(dim=1, keepdim=True)
    part.copy_((r * scale.reshape(r.shape[0], -1, 1)).reshape(part.shape))
    return w
