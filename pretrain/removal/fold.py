"""Folding fixed norm sites into the weights that read them: the ln_free model of a finished removal run."""

from __future__ import annotations

import dataclasses

import torch

from models import Llama
from models.config import ModelConfig
from models.norms import REMOVAL_SITES, _Removable
from pretrain.config import RemovalConfig
from pretrain.errors import UserError
from pretrain.removal.schedule import schedule


def site_scales(model_cfg: ModelConfig) -> dict[str, tuple[float, float]]:
    """{site name: (the norm's gain offset, its fixed output_scale)}: its gain is (weight + offset) * output_scale
    (offset 1 with model.norm_gain=zero_centered; output_scale 1/sqrt(l) for lns blocks)."""
    with torch.device("meta"):
        model = Llama(model_cfg)
    return {name: (float(m.gain_offset), float(m.output_scale))
            for name, m in model.named_modules() if isinstance(m, _Removable)}


def ln_free_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config of the folded result: ln_free, plain x + F(x) (no depth-muP multipliers: they are for
    training from scratch), untied (the head carries the final norm's scale), no gains (a zero-centred 1 + w is
    folded like any gain)."""
    return dataclasses.replace(model_cfg, norm_scheme="ln_free", removable_norms=False, tie_embeddings=False,
                               ln_free_base_depth=0, norm_gain="one")


@torch.no_grad()
def fold_norms(model_cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ln_free model config, its weights) from the weights of a removal model whose sites are all fixed.

    `weights` are full (TP = 1) tensors, or one tensor-parallel rank's shards: every fold multiplies input
    columns (dim 1), which tensor parallelism never splits for these weights. Computed in float64, returned in
    the dtype of the weights."""
    out = dict(weights)
    scales = site_scales(model_cfg)
    centred = model_cfg.norm_type == "layernorm"
    for site in schedule(model_cfg, RemovalConfig()):
        fixed = out.pop(f"{site.name}.fixed")
        sigma = out.pop(f"{site.name}.sigma").double()
        gamma = out.pop(f"{site.name}.weight").double()
        if not bool(fixed.reshape(-1)[0]) or not float(sigma.reshape(-1)[0]) > 0:
            raise UserError(f"cannot fold {site.name}: it was never switched to its fixed scale (the removal run did "
                            "not reach the end of its schedule)")
        offset, output_scale = scales[site.name]
        scale = (gamma + offset) * output_scale / sigma  # [D]
        prefix = site.name.rsplit(".", 1)[0] + "." if site.layer is not None else ""
        for consumer in REMOVAL_SITES[site.group][1]:
            key = prefix + consumer
            if key == "head.weight" and model_cfg.tie_embeddings:
                source = out["tok_emb.weight"]  # untie: the input embedding keeps its weights
            else:
                source = out[key]
            w = source.double() * scale
            if centred:  # fixed LayerNorm centres first: W (diag(scale) (I - 11^T / D)) = W' - rowmean(W')
                w = w - w.mean(dim=1, keepdim=True)
            out[key] = w.to(source.dtype)
    return ln_free_model_config(model_cfg), out
