"""The removal schedule: every norm site of the model in switching order, with the step it is fixed at."""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from models.norms import REMOVAL_SITES
from pretrain.config import RemovalConfig



@dataclass(frozen=True)
class Site:
    name: str  # the norm module's name in the full Llama, e.g. blocks.0.mlp_norm or final_norm
    group: str  # mlp, attn or final
    layer: int | None  # block l (1-based); None for the final norm
    step: int  # the first step that runs with this site fixed


def schedule(model_cfg: ModelConfig, removal: RemovalConfig) -> list[Site]:
    """Every norm site in switching order with its step (see the module docstring)."""
    sites = []
    for group in removal.order:
        module = REMOVAL_SITES[group][0]
        if group == "final":
            sites.append((module, group, None))
        else:
            sites += [(f"blocks.{l - 1}.{module}", group, l) for l in range(1, model_cfg.n_layers + 1)]
    return [Site(name, group, layer, removal.start + k * removal.gap) for k, (name, group, layer) in enumerate(sites)]
