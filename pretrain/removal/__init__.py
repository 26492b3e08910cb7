"""Norm removal (`pretrain remove-norms`): fine-tune a trained pre_ln, lns or reordered model (q/k norms included)
while its norms are switched, one site at a time, to fixed scales, then fold them into the weights: an ordinary
`ln_free` checkpoint.

The recipe is the one of "Transformers Don't Need LayerNorm at Inference Time" (submarat/removing-layer-norm)
carried over to RMSNorm (see docs/removal.md):

  * A site is one norm (models/norms.py `REMOVAL_SITES`): block l's MLP norm (group `mlp`: its input norm, or in
    reordered its output norm), its attention norm (`attn`, likewise), its q and k norms (`qk`, model.qk_norm),
    the final norm (`final`). While live it is the ordinary norm and keeps sigma, an EMA (momentum
    `removal.ema`) of the statistic it divides by, RMS(x) per token (std for LayerNorm), averaged over the
    tensor- and data-parallel ranks' tokens of each step, position 0 left out; a per-head q/k norm keeps one
    sigma per head. Switched, it computes x / sigma * gamma (* 1/sqrt(l) for lns) with sigma frozen: a fixed
    per-channel scale.
  * The schedule is a pure function of the step: the groups in `removal.order` (default mlp, attn, qk, final),
    each block by block (q before k); the k-th site (k = 0, 1, ...) is switched at step
    `removal.start + k * removal.gap`, i.e. that step is the first to run with it fixed. A resume needs nothing but the step and the sigmas, which are
    model buffers and so in every checkpoint (pretrain/state/reshard.py carries them across layouts).
  * The run is an ordinary training run (`pretrain.train.loop`, with `RemovalHooks`): any TP/PP/ZeRO layout, resume,
    SLURM, diagnostics. metrics.jsonl gets the validation loss of the untouched model at step 0, a `removal`
    record per switch (`removed`, `sigma`, `sites_removed`; TensorBoard `removal/sigma`, `removal/sites_removed`
    and the site's name as text `removal/switched`) and `sites_removed` in every logged training record.
  * At the end (step train.steps, every site fixed) `fold_norms` multiplies each site's scale gamma*s/sigma into
    the input columns of the weights that read it (input norms: q/k/v; gate and up; the head) or the output rows
    of the projection it normalizes (q/k norms: the q or k rows of qkv, before RoPE; reordered's output norms: o,
    down). Tied
    embeddings are untied: the input embedding stays, the head becomes embedding * scale. The folded weights are
    written as a step-0 checkpoint of an `ln_free` run in RUN_DIR/ln_free (through the normal engine and save
    path, on the run's own layout), and evaluated there: `ce_ln_free`.

`pretrain remove-norms` builds that run's config (the source's batch, sequence length, precision and layout; the
recipe's schedule of learning rates), runs it, with `--control` runs the same fine-tune with the norms kept
(RUN_DIR/control), and writes RUN_DIR/removal.json with the three cross-entropies on the same validation tokens.
Running the same command again continues where it stopped.

`--method taper` (model.taper_norms) is the second route, TaperNorm (arXiv 2602.10408, taper.py): one global gate
blends every site from its norm into its calibrated fixed scaling, then the same fold and the same ln_free output.
"""

LN_FREE_DIR = "ln_free"  # RUN_DIR/ln_free: the folded ln_free checkpoint
CONTROL_DIR = "control"  # RUN_DIR/control: the same fine-tune with the norms kept
REPORT = "removal.json"
