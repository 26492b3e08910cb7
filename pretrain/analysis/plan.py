"""`pretrain plan`: whether a layout fits a GPU and how fast it should train, before any job is submitted.

`plan(cfg, gpu, gpus, mfu)` estimates, for the fullest rank, what one training step holds at its peak:

    params        the rank's weights (its TP shard of its pipeline stage), in the model's dtype; ZeRO 1-2 and
                  DeepSpeed's bf16 optimizer keep them in flat buffers padded to 2 x dp elements per group
    grads         the gradients held at the optimizer step: fp32 .grad at ZeRO 0 (fp32); at ZeRO 1-2 the rank's
                  reduced partition in the model dtype (DeepSpeed sizes it by the whole parameters that reach into
                  the partition) plus, at ZeRO 1 with accumulation, the full .grad it keeps between micro-batches;
                  bf16 without ZeRO (a pipeline) .grad and DeepSpeed's flat accumulation buffer, both bf16
    grad_buckets  ZeRO 1-2: DeepSpeed's gradient reduction bucket, `zero_optimization.reduce_bucket_size` elements
                  (5e8 by default) in the model dtype, allocated at every backward however small the model (two
                  under pipeline parallelism)
    optimizer     Adam's two moments in fp32, and the fp32 master weights wherever DeepSpeed keeps a copy (ZeRO 1-2,
                  fp32 too, and bf16): 1/dp of them under ZeRO or DeepSpeed's bf16 optimizer
    activations   what autograd keeps for backward, per token and block, counted from the block's real parts
                  (`block_activations`: attention with its kv heads, SwiGLU's width, the scheme's norms, gates and
                  residual updates; flash / memory-efficient attention keeps no T x T scores), divided by tp where
                  Megatron TP splits them (heads and MLP width; d_model-wide tensors are whole on every rank: no
                  sequence parallelism); with checkpointing none, full (each block's input, plus one block's
                  activations and gradients while it is recomputed) or selective (the attention core and SwiGLU's
                  activation recomputed); plus the working set of one block's backward; with PP, DeepSpeed's 1F1B
                  schedule keeps min(pp - stage, accumulation) micro-batches in flight on a stage
    logits_loss   the head and the loss: unfused, the fp32 log-probabilities [B, T, V] kept for backward and, in
                  backward, their gradient and the logits' gradient (3 x 4 bytes per logit, plus the bf16 logits
                  and their bf16 gradient under bf16); fused (train.fused_loss), the same for one chunk of tokens
                  (models/parallel.py LOSS_CHUNK_ELEMENTS logits)
    reserve       a fixed RESERVE_GIB for the CUDA context, the caching allocator's fragmentation and NCCL buffers

The total adds the parts, an upper bound of the peak (at the start of backward every activation is still held while
the gradients are being formed; on a GPU the allocator's peak, torch.cuda.max_memory_allocated, compares with the
total less the reserve, `allocated_gib`). FLOPs per token are the training logs' MFU formula,
`Llama.meta(cfg.model).flops_per_token(cfg.data.seq_len)`, and tokens/s = gpus x peak bf16 FLOP/s x MFU / FLOPs per
token, the MFU being an assumption (`--mfu`, 0.4 by default).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import models.norm_layers as layers
from models.config import ModelConfig
from models.llama import Block, Llama, check_tp_divides
from models.parallel import LOSS_CHUNK_ELEMENTS
from models.pipeline import BlockStage, EmbeddingStage, HeadStage, ReadoutStage
from pretrain.config import ExperimentConfig
from pretrain.config.layout import check_parallel_support, gradient_accumulation_steps
from pretrain.errors import UserError
from pretrain.gpus import GPU

GIB = 2**30
RESERVE_GIB = 2.0  # CUDA context (~0.5 GiB), the caching allocator's fragmentation, NCCL's buffers
DEFAULT_MFU = 0.4
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default
ZERO_ALIGNMENT = 2  # DeepSpeed pads each flat parameter group to a multiple of 2 x dp elements
FP32 = 4


# ------------------------------------------------------------------------------------------- the layout


def layout(cfg: ExperimentConfig, gpus: int) -> dict:
    """tp, pp, dp and the accumulation of `cfg` on `gpus` GPUs, with the one-line errors `pretrain train` gives."""
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if gpus % (tp * pp):
        raise UserError(f"--gpus {gpus} is not divisible by parallel.tp * parallel.pp = {tp * pp}; "
                        f"give a multiple of {tp * pp} GPUs or change parallel.tp/pp")
    check_parallel_support(cfg)
    try:
        check_tp_divides(cfg.model, tp)
    except ValueError as e:
        raise UserError(str(e)) from None
    dp = gpus // (tp * pp)
    return {"gpus": gpus, "tp": tp, "pp": pp, "dp": dp, "zero_stage": cfg.parallel.zero_stage,
            "micro_batch_size": cfg.train.micro_batch_size, "global_batch_size": cfg.train.global_batch_size,
            "grad_accumulation": gradient_accumulation_steps(cfg, dp), "seq_len": cfg.data.seq_len,
            "precision": cfg.train.precision, "activation_checkpointing": cfg.train.activation_checkpointing,
            "fused_loss": cfg.train.fused_loss}


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's `partition_balanced` (deepspeed/runtime/utils.py), which `PipelineModule` cuts the layers with
    (partition_method "type:BlockStage": weight 1 per block): the boundaries [0, ..., len(weights)] of `parts`
    contiguous stages whose largest minus smallest weight is least, ties going to the later split."""
    n, m = len(weights), parts
    if n <= m:
        return [min(p, n) for p in range(m + 1)]
    inf = math.inf
    best_max = [[inf] * (m + 1) for _ in range(n + 1)]
    best_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    best_max[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                top = max(best_max[k][j - 1], prefix[i] - prefix[k])
                low = min(best_min[k][j - 1], prefix[i] - prefix[k])
                if cost[i][j] >= top - low:
                    cost[i][j], best_max[i][j], best_min[i][j], position[i][j] = top - low, top, low, k
    bounds = [n]
    for j in reversed(range(1, m + 1)):
        bounds.append(position[bounds[-1]][j])
    return bounds[::-1]


def stage_modules(cfg: ModelConfig, pp: int) -> list[list[nn.Module]]:
    """Each pipeline stage's modules on the meta device, in the order of the stage's parameters: the whole `Llama`
    when pp = 1; else models/pipeline.py's layers as `PipelineModule` cuts and registers them (a tied embedding, which
    the first and the last stage both hold, first)."""
    with torch.device("meta"):
        if pp == 1:
            return [[Llama(cfg)]]
        n = cfg.n_layers + 3  # embedding, blocks, final norm, head
        bounds = partition_balanced([0] + [1] * cfg.n_layers + [0, 0], pp)
        stages = []
        for s in range(pp):
            ids = range(bounds[s], bounds[s + 1])
            tied = [EmbeddingStage(cfg, None, 0)] if cfg.tie_embeddings and (0 in ids or n - 1 in ids) else []
            own = []
            for i in ids:
                if i == 0 and not cfg.tie_embeddings:
                    own.append(EmbeddingStage(cfg, None, 0))
                elif 1 <= i <= cfg.n_layers:
                    own.append(BlockStage(cfg, i, None, 0))
                elif i == cfg.n_layers + 1:
                    own.append(ReadoutStage(cfg, 0))
                elif i == n - 1 and not cfg.tie_embeddings:
                    own.append(HeadStage(cfg, None, 0))
            stages.append(tied + own)
        return stages


def rank_parameters(modules: list[nn.Module], tp: int) -> list[tuple[str, int, bool]]:
    """(name, elements on one TP rank, decayed) of every parameter, in order: a weight with a TP split holds 1/tp of
    it (column, row, vocabulary, q/k width norms, nGPT's scales), the others are whole on every rank (norm gains,
    scalars); decayed as pretrain/config/param_groups.py `split_decay` groups them (matrices but the embedding)."""
    out = []
    for module in modules:
        for name, p in module.named_parameters():
            n = p.numel() // tp if hasattr(p, "tp_split") else p.numel()
            out.append((name, n, p.ndim >= 2 and "tok_emb" not in name))
    return out


# ------------------------------------------------------------------------------------------- weights, gradients, Adam


def zero_partition(numels: list[int], dp: int, rank: int) -> tuple[int, int]:
    """(partition elements, gradient elements) of data-parallel `rank` for one flat group of parameters of `numels`
    under ZeRO 1-2: the group padded to a multiple of 2 x dp and cut in dp equal partitions; the reduced gradients of
    the rank are kept for every parameter that reaches into its partition, whole (DeepSpeed's grads_in_partition)."""
    size = padded_group(numels, dp) // dp
    lo, hi = rank * size, (rank + 1) * size
    grads, offset = 0, 0
    for n in numels:
        if offset < hi and offset + n > lo:
            grads += n
        offset += n
    return size, grads


def padded_group(numels: list[int], dp: int) -> int:
    """Elements of one flat parameter group as ZeRO and DeepSpeed's bf16 optimizer lay it out: padded to 2 x dp."""
    return -(-sum(numels) // (ZERO_ALIGNMENT * dp)) * ZERO_ALIGNMENT * dp


def reduce_bucket_elements(cfg: ExperimentConfig) -> int:
    """Elements of ZeRO 1-2's gradient reduction buckets: DeepSpeed allocates zero_optimization.reduce_bucket_size of
    them at every backward (with contiguous_gradients, its default), and the pipeline engine, whose backward ZeRO
    does not see, a second bucket when it reduces; 0 without ZeRO."""
    zero = cfg.deepspeed.get("zero_optimization", {})
    if cfg.parallel.zero_stage == 0 or not zero.get("contiguous_gradients", True):
        return 0
    buckets = 2 if cfg.parallel.pp > 1 else 1
    return buckets * int(float(zero.get("reduce_bucket_size", REDUCE_BUCKET_ELEMENTS)))


def state_bytes(params: list[tuple[str, int, bool]], cfg: ExperimentConfig, dp: int, gas: int,
                dp_rank: int | None = None) -> dict[str, float]:
    """Bytes of weights, gradients (at the optimizer step, and those ZeRO 1 accumulates in .grad between
    micro-batches), the gradient reduction buckets and optimizer state on one rank holding `params`
    (`rank_parameters`), as the engine of pretrain/train/engine.py allocates them (see the module docstring); the
    data-parallel rank with the most gradient elements unless `dp_rank` is given."""
    zero, bf16 = cfg.parallel.zero_stage, cfg.train.precision == "bf16"
    width = 2 if bf16 else FP32
    decay = cfg.train.decay_norms_and_embeddings
    groups = [[n for _, n, d in params if d or decay]] + ([[n for _, n, d in params if not d]] if not decay else [])
    groups = [g for g in groups if g]
    numel = sum(n for _, n, _ in params)
    if zero == 0 and not bf16:  # GuardedAdamW: plain tensors, fp32 .grad, two moments
        return {"params": FP32 * numel, "grads": FP32 * numel, "accumulated_grads": 0, "grad_buckets": 0,
                "optimizer": 2 * FP32 * numel}
    padded = sum(padded_group(g, dp) for g in groups)
    partition = padded // dp
    if zero == 0:  # bf16 with a pipeline: DeepSpeed's BF16_Optimizer (bf16 .grad and a flat bf16 accumulation buffer)
        return {"params": width * padded, "grads": width * (numel + padded), "accumulated_grads": 0,
                "grad_buckets": 0, "optimizer": 3 * FP32 * partition}
    ranks = range(dp) if dp_rank is None else [dp_rank]
    grads = max(sum(zero_partition(g, dp, r)[1] for g in groups) for r in ranks)
    # ZeRO 1 accumulates the micro-batches' gradients in .grad and reduces them into the partition at the last one
    accumulated = numel if zero == 1 and gas > 1 else 0
    return {"params": width * padded, "grads": width * grads, "accumulated_grads": width * accumulated,
            "grad_buckets": width * reduce_bucket_elements(cfg),
            "optimizer": 3 * FP32 * partition}  # fp32 master partition + exp_avg + exp_avg_sq


# ------------------------------------------------------------------------------------------- activations


class Saved:
    """The tensors of one forward, per token: each made tensor's bytes, and which of them autograd keeps (a view
    keeps its base: `save` takes the tensor that owns the storage)."""

    def __init__(self, width: int):
        self.width = width  # bytes of one activation: 4 (fp32) or 2 (bf16)
        self.sizes: list[float] = []
        self.kept: set[int] = set()

    def new(self, elements: float, width: int | None = None) -> int:
        self.sizes.append(elements * (width or self.width))
        return len(self.sizes) - 1

    def save(self, *tensors: int) -> None:
        self.kept.update(tensors)

    def bytes(self) -> float:
        return sum(self.sizes[t] for t in self.kept)


NORMS = (layers.RMSNorm, layers.HeadNorm, layers.WidthNorm)


def unknown_part(module: nn.Module) -> NotImplementedError:
    return NotImplementedError(f"pretrain plan has no activation rule for {type(module).__name__}; add one to "
                               "pretrain/analysis/plan.py (tests/pretrain/analysis/test_plan.py checks them all)")


def norm_like(f: Saved, module: nn.Module, x: int, width: float, heads: float = 1, contiguous: bool = True) -> int:
    """What a norm slot (or a q/k/v norm, over `heads` heads of `width` elements in all) keeps of its input x, and
    its output. A norm works in fp32: it keeps an fp32 copy of x (x itself in fp32, unless a full-width q/k norm must
    first flatten a strided x), its 1/rms per row (LayerNorm: and the mean), and the normalized rows its gain
    multiplies."""
    fp32 = f.width == FP32
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, layers.Scale):  # times a constant: nothing kept
        return f.new(width)
    if isinstance(module, NORMS):
        centred = isinstance(module, layers.LayerNorm) or getattr(module, "centred", False)
        whole = isinstance(module, layers.WidthNorm)  # one statistic over all heads of a token
        rows = 1 if whole else heads
        if whole and centred:
            f.save(f.new(width, FP32))  # the centred copy, which the statistic and the product read
        else:
            f.save(x if fp32 and (contiguous or not whole) else f.new(width, FP32))
        f.save(f.new(rows, FP32))  # 1/rms
        if centred and not whole:
            f.save(f.new(rows, FP32))  # the mean
        f.save(f.new(width))  # the normalized rows, times the gain
        return f.new(width)
    if isinstance(module, layers.ScalelessRMSNorm):  # x / rms(x) (times a constant): x in fp32 and 1/rms, no gain
        f.save(x if fp32 else f.new(width, FP32))
        f.save(f.new(heads, FP32))
        y = f.new(width)
        return f.new(width) if module.factor != 1.0 else y
    if isinstance(module, layers.DyT):  # gamma * tanh(alpha x) (+ beta); Derf: gamma * erf(alpha x + s) + beta
        f.save(x)
        if isinstance(module, layers.Derf):
            f.save(f.new(width))  # erf's input
        f.save(f.new(width))  # tanh's (erf's) output, which gamma multiplies
        return f.new(width)
    if isinstance(module, layers.L2Norm):
        return l2_normalize(f, x, width, heads)
    if isinstance(module, layers.UnitScaled):  # s * x / |x| per head
        y = l2_normalize(f, x, width, heads)
        return norm_like(f, module.scale, y, width, heads)
    if isinstance(module, layers.SplitScale):  # x times a learned vector: keeps x
        f.save(x)
        return f.new(width)
    raise unknown_part(module)


def l2_normalize(f: Saved, x: int, width: float, rows: float) -> int:
    """models/parts.py l2_normalize: x / |x|, the norm in fp32: keeps x, the fp32 norms and their cast to x's dtype."""
    f.save(x, f.new(rows, FP32))
    if f.width != FP32:
        f.save(f.new(rows))
    return f.new(width)


def residual(f: Saved, module: nn.Module, x: int, branch: int, d: float) -> int:
    """The residual update's output (a new tensor) and what it keeps."""
    if isinstance(module, layers.GPAS):  # z - SiLU(g) * stopgrad(z): keeps z (or, on a post-norm block, x)
        if module.shortcut:
            f.save(x)
            return f.new(d)
        z = f.new(d)
        f.save(z)
        return f.new(d)
    if isinstance(module, layers.NGPTResidual):  # n(n(x) + |alpha| (branch - n(x)))
        xn = l2_normalize(f, x, d, 1)
        step = f.new(d)
        f.save(step)  # branch - n(x), which alpha multiplies
        return l2_normalize(f, f.new(d), d, 1)
    if isinstance(module, layers.Residual):  # alpha x + branch: nothing kept
        return f.new(d)
    raise unknown_part(module)


def attention(f: Saved, attn: nn.Module, x: int, c: ModelConfig, tp: int, selective: bool) -> int:
    """models/llama.py Attention on this rank's heads (H, K divided by tp)."""
    H, K, E = c.n_heads / tp, c.n_kv_heads / tp, c.head_dim
    f.save(x)  # the qkv matmul's input
    qkv = f.new((H + 2 * K) * E)  # rows grouped per kv head: [K, H / K + 2, E] (q heads, k, v)
    # q.reshape(B, T, H, E) copies the grouped rows unless there is one kv head on the rank or one q head per kv
    # head; k and v are strided views of qkv, which a full-width q/k norm's flatten copies unless K = 1
    q_view = K == 1 or H == K
    q_in = qkv if q_view else f.new(H * E)
    q = norm_like(f, attn.q_norm, q_in, H * E, H, contiguous=K == 1 or not q_view)
    k = norm_like(f, attn.k_norm, qkv, K * E, K, contiguous=K == 1)
    v = norm_like(f, attn.v_norm, qkv, K * E, K, contiguous=K == 1)
    q = norm_like(f, attn.q_scale, f.new(H * E), H * E, H)  # RoPE's outputs (it keeps only its cos, sin tables)
    k = norm_like(f, attn.k_scale, f.new(K * E), K * E, K)
    f.save(q, k, v)
    out = f.new(H * E)  # stored [B, T, H, E]: the output projection reads it as a view
    if not selective:
        f.save(out, f.new(H, FP32))  # and the log-sum-exp per head; no T x T scores (flash / memory-efficient SDPA)
    if isinstance(attn.out_gate, layers.AttentionGate):  # y * sigmoid(x W_g)
        gate = f.new(H * attn.out_gate.per_head)
        f.save(x, out, gate)
        out = f.new(H * E)
    elif not isinstance(attn.out_gate, layers.Ungated):
        raise unknown_part(attn.out_gate)
    f.save(out)  # the output projection's input
    return f.new(c.d_model)


def mlp(f: Saved, module: nn.Module, x: int, c: ModelConfig, tp: int, selective: bool) -> int:
    """models/llama.py MLP (SwiGLU) on this rank's share of ffn_hidden."""
    F = c.ffn_hidden / tp
    f.save(x)  # the gate and up matmuls' input
    g = norm_like(f, module.gate_scale, f.new(F), F)
    u = norm_like(f, module.up_scale, f.new(F), F)
    f.save(g, u)  # SiLU's input and the product's other factor (selective: the recomputed part's inputs)
    if not selective:
        f.save(f.new(F))  # SiLU's output
    product = f.new(F)
    f.save(product)  # the down projection's input
    return f.new(c.d_model)


def block_forward(f: Saved, block: Block, c: ModelConfig, tp: int, selective: bool) -> tuple[int, int]:
    """(input, output) of one block, as models/llama.py Block.compute, with what it keeps recorded in `f`."""
    d = c.d_model
    x = f.new(d)
    a = norm_like(f, block.attn_out_norm, attention(f, block.attn, norm_like(f, block.attn_norm, x, d), c, tp,
                                                     selective), d)
    h = norm_like(f, block.attn_post_norm, residual(f, block.residual, x, a, d), d)
    m = norm_like(f, block.mlp_out_norm, mlp(f, block.mlp, norm_like(f, block.mlp_norm, h, d), c, tp, selective), d)
    out = norm_like(f, block.mlp_post_norm, residual(f, block.residual, h, m, d), d)
    if isinstance(block.layer_scalar, layers.LayerScalar):  # s times the output: keeps the output for s's gradient
        f.save(out)
        out = f.new(d)
    elif not isinstance(block.layer_scalar, nn.Identity):
        raise unknown_part(block.layer_scalar)
    return x, out


def block_activations(block: Block, c: ModelConfig, width: int, tp: int = 1, mode: str = "none") -> float:
    """Bytes per token that one block keeps for backward (`mode`: train.activation_checkpointing)."""
    f = Saved(width)
    x, _ = block_forward(f, block, c, tp, selective=mode == "selective")
    if mode == "full":  # only the input; the block runs again in backward
        return f.sizes[x]
    return f.bytes()


def block_backward_working_set(c: ModelConfig, width: int, tp: int) -> float:
    """Bytes per token of gradients alive at once in a block's backward beyond what the block kept (its kept tensors
    are freed as its backward uses them): the gradients of its output and of its input (d_model each) and one of
    SwiGLU's gradients (ffn_hidden / tp), from which the next is formed."""
    return width * (2 * c.d_model + c.ffn_hidden / tp)


def embedding_activations(module: nn.Module, c: ModelConfig, width: int) -> float:
    """What the scheme's part on the token embedding's output keeps, per token (the lookup keeps only the ids)."""
    f = Saved(width)
    lookup = f.new(c.d_model)
    if isinstance(module.emb_out, layers.EmbeddingScale):  # dyt, derf: a learned scalar times the lookup, kept
        f.save(lookup)
    else:
        norm_like(f, module.emb_out, lookup, c.d_model)
    return f.bytes()


def readout_activations(module: nn.Module, c: ModelConfig, width: int) -> float:
    """The final norm's keep and the head's input (the head matmul keeps it; the fused loss keeps it whole too)."""
    f = Saved(width)
    f.save(norm_like(f, module.final_norm, f.new(c.d_model), c.d_model))
    return f.bytes()


def loss_tokens(c: ModelConfig, tokens: int, tp: int, fused: bool) -> int:
    """Tokens whose logits are held at once: all of the micro-batch's, or one chunk of the fused loss."""
    if not fused:
        return tokens
    return min(tokens, max(1, LOSS_CHUNK_ELEMENTS // (c.vocab_size // tp)))


def logits_loss_bytes(c: ModelConfig, tokens: int, tp: int, fused: bool, width: int) -> float:
    """The head and loss's peak beyond the head's input: per logit, the fp32 log-probabilities kept for backward, their
    gradient and the fp32 logits' gradient (12 bytes), and in bf16 the bf16 logits and their bf16 gradient (4 more)."""
    per_logit = 3 * FP32 + (0 if width == FP32 else 2 * width)
    return per_logit * loss_tokens(c, tokens, tp, fused) * (c.vocab_size / tp)


# ------------------------------------------------------------------------------------------- the plan


def plan(cfg: ExperimentConfig, gpu: GPU, gpus: int = 1, mfu: float = DEFAULT_MFU) -> dict:
    """The estimate for `cfg` on `gpus` GPUs of kind `gpu` (see the module docstring); a dict of plain numbers,
    what `pretrain plan --json` prints."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if cfg.model.residual != "single":  # the fp32 mixing weights and the n-stream state per block: no rule here yet
        raise UserError(f"pretrain plan does not count the activations of model.residual={cfg.model.residual} "
                        "(n residual streams) yet; plan the model with model.residual=single for a lower bound")
    lay = layout(cfg, gpus)
    c, tp, pp, dp, gas = cfg.model, lay["tp"], lay["pp"], lay["dp"], lay["grad_accumulation"]
    width = 2 if cfg.train.precision == "bf16" else FP32
    mode, fused = cfg.train.activation_checkpointing, cfg.train.fused_loss
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    stages = []
    for s, modules in enumerate(stage_modules(c, pp)):
        state = state_bytes(rank_parameters(modules, tp), cfg, dp, gas)
        blocks = [m for module in modules for m in module.modules() if isinstance(m, Block)]
        kept = sum(block_activations(b, c, width, tp, mode) for b in blocks)  # per token, at the end of forward
        readout = 0.0
        first, last = s == 0, s == pp - 1
        for module in modules:
            if hasattr(module, "emb_out") and first:
                kept += embedding_activations(module, c, width)
            if hasattr(module, "final_norm"):
                readout = readout_activations(module, c, width)
        if pp > 1:  # DeepSpeed's pipe buffers: the stage's received input and its sent output, per micro-batch
            kept += width * c.d_model * ((0 if first else 1) + (0 if last else 1))
        # A block's backward: its recomputation (full checkpointing) and its gradients, when the head's part (the
        # final norm's keep and the loss) is already freed; the peak is the larger of that and the loss's backward.
        backward = 0.0
        if blocks:
            recomputed = block_activations(blocks[-1], c, width, tp) if mode == "full" else 0.0
            backward = recomputed + block_backward_working_set(c, width, tp)
        in_flight = min(pp - s, gas) if pp > 1 else 1
        logits = logits_loss_bytes(c, tokens, tp, fused, width) if last else 0.0
        micro = (kept + readout) * tokens
        activations = micro * in_flight + max(0.0, backward * tokens - readout * tokens - logits)
        parts = {"params": state["params"], "grads": state["grads"] + state["accumulated_grads"],
                 "grad_buckets": state["grad_buckets"], "optimizer": state["optimizer"], "activations": activations,
                 "logits_loss": logits, "reserve": RESERVE_GIB * GIB}
        stages.append({"stage": s, "blocks": len(blocks), "in_flight_micro_batches": in_flight,
                       "params_per_rank": sum(n for _, n, _ in rank_parameters(modules, tp)),
                       "activations_per_micro_batch_gib": micro / GIB,
                       "memory_breakdown_gib": {k: v / GIB for k, v in parts.items()},
                       "memory_gib": sum(parts.values()) / GIB})
    worst = max(stages, key=lambda st: st["memory_gib"])
    model = Llama.meta(c)
    flops = model.flops_per_token(cfg.data.seq_len)
    tokens_per_s = gpus * gpu.peak_bf16_flops * mfu / flops
    return {
        "memory_gib_per_gpu": worst["memory_gib"],
        "allocated_gib": worst["memory_gib"] - RESERVE_GIB,
        "fits": worst["memory_gib"] <= gpu.memory_gib,
        "flops_per_token": flops,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / gpus,
        "memory_breakdown_gib": worst["memory_breakdown_gib"],
        "activations_per_micro_batch_gib": worst["activations_per_micro_batch_gib"],
        "stage": worst["stage"],
        "stages": stages,
        "gpu": {"name": gpu.name, "memory_gib": gpu.memory_gib, "peak_bf16_flops": gpu.peak_bf16_flops},
        "layout": lay,
        "model": {"preset": c.preset, "norm_scheme": c.norm_scheme, "params": model.num_params(),
                  "vocab_size": c.vocab_size, "d_model": c.d_model, "n_layers": c.n_layers},
        "assumptions": {
            "mfu": mfu, "reserve_gib": RESERVE_GIB,
            "reserve": "CUDA context, caching-allocator fragmentation, NCCL buffers",
            "activation_bytes": width, "attention": "flash / memory-efficient SDPA: no T x T scores kept",
            "sequence_parallel": False,
            "pipeline_schedule": "DeepSpeed 1F1B: stage s keeps min(pp - s, accumulation) micro-batches in flight",
            "reduce_bucket_elements": reduce_bucket_elements(cfg),
            "loss_chunk_tokens": loss_tokens(c, tokens, tp, fused),
            "total": "the sum of the parts: an upper bound of the step's peak",
            "recomputation": "MFU counts model FLOPs only: full checkpointing runs about one more forward per step "
                             "(selective: the attention core and SwiGLU's activation), so the same hardware "
                             "utilization shows as a lower MFU",
        },
    }


# ------------------------------------------------------------------------------------------- the text


ROWS = (("params", "parameters"), ("grads", "gradients"), ("grad_buckets", "gradient buckets"),
        ("optimizer", "optimizer states"), ("activations", "activations"), ("logits_loss", "logits / loss"),
        ("reserve", "runtime reserve"))


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(p: dict) -> str:
    """`pretrain plan`'s text: the layout, the memory of the fullest rank part by part, FLOPs per token, tokens/s."""
    lay, gpu, m, a = p["layout"], p["gpu"], p["model"], p["assumptions"]
    width = "bf16" if lay["precision"] == "bf16" else "fp32"
    stage = p["stages"][p["stage"]]
    zero = f"ZeRO-{lay['zero_stage']}"
    notes = {
        "params": f"{stage['params_per_rank']:,} per rank, {width}",
        "grads": "at the optimizer step" + (" (ZeRO: this rank's partition)" if lay["zero_stage"] else ""),
        "grad_buckets": (f"DeepSpeed's reduce bucket, {a['reduce_bucket_elements']:.3g} elements, in backward"
                         if a["reduce_bucket_elements"] else "none without ZeRO"),
        "optimizer": ("Adam moments" + ("" if lay["zero_stage"] == 0 and width == "fp32" else " + fp32 master weights")
                      + (f", 1/{lay['dp']} per rank" if lay["dp"] > 1 and (lay["zero_stage"] or width == "bf16")
                         else "")),
        "activations": (f"{stage['activations_per_micro_batch_gib']:.2f} GiB per micro-batch, "
                        f"{stage['in_flight_micro_batches']} in flight; checkpointing {lay['activation_checkpointing']}"),
        "logits_loss": ("not on this stage" if stage["memory_breakdown_gib"]["logits_loss"] == 0 else
                        f"{'fused: ' if lay['fused_loss'] else 'unfused: '}{a['loss_chunk_tokens']:,} tokens x "
                        f"{m['vocab_size']:,} logits at once"),
        "reserve": "CUDA context, allocator fragmentation, NCCL buffers (fixed)",
    }
    used = p["memory_gib_per_gpu"]
    verdict = (f"fits in {gpu['memory_gib']:.1f} GiB ({100 * used / gpu['memory_gib']:.0f}% used)" if p["fits"] else
               f"does NOT fit in {gpu['memory_gib']:.1f} GiB ({used - gpu['memory_gib']:.1f} GiB over)")
    where = f"; the fullest rank is pipeline stage {p['stage']} of {lay['pp']}" if lay["pp"] > 1 else ""
    lines = [
        f"{m['preset'] or 'custom'} ({m['norm_scheme']}, {count(m['params'])} parameters) on {lay['gpus']} x "
        f"{gpu['name']} ({gpu['memory_gib']:.1f} GiB, {gpu['peak_bf16_flops'] / 1e12:,.0f} TFLOP/s dense bf16)",
        f"layout: tp {lay['tp']}, pp {lay['pp']}, dp {lay['dp']}, {zero}, {width}; micro-batch "
        f"{lay['micro_batch_size']} x seq {lay['seq_len']}, global batch {lay['global_batch_size']} (accumulation "
        f"{lay['grad_accumulation']}); activation checkpointing {lay['activation_checkpointing']}; fused loss "
        f"{'on' if lay['fused_loss'] else 'off'}",
        "",
        f"memory per GPU{where}",
    ]
    for key, label in ROWS:
        lines.append(f"  {label:<18}{p['memory_breakdown_gib'][key]:>9.2f} GiB  {notes[key]}")
    lines += [f"  {'total':<18}{used:>9.2f} GiB  {verdict}", "",
              f"FLOPs per token     {p['flops_per_token']:.4g}  (6 x matmul weights + 12 L d T, the MFU formula of "
              "the training logs)",
              f"tokens/s            {p['tokens_per_s']:,.0f}  at MFU {100 * a['mfu']:.0f}% ({lay['gpus']} x "
              f"{gpu['peak_bf16_flops'] / 1e12:,.0f} TFLOP/s x {a['mfu']:g} / FLOPs per token); "
              f"{p['tokens_per_s_per_gpu']:,.0f} per GPU"]
    if lay["activation_checkpointing"] == "full":
        lines.append("                    (full checkpointing runs about one more forward per step, which the MFU "
                     "formula does not count: assume a lower MFU)")
    return "\n".join(lines)
