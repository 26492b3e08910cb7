"""The removal schedule: every norm site of the model in switching order, with the step it is fixed at."""

from __future__ import annotations

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
