"""`pretrain remove-norms`: fine-tune a trained pre_ln or lns model while its norms are switched, one site at a
time, to fixed scales, then fold them into the weights: an ordinary `ln_free` checkpoint.

The recipe is the one of "Transformers Don't Need LayerNorm at Inference Time" (submarat/removing-layer-norm)
carried over to RMSNorm (see README "Removing norms"):

  * A site is one norm: block l's MLP-input norm (group `mlp`), its attention-input norm (`attn`), the final
    norm (`final`). While live it is the ordinary norm and keeps sigma, an EMA (momentum `removal.ema`) of the
    statistic it divides by, RMS(x) per token (std for LayerNorm), averaged over the data-parallel ranks' tokens
    of each step, position 0 left out. Switched, it computes x / sigma * gamma (* 1/sqrt(l) for lns) with sigma
    frozen: a fixed per-channel scale.
  * The schedule is a pure function of the step: the groups in `removal.order` (default mlp, attn, final), each
    block by block; the k-th site (k = 0, 1, ...) is switched at step `removal.start + k * removal.gap`, i.e.
    that step is the first to run with it fixed. A resume needs nothing but the step and the sigmas, which are
    model buffers and so in every checkpoint (pretrain/full_state.py carries them across layouts).
  * The run is an ordinary training run (`pretrain.train`, with `RemovalHooks`): any TP/PP/ZeRO layout, resume,
    SLURM, diagnostics. metrics.jsonl gets the validation loss of the untouched model at step 0, a `removal`
    record per switch (`removed`, `sigma`, `sites_removed`; TensorBoard `removal/sigma`, `removal/sites_removed`
    and the site's name as text `removal/switched`) and `sites_removed` in every logged training record.
  * At the end (step train.steps, every site fixed) `fold_norms` multiplies each site's scale gamma*s/sigma into
    the input columns of the weights that read it (`REMOVAL_SITES`: q/k/v; gate and up; the head). Tied
    embeddings are untied: the input embedding stays, the head becomes embedding * scale. The folded weights are
    written as a step-0 checkpoint of an `ln_free` run in RUN_DIR/ln_free (through the normal engine and save
    path, on the run's own layout), and evaluated there: `ce_ln_free`.

`pretrain remove-norms` builds that run's config (the source's batch, sequence length, precision and layout; the
recipe's schedule of learning rates), runs it, with `--control` runs the same fine-tune with the norms kept
(RUN_DIR/control), and writes RUN_DIR/removal.json with the three cross-entropies on the same validation tokens.
Running the same command again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.config import ModelConfig
from models.norms import REMOVAL_SITES, _Removable
from pretrain.config import ExperimentConfig, RemovalConfig, RunConfig, load_config
from pretrain.errors import UserError
from pretrain.train import TrainContext, TrainHooks

LN_FREE_DIR = "ln_free"
CONTROL_DIR = "control"
REPORT = "removal.json"


# ----------------------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Folding
# ----------------------------------------------------------------------------------------------------------


def site_scales(model_cfg: ModelConfig) -> dict[str, float]:
    """{site name: the norm's fixed output_scale} (1/sqrt(l) for lns blocks, else 1)."""
    from models import Llama

    with torch.device("meta"):
        model = Llama(model_cfg)
    return {name: float(m.output_scale) for name, m in model.named_modules() if isinstance(m, _Removable)}


def ln_free_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config of the folded result: ln_free, plain x + F(x) (no depth-muP multipliers: they are for
    training from scratch), untied (the head carries the final norm's scale)."""
    return dataclasses.replace(model_cfg, norm_scheme="ln_free", removable_norms=False, tie_embeddings=False,
                               ln_free_base_depth=0)


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
        scale = gamma * scales[site.name] / sigma  # [D]
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


# ----------------------------------------------------------------------------------------------------------
# The training-loop hooks
# ----------------------------------------------------------------------------------------------------------


def removable_modules(built, model_cfg: ModelConfig) -> dict[str, _Removable]:
    """{full site name: module} of the norm sites on this rank (its pipeline stage)."""
    from pretrain.full_state import full_name

    found = {}
    for local, module in built.model.named_modules():
        if isinstance(module, _Removable):
            found[full_name(model_cfg, f"{local}.sigma", built.pipelined).removesuffix(".sigma")] = module
    return found


class RemovalHooks(TrainHooks):
    """Drives the schedule of a run with model.removable_norms: sigma EMAs, switches, the fold at the end."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.sites = schedule(cfg.model, cfg.removal)
        self.local: dict[str, _Removable] = {}
        self.ctx: TrainContext | None = None

    def on_start(self, ctx: TrainContext) -> None:
        from pretrain.evaluate import evaluate

        self.ctx = ctx
        modules = removable_modules(ctx.built, ctx.cfg.model)
        self.local = {s.name: modules[s.name] for s in self.sites if s.name in modules}
        for module in self.local.values():
            module.tracking = True
        if ctx.step == 0 and ctx.val_batches is not None:
            ce = evaluate(ctx.built, ctx.val_batches, ctx.topo)
            ctx.out.write({"step": 0, "val_loss": ce, "val_ppl": math.exp(min(ce, 50))}, "val")
            ctx.out.say(f"step      0 | val_loss {ce:.4f} | the source model, every norm live (ce_original)")

    def removed_by(self, step: int) -> int:
        return sum(1 for s in self.sites if s.step <= step)

    def before_step(self, step: int) -> None:
        switching = [s for s in self.sites if s.step == step]
        sigmas = self._all_sigmas() if switching else {}
        for site in self.sites:
            module = self.local.get(site.name)
            if module is not None and module.is_fixed != (step >= site.step):
                if step >= site.step and not module.sigma.item() > 0:
                    raise UserError(f"removal: {site.name} has no measured sigma at step {step} (every step before it "
                                    "was skipped); raise removal.start")
                module.set_fixed(step >= site.step)
        out = self.ctx.out
        for site in switching:
            n = self.sites.index(site) + 1
            out.write({"step": step, "removed": site.name, "group": site.group, "sigma": sigmas[site.name],
                       "sites_removed": n}, "removal")
            out.say(f"step {step:>6} | removal: {site.name} fixed, sigma {sigmas[site.name]:.4g} "
                    f"({n}/{len(self.sites)})")
            if out.tb is not None:  # the site's name next to the removal/* scalars
                out.tb.add_text("removal/switched", f"{site.name} (sigma {sigmas[site.name]:.4g})", step)

    def after_step(self, step: int) -> dict:
        from megatron.core import parallel_state

        live = [(name, m) for name, m in self.local.items() if not m.is_fixed]
        if live:
            stats = torch.stack([m.take_statistic() for _, m in live])  # [sites, (sum, count)]
            group = parallel_state.get_data_parallel_group()
            if dist.get_world_size(group) > 1:
                dist.all_reduce(stats, group=group)
            momentum = self.cfg.removal.ema
            for (name, module), (total, count) in zip(live, stats.tolist()):
                if count > 0 and math.isfinite(total):
                    mean = total / count
                    old = float(module.sigma.item())
                    module.sigma.fill_(mean if old == 0 else momentum * old + (1 - momentum) * mean)
        return {"sites_removed": self.removed_by(step)}

    def _all_sigmas(self) -> dict[str, float]:
        """Every site's current sigma on every rank (each pipeline stage contributes its own sites once)."""
        topo = self.ctx.topo
        values = torch.zeros(len(self.sites), dtype=torch.float64, device=topo.device)
        if topo.tp_rank == 0 and topo.dp_rank == 0:
            for i, site in enumerate(self.sites):
                if site.name in self.local:
                    values[i] = float(self.local[site.name].sigma.item())
        if dist.get_world_size() > 1:
            dist.all_reduce(values)
        return {site.name: v for site, v in zip(self.sites, values.tolist())}

    def on_finish(self, ctx: TrainContext, exit_code: int) -> None:
        if exit_code != 0 or ctx.step < self.cfg.train.steps:
            return
        target = os.path.join(self.cfg.run.dir, LN_FREE_DIR)
        if folded_step(target) == ctx.step:
            return  # already folded (a run continued after it had finished)
        write_ln_free(ctx, target)


# ----------------------------------------------------------------------------------------------------------
# The folded checkpoint
# ----------------------------------------------------------------------------------------------------------


def folded_step(target: str) -> int | None:
    """The removal step whose fold RUN_DIR/ln_free holds, or None."""
    from pretrain import checkpoint

    latest = os.path.join(target, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    folder = checkpoint.find_checkpoint(target)
    if not os.path.isfile(os.path.join(folder, checkpoint.STATE_FILE)):
        return None
    return checkpoint.read_state(folder).get("removal_step")


def final_weights(folder: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights and buffers of a checkpoint: its fp32 master weights where the run keeps them (bf16)."""
    from pretrain import checkpoint, full_state

    layout = checkpoint.read_layout(folder)
    _, weights = checkpoint.load_model_state(folder)
    if layout["precision"] != "fp32":
        state = full_state.read(folder, layout)
        weights.update(state.weights)
    return weights


def ln_free_experiment(cfg: ExperimentConfig, model: ModelConfig, run_dir: str) -> ExperimentConfig:
    """The config stored with the folded checkpoint: this run's settings, the ln_free model, a fresh run."""
    train = dataclasses.replace(cfg.train, init_from=None, resume=None, stop_at_step=None)
    return dataclasses.replace(cfg, run=RunConfig(run_dir), model=model, train=train, removal=RemovalConfig())


def write_ln_free(ctx: TrainContext, target: str) -> None:
    """Fold the run's last checkpoint, evaluate the result and save it as RUN_DIR/ln_free (replaced atomically)."""
    from pretrain import checkpoint
    from pretrain.config import save_config
    from pretrain.engine import build_engine
    from pretrain.evaluate import evaluate
    from pretrain.full_state import apply_weights

    cfg, topo, step = ctx.cfg, ctx.topo, ctx.step
    rank0 = topo.rank == 0
    weights = final_weights(os.path.join(cfg.run.dir, "checkpoints", checkpoint.tag_for(step)))
    model_cfg, folded = fold_norms(cfg.model, weights)
    ln_cfg = ln_free_experiment(cfg, model_cfg, target)
    built = build_engine(ln_cfg, topo)
    apply_weights(built, ln_cfg, folded)
    del weights, folded
    ce = evaluate(built, ctx.val_batches, topo)
    partial = os.path.join(cfg.run.dir, f".{LN_FREE_DIR}.partial")
    if rank0 and os.path.isdir(partial):
        shutil.rmtree(partial)
    dist.barrier()
    state = {"consumed_samples": 0, "consumed_tokens": 0, "skipped_steps": 0,
             "data_fingerprint": ctx.data_fingerprint, "removal_step": step}
    checkpoint.save(built, ln_cfg, os.path.join(partial, "checkpoints"), 0, state, topo)
    if rank0:
        save_config(ln_cfg, os.path.join(partial, "config.yaml"))
        with open(os.path.join(partial, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 0, "val_loss": ce, "val_ppl": math.exp(min(ce, 50))}) + "\n")
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.rename(partial, target)
    dist.barrier()
    ctx.out.write({"step": step, "ce_ln_free": ce}, "removal")
    ctx.out.say(f"step {step:>6} | removal: every site fixed and folded; wrote the ln_free checkpoint {target} "
                f"(val_loss {ce:.4f})")


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------

# The fine-tune of the recipe (GPT-2 small: lr 6e-4 -> 3e-4 cosine, warm-up 20, weight decay 0.01, clip 1.0).
RECIPE = {"train.min_lr_ratio": 0.5, "train.weight_decay": 0.01, "train.grad_clip": 1.0}
WARMUP_STEPS = 20
LR_FRACTION = 0.5  # of the source's peak learning rate
HF_LR = 3e-4  # a Hugging Face source has no training config
# Taken over from a training checkpoint's config (the fine-tune runs like the source's training did).
INHERITED = ("train.global_batch_size", "train.micro_batch_size", "train.precision", "train.betas", "train.eps",
             "train.seed", "train.max_bad_steps", "train.compile", "data.seq_len", "data.cache_dir", "parallel.tp",
             "parallel.pp", "parallel.zero_stage", "eval.tokens", "checkpoint.interval", "checkpoint.keep",
             "logging.interval", "logging.tensorboard", "logging.progress_bar", "diagnostics.interval", "deepspeed")


def register(sub) -> None:
    p = sub.add_parser("remove-norms", help="fine-tune a pre_ln/lns model into an ln_free one (norm removal)")
    p.add_argument("--checkpoint", required=True,
                   help="the trained pre_ln or lns model: a step folder, checkpoints/ or run folder (any TP/PP "
                        "layout), or a Hugging Face Llama directory")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help="the run folder (run the same command again to continue it)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--schedule", default="mlp,attn,final",
                   help="order of the site groups, comma-separated (default mlp,attn,final); removal.start and "
                        "removal.gap set when")
    p.add_argument("--control", action="store_true",
                   help="also run the same fine-tune with the norms kept (RUN_DIR/control): ce_control")
    p.add_argument("--nproc-per-node", type=int, default=None, help="spawn N local ranks (via torchrun)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 removal.gap=3 parallel.tp=2")
    p.set_defaults(func=cmd_remove_norms)


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def removal_configs(args) -> tuple[ExperimentConfig, ExperimentConfig | None]:
    """(the removal run's config, the control's or None) from the command line."""
    from pretrain.init_from import is_hf_dir, source_folder, source_model_config
    from pretrain.resume import flatten

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    order = [g.strip() for g in args.schedule.split(",") if g.strip()]
    folder = source_folder(args.checkpoint)
    given_scheme = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model.norm_scheme=")), None)
    source = source_model_config(folder, given_scheme or "pre_ln")
    scheme = given_scheme or source.norm_scheme
    if scheme not in ("pre_ln", "lns"):
        raise UserError(f"remove-norms: {args.checkpoint} is a {scheme} model; norm removal fine-tunes a pre_ln or "
                        "lns model")
    base = []
    if is_hf_dir(folder):
        lr = HF_LR
    else:
        stored = flatten(load_config(os.path.join(folder, "config.yaml"), stored=True))
        base = [f"{k}={_yaml(stored[k])}" for k in INHERITED if k in stored]
        lr = stored["train.lr"] * LR_FRACTION
        interval = stored["eval.interval"]
        base.append(f"eval.interval={interval if interval > 0 else args.steps}")
    base += [f"{k}={v}" for k, v in RECIPE.items()]
    base.append(f"model.n_layers={source.n_layers}")  # the schedule's length is checked with the config
    base += [f"train.lr={lr}", f"train.warmup_steps={min(WARMUP_STEPS, args.steps)}", f"train.steps={args.steps}",
             f"train.init_from={args.checkpoint}", "train.resume=auto", f"data.paths=[{args.data}]"]
    removal = load_config(None, base + [f"run.dir={args.out}", "model.removable_norms=true",
                                        f"removal.order=[{', '.join(order)}]", *args.overrides])
    control = None
    if args.control:
        control = load_config(None, base + [f"run.dir={os.path.join(args.out, CONTROL_DIR)}", *args.overrides])
        if control.model.removable_norms:
            raise UserError("model.removable_norms: the control keeps its norms; drop the override")
    return removal, control


def cmd_remove_norms(args) -> int:
    from pretrain.distributed import use_cpu_accelerator_without_gpu

    use_cpu_accelerator_without_gpu()
    from pretrain.train import preflight

    removal, control = removal_configs(args)
    removal = preflight(removal)  # one-line errors (source, resume, config) before any rank starts
    control = preflight(control) if control is not None else None
    if args.nproc_per_node:
        if args.nproc_per_node < 1:
            raise UserError("--nproc-per-node must be >= 1")
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        from pretrain.distributed import free_port

        argv = _argv_without_nproc(args)
        try:
            torchrun(["--nproc-per-node", str(args.nproc_per_node), "--master-port", str(free_port()), "-m",
                      "pretrain", "remove-norms", *argv])
        except ChildFailedError as e:
            _rank, failure = e.get_first_failure()
            return failure.exitcode if failure.exitcode > 0 else 1
        return 0
    return run(removal, control)


def _argv_without_nproc(args) -> list[str]:
    argv = ["--checkpoint", args.checkpoint, "--data", args.data, "--out", args.out, "--steps", str(args.steps),
            "--schedule", args.schedule]
    return argv + (["--control"] if args.control else []) + list(args.overrides)


def run(removal: ExperimentConfig, control: ExperimentConfig | None) -> int:
    """The removal run, then the control, in one process group; rank 0 writes removal.json when both are done."""
    from pretrain.distributed import init_distributed, shutdown
    from pretrain.train import StopSignal, _train

    stop = StopSignal()
    topo = init_distributed(removal.parallel.tp, removal.parallel.pp)
    try:
        code = _train(removal, topo, stop, RemovalHooks(removal))
        done = code == 0 and _finished(removal)
        if done and control is not None:
            code = _train(control, topo, stop, TrainHooks())
            done = code == 0 and _finished(control)
    finally:
        shutdown()
    if topo.rank == 0 and code == 0:
        if done:
            print(report_line(write_report(removal, control)), flush=True)
        else:
            print(f"remove-norms: stopped before the end (train.stop_at_step); run the same command without it to "
                  f"continue {removal.run.dir}", flush=True)
    return code


def _finished(cfg: ExperimentConfig) -> bool:
    from pretrain import checkpoint

    folder = checkpoint.resolve_resume("auto", os.path.join(cfg.run.dir, "checkpoints"))
    return folder is not None and checkpoint.read_state(folder)["step"] >= cfg.train.steps


# ----------------------------------------------------------------------------------------------------------
# removal.json
# ----------------------------------------------------------------------------------------------------------


def _records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _val_at(records: list[dict], step: int) -> float | None:
    values = [r["val_loss"] for r in records if r.get("step") == step and "val_loss" in r]
    return values[-1] if values else None


def write_report(removal: ExperimentConfig, control: ExperimentConfig | None) -> dict:
    """RUN_DIR/removal.json from the runs' metrics: cross-entropies on the same validation tokens, the switches."""
    from pretrain.checkpoint import write_atomic

    records = _records(removal.run.dir)
    steps = removal.train.steps
    folded = [r["ce_ln_free"] for r in records if "ce_ln_free" in r]
    report = {
        "ce_original": _val_at(records, 0),
        "ce_control": _val_at(_records(control.run.dir), steps) if control is not None else None,
        "ce_ln_free": folded[-1] if folded else None,
        "ce_fixed_sigma": _val_at(records, steps),  # the fine-tuned model before the fold (same function)
        "steps": steps,
        "eval_tokens": removal.eval.tokens,
        "data": removal.data.paths,
        "source": removal.train.init_from,
        "norm_scheme": removal.model.norm_scheme,
        "ln_free_checkpoint": os.path.join(removal.run.dir, LN_FREE_DIR),
        "control_run": control.run.dir if control is not None else None,
        "schedule": [{"step": r["step"], "site": r["removed"], "sigma": r["sigma"]} for r in records if "removed" in r],
    }
    if report["ce_control"] is not None and report["ce_ln_free"] is not None:
        report["gap_vs_control"] = report["ce_ln_free"] - report["ce_control"]
    write_atomic(os.path.join(removal.run.dir, REPORT), json.dumps(report, indent=1))
    return report


def report_line(report: dict) -> str:
    def show(x):
        return "n/a" if x is None else f"{x:.4f}"

    gap = report.get("gap_vs_control")
    tail = f" ({gap:+.4f} vs control)" if gap is not None else ""
    return (f"removal: ce_original {show(report['ce_original'])} | ce_control {show(report['ce_control'])} | "
            f"ce_ln_free {show(report['ce_ln_free'])}{tail}")
