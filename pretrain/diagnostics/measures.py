"""The per-layer measures: one table, read by the training-time diagnostics, `pretrain analyze-depth` and every
figure that draws them (names, labels and definitions live here once).

Two consumers measure them, on different data:

    training       pretrain/diagnostics (stats.py computes, writer.py writes): layer_stats.jsonl, TensorBoard's
                   layers/<name>/lNN; every diagnostics.interval steps, over the ONE measured micro-batch of the
                   step (the first of data-parallel rank 0), with the weights before that step's update
    analyze_depth  pretrain/analysis/depth.py: depth.json of `pretrain analyze-depth`; once per checkpoint, over all
                   tokens of --batches validation micro-batches, on one full model

An entry in both (`training` and `analyze_depth`) has one definition; its `difference` says how the two numbers
differ (the data). An entry in one only says why in `difference` (it needs the backward pass, or the whole model:
the logit lens, a rerun with a block skipped), and names its near twin in the other consumer where there is one.

Notation of the definitions: a block computes h = attn_post_norm(alpha x + a), y = mlp_post_norm(alpha h + m)
(models/norms.py, read through pretrain/diagnostics/taps.py) with x its input, y its output,
a = attn_out_norm(Attn(attn_norm(x))), m = mlp_out_norm(MLP(mlp_norm(h))) and alpha the scheme's residual weight
(1 except deepnorm). v_t is token t's vector over the hidden dim (D = d_model), ||v||_F the norm over all
elements; "mean over tokens" is over every position the consumer measures; statistics in at least fp32.
With residual streams (model.residual: the block reads and writes a state [B, T, n, D], models/streams.py) x, h and y
are the collapsed state, the sum over the streams; a and m are the sublayers' outputs before the streams' write; the
logit lens decodes the state through the model's readout (its collapse, then the final norm); a skipped block is the
identity on the whole state.
The per-stream entries (shape PER_STREAM, training only, in layer_stats.jsonl only when the model has n > 1 streams
side by side: mhc, hc, hc_static, siamese; not attn_res, whose state holds the earlier blocks' outputs)
are of the state's streams themselves: X_k, H_k, Y_k the k-th stream [B, T, D] of the block's input, mid-block and
output states. No parameter gradient belongs to one stream (every parameter of a block acts on the streams' mix u, a
weighted sum over all streams, and its output is written into every stream; the mixing weights are functions of the
whole flattened state), so the per-stream gradient norm grad_norm_stream is that of the loss with respect to the
stream itself, dl/dX_k, the activation gradient; grad_norm stays the block's parameter gradient norm.

Drawn: `stats_panel` draws an entry's training values against depth in `pretrain plot` and the report's layer
figure; `depth_panel` its analyze-depth values in the report's depth figure (pretrain/analysis/figures.py), both
in table order, with `label` on the y axis (log scale where `log_scale`) and `title` over the panel.
depth.png (`figures.depth_figure`) is laid out by hand, with the labels and titles of this table.
"""

from __future__ import annotations

from dataclasses import dataclass

# The values of one record (`shape`):
PER_BLOCK = "L"  # one per block, index 0 = block 1
FROM_EMBEDDING = "L + 1"  # index 0 = the embedding as the first block reads it, then one per block
BLOCK_PAIRS = "L x L"  # row s = the skipped block, column l = the affected block
PER_STREAM = "L x n"  # one list of n values per block (stream k at index k - 1), in the record only when n > 1


@dataclass(frozen=True)
class LayerMeasure:
    name: str  # key in layer_stats.jsonl and TensorBoard (layers/<name>/lNN) and/or in depth.json
    label: str  # axis label (the legend, where depth.png draws several measures in one panel)
    title: str  # panel title
    definition: str  # what is measured, in the notation of the module docstring
    difference: str  # both consumers: how their numbers differ; one: why only it, and the other's near twin
    training: bool = False  # measured during training (pretrain/diagnostics: layer_stats.jsonl, TensorBoard)
    analyze_depth: bool = False  # computed by `pretrain analyze-depth` (pretrain/analysis/depth.py: depth.json)
    log_scale: bool = True
    stats_panel: bool = False  # training values: a panel of `pretrain plot` and of the report's layer figure
    depth_panel: bool = False  # analyze-depth values: a panel of the report's depth figure
    shape: str = PER_BLOCK


_SKIPS = ("analyze-depth only: reruns the blocks after the skipped one and the head, which needs the whole model, "
          "not one block's activations")

LAYER_MEASURES: tuple[LayerMeasure, ...] = (
    LayerMeasure(
        "variance", "output variance", "Residual variance vs depth",
        "mean over tokens of the per-token (biased) variance of y over the hidden dim, "
        "(1/BT) sum_t (1/D) sum_d (y_td - mean_d y_t)^2: the Curse of Depth paper's \"output variance\" of layer l, "
        "the quantity the next LayerNorm divides by",
        "training only: the residual's scale followed over the steps of a run",
        training=True, stats_panel=True),
    LayerMeasure(
        "rms", "output RMS", "Residual RMS vs depth",
        "sqrt(mean over all elements of y^2)",
        "training only: the residual's scale followed over the steps of a run",
        training=True),
    LayerMeasure(
        "attn_ratio", "||a|| / ||x||", "Attention branch vs residual",
        "||a||_F / ||alpha x||_F over the micro-batch: the attention output relative to the residual it is added to "
        "(Csordas et al.'s ||a_l|| / ||h_l||)",
        "training only; analyze-depth's attn_contribution is its per-token twin (a mean of per-token ratios, where "
        "this one ratio of norms over the micro-batch weighs tokens by their norm): not the same number",
        training=True),
    LayerMeasure(
        "mlp_ratio", "||m|| / ||h||", "MLP branch vs residual",
        "||m||_F / ||alpha h||_F over the micro-batch, h the residual m is added to (= ||m_l|| / ||h_l + a_l|| in "
        "Csordas et al.'s notation for pre-norm blocks)",
        "training only; analyze-depth's mlp_contribution is its per-token twin: not the same number",
        training=True),
    LayerMeasure(
        "angular_distance", "angular distance / pi", "Input vs output of each block",
        "mean over tokens of arccos(cos(x_t, y_t)) / pi, in [0, 1] (Gromov et al., \"The Unreasonable "
        "Ineffectiveness of the Deeper Layers\")",
        "both, one definition, different data: training over the step's one measured micro-batch; analyze-depth "
        "over all tokens of its validation micro-batches (the cosine in float64)",
        training=True, analyze_depth=True, log_scale=False, depth_panel=True),
    LayerMeasure(
        "mix_ds_error", "max |row/column sum - 1|", "Streams' mix: distance from doubly stochastic",
        "max over tokens, both sublayers and all rows and columns of |sum - 1| of the residual streams' mixing "
        "matrix C (model.residual: mHC's Sinkhorn-Knopp comb, hyper-connections' A_r; one stream, and attn_res and "
        "siamese, whose updates are not a mixing matrix: C = [alpha])",
        "training only: the mixing weights are followed over the steps of a run",
        training=True),
    LayerMeasure(
        "mix_spectral_norm", "||C||_2", "Streams' mix: spectral norm",
        "mean over tokens and both sublayers of the largest singular value of the mixing matrix C (as "
        "mix_ds_error; 1 for a doubly-stochastic C, alpha for one stream)",
        "training only: the mixing weights are followed over the steps of a run",
        training=True),
    LayerMeasure(
        "mix_entropy", "row entropy (nats)", "Streams' mix: entropy",
        "mean over tokens, both sublayers and the rows of C of the entropy of the row's |entries| normalized to sum "
        "1, in [0, log n] (0: each stream kept apart; log n: evenly mixed; 0 for one stream)",
        "training only: the mixing weights are followed over the steps of a run",
        training=True),
    LayerMeasure(
        "variance_stream", "stream output variance", "Residual variance per stream",
        "variance of each stream: mean over tokens of the per-token (biased) variance of Y_k over the hidden dim, "
        "k = 1..n (as variance, whose y is the sum over k of Y_k)",
        "training only: the streams' scales followed over the steps of a run (analyze-depth measures the collapsed "
        "state only)",
        training=True, shape=PER_STREAM),
    LayerMeasure(
        "attn_ratio_stream", "||H_k - X_k|| / ||X_k||", "Attention update per stream",
        "||H_k - X_k||_F / ||X_k||_F over the micro-batch: how much the attention sublayer changes stream k (its write "
        "of the branch into the stream and the streams' mix), relative to the stream (the sum over k of H_k - X_k is "
        "h - x; with n copies of one stream, comb = I and every write weight 1, as hyper-connections at init, "
        "it is n x attn_ratio)",
        "training only, as attn_ratio",
        training=True, shape=PER_STREAM),
    LayerMeasure(
        "mlp_ratio_stream", "||Y_k - H_k|| / ||H_k||", "MLP update per stream",
        "||Y_k - H_k||_F / ||H_k||_F over the micro-batch: as attn_ratio_stream, for the MLP sublayer",
        "training only, as mlp_ratio",
        training=True, shape=PER_STREAM),
    LayerMeasure(
        "grad_norm_stream", "||dl/dX_k||", "Input-state gradient norm per stream",
        "||dl/dX_k||_F over the measured micro-batch: the gradient of the loss with respect to stream k of block l's "
        "input state (no parameter gradient belongs to one stream), l the micro-batch's loss as the step's "
        "gradient weighs it times the micro-batches per data-parallel rank: the micro-batch's mean token loss (a "
        "token-weighted step: its loss sum over the mean trained tokens per micro-batch of the global batch)",
        "training only: needs the step's backward pass; unlike grad_norm (the whole global batch's parameter "
        "gradient) it is of the one measured micro-batch",
        training=True, shape=PER_STREAM),
    LayerMeasure(
        "grad_norm", "gradient norm", "Block gradient norm vs depth",
        "L2 norm of the gradient of block l's parameters: the accumulated, data-parallel-averaged gradient of the "
        "whole global batch, before clipping (pretrain/diagnostics/probes.py)",
        "training only: needs the step's backward pass (analyze-depth runs forward only)",
        training=True, stats_panel=True),
    LayerMeasure(
        "attn_contribution", "||a|| / ||x||", "Attention contribution (Csordas et al.)",
        "mean over tokens of ||a_t|| / ||alpha x_t|| (Csordas et al., \"Do Language Models Use Their Depth "
        "Efficiently?\": the sublayer's relative contribution; denominators clamped at 1e-6)",
        "analyze-depth only; training's attn_ratio is its twin over the micro-batch (one ratio of Frobenius "
        "norms): not the same number",
        analyze_depth=True),
    LayerMeasure(
        "mlp_contribution", "||m|| / ||h||", "MLP contribution (Csordas et al.)",
        "mean over tokens of ||m_t|| / ||alpha h_t|| (Csordas et al.; denominators clamped at 1e-6)",
        "analyze-depth only; training's mlp_ratio is its twin over the micro-batch (one ratio of Frobenius "
        "norms): not the same number",
        analyze_depth=True),
    LayerMeasure(
        "block_contribution", "||a+m|| / ||x||", "Block contribution (Csordas et al.)",
        "mean over tokens of ||a_t + m_t|| / ||alpha x_t|| (Csordas et al.; denominators clamped at 1e-6)",
        "analyze-depth only, with the two sublayer contributions it sums",
        analyze_depth=True, depth_panel=True),
    LayerMeasure(
        "logit_lens_kl", "KL(p_l || p_L)", "Logit lens (layer 0: the embedding)",
        "mean over tokens of KL(p_l || p_L), p_l = softmax(head(final_norm(y_l))) the distribution decoded from "
        "the residual after block l, y_0 the embedding as the first block reads it (Csordas et al. start there "
        "too), p_L the model's output (so the last entry is 0)",
        "analyze-depth only: the logit lens decodes every layer's residual through the final norm and the head",
        analyze_depth=True, log_scale=False, depth_panel=True, shape=FROM_EMBEDDING),
    LayerMeasure(
        "skip_loss", "validation loss", "Validation loss with one block skipped",
        "validation loss with block l replaced by the identity (y_l = x_l), all other blocks intact: the Curse of "
        "Depth paper's layer pruning (a skip keeps the first keep_first positions: pretrain/analysis/depth.py)",
        _SKIPS, analyze_depth=True, log_scale=False),
    LayerMeasure(
        "skip_loss_increase", "validation loss increase", "Skipping one block",
        "skip_loss[l] - val_loss",
        _SKIPS, analyze_depth=True, log_scale=False, depth_panel=True),
    LayerMeasure(
        "skip_output_change", "max ||dp||_2", "Skip: change of the output distribution",
        "with block l skipped, the max over positions of ||softmax(logits_skip) - softmax(logits_orig)||_2",
        _SKIPS, analyze_depth=True, log_scale=False),
    LayerMeasure(
        "skip_effect", "max relative change of contribution", "Skip: effect on later contributions",
        "the effect of skipping block s on block l's contribution y_l - x_l: the max over positions of "
        "||(y_l - x_l)_skip - (y_l - x_l)_orig|| / ||(y_l - x_l)_orig|| (Csordas et al.'s layer-skip heat map; "
        "denominators clamped at 1e-6); 1 on the diagonal (the skipped block contributes nothing) and 0 below it "
        "by definition",
        _SKIPS, analyze_depth=True, log_scale=False, shape=BLOCK_PAIRS),
)

_BY_NAME = {m.name: m for m in LAYER_MEASURES}

# The consumers' views, in table order (the order of layer_stats.jsonl's keys and of the panels).
LAYER_STATS = tuple(m for m in LAYER_MEASURES if m.training)
FIGURE_STATS = tuple(m for m in LAYER_STATS if m.stats_panel)
DEPTH_MEASURES = tuple(m for m in LAYER_MEASURES if m.analyze_depth)
DEPTH_PANELS = tuple(m for m in DEPTH_MEASURES if m.depth_panel)


def measure(name: str) -> LayerMeasure:
    """The table's entry `name` (KeyError for a name the table lacks)."""
    return _BY_NAME[name]
