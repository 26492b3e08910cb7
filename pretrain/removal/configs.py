"""The configs of a `pretrain remove-norms` run and its control, from the source model and the command line."""

from __future__ import annotations

import os

from models.norms import NORM_SCHEMES
from pretrain.config import ExperimentConfig, load_config
from pretrain.errors import UserError
from pretrain.removal import CONTROL_DIR
from pretrain.state.resume import flatten
from pretrain.state.sources import open_source

# The fine-tune of the recipe (GPT-2 small: lr 6e-4 -> 3e-4 cosine, warm-up 20, weight decay 0.01, clip 1.0).
RECIPE = {"train.min_lr_ratio": 0.5, "train.weight_decay": 0.01, "train.grad_clip": 1.0}
WARMUP_STEPS = 20
LR_FRACTION = 0.5  # of the source's peak learning rate
HF_LR = 3e-4  # a Hugging Face source has no training config
# Taken over from a training checkpoint's config (the fine-tune runs like the source's training did).
INHERITED = ("train.global_batch_size", "train.micro_batch_size", "train.precision", "train.betas", "train.eps",
             "train.seed", "train.max_bad_steps", "train.compile", "data.seq_len", "data.cache_dir", "parallel.tp",
             "parallel.pp", "parallel.zero_stage", "eval.tokens", "checkpoint.interval", "checkpoint.keep",
             "logging.interval", "logging.backends", "logging.project", "logging.progress_bar", "diagnostics.interval",
             "deepspeed")


METHODS = ("fixed", "taper")  # --method: the switch to fixed scales site by site, or TaperNorm's gated taper


def removal_configs(checkpoint: str, data: str, out: str, steps: int, order: list[str], control: bool,
                    overrides: list[str], method: str = "fixed") -> tuple[ExperimentConfig, ExperimentConfig | None]:
    """(the removal run's config, the control's or None); `overrides` are the command line's dotted overrides."""
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if method not in METHODS:
        raise UserError(f"--method {method}: must be one of {', '.join(METHODS)}")
    given_scheme = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.norm_scheme=")), None)
    origin = open_source(checkpoint, "--checkpoint", norm_scheme=given_scheme)  # None: by the HF model_type
    source = origin.model_config
    scheme = given_scheme or source.norm_scheme
    if scheme not in NORM_SCHEMES or not NORM_SCHEMES[scheme].removable:
        removable = " or ".join(name for name, s in NORM_SCHEMES.items() if s.removable)
        raise UserError(f"remove-norms: {checkpoint} is a {scheme} model; norm removal fine-tunes a {removable} model")
    values: dict = {}
    if origin.is_hf:
        lr = HF_LR
    else:
        stored = flatten(origin.run_config)
        values.update({k: stored[k] for k in INHERITED if k in stored})
        lr = stored["train.lr"] * LR_FRACTION
        values["eval.interval"] = stored["eval.interval"] if stored["eval.interval"] > 0 else steps
    values.update(RECIPE)
    values["model.n_layers"] = source.n_layers  # the schedule's length is checked with the config
    values.update({"train.lr": lr, "train.warmup_steps": min(WARMUP_STEPS, steps), "train.steps": steps,
                   "train.init_from": checkpoint, "train.resume": "auto", "data.paths": [data]})
    removal = load_config(None, overrides, values={**values, "run.dir": out, "model.removable_norms": True,
                                                   "model.taper_norms": method == "taper", "removal.order": order})
    if not control:
        return removal, None
    kept = load_config(None, overrides, values={**values, "run.dir": os.path.join(out, CONTROL_DIR)})
    if kept.model.removable_norms or kept.model.taper_norms:
        raise UserError("model.removable_norms/taper_norms: the control keeps its norms; drop the override")
    return removal, kept
