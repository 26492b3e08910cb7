"""The Llama's parts as DeepSpeed `LayerSpec`s, for `PipelineModule` (pipeline parallelism).

Layer list: [embedding, block 1, ..., block L, final norm, head], each stage built from the part `Llama` itself is
made of (models/llama.py: `EmbeddingPart`, `Block`, `ReadoutPart`, `HeadPart`, and `initialize`), so what a part
computes and how it is initialized is written once; a stage here only adapts it to what DeepSpeed passes. With tied
embeddings the first and the last entries are one `TiedLayerSpec` ("embed"), so DeepSpeed keeps the copies on the
first and last stage in sync. Each stage initializes its weights under its name in the whole `Llama`, so a
pipelined model from seed s holds exactly the weights of `Llama(cfg, seed=s)`.

Between stages DeepSpeed passes a tuple of tensors whose last entry is the micro-batch's labels. Pretraining feeds
the first stage `(tokens, labels)`; packed supervised fine-tuning feeds `(tokens, positions, doc_ids, labels)`. The
embedding and the blocks pass `(x, *rest)` on (integer tensors: DeepSpeed sends them along and sends no gradient back
for them), each block builds its document mask from `doc_ids`, and the final norm keeps only `(x, labels)`. The last
stage computes the head and the loss itself and hands `pipeline_loss` the micro-batch's loss sum: the head is then
used inside the module's forward, where DeepSpeed expects every parameter's gradient to arise (its engine starts
each backward, and with bf16 clears the low-precision gradients, when the gradient reaches the module's output; a
head used later, in `loss_fn`, lost its gradient there), and the fused loss (train.fused_loss) never holds
[B, T, V] under pipeline parallelism either. The labels also reach `pipeline_loss` from the last stage's loader, as a
tensor or as `(labels, scale)` for the token-weighted loss.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.llama import Block, EmbeddingPart, HeadPart, ReadoutPart, document_mask, initialize, rope_cache
from models.norms import block_parts
from models.parallel import IGNORE_INDEX, TensorParallel


class EmbeddingStage(EmbeddingPart, HeadPart, nn.Module):
    """The first stage; with tied embeddings also the last (the same module, `tied_loss_forward`)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None, seed: int):
        super().__init__()
        self.add_embedding(cfg, tp)
        if cfg.tie_embeddings:
            self.add_head(cfg, tp)  # head None: the logits read tok_emb
            if any(True for _ in self.logit_scale.parameters()):
                raise ValueError(f"model.norm_scheme={cfg.norm_scheme} has a learned logit scale, which the tied "
                                 "pipeline stage would hold twice; set model.tie_embeddings=false")
        initialize(self, cfg, seed)

    def forward(self, inputs: tuple) -> tuple:
        tokens, *rest = inputs  # rest: ([positions, doc_ids,] labels)
        return (self.embed(tokens), *rest)

    @property
    def weight(self) -> torch.Tensor:  # what TiedLayerSpec ties
        return self.tok_emb.weight


def tied_loss_forward(stage: EmbeddingStage, inputs: tuple) -> torch.Tensor:
    """The tied last stage's forward: the loss sum of the final hidden states (`HeadPart.head_loss`)."""
    x, labels = inputs
    return stage.head_loss(x, labels, reduction="sum")


class BlockStage(Block):
    """A Block that carries its own RoPE tables, since a pipeline stage sees only the activations."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel | None, seed: int):
        super().__init__(cfg, block_parts(cfg, layer), tp)
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        initialize(self, cfg, seed, prefix=full_name_prefix(cfg, layer))

    def forward(self, inputs: tuple) -> tuple:
        x, *rest = inputs
        if len(rest) == 3:  # (positions, doc_ids, labels) of packed sequences
            positions, doc_ids, _ = rest
            return super().forward(x, self.rope_cos, self.rope_sin, positions, document_mask(doc_ids)), *rest
        return super().forward(x, self.rope_cos, self.rope_sin), *rest


class ReadoutStage(ReadoutPart, nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.add_readout(cfg)
        initialize(self, cfg, seed)

    def forward(self, inputs: tuple) -> tuple:
        return self.readout(inputs[0]), inputs[-1]  # (x, labels): the packing inputs end here


class HeadStage(HeadPart, nn.Module):
    """The last stage of an untied model: the head and the loss sum of the micro-batch."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None, seed: int):
        super().__init__()
        self.add_head(cfg, tp)
        initialize(self, cfg, seed)

    def forward(self, inputs: tuple) -> torch.Tensor:
        x, labels = inputs  # [B, T, D], [B, T]
        return self.head_loss(x, labels, reduction="sum")  # vocab-parallel under TP, chunked with train.fused_loss


def pipeline_loss(loss_sum: torch.Tensor, labels) -> torch.Tensor:
    """loss_fn(the last stage's loss sum, labels) for PipelineModule.

    Plain labels give the mean token loss of the micro-batch (pretraining steps). Labels given as `(labels,
    scale)` give the sum of the micro-batch's token losses times `scale`: the token-weighted loss of supervised
    fine-tuning (pretrain/train/steps.py) and, with scale 1, validation's loss sums (pretrain/train/evaluate.py)."""
    if isinstance(labels, tuple):
        labels, scale = labels
        return loss_sum * scale
    return loss_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)


# What `PipelineModule(partition_method=...)` balances: the blocks, by count.
PARTITION_METHOD = f"type:{BlockStage.__name__}"


def layer_specs(cfg: ModelConfig, tp: TensorParallel | None, seed: int) -> list:
    """The layers of a PipelineModule whose `loss_fn` is `pipeline_loss`."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # DeepSpeed picks its accelerator at import: pretrain.train sets it first

    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbeddingStage, cfg, tp, seed, tied_weight_attr="weight")
        last = TiedLayerSpec("embed", EmbeddingStage, cfg, tp, seed, forward_fn=tied_loss_forward,
                             tied_weight_attr="weight")
    else:
        first, last = LayerSpec(EmbeddingStage, cfg, tp, seed), LayerSpec(HeadStage, cfg, tp, seed)
    blocks = [LayerSpec(BlockStage, cfg, l, tp, seed) for l in range(1, cfg.n_layers + 1)]
    return [first, *blocks, LayerSpec(ReadoutStage, cfg, seed), last]


def full_name_prefix(cfg: ModelConfig, layer_index: int) -> str:
    """Prefix that turns a key of pipeline layer `layer_index` into its name in the full `Llama` state dict.

    The stages of the other parts name their children as `Llama` does (tok_emb, emb_out, final_norm, head,
    logit_scale)."""
    return f"blocks.{layer_index - 1}." if 1 <= layer_index <= cfg.n_layers else ""
