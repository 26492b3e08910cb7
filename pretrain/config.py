"""Experiment configuration: typed dataclasses loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["model.norm_scheme=lns", "train.lr=3e-4"])

Unknown keys, wrong types and bad values raise `UserError` with one line naming the key and the valid
choices. Every field is documented once, in its `doc(...)` help string; `pretrain config --docs` and the
README's reference table are generated from those strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from models.config import PRESETS, ModelConfig, check_choices, doc, literal_choices
from models.norms import NORM_SCHEMES, OPTIONS, REMOVAL_GROUPS, refusal_reason, removal_sites
from pretrain.errors import UserError


@dataclass
class RunConfig:
    dir: str = doc("runs/tiny", "Run folder: config.yaml, metrics.jsonl, layer_stats.jsonl, tb/, checkpoints/.")

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir.strip():
            raise ValueError(f"run.dir: {self.dir!r} is not a folder path; give the run folder, e.g. run.dir=runs/mine")


@dataclass
class ParallelConfig:
    tp: int = doc(1, "Tensor-parallel size (megatron-core layers); must divide heads, kv heads and vocab.")
    pp: int = doc(1, "Pipeline-parallel stages (DeepSpeed PipelineModule); data parallel = world / (tp * pp).")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage: 0-2 without pipeline parallelism, 0-1 with it.")

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError("parallel.tp and parallel.pp must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage: {self.zero_stage} is not one of 0, 1, 2, 3")


@dataclass
class TrainConfig:
    steps: int = doc(300, "Optimizer steps to train for.")
    global_batch_size: int = doc(16, "Sequences per optimizer step, over all data-parallel ranks and micro-steps.")
    micro_batch_size: int = doc(16, "Sequences per forward/backward on one rank; accumulation fills the rest.")
    lr: float = doc(1e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = doc(0.1, "Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int = doc(30, "Linear warm-up steps from 0 to lr.")
    weight_decay: float = doc(0.0, "AdamW weight decay (decoupled).")
    decay_norms_and_embeddings: bool = doc(False, "Also apply weight decay to norm gains and embeddings.")
    betas: list = doc([0.9, 0.95], "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this (0 = off).")
    gpas_gate_clip: float = doc(
        0.0,
        "model.gpas only: clip the joint gradient norm of the GPAS gates g to this, besides train.grad_clip (the GPAS "
        "code's clip_gate_grad: 0.01 at 7B and for Sandwich at 1B, off below); 0 = off.",
    )
    precision: Literal["fp32", "bf16"] = doc(
        "fp32", "fp32, or bf16 (mixed: fp32 master weights, gradients and Adam state; needs parallel.zero_stage >= 1 "
        "or parallel.pp > 1; meant for GPUs, runs on CPU too)."
    )
    seed: int = doc(0, "Seed of the weight init, data order and dropout-free RNG state.")
    resume: str | None = doc(None, "null: fresh run; auto: continue from run.dir/checkpoints/latest if any; or a checkpoint path.")
    init_from: str | None = doc(
        None,
        "Start a fresh run (step 0, new optimizer and schedule) from the model weights of a checkpoint (step, "
        "checkpoints/ or run folder, any TP/PP layout) or a Hugging Face directory (Llama, Qwen3, OLMo 2); model "
        "keys the config does not give come from it.",
    )
    stop_at_step: int | None = doc(
        None, "Save and exit (code 0) once this step is done; the lr schedule still runs to train.steps."
    )
    max_bad_steps: int = doc(5, "Stop after this many consecutive steps with a NaN/inf loss or gradient.")
    compile: bool = doc(False, "torch.compile the model (fast path on GPU).")

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "micro_batch_size", "max_bad_steps"):
            _at_least(self, "train.", name, 1)
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        _number(self, "train.", "lr", low=0.0, low_ok=False)
        _number(self, "train.", "min_lr_ratio", low=0.0, high=1.0)
        _at_least(self, "train.", "warmup_steps", 0)
        _number(self, "train.", "weight_decay", low=0.0)
        _number(self, "train.", "eps", low=0.0, low_ok=False)
        _number(self, "train.", "grad_clip", low=0.0, hint="0 turns clipping off")
        _number(self, "train.", "gpas_gate_clip", low=0.0, hint="0 turns it off")
        if (
            not isinstance(self.betas, list) or len(self.betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"train.betas: expected two numbers in [0, 1), e.g. [0.9, 0.95], got {self.betas}")
        _at_least(self, "train.", "seed", 0)
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(
                f"train.stop_at_step: must be >= 1 (the step to save and exit after), or null to train to "
                f"train.steps; got {self.stop_at_step}"
            )
        for name, what in (("resume", "null, auto or a checkpoint path"), ("init_from", "null or a checkpoint path")):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"train.{name}: empty; give {what}")


@dataclass
class DataConfig:
    paths: list = doc(
        ["bundled:tinyshakespeare"],
        "Prepared data folders (`pretrain data prepare`), or bundled:tinyshakespeare (prepared on first use).",
    )
    weights: list | None = doc(None, "Blending weights, one per path (null = proportional to their sizes).")
    seq_len: int = doc(256, "Tokens per training sample; must be <= model.max_seq_len.")
    cache_dir: str | None = doc(None, "Where bundled corpora are prepared (null: $PRETRAIN_CACHE or ~/.cache/pretrain).")
    sft_packing: bool = doc(
        True,
        "SFT folders (`pretrain data prepare-sft`) only: pack several examples into each data.seq_len row (attention "
        "never crosses an example, positions restart per example); false: one example per row, right-padded.",
    )

    def __post_init__(self):
        if not self.paths:
            raise ValueError("data.paths: give at least one prepared data folder")
        for i, path in enumerate(self.paths, start=1):
            if not isinstance(path, str) or not path.strip():
                raise ValueError(
                    f"data.paths: entry {i} is {path!r}, not a folder path; give prepared data folders, "
                    "e.g. data.paths=[data/mine] or [bundled:tinyshakespeare]"
                )
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ValueError(
                    f"data.weights: {len(self.weights)} weights for {len(self.paths)} paths; give one per path "
                    "or null (proportional to their sizes)"
                )
            for i, w in enumerate(self.weights, start=1):
                if not (_is_number(w) and math.isfinite(w) and w > 0):
                    raise ValueError(
                        f"data.weights: entry {i} is {w!r}; blend weights must be positive finite numbers, one per path"
                    )
        _at_least(self, "data.", "seq_len", 1)


@dataclass
class EvalConfig:
    interval: int = doc(100, "Validation loss and perplexity every N steps and at the end (0 = never).")
    tokens: int = doc(
        1_048_576,
        "Validation token budget, clipped to the val split: its first tokens // data.seq_len samples, the same "
        "ones for every micro-batch, data-parallel size and TP/PP layout.",
    )

    def __post_init__(self):
        _at_least(self, "eval.", "interval", 0, hint="0 = never")
        _at_least(self, "eval.", "tokens", 1)


@dataclass
class CheckpointConfig:
    interval: int = doc(100, "Save every N steps (0 = only at the end).")
    keep: int = doc(3, "Keep the last K checkpoints (0 = keep all).")

    def __post_init__(self):
        _at_least(self, "checkpoint.", "interval", 0, hint="0 = only at the end")
        _at_least(self, "checkpoint.", "keep", 0, hint="0 = keep all")


@dataclass
class LoggingConfig:
    interval: int = doc(10, "Log line and metrics.jsonl entry every N steps.")
    tensorboard: bool = doc(True, "Write TensorBoard event files to run.dir/tb.")
    progress_bar: bool | None = doc(None, "Progress bar: true, false, or null to show it only in an interactive terminal.")

    def __post_init__(self):
        _at_least(self, "logging.", "interval", 1, hint="a log line every N steps")


@dataclass
class DiagnosticsConfig:
    interval: int = doc(
        0,
        "Per-layer residual variance/RMS, branch-to-residual ratios, angular distance and gradient norms every N "
        "steps, to layer_stats.jsonl and TensorBoard (0 = off). See pretrain/diagnostics/.",
    )

    def __post_init__(self):
        if self.interval < 0:
            raise ValueError(f"diagnostics.interval: must be >= 0 (0 = off), got {self.interval}")


# mlp, attn, qk, final: the site groups of models/norms.py REMOVAL_SITES. Every removable scheme has sites in mlp,
# attn and final; qk only with model.qk_norm, so an order written before q/k sites existed (without qk) stays valid
# for the models it was written for (ExperimentConfig checks that every group with sites is named).
REMOVAL_GROUPS_ALWAYS = ("mlp", "attn", "final")


@dataclass
class RemovalConfig:
    order: list = doc(
        ["mlp", "attn", "qk", "final"],
        "Norm removal (model.removable_norms): the order of the site groups, each block by block: mlp (the MLP's "
        "input norms, or its output norms in reordered), attn (the attention's, likewise), qk (the q and k norms "
        "of model.qk_norm), final (the final norm); each once (qk may be left out for a model without q/k norms).",
    )
    start: int = doc(20, "Norm removal: the step at which the first site is switched to its fixed scale.")
    gap: int = doc(2, "Norm removal: steps between two sites' switches (0 = all at once).")
    ema: float = doc(0.9, "Norm removal: momentum of each live site's EMA of its statistic (RMS or std).")

    def __post_init__(self):
        if (not isinstance(self.order, list) or not all(isinstance(g, str) for g in self.order)
                or not set(REMOVAL_GROUPS_ALWAYS) <= set(self.order)
                or not set(self.order) <= set(REMOVAL_GROUPS) or len(set(self.order)) != len(self.order)):
            raise ValueError(
                f"removal.order: {self.order!r} must name each of {', '.join(REMOVAL_GROUPS)} once (qk may be left "
                "out for a model without q/k norms), e.g. [mlp, attn, qk, final]"
            )
        _at_least(self, "removal.", "start", 2, hint="sigma is measured on the steps before the first switch")
        _at_least(self, "removal.", "gap", 0, hint="0 switches every site at once")
        _number(self, "removal.", "ema", low=0.0, high=1.0)
        if self.ema == 1.0:
            raise ValueError("removal.ema: must be below 1 (1 would never move sigma from its first measurement)")

    def switch_steps(self, n_sites: int) -> int:
        """The step of the last switch: start + gap * (sites - 1)."""
        return self.start + self.gap * (n_sites - 1)


@dataclass
class ExperimentConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    removal: RemovalConfig = dataclasses.field(default_factory=RemovalConfig)
    deepspeed: dict = doc({}, "Extra DeepSpeed config keys, merged over the generated DeepSpeed config.")
    # Not a config key: the dotted keys the YAML file or the overrides set (a preset counts as setting its model
    # keys), which model keys a resume or train.init_from may fill in (pretrain/state/sources.py).
    given_keys: frozenset = dataclasses.field(default=frozenset(), repr=False, compare=False,
                                              metadata={"internal": True})

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.eval.interval > 0 and self.eval.tokens < self.data.seq_len:
            raise ValueError(
                f"eval.tokens={self.eval.tokens} is less than one validation sample (data.seq_len={self.data.seq_len} "
                f"tokens); raise eval.tokens to at least {self.data.seq_len} or set eval.interval=0"
            )
        check_deepspeed_section(self.deepspeed)
        if self.train.gpas_gate_clip > 0 and not self.model.gpas:
            raise ValueError(f"train.gpas_gate_clip={self.train.gpas_gate_clip}: the model has no GPAS gates; set "
                             "model.gpas=true or train.gpas_gate_clip=0")
        if NORM_SCHEMES[self.model.norm_scheme].unit_weights and self.train.weight_decay > 0:
            raise ValueError(
                f"train.weight_decay={self.train.weight_decay}: {self.model.norm_scheme} puts its matrices back on the "
                "unit sphere after every step, which undoes any decay (the paper trains with 0); set train.weight_decay=0"
            )
        if self.model.removable_norms:
            sites = removal_sites(self.model, REMOVAL_GROUPS)
            unnamed = sorted({site.group for _, site, _ in sites} - set(self.removal.order))
            if unnamed:
                raise ValueError(f"removal.order: {self.removal.order!r} leaves out {', '.join(unnamed)}, where this "
                                 f"model has norms; name it, e.g. removal.order=[{','.join(REMOVAL_GROUPS)}]")
            last = self.removal.switch_steps(len(sites))
            if last > self.train.steps:
                raise ValueError(
                    f"removal: the schedule switches its last site at step {last} (removal.start + removal.gap * "
                    f"({len(sites)} sites - 1)) but train.steps={self.train.steps}; raise train.steps (remove-norms "
                    "--steps) or lower removal.start/gap"
                )
            if self.eval.interval == 0:
                raise ValueError(
                    "eval.interval=0: a norm-removal run measures its cross-entropy on the validation set; set "
                    "eval.interval > 0"
                )


# DeepSpeed keys the generated config (pretrain/train/engine.py `deepspeed_config`) takes from normlab's own keys:
# giving them in `deepspeed:` would silently override ours (or fight with them), so they are refused.
DEEPSPEED_OWNED = {
    "train_batch_size": "set train.global_batch_size instead",
    "train_micro_batch_size_per_gpu": "set train.micro_batch_size instead",
    "gradient_accumulation_steps": (
        "set train.global_batch_size and train.micro_batch_size instead (accumulation = global / (micro * data parallel))"
    ),
    "gradient_clipping": "set train.grad_clip instead",
    "zero_optimization.stage": "set parallel.zero_stage instead",
    "bf16.enabled": "set train.precision instead",
    "fp16": "set train.precision instead (fp32 or bf16)",
    "amp": "set train.precision instead (fp32 or bf16)",
    "optimizer": "set train.lr, train.betas, train.eps and train.weight_decay instead (normlab builds AdamW itself)",
    "scheduler": "set train.lr, train.warmup_steps and train.min_lr_ratio instead (normlab builds the schedule itself)",
}
# Sections of the generated config that must stay mappings (merged key by key).
DEEPSPEED_SECTIONS = {"zero_optimization": "parallel.zero_stage", "bf16": "train.precision"}


def check_deepspeed_section(ds: dict) -> None:
    """Raise a one-line ValueError for a `deepspeed:` key that normlab's own keys own."""
    for section, owner in DEEPSPEED_SECTIONS.items():
        if section in ds and not isinstance(ds[section], dict):
            raise ValueError(
                f"deepspeed.{section}: expected a mapping of DeepSpeed keys, got {ds[section]!r}; set {owner} instead"
            )
    for dotted, fix in DEEPSPEED_OWNED.items():
        section, _, key = dotted.partition(".")
        if (key and isinstance(ds.get(section), dict) and key in ds[section]) or (not key and section in ds):
            raise ValueError(f"deepspeed.{dotted}: {fix}")
    if "zero_allow_untested_optimizer" in ds and ds["zero_allow_untested_optimizer"] is not True:
        raise ValueError(
            "deepspeed.zero_allow_untested_optimizer: normlab's own AdamW needs it true at ZeRO 1-2; remove the key"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(obj, prefix: str, name: str, low: int, hint: str = "") -> None:
    value = getattr(obj, name)
    if value < low:
        raise ValueError(f"{prefix}{name}: must be >= {low}{f' ({hint})' if hint else ''}, got {value}")


def _number(obj, prefix: str, name: str, low: float, high: float | None = None, low_ok: bool = True,
            hint: str = "") -> None:
    """A finite number in [low, high] (low excluded unless `low_ok`), else a one-line ValueError."""
    value = getattr(obj, name)
    if not math.isfinite(value) or (value < low if low_ok else value <= low) or (high is not None and value > high):
        rule = f"in [{low:g}, {high:g}]" if high is not None else f"{'>=' if low_ok else '>'} {low:g}"
        raise ValueError(f"{prefix}{name}: must be a finite number {rule}{f' ({hint})' if hint else ''}, got {value}")


def sections() -> list[dataclasses.Field]:
    """The config's sections (`deepspeed` included), without the internal `given_keys`."""
    return [f for f in dataclasses.fields(ExperimentConfig) if not f.metadata.get("internal")]


SECTIONS = {f.name: f.type for f in sections()}

# Keys earlier versions had: a user's file naming one gets the fix; a config stored in an old checkpoint loads.
REMOVED_KEYS = {
    "eval.batches": "the validation set is a token budget now: use eval.tokens (the same samples on every layout)",
}


# Keys added later whose new default would change what a config stored before them describes: such a stored
# config (a run's or a checkpoint's) without the key gets the value that keeps its old meaning.
LEGACY_DEFAULTS = {
    "model.ln_free_base_depth": 0,  # ln_free before its depth-muP multipliers: plain x + F(x)
}
# Training settings a scheme's paper fixes, used where the config does not give the key (a given other value is
# trained as given, with a warning): nGPT trains without warm-up (NVIDIA/ngpt train.py, OLMo-core's example).
SCHEME_TRAIN_DEFAULTS = {
    "ngpt": {"train.warmup_steps": 0},
}


def load_config(path: str | None = None, overrides: list[str] = (), stored: bool = False,
                values: dict[str, Any] | None = None) -> ExperimentConfig:
    """The experiment in YAML file `path` (None: all defaults) with `values` ({dotted key: value}, set as they are)
    and then `key.sub=value` overrides (value parsed as YAML) applied.

    `stored`: the file is a config normlab wrote (a run's or a checkpoint's), so keys of earlier versions
    (REMOVED_KEYS) are dropped instead of refused."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (run, model, train, ...)")
    for key, value in (values or {}).items():
        set_key(raw, key, value)
    for item in overrides:
        apply_override(raw, item)
    _drop_removed_keys(raw, refuse=not stored)
    if stored:
        for dotted, value in LEGACY_DEFAULTS.items():
            section, key = dotted.split(".")
            if isinstance(raw.get(section), dict) and key not in raw[section]:
                raw[section][key] = value
    given = {f"{section}.{key}" for section, keys in raw.items() if isinstance(keys, dict) for key in keys}
    if isinstance(raw.get("model"), dict) and raw["model"].get("preset") in PRESETS:
        given |= {f"model.{key}" for key in PRESETS[raw["model"]["preset"]]}
    _scheme_train_defaults(raw, given)
    return dataclasses.replace(from_dict(raw), given_keys=frozenset(given))


def _scheme_train_defaults(raw: dict, given: set[str]) -> None:
    scheme = raw.get("model", {}).get("norm_scheme") if isinstance(raw.get("model"), dict) else None
    for dotted, value in SCHEME_TRAIN_DEFAULTS.get(scheme, {}).items():
        section, key = dotted.split(".")
        if dotted not in given:
            raw.setdefault(section, {})[key] = value
        elif raw[section][key] != value:
            print(f"warning: {dotted}={raw[section][key]} with model.norm_scheme={scheme}, whose paper trains with "
                  f"{dotted}={value}; training as given", file=sys.stderr)


def _drop_removed_keys(raw: dict, refuse: bool) -> None:
    for dotted, fix in REMOVED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            if refuse:
                raise UserError(f"{dotted} was removed: {fix}")
            del raw[section][key]


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b=value` (value parsed as YAML: numbers, booleans, null, lists) in the nested dict `raw`."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} is not of the form section.key=value (e.g. model.norm_scheme=lns)")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    set_key(raw, key, parsed, what=f"override {item!r}")


def set_key(raw: dict, key: str, value: Any, what: str | None = None) -> None:
    """Set dotted `key` to `value` in the nested dict `raw`."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"{what or key}: {part} is not a section")
    node[leaf] = value


def from_dict(raw: dict) -> ExperimentConfig:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise UserError(_unknown_key_message(sorted(unknown)[0], "", SECTIONS))
    try:
        kwargs = {}
        for name, section_type in typing.get_type_hints(ExperimentConfig).items():
            if name not in SECTIONS:
                continue
            value = raw.get(name, {})
            if name == "deepspeed":
                kwargs[name] = _check_type(value, dict, "deepspeed")
                continue
            if not isinstance(value, dict):
                raise UserError(f"{name}: expected a mapping of keys, got {type(value).__name__}")
            if name == "model":
                value = _with_preset(value)
            kwargs[name] = _build(section_type, value, name + ".")
        return ExperimentConfig(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def _with_preset(model: dict) -> dict:
    preset = model.get("preset")
    if preset is None:
        return model
    if preset not in PRESETS:
        raise UserError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **model}


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(_unknown_key_message(key, prefix, fields))
    for key, value in values.items():
        choices = fields[key].metadata.get("choices")  # a key whose valid values are a table's (models/norms.py)
        if choices and value not in choices:
            raise UserError(f"{prefix}{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    kwargs = {key: _check_type(value, hints[key], prefix + key) for key, value in values.items()}
    obj = cls(**kwargs)
    check_choices(obj, prefix)
    return obj


def _check_type(value: Any, tp, key: str) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise a one-line UserError."""
    choices = literal_choices(tp)
    if choices is not None:
        if value not in choices:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, key)
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _unknown_key_message(key: str, prefix: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return f"unknown config key {prefix}{key}; {hint}valid keys: {', '.join(prefix + k for k in valid)}"


def to_dict(cfg: ExperimentConfig) -> dict:
    """{section: {key: value}} (`deepspeed`: its mapping) of every config key."""
    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) if f.name != "deepspeed" else dict(cfg.deepspeed)
            for f in sections()}


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: ExperimentConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)


def composition_reference() -> str:
    """Markdown table: which composable model keys (models/norms.py `OPTIONS`) each norm scheme takes, and why one
    refuses a key where the table says so."""
    keys = list(OPTIONS)
    rows = ["| scheme | " + " | ".join(f"`model.{k}`" for k in keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, scheme in NORM_SCHEMES.items():
        cells = ["yes" if k in scheme.options else f"refused: {refusal_reason(name, k)}" for k in keys]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def config_reference() -> str:
    """Markdown table of every config key, its default and its documentation."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, section_type in typing.get_type_hints(ExperimentConfig).items():
        if section not in SECTIONS:
            continue
        if section == "deepspeed":
            f = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == "deepspeed")
            rows.append(f"| `deepspeed` | `{{}}` | {f.metadata['help']} |")
            continue
        for f in dataclasses.fields(section_type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `{section}.{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {f.metadata['help']} |")
    return "\n".join(rows)
