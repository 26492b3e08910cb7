"""Llama-like decoder: RoPE, SwiGLU, grouped-query attention, optional tied embeddings, no biases.

Shapes: B batch, T sequence, D d_model, H query heads, K kv heads, Q = H / K queries per kv head,
E head dim, V vocab. Under tensor parallelism H, K, the MLP width and V are this rank's shares; the math
below is the same, the layers come from models/parallel.py.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from models.config import ModelConfig
from models.norms import (ATTENTION_SLOTS, MLP_SLOTS, NORM_SCHEMES, SLOTS, BlockParts, block_parts, embedding_init_gain,
                          stream_collapse, stream_expand)
from models.norm_layers import Scale
from models.parametrization import multipliers, param_group
from models.parts import normalize_unit_weights
from models.parallel import (TPSplit, TensorParallel, chunked_cross_entropy, column_linear, cross_entropy,
                             liger_cross_entropy, row_linear, tied_logits, vocab_embedding)


def rope_cache(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, E] in the rotate-half layout of Hugging Face's Llama."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, E]; cos, sin: [T, E], or [B, 1, T, E] for per-token positions
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_at(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None, T: int, dtype: torch.dtype):
    """The RoPE rows of a [B, T] position tensor ([B, 1, T, E], positions restart per packed example), or of
    positions 0..T-1 ([T, E]) when `positions` is None."""
    if positions is None:
        return cos[:T].to(dtype), sin[:T].to(dtype)
    return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, T] of packed sequences: query i sees key j iff j <= i and both belong to
    the same example (doc_ids [B, T], equal ids = one example, laid out contiguously)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: BlockParts, tp: TensorParallel | None = None):
        super().__init__()
        tp_size = 1 if tp is None else tp.size
        for what, n in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads)):
            if n % tp_size:
                raise ValueError(f"{what}={n} is not divisible by parallel.tp={tp_size}; choose a tp that divides it")
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.n_kv_local = cfg.n_kv_heads // tp_size
        self.gqa = self.q_per_kv > 1
        # Fused q/k/v, grouped per kv head: rows are [K, Q + 2, E] = (q_1..q_Q, k, v) for each kv head, so a
        # contiguous TP split hands each rank whole groups (Megatron's layout).
        self.qkv = column_linear(cfg.d_model, cfg.n_kv_heads * (self.q_per_kv + 2) * cfg.head_dim, tp)
        self.o = row_linear(cfg.n_heads * cfg.head_dim, cfg.d_model, tp)
        row_gain = torch.full((cfg.n_kv_heads, self.q_per_kv + 2, cfg.head_dim, 1), parts.init_gain_qkv)
        row_gain[:, -1] *= parts.init_gain_value
        self.qkv.weight.init_gain = row_gain.reshape(-1, 1)
        self.o.weight.init_gain = parts.init_gain_attn_out
        for slot in ATTENTION_SLOTS:  # q/k/v norms, q/k scales, output gate (models/norms.py); nn.Identity if unused
            setattr(self, slot, getattr(parts, slot)(tp))
        self.softmax_scale = parts.softmax_scale
        self.recompute_core = False  # selective activation checkpointing: `recompute` sets it

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Causal self-attention. `positions` [B, T]: per-token RoPE positions (default 0..T-1); `mask`: a boolean
        [B, 1, T, S] mask of the keys each query sees (packed examples, see `document_mask`; default causal);
        `cache`: a `models.generate.LayerCache` the new keys and values are appended to (S = all cached keys)."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_kv_local, self.q_per_kv + 2, self.head_dim)
        # split (not indexing): its backward is one concatenation instead of three zero-filled qkv-sized buffers
        q, k, v = qkv.split([self.q_per_kv, 1, 1], dim=3)
        q = self.q_norm(q.reshape(B, T, -1, self.head_dim)).transpose(1, 2)  # [B, H, T, E]
        k = self.k_norm(k.squeeze(3)).transpose(1, 2)  # [B, K, T, E]
        v = self.v_norm(v.squeeze(3)).transpose(1, 2)
        cos, sin = rope_at(cos, sin, positions, T, q.dtype)
        q, k = self.q_scale(apply_rope(q, cos, sin)), self.k_scale(apply_rope(k, cos, sin))
        if cache is not None:
            k, v = cache.append(k, v)
            if mask is None and k.shape[2] != T:  # causal, aligned to the newest key
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        # pretraining (no mask): one sequence per row, the fused causal kernel
        core = dict(attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale, enable_gqa=self.gqa)
        if self.recompute_core and torch.is_grad_enabled():  # keep q, k, v; recompute softmax(q k^T) v in backward
            y = _recomputed(F.scaled_dot_product_attention, q, k, v, **core)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **core)  # [B, H, T, E]
        return self.o(self.out_gate(x, y.transpose(1, 2)).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). gate and up are separate column-parallel matmuls: a fused [gate; up]
    projection would hand SiLU and the product strided halves, which measured slower on CPU."""

    def __init__(self, cfg: ModelConfig, parts: BlockParts, tp: TensorParallel | None = None):
        super().__init__()
        self.gate = column_linear(cfg.d_model, cfg.ffn_hidden, tp)
        self.up = column_linear(cfg.d_model, cfg.ffn_hidden, tp)
        self.down = row_linear(cfg.ffn_hidden, cfg.d_model, tp)
        self.gate.weight.init_gain, self.up.weight.init_gain = parts.init_gain_gate, parts.init_gain_up
        self.down.weight.init_gain = parts.init_gain_mlp_out
        for slot in MLP_SLOTS:  # scales on the gate and up outputs (nGPT); nn.Identity if unused
            setattr(self, slot, getattr(parts, slot)(tp))
        self.recompute_act = False  # selective activation checkpointing: `recompute` sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_scale(self.gate(x)), self.up_scale(self.up(x))  # [B, T, F] each
        if self.recompute_act and torch.is_grad_enabled():  # keep the matmul outputs, recompute silu(g) in backward
            return self.down(_recomputed(_swiglu, g, u))
        return self.down(_swiglu(g, u))


def _swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _recomputed(fn, *args, **kwargs):
    """fn(*args) whose intermediate tensors are not kept for backward but computed again there (non-reentrant
    checkpointing; the model draws no random numbers, so no RNG state is replayed)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


class Block(nn.Module):
    """One transformer block; which norms sit where is given by `parts` (see models/norms.py)."""

    def __init__(self, cfg: ModelConfig, parts: BlockParts, tp: TensorParallel | None = None):
        super().__init__()
        for slot in SLOTS:  # attn_norm, attn_out_norm, ... (models/norms.py): the declared slot names
            setattr(self, slot, getattr(parts, slot)())
        self.attn = Attention(cfg, parts, tp)
        self.mlp = MLP(cfg, parts, tp)
        self.residual = parts.residual(parts.residual_alpha)  # alpha x + F, or GPAS / nGPT's update (models/parts.py)
        if parts.branch_scale != 1.0:  # the parametrization's branch multiplier where the output slot holds a norm
            self.residual.branch_scale = parts.branch_scale
        self.residual_alpha = parts.residual_alpha
        self.layer_scalar = parts.layer_scalar()  # Gemma 4's scalar on the block's output (nn.Identity if unused)
        self.recompute_all = False  # full activation checkpointing: `recompute` sets it

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        if self.recompute_all and torch.is_grad_enabled() and cache is None:  # keep only x; the block again in backward
            return _recomputed(self.compute, x, cos, sin, positions, mask)
        return self.compute(x, cos, sin, positions, mask, cache)

    def compute(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        # x, h: the residual, [B, T, D], or with model.residual the stream state [B, T, n, D] (models/streams.py)
        u, mix = self.residual.read(x, 0)  # the sublayer's input: x itself, or the streams' mix
        a = self.attn_out_norm(self.attn(self.attn_norm(u), cos, sin, positions, mask, cache))
        h = self.attn_post_norm(self.residual(x, a, 0, mix))  # alpha * x + a
        u, mix = self.residual.read(h, 1)
        m = self.mlp_out_norm(self.mlp(self.mlp_norm(u)))
        return self.layer_scalar(self.mlp_post_norm(self.residual(h, m, 1, mix)))


class EmbeddingPart:
    """The model's input end, as a mixin of `Llama` and of the pipeline's first stage: the token embedding, the
    scheme's part on its output (dyt/derf's scalar, peri_ln's norm; else nn.Identity) and its expansion into the
    residual streams (model.residual; else nn.Identity). Its children are named as in the full model's state dict
    (`tok_emb`, `emb_out`, `streams_in`) wherever it sits."""

    def add_embedding(self, cfg: ModelConfig, tp: TensorParallel | None) -> None:
        self.tok_emb = vocab_embedding(cfg.vocab_size, cfg.d_model, tp)
        self.tok_emb.weight.init_gain = embedding_init_gain(cfg)
        self.emb_out = NORM_SCHEMES[cfg.norm_scheme].embedding(cfg)
        self.streams_in = stream_expand(cfg)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.streams_in(self.emb_out(self.tok_emb(tokens)))  # [B, T] -> [B, T, D] (the state: [B, T, n, D])


class ReadoutPart:
    """The end of the residual stream, as a mixin of `Llama` and of the pipeline's final-norm stage: the collapse of
    the residual streams (model.residual; else nn.Identity) and the scheme's final norm (nn.Identity where it has
    none)."""

    def add_readout(self, cfg: ModelConfig) -> None:
        self.streams_out = stream_collapse(cfg)
        self.final_norm = NORM_SCHEMES[cfg.norm_scheme].final_norm(cfg)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.streams_out(x))  # [B, T, D] (or the state [B, T, n, D]) -> [B, T, D]


class HeadPart:
    """The output end, as a mixin of `Llama` and of the pipeline's last stage: the head (None when tied to the token
    embedding, whose `tok_emb` the module then holds too) and the logit scale (ngpt's s_z, a parametrization's fixed
    1/m_d; else nn.Identity)."""

    def add_head(self, cfg: ModelConfig, tp: TensorParallel | None) -> None:
        self.tp = tp
        self.head = None if cfg.tie_embeddings else column_linear(cfg.d_model, cfg.vocab_size, tp)
        self.logit_scale = NORM_SCHEMES[cfg.norm_scheme].logit_scale(cfg, tp)
        logits = multipliers(cfg).logits
        if logits != 1.0:  # µP's 1/m_d (no scheme with a logit scale of its own takes a parametrization)
            self.logit_scale = Scale(logits)

    fused_loss = True  # train.fused_loss (`recompute` sets it): the head and the loss in chunks of tokens
    liger = False  # ... by Liger's fused kernel (CUDA; `recompute` sets it where the kernel applies)

    def liger_applies(self) -> bool:
        """Liger's kernel computes x W^T and the loss: a whole-vocabulary head (no TP) with no logit scale (ngpt's
        s_z multiplies the logits, which the kernel never hands back)."""
        return self.tp is None and type(self.logit_scale) is nn.Identity

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, D] -> [B, T, V] (this rank's vocabulary shard under TP)
        return self.logit_scale(tied_logits(x, self.tok_emb.weight, self.tp) if self.head is None else self.head(x))

    def head_loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The next-token loss of the final hidden states x [B, T, D] (see `cross_entropy`); fused, the [B, T, V]
        logits are never held (models/parallel.py `chunked_cross_entropy`)."""
        if not self.fused_loss:
            return cross_entropy(self.logits(x), labels, self.tp, reduction=reduction)
        weight = (self.tok_emb if self.head is None else self.head).weight  # [V, D], this rank's share under TP
        if self.liger and torch.is_grad_enabled():  # (Liger makes the gradients in its forward: not for evaluation)
            return liger_cross_entropy(x, weight, labels, reduction=reduction)
        return chunked_cross_entropy(self.logits, x, labels, self.tp, weight.shape[0], reduction=reduction)


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def recompute(model: nn.Module, activation_checkpointing: str = "none", fused_loss: bool = True,
              liger: bool = False) -> set[str]:
    """How `model` (a Llama or a pipeline's stages) trades compute for memory in training (train.fused_loss,
    train.activation_checkpointing): "full" keeps only each block's input and runs the block again in backward;
    "selective" keeps the matmul outputs and recomputes the attention core (softmax(q k^T) v) and SwiGLU's
    activation (Megatron's selective recomputation); fused, the loss holds one chunk of logits at a time, by
    Liger's kernel where `liger` (CUDA, liger-kernel installed) and the head allows it. The math and every gradient
    are those of the plain model; evaluation and generation (no grad) never recompute. Returns the loss paths of
    the heads `model` holds ("unfused", "chunked", "liger"; none for a pipeline stage without the head)."""
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, "
                         f"got {activation_checkpointing!r}")
    paths = set()
    for module in model.modules():
        if isinstance(module, Block):
            module.recompute_all = activation_checkpointing == "full"
            module.attn.recompute_core = module.mlp.recompute_act = activation_checkpointing == "selective"
        if isinstance(module, HeadPart):
            module.fused_loss = fused_loss
            module.liger = fused_loss and liger and module.liger_applies()
            paths.add("liger" if module.liger else "chunked" if fused_loss else "unfused")
    return paths


def initialize(module: nn.Module, cfg: ModelConfig, seed: int, prefix: str = "") -> None:
    """The model's initialization of `module`: the whole `Llama`, or one pipeline stage whose parameters are named
    `prefix` + their name within it in the full model. The same seed gives the same weights at any TP/PP layout."""
    table = multipliers(cfg)
    init_weights(module, cfg.weight_std, seed, prefix,
                 group_init=lambda name, ndim: table.groups[param_group(name, ndim)].init)
    normalize_unit_weights(module, NORM_SCHEMES[cfg.norm_scheme].unit_weights)  # ngpt: every weight on the sphere


def check_tp_divides(cfg: ModelConfig, tp_size: int) -> None:
    """A ValueError naming the first model size that `tp_size` ranks cannot split (vocabulary, heads, MLP width)."""
    for what, n in (("model.vocab_size", cfg.vocab_size), ("model.n_heads", cfg.n_heads),
                    ("model.n_kv_heads", cfg.n_kv_heads), ("model.ffn_hidden", cfg.ffn_hidden)):
        if n % tp_size:  # checked before any (megatron) layer is built
            raise ValueError(f"{what}={n} is not divisible by parallel.tp={tp_size}; choose a tp that divides it")


class Llama(EmbeddingPart, ReadoutPart, HeadPart, nn.Module):
    """tokens [B, T] -> logits [B, T, V] (vocab-sharded under TP), or the mean loss when labels are given.

    The embedding, the blocks, the final norm and the head are the parts models/pipeline.py cuts into pipeline
    stages; what each computes and how it is initialized is written once, here."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None, seed: int = 0):
        super().__init__()
        check_tp_divides(cfg, 1 if tp is None else tp.size)
        self.cfg = cfg
        self.add_embedding(cfg, tp)
        self.blocks = nn.ModuleList(Block(cfg, block_parts(cfg, l), tp) for l in range(1, cfg.n_layers + 1))
        self.add_readout(cfg)
        self.add_head(cfg, tp)
        self.reset_rope()
        initialize(self, cfg, seed)

    def reset_rope(self) -> None:
        cos, sin = rope_cache(self.cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def meta(cls, cfg: ModelConfig, tp: int = 1) -> Llama:
        """The model's structure on the meta device: no memory, no init. Its weights' `tp_split` describe a split
        over `tp` ranks, the reference that merges TP shards into full tensors; the names and shapes are those of
        the full model."""
        with torch.device("meta"):
            model = cls(cfg)
        if tp != 1:
            for p in model.parameters():
                if hasattr(p, "tp_split"):
                    p.tp_split = dataclasses.replace(p.tp_split, size=tp, rank=0)
        return model

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Llama:
        """The model holding `state_dict` (full, TP = 1; every key, strictly), on the CPU, without spending time on
        a random init that is overwritten."""
        model = cls.meta(cfg).to_empty(device="cpu")
        model.reset_rope()  # the only buffers (checked below): computed, not stored
        extra = {name for name, _ in model.named_buffers()} - {"rope_cos", "rope_sin"}
        if extra:
            raise RuntimeError(f"Llama.from_state_dict does not know how to fill the buffers {sorted(extra)}")
        model.load_state_dict(state_dict, strict=True)
        return model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean",
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """Logits, or with `labels` the next-token loss (`reduction` "mean", or "sum" over non-ignored tokens).

        Packed sequences (supervised fine-tuning) give `positions` [B, T] (restarting at 0 for every example) and
        `doc_ids` [B, T] (one id per example): attention then never crosses an example boundary. Generation gives
        `positions`, an explicit boolean `mask` [B, 1, T, S] and a `models.generate.KVCache`. Without them: one
        sequence per row, positions 0..T-1, causal attention."""
        if doc_ids is not None:
            mask = document_mask(doc_ids)
        x = self.embed(tokens)  # [B, T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope_cos, self.rope_sin, positions, mask, None if cache is None else cache.layers[i])
        x = self.readout(x)
        return self.logits(x) if labels is None else self.head_loss(x, labels, reduction)  # [B, T, V] or the loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the full (unsharded) model."""
        n = sum(_full_numel(p) for p in self.parameters())
        if exclude_embeddings:
            n -= _full_numel(self.tok_emb.weight)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, PaLM appendix B): 6 x the weights of every matmul, the
        output head included whether or not it is tied to the embedding (a lookup, no matmul), plus 12 L D T for
        the attention scores and values. Norm gains and scalars do no matmul and are not counted."""
        c = self.cfg
        matmul = sum(_full_numel(p) for name, p in self.named_parameters() if p.ndim == 2 and name != "tok_emb.weight")
        head = c.vocab_size * c.d_model if c.tie_embeddings else 0  # untied: head.weight is among the matmuls
        return 6.0 * (matmul + head) + 12.0 * c.n_layers * c.d_model * seq_len


def _full_numel(p: torch.Tensor) -> int:
    split = getattr(p, "tp_split", None)
    return p.numel() if split is None else int(torch.Size(split.full_shape).numel())


def stable_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(module: nn.Module, std: float, seed: int, prefix: str = "", group_init=None) -> None:
    """Normal(0, std * gain) for every linear/embedding weight, ones (or the scheme's constants) for norms.

    Each weight's full (TP = 1) tensor is drawn from a generator seeded by (seed, its name), then this
    rank's shard is kept: the same seed gives the same model at any TP or PP layout. `prefix` is the
    weight's name in the whole Llama when `module` is one part of it (a pipeline stage's layer). `group_init`
    (full name, ndim) -> the parametrization's init factor of the weight's group (models/parametrization.py).
    """
    for name, p in module.named_parameters():
        split = getattr(p, "tp_split", None)
        if split is None and getattr(p, "seeded_init", False):  # replicated, drawn alike (models/streams.py `seeded`)
            split = TPSplit(tuple(p.shape))
        if split is None or p.is_meta:
            continue
        if hasattr(p, "init_value"):  # a TP-split gain (models.parallel.WidthNorm)
            p.fill_(p.init_value)
            continue
        gen = torch.Generator().manual_seed(stable_seed(seed, prefix + name))
        gain = getattr(p, "init_gain", 1.0)
        factor = 1.0 if group_init is None else group_init(prefix + name, len(split.full_shape))
        full = torch.randn(split.full_shape, generator=gen) * (std * (gain if factor == 1.0 else gain * factor))
        p.copy_(split.shard(full))
    for m in module.modules():
        if hasattr(m, "reset_parameters") and not any(hasattr(p, "tp_split") for p in m.parameters(recurse=False)):
            m.reset_parameters()
