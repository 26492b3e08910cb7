"""The DeepSpeed engine: generated DeepSpeed config, model (plain or pipelined), AdamW and its schedule.

Users never keep a DeepSpeed JSON: `deepspeed_config` derives it from the experiment config and merges
`deepspeed:` keys from the YAML over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule

from models import Llama
from models.llama import Block, recompute
from models.parallel import TensorParallel, cross_entropy, liger_available, liger_cross_entropy
from models.pipeline import PARTITION_METHOD, layer_specs, pipeline_loss
from pretrain import compat
from pretrain.config import ExperimentConfig
from pretrain.config.layout import check_parallel_support, gradient_accumulation_steps
from pretrain.config.param_groups import GroupSettings, group_settings, optimizer_param_names, param_groups
from pretrain.errors import UserError
from pretrain.train.distributed import Topology, deepspeed_topology, parallel_state


def deepspeed_config(cfg: ExperimentConfig, topo: Topology) -> dict:
    t = cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, topo.dp),
        # ZeRO 1-2 clip and skip non-finite steps themselves; at stage 0 GuardedAdamW does both.
        "gradient_clipping": t.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # our own log lines
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"use_node_local_storage": False},
    }
    if cfg.parallel.pp > 1:
        ds["pipeline"] = {"activation_checkpoint_interval": 0}
    return merge(ds, cfg.deepspeed)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that, like DeepSpeed's ZeRO optimizers, measures the global gradient norm, clips, and skips the
    update when the norm is not finite. Used at ZeRO stage 0, where DeepSpeed calls the client optimizer directly.

    Everything stays on the device: the norm is a tensor, the clip factor min(1, clip / norm) multiplies the
    gradients, and the skip is the fused AdamW kernel's `found_inf` (it leaves weights, moments and Adam's step count
    untouched). DeepSpeed's ZeRO optimizers instead read their overflow flag into Python (a host synchronisation per
    step); here `overflow` stays False for the engine and `skipped` (1.0 on a skipped step) is read by the training
    loop when it logs (pretrain/train/health.py)."""

    def __init__(self, param_groups, clip: float, model_parallel_group, replicated_owner: bool, **kwargs):
        super().__init__(param_groups, fused=True, **kwargs)  # found_inf is a fused-kernel argument
        self.clip, self.mp_group, self.replicated_owner = clip, model_parallel_group, replicated_owner
        self.overflow = False  # what DeepSpeed's engine reads: the skip happens on the device instead
        self._global_grad_norm = None
        self.skipped = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        # Count each weight once: TP-replicated ones (norms) on TP rank 0 only, and pipeline-tied ones (tied
        # embeddings) on their owning stage only (DeepSpeed marks the other copies ds_pipe_replicated).
        owned = [
            p.grad for g in self.param_groups for p in g["params"]
            if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
            and (self.replicated_owner or getattr(p, "tensor_model_parallel", False))
        ]
        device = grads[0].device if grads else None
        sq = torch.zeros((), dtype=torch.float64, device=device)
        if owned:
            sq += torch.stack(torch._foreach_norm(owned)).double().square().sum()
        if self.mp_group is not None and dist.get_world_size(self.mp_group) > 1:
            dist.all_reduce(sq, group=self.mp_group)  # TP shards and PP stages; replicated params once
        norm = sq.sqrt().float()
        self._global_grad_norm = norm
        self.skipped = self.found_inf = (~torch.isfinite(norm)).float()
        if self.clip > 0 and grads:
            torch._foreach_mul_(grads, (self.clip / (norm + 1e-6)).clamp(max=1.0))
        return super().step(closure)


def step_skipped(built: "Built") -> torch.Tensor:
    """After an optimizer step: 1.0 (on the device) when its update was skipped for a non-finite gradient.

    At ZeRO stage 0 GuardedAdamW decided on the device. DeepSpeed's ZeRO and bf16 optimizers decided on the host
    (their overflow check reads the device, see docs/training.md) and also held the learning-rate schedule back;
    here the schedule is moved on, so that on every layout the learning rate of step s is the schedule's at s,
    skipped steps or not (Adam's own step count counts applied updates only)."""
    optimizer = built.engine.optimizer
    if isinstance(optimizer, GuardedAdamW):
        return optimizer.skipped
    applied = built.engine.was_step_applied()
    if not applied:
        built.engine.lr_scheduler.step()
    device = next(built.model.parameters()).device
    return torch.full((), 0.0 if applied else 1.0, device=device)


def apply_optimizer_settings(built: "Built", cfg: ExperimentConfig, schedule_position: int) -> None:
    """The config's optimizer hyper-parameters and lr schedule, at `schedule_position` scheduler steps.

    After `engine.load_checkpoint` the optimizer and scheduler hold the values they were saved with (the saved
    learning rate would win over a changed train.lr); this makes every train.* optimizer key take effect."""
    t = cfg.train
    optimizer = compat.wrapped_optimizer(built.engine)
    settings = [s.values(cfg) for s in built.group_settings]
    if len(settings) != len(optimizer.param_groups):  # a checkpoint's groups are the model's (model.* is fixed)
        raise UserError(f"the optimizer has {len(optimizer.param_groups)} parameter groups, the config makes "
                        f"{len(settings)}; resume with the run's own model.parametrization")
    for group, values in zip(optimizer.param_groups, settings):  # as pretrain/config/param_groups.py builds them
        group.update(betas=tuple(t.betas), eps=values["eps"], weight_decay=values["weight_decay"],
                     initial_lr=values["lr"])
    if cfg.parallel.zero_stage > 0 or t.precision == "bf16":
        compat.set_zero_clip(built.engine, t.grad_clip)
    scheduler = built.engine.lr_scheduler
    factor = lr_lambda(cfg)
    state = scheduler.state_dict()
    base_lrs = [values["lr"] for values in settings]
    lrs = [lr * factor(schedule_position) for lr in base_lrs]
    state.update(base_lrs=base_lrs, last_epoch=schedule_position, _last_lr=lrs)
    scheduler.load_state_dict(state)
    scheduler.lr_lambdas = [factor] * len(lrs)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def lr_lambda(cfg: ExperimentConfig):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at train.steps."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class Built:
    engine: object  # deepspeed.DeepSpeedEngine or deepspeed.PipelineEngine
    model: torch.nn.Module  # the module whose parameters train (Llama or PipelineModule)
    pipelined: bool
    gas: int
    param_names: list[list[str]]  # this rank's parameter names in optimizer order (`optimizer_param_names`)
    group_settings: list[GroupSettings]  # each optimizer group's factors of train.lr, weight decay, eps
    loss_line: str | None = None  # how the fused loss runs on a GPU, for the log


def build_engine(cfg: ExperimentConfig, topo: Topology) -> Built:
    check_parallel_support(cfg)
    tp = TensorParallel.from_parallel_state()
    seed = cfg.train.seed
    try:
        if cfg.parallel.pp > 1:
            model = PipelineModule(
                layers=layer_specs(cfg.model, tp, seed), loss_fn=pipeline_loss, topology=deepspeed_topology(topo),
                partition_method=PARTITION_METHOD, activation_checkpoint_interval=0,
            )
        else:
            model = Llama(cfg.model, tp, seed=seed)
    except ValueError as e:  # divisibility of heads / vocab by tp
        raise UserError(str(e)) from None
    model.to(topo.device)
    on_gpu = topo.device.type == "cuda"
    liger_installed = on_gpu and cfg.train.fused_loss and liger_available()
    liger_failed = liger_probe(topo.device) if liger_installed else None
    liger = liger_installed and liger_failed is None
    paths = recompute(model, cfg.train.activation_checkpointing, cfg.train.fused_loss, liger=liger)
    if cfg.train.compile:
        # Compile block by block (nn.Module.compile keeps parameter names, so checkpoints and hooks see the same
        # module tree); the blocks are where the time goes, and the pipeline engine sees the same layers.
        for module in model.modules():
            if isinstance(module, Block):
                module.compile(dynamic=False)
    ds_cfg = deepspeed_config(cfg, topo)
    t = cfg.train
    opt_kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    if cfg.parallel.zero_stage == 0 and t.precision == "fp32":
        optimizer = GuardedAdamW(
            param_groups(model, cfg), clip=t.grad_clip, model_parallel_group=parallel_state.get_model_parallel_group(),
            replicated_owner=topo.tp_rank == 0, **opt_kwargs,
        )
    else:
        if cfg.parallel.zero_stage == 0:
            ds_cfg["gradient_clipping"] = t.grad_clip
        # Fused (one kernel for all tensors, its step counts on the device: no per-tensor host reads of them).
        optimizer = torch.optim.AdamW(param_groups(model, cfg), fused=True, **opt_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
        mpu=None if cfg.parallel.pp > 1 else parallel_state_mpu(),
    )
    return Built(engine=engine, model=model, pipelined=cfg.parallel.pp > 1, gas=ds_cfg["gradient_accumulation_steps"],
                 param_names=optimizer_param_names(model, cfg), group_settings=group_settings(model, cfg),
                 loss_line=fused_loss_line(paths, liger, liger_failed) if on_gpu and cfg.train.fused_loss else None)


def liger_probe(device: torch.device) -> str | None:
    """None when Liger's kernel runs on `device` and gives our loss and gradient on a small case, else why not (a
    Triton or liger-kernel release that does not work with this torch must not stop a run: the chunked loss runs)."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(64, 32, device=device, generator=gen, requires_grad=True)
        w = torch.randn(100, 32, device=device, generator=gen)
        labels = torch.randint(0, 100, (64,), device=device, generator=gen)
        got = liger_cross_entropy(x, w, labels)
        (grad,) = torch.autograd.grad(got, x)
        want = cross_entropy(torch.nn.functional.linear(x, w), labels, None)
        (want_grad,) = torch.autograd.grad(want, x)
        if not (torch.allclose(got, want, rtol=1e-4) and torch.allclose(grad, want_grad, rtol=1e-3, atol=1e-6)):
            return f"its loss {float(got.detach()):.6f} differs from ours {float(want.detach()):.6f} on a check"
    except Exception as e:  # noqa: BLE001 (whatever Triton raises: the run goes on without the kernel)
        return f"it failed on a check: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def fused_loss_line(paths: set[str], liger: bool, liger_failed: str | None = None) -> str | None:
    """On a GPU, which kernel computes train.fused_loss on this rank (none said where it holds no head)."""
    if "liger" in paths:
        return "train.fused_loss: Liger's fused linear cross-entropy (liger-kernel)"
    if "chunked" not in paths:
        return None
    if liger_failed:
        why = f"Liger's kernel is installed but {liger_failed}"
    elif liger:
        why = "a vocab-parallel or scaled head, which Liger's kernel does not compute"
    else:
        why = "liger-kernel is not installed; `pip install liger-kernel` for its fused kernel"
    return f"train.fused_loss: the chunked head + cross-entropy ({why})"


def parallel_state_mpu():
    """megatron's parallel_state under the method names DeepSpeed's `mpu` argument expects."""
    ps = parallel_state

    class MPU:
        get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
        get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
        get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
        get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
        get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
        get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    return MPU()
