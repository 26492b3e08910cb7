"""What a resume may change: every config key is free, takes effect, or is part of the experiment's identity.

    free            applied as given (how long, how often to log / evaluate / save, where to write)
    takes effect    applied for real from the next step: optimizer hyper-parameters and the lr schedule are
                    rebuilt from the config, the data position comes from the consumed samples stored in the
                    checkpoint, and a new layout (tp, pp, data-parallel size, zero_stage, precision) reshards
                    weights and optimizer state (pretrain/state/reshard.py)
    identity        refused: a run that changed these would be another experiment; keep the old value, or start
                    a new run from these weights with train.init_from

`plan_resume` compares the resolved config with the checkpoint's and returns one log line per changed key
(`resume: train.lr 0.002 -> 0.0001`), or raises one `UserError` naming every identity change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pretrain.config import ExperimentConfig, to_dict
from pretrain.errors import UserError
from pretrain.runs import read_stored_config
from pretrain.state import checkpoint
from pretrain.state.sources import resolve_model

FREE, TAKES_EFFECT, IDENTITY = "free", "takes effect", "identity"

# Exact keys first, then whole sections; every key of the config falls under one (tests/pretrain/state/test_resume_config.py).
CLASSES: dict[str, str] = {
    "run.dir": FREE,
    "model": IDENTITY,
    "parallel": TAKES_EFFECT,
    "train.steps": FREE,
    "train.stop_at_step": FREE,
    "train.resume": FREE,
    "train.max_bad_steps": FREE,
    "train.spike_window": FREE,  # spike detection starts afresh at every start anyway
    "train.spike_threshold": FREE,
    "train.on_spike": FREE,  # the batches skipped so far stay skipped (the trainer state's skipped_batches)
    "train.max_rollbacks": FREE,
    "train.snapshot_interval": FREE,
    "train.compile": FREE,
    "train.fused_loss": FREE,
    "train.activation_checkpointing": FREE,
    "train.global_batch_size": TAKES_EFFECT,
    "train.micro_batch_size": TAKES_EFFECT,
    "train.lr": TAKES_EFFECT,
    "train.min_lr_ratio": TAKES_EFFECT,
    "train.warmup_steps": TAKES_EFFECT,
    "train.weight_decay": TAKES_EFFECT,
    "train.decay_norms_and_embeddings": TAKES_EFFECT,
    "train.betas": TAKES_EFFECT,
    "train.eps": TAKES_EFFECT,
    "train.grad_clip": TAKES_EFFECT,
    "train.gpas_gate_clip": TAKES_EFFECT,
    "train.precision": TAKES_EFFECT,
    "train.seed": IDENTITY,
    "train.init_from": IDENTITY,
    "data.paths": IDENTITY,
    "data.weights": IDENTITY,
    "data.seq_len": IDENTITY,
    "data.sft_packing": IDENTITY,
    "data.cache_dir": FREE,
    "eval": FREE,
    "checkpoint": FREE,
    "logging": FREE,
    "diagnostics": FREE,
    "removal": IDENTITY,
    "deepspeed": TAKES_EFFECT,
}

# What makes DeepSpeed's own checkpoint files unusable: a change here reshards through pretrain/state/reshard.py.
LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage", "precision")


def key_class(key: str) -> str:
    if key in CLASSES:
        return CLASSES[key]
    section = key.split(".")[0]
    if section in CLASSES:
        return CLASSES[section]
    raise KeyError(f"config key {key} has no resume class in pretrain/state/resume.py")


def flatten(cfg: ExperimentConfig) -> dict:
    """Dotted key -> value (the `deepspeed:` section as one value)."""
    out = {}
    for section, values in to_dict(cfg).items():
        if section == "deepspeed":
            out[section] = values
        else:
            out.update({f"{section}.{k}": v for k, v in values.items()})
    return out


@dataclass
class ResumePlan:
    changes: list[tuple[str, object, object, str]]  # (key, old, new, class)
    old_layout: dict
    new_layout: dict

    @property
    def same_layout(self) -> bool:
        """DeepSpeed can load its own files: same layout, same optimizer param groups, same extra DS keys."""
        changed = {k for k, *_ in self.changes}
        return (all(self.old_layout[k] == self.new_layout[k] for k in LAYOUT_KEYS)
                and not changed & {"train.decay_norms_and_embeddings", "deepspeed"})

    def log_lines(self) -> list[str]:
        lines = [f"resume: {k} {_show(old)} -> {_show(new)}" for k, old, new, _ in self.changes]
        for k in LAYOUT_KEYS:
            if k == "dp" and self.old_layout[k] != self.new_layout[k]:
                lines.append(f"resume: data-parallel size {self.old_layout[k]} -> {self.new_layout[k]} "
                             f"(world size {self.old_layout['world_size']} -> {self.new_layout['world_size']})")
        if not self.same_layout:
            lines.append("resume: another layout: weights, Adam moments and schedule are resharded from the full state")
        return lines


def plan_resume(old: ExperimentConfig, new: ExperimentConfig, old_state: dict, old_layout: dict, new_layout: dict,
                data_fingerprint: str | None) -> ResumePlan:
    """Compare the checkpoint's config with this run's; raise one UserError naming every identity change."""
    a, b = flatten(old), flatten(new)
    changes = [(k, a.get(k), b[k], key_class(k)) for k in b if a.get(k) != b[k]]
    saved_fingerprint = old_state.get("data_fingerprint")
    refused = [c for c in changes if c[3] == IDENTITY]
    if saved_fingerprint is not None and data_fingerprint is None:
        # Not opened yet (the check before any process starts): moved paths are judged once the data is open.
        refused = [c for c in refused if c[0] != "data.paths"]
    elif saved_fingerprint is not None:
        same_data = saved_fingerprint == data_fingerprint
        # Moved data (another cluster, another mount point) is the same experiment when the tokens are the same.
        refused = [c for c in refused if not (c[0] == "data.paths" and same_data)]
        if not same_data and not any(c[0] in ("data.paths", "data.weights", "data.seq_len") for c in refused):
            refused.append(("data (tokenizer or tokens of data.paths)", saved_fingerprint, data_fingerprint, IDENTITY))
    if refused:
        what = ", ".join(f"{k} {_show(o)} -> {_show(n)}" for k, o, n, _ in refused)
        raise UserError(
            f"resume: the checkpoint belongs to another experiment ({what}); keep the checkpoint's values, or start a "
            "new run from its weights with train.init_from=<checkpoint> and another run.dir"
        )
    return ResumePlan(changes, old_layout, new_layout)


@dataclass
class RunStart:
    """Where a run starts, resolved once per process before anything is built: the config with the model keys it
    does not give filled in (from the resumed checkpoint or train.init_from), and the checkpoint it continues."""

    cfg: ExperimentConfig
    folder: str | None = None  # the checkpoint resumed, None for a fresh start
    saved: dict = field(default_factory=lambda: {"step": 0, "consumed_samples": 0})  # its trainer_state.json
    old_cfg: ExperimentConfig | None = None
    old_layout: dict | None = None

    def plan(self, new_layout: dict, data_fingerprint: str) -> ResumePlan | None:
        """The resume plan once the data is open (moved data.paths are judged by the data's fingerprint)."""
        if self.folder is None:
            return None
        return plan_resume(self.old_cfg, self.cfg, self.saved, self.old_layout, new_layout, data_fingerprint)


def prepare_run(cfg: ExperimentConfig) -> RunStart:
    """Everything about the start that can be checked before any process starts: the resume target, the model keys
    taken from it or from train.init_from, the config changes a resume refuses and the tracking packages
    logging.backends needs (one-line UserErrors)."""
    cfg.logging.check_installed()
    check_resume_target(cfg)
    folder = checkpoint.resolve_resume(cfg.train.resume, os.path.join(cfg.run.dir, "checkpoints"))
    old = read_stored_config(folder) if folder is not None else None
    cfg = resolve_model(cfg, old)
    if folder is None:
        return RunStart(cfg)
    saved = checkpoint.read_state(folder)
    layout = checkpoint.read_layout(folder, old)
    plan_resume(old, cfg, saved, layout, layout, data_fingerprint=None)
    return RunStart(cfg, folder, saved, old, layout)


def check_resume_target(cfg: ExperimentConfig) -> None:
    """Fail before any process starts when train.resume names a checkpoint that cannot be used."""
    if cfg.train.resume not in (None, "auto"):
        checkpoint.check_checkpoint(cfg.train.resume)
    if cfg.train.resume is None and os.path.isfile(os.path.join(cfg.run.dir, "checkpoints", "latest")):
        raise UserError(
            f"{cfg.run.dir} already holds checkpoints; pass train.resume=auto to continue it or choose another run.dir"
        )


def _show(value) -> str:
    return "null" if value is None else str(value)


def resume_table() -> str:
    """Markdown table of the resume classes (docs/training.md, generated; tests check it is current)."""
    keys = list(flatten(ExperimentConfig()))
    rows = ["| class | keys | on resume |", "| --- | --- | --- |"]
    meaning = {
        FREE: "applied as given",
        TAKES_EFFECT: "applied from the next step, one `resume: key old -> new` log line each (optimizer and "
                      "schedule rebuilt, data position from the consumed samples, another layout resharded); "
                      "the world size is in this class too",
        IDENTITY: "refused with one line naming each change and the fix (keep the old value, or "
                  "`train.init_from`); `data.paths` may move when the data's fingerprint (tokenizer and tokens) "
                  "is the same",
    }
    for cls in (FREE, TAKES_EFFECT, IDENTITY):
        members = [k for k in keys if key_class(k) == cls]
        sections = {k.split(".")[0] for k in members}
        shown = []
        for k in members:
            section = k.split(".")[0]
            whole = section in CLASSES and all(key_class(x) == cls for x in keys if x.split(".")[0] == section)
            if whole and section in sections and section != k:
                shown.append(f"`{section}.*`")
                sections.discard(section)
            elif not whole or section == k:
                shown.append(f"`{k}`")
        rows.append(f"| {cls} | {', '.join(shown)} | {meaning[cls]} |")
    return "\n".join(rows)


