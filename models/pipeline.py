"""The Llama's parts as DeepSpeed `LayerSpec`s, for `PipelineModule` (pipeline parallelism).

Layer list: [embedding, block 1, ..., block L, final norm, head], each stage built from the part `Llama` itself is
made of (models/llama.py: `EmbeddingPart`, `Block`, `ReadoutPart`, `HeadPart`, and `initialize`), so what a part
computes and how it is initialized is written once; a stage here only adapts it to what DeepSpeed passes. With tied
embeddings the first and the last entries are one `TiedLayerSpec` ("embed"), so DeepSpeed keeps the copies on the
first and last stage in sync. Each stage initializes its weights under its name in the whole `Llama`, so a
pipelined model from seed s holds exactly the weights of `Llama(cfg, seed=s)`.

Between stages DeepSpeed passes one tensor (pretraining: the activations) or a tuple of tensors. Packed
supervised fine-tuning feeds the first stage `(tokens, positions, doc_ids)`; the embedding, the blocks and the
final norm pass `(x, positions, doc_ids)` on (integer tensors: DeepSpeed sends them along and sends no gradient
back for them), the final norm drops them, and each block builds its document mask from `doc_ids`. The labels
reach the loss on the last stage as a tensor, or as `(labels, scale)` for the token-weighted loss. The last stage
hands the loss its final hidden states, not logits: the loss computes the head through that stage's `head_loss`, so
the fused loss (train.fused_loss) never holds [B, T, V] under pipeline parallelism either.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.llama import Block, EmbeddingPart, HeadPart, ReadoutPart, document_mask, initialize, rope_cache
from models.norms import block_parts
from models.parallel import TensorParallel


class EmbeddingStage(EmbeddingPart, HeadPart, nn.Module):
    """The first stage; with tied embeddings also the last (the same module, `hidden_forward`), whose head the loss
    computes."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None, seed: int, loss: PipelineLoss | None = None):
        super().__init__()
        self.add_embedding(cfg, tp)
        if cfg.tie_embeddings:
            self.add_head(cfg, tp)  # head None: the logits read tok_emb
            if loss is not None:
                loss.head = self
            if any(True for _ in self.logit_scale.parameters()):
                raise ValueError(f"model.norm_scheme={cfg.norm_scheme} has a learned logit scale, which the tied "
                                 "pipeline stage would hold twice; set model.tie_embeddings=false")
        initialize(self, cfg, seed)

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (tokens, positions, doc_ids) of packed sequences
            tokens, *rest = inputs
            return (self.embed(tokens), *rest)
        return self.embed(inputs)

    @property
    def weight(self) -> torch.Tensor:  # what TiedLayerSpec ties
        return self.tok_emb.weight


def hidden_forward(stage: EmbeddingStage, x: torch.Tensor) -> torch.Tensor:
    """The tied last stage's forward: the hidden states pass to the loss, which computes the head (`PipelineLoss`)."""
    return x


class BlockStage(Block):
    """A Block that carries its own RoPE tables, since a pipeline stage sees only the activations."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel | None, seed: int):
        super().__init__(cfg, block_parts(cfg, layer), tp)
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        initialize(self, cfg, seed, prefix=full_name_prefix(cfg, layer))

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (x, positions, doc_ids) of packed sequences
            x, positions, doc_ids = inputs
            return super().forward(x, self.rope_cos, self.rope_sin, positions, document_mask(doc_ids)), positions, doc_ids
        return super().forward(inputs, self.rope_cos, self.rope_sin)


class ReadoutStage(ReadoutPart, nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.add_readout(cfg)
        initialize(self, cfg, seed)

    def forward(self, inputs):
        return self.readout(inputs[0] if isinstance(inputs, tuple) else inputs)


class HeadStage(HeadPart, nn.Module):
    """The last stage of an untied model: it holds the head, which the loss computes (`PipelineLoss`)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None, seed: int, loss: PipelineLoss | None = None):
        super().__init__()
        self.add_head(cfg, tp)
        initialize(self, cfg, seed)
        if loss is not None:
            loss.head = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # [B, T, D]: the loss makes the logits


class PipelineLoss:
    """loss_fn(hidden states, labels) for PipelineModule: the head and the loss of the last stage, through the head
    stage's `head_loss` (vocab-parallel under TP, chunked with train.fused_loss). The head stage registers itself
    here when DeepSpeed builds it on the last pipeline rank.

    Plain labels give the mean token loss of the micro-batch (pretraining steps). Labels given as `(labels,
    scale)` give the sum of the micro-batch's token losses times `scale`: the token-weighted loss of supervised
    fine-tuning (pretrain/train/steps.py) and, with scale 1, validation's loss sums (pretrain/train/evaluate.py)."""

    def __init__(self):
        self.head: HeadPart | None = None

    def __call__(self, x: torch.Tensor, labels) -> torch.Tensor:
        if isinstance(labels, tuple):
            labels, scale = labels
            return self.head.head_loss(x, labels, reduction="sum") * scale
        return self.head.head_loss(x, labels, reduction="mean")


# What `PipelineModule(partition_method=...)` balances: the blocks, by count.
PARTITION_METHOD = f"type:{BlockStage.__name__}"


def layer_specs(cfg: ModelConfig, tp: TensorParallel | None, seed: int, loss: PipelineLoss) -> list:
    """The layers of a PipelineModule whose `loss_fn` is `loss` (the last stage registers its head there)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # DeepSpeed picks its accelerator at import: pretrain.train sets it first

    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbeddingStage, cfg, tp, seed, loss, tied_weight_attr="weight")
        last = TiedLayerSpec("embed", EmbeddingStage, cfg, tp, seed, loss, forward_fn=hidden_forward,
                             tied_weight_attr="weight")
    else:
        first, last = LayerSpec(EmbeddingStage, cfg, tp, seed), LayerSpec(HeadStage, cfg, tp, seed, loss)
    blocks = [LayerSpec(BlockStage, cfg, l, tp, seed) for l in range(1, cfg.n_layers + 1)]
    return [first, *blocks, LayerSpec(ReadoutStage, cfg, seed), last]


def full_name_prefix(cfg: ModelConfig, layer_index: int) -> str:
    """Prefix that turns a key of pipeline layer `layer_index` into its name in the full `Llama` state dict.

    The stages of the other parts name their children as `Llama` does (tok_emb, emb_out, final_norm, head,
    logit_scale)."""
    return f"blocks.{layer_index - 1}." if 1 <= layer_index <= cfg.n_layers else ""
