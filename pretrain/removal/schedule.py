"""The removal schedule: every norm site of the model in switching order, with the step it is fixed at."""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.norms import RemovalSite
from models.removal import removal_sites
from pretrain.config import RemovalConfig


@dataclass(frozen=True)
class Site:
    name: str  # the norm module's name in the full Llama, e.g. blocks.0.mlp_norm, blocks.0.attn.q_norm, final_norm
    group: str  # mlp, attn, qk or final
    layer: int | None  # block l (1-based); None for the final norm
    step: int  # the first step that runs with this site fixed
    kind: RemovalSite  # where it sits and how it folds (models/norms.py REMOVAL_SITES)


def schedule(model_cfg: ModelConfig, removal: RemovalConfig) -> list[Site]:
    """Every norm site in switching order with its step (see the package docstring)."""
    return [Site(name, kind.group, layer, removal.start + k * removal.gap, kind)
            for k, (name, kind, layer) in enumerate(removal_sites(model_cfg, removal.order))]


def taper_gate(removal: RemovalConfig, step: int) -> float:
    """TaperNorm's global gate at training step `step` (model.taper_norms), the paper's cosine schedule

        g(k) = 1 for k <= k_w;  1/2 (1 + cos(pi (k - k_w) / (k_t - k_w))) for k_w < k <= k_t;  0 for k > k_t

    with k_w = removal.start - 1 (the last step with the plain norms; the calibration of c follows it) and
    k_t = k_w + removal.taper_steps, the first step with g = 0 (every site fixed: the model the fold reads)."""
    k_w = removal.start - 1
    if step <= k_w:
        return 1.0
    if step >= removal.taper_end():
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - k_w) / removal.taper_steps))

