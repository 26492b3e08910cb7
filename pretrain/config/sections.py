"""The experiment config's sections: typed dataclasses, one per YAML section, each field documented once in its
`doc(...)` help string (docs/configuration.md's key reference is generated from them, pretrain/config/reference.py),
each section validated where it is built (one-line ValueErrors naming the key)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from dataclasses import dataclass
from typing import Literal

from models.config import ModelConfig, doc
from models.norms import NORM_SCHEMES, REMOVAL_GROUPS
from pretrain.errors import UserError

# logging.backends: name -> the module it imports (None: a dependency of normlab itself)
TRACKING_BACKENDS = {"tensorboard": None, "wandb": "wandb", "trackio": "trackio"}
# eval.downstream: the task names of `pretrain eval-downstream` (pretrain/data/downstream_tasks.py TASKS, which a test
# keeps equal to this; the config cannot import the data layer)
DOWNSTREAM_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "sciq", "boolq", "openbookqa",
                    "social_iqa", "copa", "csqa")


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
    spike_window: int = doc(
        50, "Spike detection: a step's loss or gradient norm is a spike above the running median + "
        "train.spike_threshold x 1.4826 MAD of the last this many steps (events in metrics.jsonl); 0 = off."
    )
    spike_threshold: float = doc(6.0, "Spike detection: how many robust standard deviations (1.4826 MAD) above the "
                                 "running median a value must be to be a spike.")
    on_spike: Literal["log", "skip_batch", "rollback"] = doc(
        "log", "What a spike does: log (an event, nothing more); skip_batch (roll back, skip the spiking steps' "
        "batches); rollback (roll back, skip the batches from the spike to where it was found). Rolling back restores "
        "the train.snapshot_interval snapshot, else the last checkpoint; the skipped batches stay skipped on resume."
    )
    max_rollbacks: int = doc(3, "train.on_spike skip_batch / rollback: the run ends (exit 3) at a spike after this "
                             "many rollbacks.")
    snapshot_interval: int = doc(
        0, "train.on_spike skip_batch / rollback: keep an in-memory snapshot (weights, AdamW, schedule, data position) "
        "every this many steps, a multiple of logging.interval, to roll back to (fp32, parallel.zero_stage=0); 0 = "
        "roll back to the last checkpoint."
    )
    compile: bool = doc(
        False, "torch.compile each transformer block (inductor; GPU, and CPU through its C++ backend): the first two "
        "steps compile, later ones reuse the graphs (metrics.jsonl: compiled_graphs, recompiles); evaluation runs "
        "the blocks eagerly."
    )
    fused_loss: bool = doc(
        True, "The head and the cross-entropy in chunks of tokens (forward and backward), so the fp32 [batch, "
        "sequence, vocab] logits are never held (every layout; equal to the unfused loss up to summation order); on a "
        "GPU with liger-kernel installed, Liger's fused linear cross-entropy where the head is whole (no TP, no logit scale)."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = doc(
        "none", "Recompute activations in backward to save memory: full (keep each block's input only; about one "
        "more forward per step) or selective (keep the matmul outputs, recompute the attention core and SwiGLU's "
        "activation, as Megatron's selective recomputation); the same gradients."
    )

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
        for name in ("spike_window", "max_rollbacks", "snapshot_interval"):
            _at_least(self, "train.", name, 0)
        _number(self, "train.", "spike_threshold", low=0.0, low_ok=False)
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


DOWNSTREAM_EVERY_VALIDATIONS = 10  # eval.downstream_interval's default, in validations: under 5% of a tiny run's time
# for six tasks at the default limit (README, Downstream evaluation)


@dataclass
class EvalConfig:
    interval: int = doc(100, "Validation loss, perplexity and bits per byte every N steps and at the end (0 = never).")
    tokens: int = doc(
        1_048_576,
        "Validation token budget, clipped to the val split: its first tokens // data.seq_len samples, the same "
        "ones for every micro-batch, data-parallel size and TP/PP layout.",
    )

    downstream: list = doc(
        [],
        "Downstream tasks scored in the loop (ranked classification as `pretrain eval-downstream`, lm-eval format, "
        "0-shot), from: " + ", ".join(DOWNSTREAM_TASKS) + "; [] for none. Logged as `down` records "
        "(down_TASK_acc, ..._acc_norm, ..._primary, down_avg_primary) in metrics.jsonl and the trackers.",
    )
    downstream_limit: int = doc(
        100, "Questions per downstream task: a fixed, seeded subset (eval-downstream's --limit), the same at every "
        "evaluation and on every layout.",
    )
    downstream_interval: int = doc(
        0, "Score eval.downstream every N steps and at the end; 0 = at every 10th validation (10 * eval.interval; "
        "at the end only when eval.interval is 0).",
    )

    def __post_init__(self):
        _at_least(self, "eval.", "interval", 0, hint="0 = never")
        _at_least(self, "eval.", "tokens", 1)
        _at_least(self, "eval.", "downstream_limit", 1, hint="questions per task")
        _at_least(self, "eval.", "downstream_interval", 0, hint=f"0 = every {DOWNSTREAM_EVERY_VALIDATIONS}th validation")
        if not isinstance(self.downstream, list):
            raise ValueError(f"eval.downstream: {self.downstream!r} is not a list of task names; e.g. "
                             "eval.downstream=[hellaswag,arc_easy]")
        unknown = [n for n in self.downstream if n not in DOWNSTREAM_TASKS]
        if unknown:
            raise ValueError(f"eval.downstream: unknown task {', '.join(map(str, unknown))}; the tasks are "
                             f"{', '.join(DOWNSTREAM_TASKS)}")
        if len(set(self.downstream)) < len(self.downstream):
            raise ValueError(f"eval.downstream: {self.downstream} names a task twice")

    def downstream_every(self) -> int:
        """The steps between downstream evaluations (0: only at the end)."""
        return self.downstream_interval or DOWNSTREAM_EVERY_VALIDATIONS * self.interval

    def downstream_at(self, step: int, last: int) -> bool:
        """Whether the downstream tasks are scored after step `step` of a run of `last` steps."""
        every = self.downstream_every()
        return bool(self.downstream) and (step == last or (every > 0 and step % every == 0))


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
    backends: list = doc(
        ["tensorboard"],
        "Experiment trackers that get every metrics.jsonl and layer_stats.jsonl number besides those files, on rank "
        "0, their files inside the run folder: tensorboard (run.dir/tb), wandb (run.dir/wandb, offline unless "
        "WANDB_MODE says otherwise), trackio (run.dir/trackio); [] for none. wandb and trackio need the tracking "
        "extra (pip install -e '.[tracking]'). Replaces logging.tensorboard (docs/training.md, Tracking).",
    )
    project: str = doc(
        "normlab", "The W&B and trackio project the run is logged under, as a run named after run.dir's folder."
    )
    progress_bar: bool | None = doc(None, "Progress bar: true, false, or null to show it only in an interactive terminal.")
    host_syncs: bool = doc(
        False, "Count each step's host synchronisations (tensor values read into Python; each stalls a GPU) into "
        "metrics.jsonl: host_syncs (the logged step's), host_syncs_quiet (the most of any step in between) and the "
        "first sites; costs a little time per op, so off unless measuring."
    )

    def __post_init__(self):
        _at_least(self, "logging.", "interval", 1, hint="a log line every N steps")
        for name in self.backends:
            if name not in TRACKING_BACKENDS:
                raise ValueError(f"logging.backends: {name!r} is not one of {', '.join(TRACKING_BACKENDS)}")
        if len(set(self.backends)) < len(self.backends):
            raise ValueError(f"logging.backends: {self.backends} names a backend twice")
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"logging.project: {self.project!r} is not a project name; e.g. logging.project=norms")

    def missing_packages(self) -> list[str]:
        """The backends whose package is not installed (checked without importing it: trackio reads its folder
        from the environment when it is imported, pretrain/train/trackers.py sets that first)."""
        return [name for name in self.backends if TRACKING_BACKENDS[name] and not _installed(TRACKING_BACKENDS[name])]

    def check_installed(self) -> None:
        """A one-line UserError naming the extra to install, before any process starts or the run folder is
        touched (pretrain.state.resume.prepare_run)."""
        missing = self.missing_packages()
        if missing:
            names = " and ".join(missing)
            raise UserError(f"logging.backends: {names} {'is' if len(missing) == 1 else 'are'} not installed; "
                            f"install the tracking extra (pip install -e '.[tracking]' in a checkout) or drop {names} from "
                            "logging.backends")


@dataclass
class DiagnosticsConfig:
    interval: int = doc(
        0,
        "Per-layer residual variance/RMS, branch-to-residual ratios, angular distance and gradient norms every N "
        "steps, to layer_stats.jsonl and the trackers of logging.backends (0 = off). See pretrain/diagnostics/.",
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
    taper_steps: int = doc(
        100,
        "TaperNorm (model.taper_norms): steps of the gate's cosine from 1 to 0, which starts after step "
        "removal.start - 1 (c calibrated there); g = 0 from step removal.start - 1 + taper_steps on.",
    )
    scale_loss: float = doc(
        0.0,
        "TaperNorm: lambda of the paper's fixed-target scale loss lambda * E (s(h) - s_tgt)^2 on the final norm's "
        "input h from the taper start on (s = RMS, std for LayerNorm; s_tgt its EMA until then): the explicit "
        "scale anchor for the tapered final norm (0 = off).",
    )

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
        _at_least(self, "removal.", "taper_steps", 1, hint="the gate needs at least one step to reach 0")
        _number(self, "removal.", "scale_loss", low=0.0)
        if self.ema == 1.0:
            raise ValueError("removal.ema: must be below 1 (1 would never move sigma from its first measurement)")

    def switch_steps(self, n_sites: int) -> int:
        """The step of the last switch: start + gap * (sites - 1)."""
        return self.start + self.gap * (n_sites - 1)

    def taper_end(self) -> int:
        """TaperNorm: the first step with gate 0, start - 1 + taper_steps (pretrain/removal/schedule.py taper_gate)."""
        return self.start - 1 + self.taper_steps


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
        self._check_spike_response()
        if self.train.gpas_gate_clip > 0 and not self.model.gpas:
            raise ValueError(f"train.gpas_gate_clip={self.train.gpas_gate_clip}: the model has no GPAS gates; set "
                             "model.gpas=true or train.gpas_gate_clip=0")
        if NORM_SCHEMES[self.model.norm_scheme].unit_weights and self.train.weight_decay > 0:
            raise ValueError(
                f"train.weight_decay={self.train.weight_decay}: {self.model.norm_scheme} puts its matrices back on the "
                "unit sphere after every step, which undoes any decay (the paper trains with 0); set train.weight_decay=0"
            )
        if self.model.removable_norms:
            # the sites come from the model built on the meta device: torch loads for a removal run's config only
            from models.removal import removal_sites
            sites = removal_sites(self.model, REMOVAL_GROUPS)
            unnamed = sorted({site.group for _, site, _ in sites} - set(self.removal.order))
            if unnamed:
                raise ValueError(f"removal.order: {self.removal.order!r} leaves out {', '.join(unnamed)}, where this "
                                 f"model has norms; name it, e.g. removal.order=[{','.join(REMOVAL_GROUPS)}]")
            if self.removal.scale_loss > 0 and not self.model.taper_norms:
                raise ValueError(f"removal.scale_loss={self.removal.scale_loss}: the scale loss anchors a tapered final "
                                 "norm; set model.taper_norms=true (remove-norms --method taper) or removal.scale_loss=0")
            if self.model.taper_norms:
                if self.removal.taper_end() > self.train.steps:
                    raise ValueError(
                        f"removal: the taper's gate reaches 0 at step {self.removal.taper_end()} (removal.start - 1 + "
                        f"removal.taper_steps) but train.steps={self.train.steps}; raise train.steps (remove-norms "
                        "--steps) or lower removal.start/taper_steps"
                    )
            last = self.removal.switch_steps(len(sites))
            if not self.model.taper_norms and last > self.train.steps:
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


    def _check_spike_response(self) -> None:
        """train.on_spike skip_batch / rollback need detection and a state to return to."""
        t = self.train
        if t.snapshot_interval and t.on_spike == "log":
            raise ValueError(f"train.snapshot_interval={t.snapshot_interval} is for train.on_spike=skip_batch or "
                             "rollback (a state to roll back to); set one of them, or train.snapshot_interval=0")
        if t.on_spike == "log":
            return
        if t.spike_window == 0:
            raise ValueError(f"train.on_spike={t.on_spike} needs spike detection: set train.spike_window > 0")
        if t.snapshot_interval:
            if self.parallel.zero_stage != 0 or t.precision != "fp32":
                raise ValueError(
                    f"train.snapshot_interval={t.snapshot_interval}: in-memory snapshots need fp32 and "
                    f"parallel.zero_stage=0 (ZeRO and bf16 optimizers are DeepSpeed's); set "
                    "train.snapshot_interval=0 to roll back to the last checkpoint")
            if t.snapshot_interval % self.logging.interval:
                raise ValueError(f"train.snapshot_interval={t.snapshot_interval} is not a multiple of "
                                 f"logging.interval={self.logging.interval} (a snapshot is taken where a record has "
                                 "found no spike)")
        elif self.checkpoint.interval == 0:
            raise ValueError(f"train.on_spike={t.on_spike} needs a state to roll back to: set "
                             "train.snapshot_interval (in memory) or checkpoint.interval (the last checkpoint)")


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


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked (None)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def sections() -> list[dataclasses.Field]:
    """The config's sections (`deepspeed` included), without the internal `given_keys`."""
    return [f for f in dataclasses.fields(ExperimentConfig) if not f.metadata.get("internal")]


SECTIONS = {f.name: f.type for f in sections()}
