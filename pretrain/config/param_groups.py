"""The optimizer's parameter groups the config makes: weight decay or not, and the parametrization's per-group
factors (torch-free: `pretrain coord-check` uses them without loading DeepSpeed).

`grouped` is the one place the groups are made; the engine hands them to AdamW (and so to DeepSpeed's ZeRO and bf16
optimizers, which keep a torch optimizer's groups), `apply_optimizer_settings` re-applies their settings after a
checkpoint is loaded, checkpoints record their names (param_names.json), and `pretrain coord-check` trains with them.
Under model.parametrization=standard there are the two groups normlab always had, decayed matrices then the rest;
under mup or completep each of those splits by the factors of models/parametrization.py's table (learning rate,
weight decay, Adam epsilon), one group per distinct set of factors, in first-seen order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.parametrization import multipliers, param_group
from pretrain.config.sections import ExperimentConfig

if TYPE_CHECKING:
    # annotations only: the groups are read from any module's named_parameters; torch is not needed to make them
    import torch


@dataclass(frozen=True)
class GroupSettings:
    """One optimizer group's factors of train.lr, train.weight_decay (0: not decayed) and train.eps."""

    lr: float
    weight_decay: float
    eps: float

    def values(self, cfg: ExperimentConfig) -> dict:
        t = cfg.train
        # x * 1.0 is x: under `standard` every value is the config's own, bit for bit
        return {"lr": t.lr * self.lr, "weight_decay": t.weight_decay * self.weight_decay, "eps": t.eps * self.eps}


def split_decay(model: torch.nn.Module, cfg: ExperimentConfig) -> tuple[list, list]:
    """(name, parameter) pairs with and without weight decay: matrices only, unless
    train.decay_norms_and_embeddings; norm gains, scalars and the embedding matrix are not decayed (as in
    GPT-NeoX / OLMo)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.ndim >= 2 and "tok_emb" not in name
            (decay if matrix or cfg.train.decay_norms_and_embeddings else no_decay).append((name, p))
    return decay, no_decay


def grouped(model: torch.nn.Module, cfg: ExperimentConfig) -> list[tuple[GroupSettings, list]]:
    """[(settings, [(name, parameter), ...]), ...] in optimizer order: decayed groups first."""
    table = multipliers(cfg.model)
    decay, no_decay = split_decay(model, cfg)
    groups: dict[GroupSettings, list] = {}
    for decays, pairs in ((True, decay), (False, no_decay)):
        for name, p in pairs:
            f = table.groups[param_group(name, p.ndim)]
            settings = GroupSettings(lr=f.lr, weight_decay=f.weight_decay if decays else 0.0, eps=f.eps)
            groups.setdefault(settings, []).append((name, p))
    return list(groups.items())


def param_groups(model: torch.nn.Module, cfg: ExperimentConfig) -> list[dict]:
    """The groups for torch's AdamW (each with its lr, weight decay and eps)."""
    return [{"params": [p for _, p in pairs], **settings.values(cfg)} for settings, pairs in grouped(model, cfg)]


def group_settings(model: torch.nn.Module, cfg: ExperimentConfig) -> list[GroupSettings]:
    return [settings for settings, _ in grouped(model, cfg)]


def optimizer_param_names(model: torch.nn.Module, cfg: ExperimentConfig) -> list[list[str]]:
    """This rank's parameter names in optimizer order (group by group), as `param_groups` builds them: checkpoints
    record them (param_names.json) so that pretrain/state/reshard.py can read a ZeRO-0 optimizer state by name."""
    return [[n for n, _ in pairs] for _, pairs in grouped(model, cfg)]
