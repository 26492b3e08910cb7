"""The norm-removal sites of a model: every `RemovableNorm` the built model holds, named as in its state dict and
ordered as `pretrain remove-norms` switches them (the kinds of site: `REMOVAL_SITES` in models/norms.py)."""

from __future__ import annotations

from models.config import ModelConfig
from models.llama import Llama
from models.norm_layers import RemovableNorm
from models.norms import REMOVAL_SITES, RemovalSite


def removal_sites(cfg: ModelConfig, order) -> list[tuple[str, RemovalSite, int | None]]:
    """(full module name, kind, block l in 1..L or None) of every removable norm of the model, in switching order:
    the groups of `order`, each block by block (a group without sites in this model contributes none)."""
    present = {name for name, module in Llama.meta(cfg).named_modules() if isinstance(module, RemovableNorm)}
    sites = []
    for group in order:
        kinds = [site for site in REMOVAL_SITES.values() if site.group == group]
        sites += [(site.module, site, None) for site in kinds if site.top and site.module in present]
        for l in range(1, cfg.n_layers + 1):
            names = [(f"blocks.{l - 1}.{site.module}", site) for site in kinds if not site.top]
            sites += [(name, site, l) for name, site in names if name in present]
    return sites
