"""The Llama parts as DeepSpeed `LayerSpec`s, for `PipelineModule` (pipeline parallelism).

Layer list: [embedding, block 1, ..., block L, final norm, head]. With tied embeddings the first and the last
entries are one `TiedLayerSpec` ("embed"), so DeepSpeed keeps the copies on the first and last stage in sync.
Each part initializes its weights under its name in the whole `Llama` (`init_weights(prefix=...)`), so a
pipelined model from seed s holds exactly the weights of `Llama(cfg, seed=s)`.

Between stages DeepSpeed passes one tensor (pretraining: the activations) or a tuple of tensors. Packed
supervised fine-tuning feeds the first stage `(tokens, positions, doc_ids)`; the embedding, the blocks and the
final norm pass `(x, positions, doc_ids)` on (integer tensors: DeepSpeed sends them along and sends no gradient
back for them), the final norm drops them, and each block builds its document mask from `doc_ids`. The labels
reach the loss on the last stage as a tensor, or as `(labels, scale)` for the token-weighted loss.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.llama import Block, document_mask, init_weights, rope_cache
from models.norms import NORM_SCHEMES, block_parts, embedding_init_gain
from models.parts import normalize_unit_weights
from models.parallel import TensorParallel, column_linear, cross_entropy, tied_logits, vocab_embedding


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None, seed: int):
        super().__init__()
        self.tp = tp
        self.tok_emb = vocab_embedding(cfg.vocab_size, cfg.d_model, tp)
        self.tok_emb.weight.init_gain = embedding_init_gain(cfg)
        self.emb_out = NORM_SCHEMES[cfg.norm_scheme].embedding(cfg)
        init_weights(self, cfg.weight_std, seed)
        normalize_unit_weights(self, NORM_SCHEMES[cfg.norm_scheme].unit_weights)

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (tokens, positions, doc_ids) of packed sequences
            tokens, *rest = inputs
            return (self.emb_out(self.tok_emb(tokens)), *rest)
        return self.emb_out(self.tok_emb(inputs))

    @property
    def weight(self) -> torch.Tensor:  # what TiedLayerSpec ties
        return self.tok_emb.weight


def tied_head_forward(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    return tied_logits(x, embedding.tok_emb.weight, embedding.tp)


class BlockPipe(Block):
    """A Block that carries its own RoPE tables, since a pipeline layer sees only the activations."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel | None, seed: int):
        super().__init__(cfg, block_parts(cfg, layer), tp)
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.weight_std, seed, prefix=f"blocks.{layer - 1}.")
        normalize_unit_weights(self, NORM_SCHEMES[cfg.norm_scheme].unit_weights)

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (x, positions, doc_ids) of packed sequences
            x, positions, doc_ids = inputs
            return super().forward(x, self.rope_cos, self.rope_sin, positions, document_mask(doc_ids)), positions, doc_ids
        return super().forward(inputs, self.rope_cos, self.rope_sin)


class FinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_norm = NORM_SCHEMES[cfg.norm_scheme].final_norm(cfg)

    def forward(self, inputs):
        return self.final_norm(inputs[0] if isinstance(inputs, tuple) else inputs)


class HeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None, seed: int):
        super().__init__()
        self.head = column_linear(cfg.d_model, cfg.vocab_size, tp)
        self.logit_scale = NORM_SCHEMES[cfg.norm_scheme].logit_scale(cfg, tp)
        init_weights(self, cfg.weight_std, seed)
        normalize_unit_weights(self, NORM_SCHEMES[cfg.norm_scheme].unit_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_scale(self.head(x))


class PipelineLoss:
    """loss_fn(logits, labels) for PipelineModule (vocab-parallel under TP).

    Plain labels give the mean token loss of the micro-batch (pretraining steps). Labels given as `(labels,
    scale)` give the sum of the micro-batch's token losses times `scale`: the token-weighted loss of supervised
    fine-tuning (pretrain/train/steps.py) and, with scale 1, validation's loss sums (pretrain/train/evaluate.py)."""

    def __init__(self, tp: TensorParallel | None):
        self.tp = tp

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        if isinstance(labels, tuple):
            labels, scale = labels
            return cross_entropy(logits, labels, self.tp, reduction="sum") * scale
        return cross_entropy(logits, labels, self.tp, reduction="mean")


def layer_specs(cfg: ModelConfig, tp: TensorParallel | None, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # DeepSpeed picks its accelerator at import: pretrain.train sets it first

    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbeddingPipe, cfg, tp, seed, tied_weight_attr="weight")
        last = TiedLayerSpec("embed", EmbeddingPipe, cfg, tp, seed, forward_fn=tied_head_forward, tied_weight_attr="weight")
    else:
        first, last = LayerSpec(EmbeddingPipe, cfg, tp, seed), LayerSpec(HeadPipe, cfg, tp, seed)
    blocks = [LayerSpec(BlockPipe, cfg, l, tp, seed) for l in range(1, cfg.n_layers + 1)]
    return [first, *blocks, LayerSpec(FinalNormPipe, cfg), last]


def full_name_prefix(cfg: ModelConfig, layer_index: int) -> str:
    """Prefix that turns a key of pipeline layer `layer_index` into its name in the full `Llama` state dict.

    The non-block parts name their submodules as `Llama` does (tok_emb, final_norm, head)."""
    return f"blocks.{layer_index - 1}." if 1 <= layer_index <= cfg.n_layers else ""
