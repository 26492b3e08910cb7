"""The removal run's loop hooks: sigma EMAs while sites are live, the switches on schedule, the fold at the end
(written as RUN_DIR/ln_free)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist

from models.config import ModelConfig
from models.norm_layers import RemovableNorm
from pretrain.config import ExperimentConfig, RemovalConfig, RunConfig, save_config
from pretrain.errors import UserError
from pretrain.files import publish_folder
from pretrain.removal import LN_FREE_DIR
from pretrain.removal.fold import fold_norms, sigma_shapes
from pretrain.removal.schedule import schedule
from pretrain.runs import CONFIG_FILE, read_stored_config
from pretrain.state import checkpoint, reshard
from pretrain.state.reshard import full_name
from pretrain.train.distributed import parallel_state
from pretrain.train.engine import build_engine
from pretrain.train.evaluate import evaluate
from pretrain.train.hooks import TrainContext, TrainHooks


def removable_modules(built, model_cfg: ModelConfig) -> dict[str, RemovableNorm]:
    """{full site name: module} of the norm sites on this rank (its pipeline stage)."""
    found = {}
    for local, module in built.model.named_modules():
        if isinstance(module, RemovableNorm):
            found[full_name(model_cfg, f"{local}.sigma", built.pipelined).removesuffix(".sigma")] = module
    return found


class RemovalHooks(TrainHooks):
    """Drives the schedule of a run with model.removable_norms: sigma EMAs, switches, the fold at the end."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.sites = schedule(cfg.model, cfg.removal)
        self.sigma_sizes = {name: sizes[-1] for name, sizes in sigma_shapes(cfg.model).items()}
        self.local: dict[str, RemovableNorm] = {}
        self.ctx: TrainContext | None = None

    def on_start(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        modules = removable_modules(ctx.built, ctx.cfg.model)
        self.local = {s.name: modules[s.name] for s in self.sites if s.name in modules}
        for module in self.local.values():
            module.sync_from_buffers()  # a resume on another layout wrote the buffers directly (state/reshard.py)
            module.tracking = True
        if ctx.step == 0 and ctx.val_batches is not None:
            val = evaluate(ctx.built, ctx.val_batches, ctx.topo)
            ctx.out.write(val.record(0), "val")
            ctx.out.say(f"{val.line(0)} | the source model, every norm live (ce_original)")

    def removed_by(self, step: int) -> int:
        return sum(1 for s in self.sites if s.step <= step)

    def writes_at(self, step: int) -> bool:
        return any(s.step == step for s in self.sites)  # a switch: its sigma read and written to metrics.jsonl

    def before_step(self, ctx: TrainContext, step: int) -> None:
        switching = [s for s in self.sites if s.step == step]
        sigmas = self._all_sigmas() if switching else {}
        for site in self.sites:
            module = self.local.get(site.name)
            if module is not None and module.is_fixed != (step >= site.step):
                if step >= site.step and not bool((module.sigma > 0).all()):
                    raise UserError(f"removal: {site.name} has no measured sigma at step {step} (every step before it "
                                    "was skipped); raise removal.start")
                module.set_fixed(step >= site.step)
        out = self.ctx.out
        for site in switching:
            n = self.sites.index(site) + 1
            values = sigmas[site.name]
            sigma = sum(values) / len(values)  # per-head sites: the mean over heads here, every head's in sigma_heads
            record = {"step": step, "removed": site.name, "group": site.group, "sigma": sigma, "sites_removed": n}
            if len(values) > 1:
                record["sigma_heads"] = values
            out.write(record, "removal")
            shown = f"sigma {sigma:.4g}" + (f" (mean of {len(values)} heads)" if len(values) > 1 else "")
            out.say(f"step {step:>6} | removal: {site.name} fixed, {shown} ({n}/{len(self.sites)})")
            if out.tb is not None:  # the site's name next to the removal/* scalars
                out.tb.add_text("removal/switched", f"{site.name} ({shown})", step)

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        live = [(name, m) for name, m in self.local.items() if m.measuring]
        if live:
            # [2, entries of every live sigma]: (sum, count). Every rank of a tensor- and data-parallel group holds the
            # same stage, so the same live sites. Summed over data parallelism: every rank's tokens. Over tensor
            # parallelism: a per-head site's entries come from the ranks holding those heads (zeros elsewhere); any
            # other site sees the same tokens on every TP rank, which multiplies sum and count alike.
            stats = torch.cat([m.take_statistic() for _, m in live], dim=1)
            for group in (parallel_state.get_data_parallel_group(), parallel_state.get_tensor_model_parallel_group()):
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(stats, group=group)
            for (name, module), (total, count) in zip(live, self._split(stats, live)):
                module.absorb(total, count, self.cfg.removal.ema)
        return {"sites_removed": self.removed_by(step)}

    @staticmethod
    def _split(stats: torch.Tensor, live) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = stats.split([m.stat_entries() for _, m in live], dim=1)
        return [(p[0], p[1]) for p in parts]

    def _all_sigmas(self) -> dict[str, list[float]]:
        """Every site's current sigma (all its entries) on every rank (each pipeline stage contributes its own sites
        once; a sigma is replicated over tensor parallelism)."""
        topo = self.ctx.topo
        sizes = [self._size(site) for site in self.sites]
        values = torch.zeros(sum(sizes), dtype=torch.float64, device=topo.device)
        if topo.tp_rank == 0 and topo.dp_rank == 0:
            offset = 0
            for site, size in zip(self.sites, sizes):
                if site.name in self.local:
                    values[offset:offset + size] = self.local[site.name].sigma.double()
                offset += size
        if dist.get_world_size() > 1:
            dist.all_reduce(values)
        return {site.name: v.tolist() for site, v in zip(self.sites, values.split(sizes))}

    def _size(self, site) -> int:
        """Entries of a site's sigma, known on every rank (a per-head q/k site: one per q or k head)."""
        return self.sigma_sizes[site.name]

    def on_finish(self, ctx: TrainContext, exit_code: int) -> None:
        if exit_code != 0 or ctx.step < self.cfg.train.steps:
            return
        target = os.path.join(self.cfg.run.dir, LN_FREE_DIR)
        if folded_step(target) == ctx.step:
            return  # already folded (a run continued after it had finished)
        write_ln_free(ctx, target)


def folded_step(target: str) -> int | None:
    """The removal step whose fold RUN_DIR/ln_free holds, or None."""
    latest = os.path.join(target, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    folder = checkpoint.find_checkpoint(target)
    if not os.path.isfile(os.path.join(folder, checkpoint.STATE_FILE)):
        return None
    return checkpoint.read_state(folder).get("removal_step")


def final_weights(folder: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights and buffers of a checkpoint: its fp32 master weights where the run keeps them (bf16)."""
    cfg = read_stored_config(folder)
    layout = checkpoint.read_layout(folder, cfg)
    _, weights = checkpoint.load_model_state(folder, cfg)
    if layout["precision"] != "fp32":
        state = reshard.read(folder, layout, cfg)
        weights.update(state.weights)
    return weights


def ln_free_experiment(cfg: ExperimentConfig, model: ModelConfig, run_dir: str) -> ExperimentConfig:
    """The config stored with the folded checkpoint: this run's settings, the ln_free model, a fresh run."""
    train = dataclasses.replace(cfg.train, init_from=None, resume=None, stop_at_step=None)
    return dataclasses.replace(cfg, run=RunConfig(run_dir), model=model, train=train, removal=RemovalConfig())


def write_ln_free(ctx: TrainContext, target: str) -> None:
    """Fold the run's last checkpoint, evaluate the result and save it as RUN_DIR/ln_free (replaced atomically)."""
    cfg, topo, step = ctx.cfg, ctx.topo, ctx.step
    rank0 = topo.rank == 0
    weights = final_weights(os.path.join(cfg.run.dir, "checkpoints", checkpoint.tag_for(step)))
    model_cfg, folded = fold_norms(cfg.model, weights)
    ln_cfg = ln_free_experiment(cfg, model_cfg, target)
    built = build_engine(ln_cfg, topo)
    reshard.apply_weights(built, ln_cfg, folded)
    del weights, folded
    val = evaluate(built, ctx.val_batches, topo)
    ce = val.loss
    partial = os.path.join(cfg.run.dir, f".{LN_FREE_DIR}.partial")
    if rank0 and os.path.isdir(partial):
        shutil.rmtree(partial)
    dist.barrier()
    state = {"consumed_samples": 0, "consumed_tokens": 0, "skipped_steps": 0,
             "data_fingerprint": ctx.data_fingerprint, "removal_step": step}
    checkpoint.save(built, ln_cfg, os.path.join(partial, "checkpoints"), 0, state, topo)
    if rank0:
        save_config(ln_cfg, os.path.join(partial, CONFIG_FILE))
        with open(os.path.join(partial, "metrics.jsonl"), "w") as f:
            f.write(json.dumps(val.record(0)) + "\n")
        publish_folder(partial, target, replace=True)  # an earlier ln_free stays until the new one is in place
    dist.barrier()
    ctx.out.write({"step": step, "ce_ln_free": ce}, "removal")
    ctx.out.say(f"step {step:>6} | removal: every site fixed and folded; wrote the ln_free checkpoint {target} "
                f"(val_loss {ce:.4f})")
