"""The taper route of norm removal (model.taper_norms, `pretrain remove-norms --method taper`): the hooks that drive
TaperNorm's global gate (models/norm_layers.py `TaperNorm`, arXiv 2602.10408) through the removal run.

Until step removal.start - 1 every site is its plain norm and measures c*'s statistics (EMAs, momentum
removal.ema); before step removal.start each site is calibrated (c = c*, gamma~ = gamma) and the gate g, one for
all sites, follows the cosine of `taper_gate` to 0 at step removal.start - 1 + removal.taper_steps, from which
on every site is its fixed scaling branch c * x * gamma~: the fixed form of `RemovalHooks`, which the same fold
turns into RUN_DIR/ln_free at the end of the run. With removal.scale_loss the final norm's input carries the
paper's fixed-target scale loss from the taper start on (models/norm_layers.py `ScaleAnchor`). The gate is a
function of the step; c, gamma~, the gate and the scale target are model state (parameter and buffers), so a
resume anywhere in the schedule is exact.
"""

from __future__ import annotations

from pretrain.errors import UserError
from pretrain.removal.hooks import RemovalHooks
from pretrain.removal.schedule import taper_gate
from pretrain.train.hooks import TrainContext

FINAL = "final_norm"  # the site whose input the scale loss anchors (removal.scale_loss)


class TaperHooks(RemovalHooks):
    """`RemovalHooks` with one global gate instead of one switch per site (the EMAs, the fold: the same)."""

    def on_start(self, ctx: TrainContext) -> None:
        super().on_start(ctx)
        final = self.local.get(FINAL)
        if final is not None:  # the scale loss's weight per micro-batch (DeepSpeed divides each one's loss by gas)
            final.scale_loss = self.cfg.removal.scale_loss / ctx.built.gas

    def removed_by(self, step: int) -> int:
        return len(self.sites) if taper_gate(self.cfg.removal, step) == 0.0 else 0

    def writes_at(self, step: int) -> bool:
        return step == self.cfg.removal.start  # the calibration: every site's c read and written to metrics.jsonl

    def before_step(self, ctx: TrainContext, step: int) -> None:
        g = taper_gate(self.cfg.removal, step)
        for name, module in self.local.items():
            if g < 1.0 and module.gate_value == 1.0:  # the taper starts (on a resume later than this, it had)
                if not bool((module.sigma > 0).all()):
                    raise UserError(f"removal: {name} has no measured c at step {step} (every step before it was "
                                    "skipped); raise removal.start")
                module.calibrate()
                _sync_master(module.taper_weight)
            module.set_gate(g)
            module.tracking = module.measuring
        if step == self.cfg.removal.start:
            c = {name: 1.0 / values[0] for name, values in self._all_sigmas().items()}
            for site in self.sites:
                ctx.out.write({"step": step, "tapered": site.name, "group": site.group, "c": c[site.name],
                               "sigma": 1.0 / c[site.name]}, "removal")
            ctx.out.say(f"step {step:>6} | removal: taper started, {len(self.sites)} sites calibrated (c from "
                        f"{min(c.values()):.4g} to {max(c.values()):.4g}); gate 0 at step "
                        f"{self.cfg.removal.taper_end()}")
        elif step == self.cfg.removal.taper_end():
            ctx.out.say(f"step {step:>6} | removal: gate 0, every site its fixed scaling ({len(self.sites)}/"
                        f"{len(self.sites)})")

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        return {**super().after_step(ctx, step), "taper_gate": taper_gate(self.cfg.removal, step)}


def _sync_master(param) -> None:
    """A parameter set in place outside the optimizer: its fp32 master copy too (ZeRO, bf16; no-op otherwise)."""
    from deepspeed.utils import safe_set_full_fp32_param  # deepspeed loads only where a taper runs (a startup cost)

    safe_set_full_fp32_param(param, param.data.float())
