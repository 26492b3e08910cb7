"""Per-layer diagnostics: residual variance, branch contributions, angular distance and gradient norms.

    measures.py  the per-layer measure table, shared with `pretrain analyze-depth` (one entry each: name = file
                 key and TensorBoard tag, labels, definition, which consumer has it and how the two differ)
    stats.py     how the training-time entries are computed from a block's activations
    taps.py      reading a block's activations through its declared slots (shared with pretrain/analysis/depth.py)
    probes.py    activation statistics of one micro-batch, gradient norms per block, from a model of any layout
    writer.py    layer_stats.jsonl and TensorBoard
    hooks.py     the training-loop hooks (pretrain/features.py turns them on when diagnostics.interval > 0)

Every `diagnostics.interval` optimizer steps (0 = off: nothing is registered or wrapped) the training loop
measures, for each block l = 1..L of the model, and rank 0 appends one line to run.dir/layer_stats.jsonl and
writes TensorBoard scalars.

Definitions
-----------
The statistics are the entries of the per-layer measure table (measures.py) marked `training` -- variance,
rms, attn_ratio, mlp_ratio, angular_distance, the residual streams' mixing statistics (mix_ds_error,
mix_spectral_norm, mix_entropy) and grad_norm today -- each defined there once, over the B x T
tokens of the measured micro-batch (D = d_model, statistics in at least fp32). Outside the blocks:

    grad_norm_embedding, grad_norm_final_norm, grad_norm_head   as grad_norm, of those parameters (null when
                      the model has no such parameters: a tied head is part of the embedding,
                      ln_free/post_ln/deepnorm have no final norm; final_norm includes mHC's collapse of the
                      residual streams, `streams_out`)
    grad_norm_global  over all parameters, equal to the `grad_norm` the engine reports in metrics.jsonl

With residual streams (model.residual) a block's input, output and mid-block residual are states [B, T, n, D]; the
statistics above are of the collapsed state, the streams' sum (taps.py), and the branches are the sublayers' outputs
before the streams' write. With n > 1 streams the per-stream entries of the table (shape PER_STREAM) are added, each
a list of n values per block, computed from the states' [B, T, n, D] shape whatever the residual:

    variance_stream     variance of stream k of the block's output (as variance)
    attn_ratio_stream   ||H_k - X_k||_F / ||X_k||_F: the attention sublayer's update of stream k (its write and the
                        streams' mix) relative to the stream
    mlp_ratio_stream    ||Y_k - H_k||_F / ||H_k||_F: the same for the MLP sublayer
    grad_norm_stream    ||dl/dX_k||_F: the gradient of the measured micro-batch's mean loss with respect to stream k
                        of the block's input state, from a tensor hook on that input (taps.py) in the micro-batch's
                        backward, times the micro-batches per data-parallel rank (DeepSpeed divides each
                        micro-batch's loss by them) so that it is the same number in every layout. No parameter
                        gradient belongs to one stream: a block's parameters act on the streams' mix and write into
                        every stream, and the mixing weights read the whole flattened state.

A one-stream run's record (and TensorBoard) has none of these keys: its files are as they were before them.

Which data
----------
`step` is the optimizer step as in metrics.jsonl: activations and gradients of step s are those of its own
forward/backward passes, i.e. of the weights before update s is applied (step 1 = the initial weights).
Activation statistics come from ONE micro-batch per measured step: the first micro-batch of data-parallel
rank 0. The data loader gives that rank the first micro_batch_size samples of the step's global batch, so
the statistics cover the same samples in every TP/PP/DP layout with the same micro_batch_size. (With
gradient accumulation the other micro-batches are not measured.) Gradient norms are those of the
accumulated, data-parallel-averaged gradient of the whole global batch: the gradient the optimizer update
uses, before clipping.

How (cost and parallelism)
--------------------------
* Activations: forward hooks on each block and its attn_out_norm, attn_post_norm and mlp_out_norm (nn.Identity
  where a scheme has no norm, still a module call) are registered at the start of a measured step and each
  block's hooks remove themselves after its first forward, so unmeasured steps and later micro-batches run
  no hook at all. Statistics are reduced on the device to one scalar per statistic and block (n per per-stream
  statistic); one `.tolist()` per measured step moves them to the host. grad_norm_stream's tensor hook fires once,
  in the measured micro-batch's backward (with activation checkpointing too: it is on the kept block input).
  Hooks run only on ranks with tp_rank == 0 and dp_rank == 0.
* TP: after the row-parallel all-reduce the residual stream and both branch outputs are full (replicated) on
  every TP rank, so activation statistics need no TP reduction. Gradient sums of squares count TP-sharded
  weights (`tensor_model_parallel`) on every TP rank and replicated ones (norm gains) on TP rank 0 only, then
  are summed over the model-parallel (TP x PP) group -- the rule the engine's own global norm uses.
* PP: each stage measures its own blocks into a fixed-size vector (zeros elsewhere); one all-reduce over the
  model-parallel group of data-parallel rank 0 assembles all layers on global rank 0, which writes. A tied
  embedding is counted once: DeepSpeed marks the non-owning stage's copy `ds_pipe_replicated`.
* Gradient hook point: the engine's `_take_model_step` (instance attribute, wrapped once at set-up). Both the
  plain DeepSpeedEngine (inside `engine.step()` at the accumulation boundary) and the PipelineEngine (its
  OptimizerStep instruction, inside `train_batch`) call it exactly once per optimizer step, after the
  data-parallel and tied-weight gradient reductions and before clipping and the optimizer update. A
  `torch.optim` step pre-hook would do for ZeRO 0 only; at ZeRO 1-2 the client optimizer sees flattened
  partitions.
* ZeRO: every gradient is read with `deepspeed.utils.safe_get_full_grad`: p.grad at ZeRO 0, the partitioned
  fp32 gradient reassembled over the data-parallel group at ZeRO 1-2 (and the bf16 optimizer's fp32
  accumulation buffer with train.precision=bf16). Its all-reduces run on every rank of the step, so at ZeRO
  1-2 a measured step costs about one extra gradient all-reduce.
* train.compile: a compiled block ignores hooks added after compilation, so the measured forward of each
  block runs eagerly (its compiled version is restored by its own hook); the hooks themselves are excluded
  from compilation (torch.compiler.disable).
* The measured step's extra time is part of its step_time / tokens_per_s in metrics.jsonl.

layer_stats.jsonl
-----------------
One JSON object per measured step; arrays have one entry per block, index 0 = block 1:

    {"step": 100, "layers": 8, "norm_scheme": "lns",
     "variance": [...], "rms": [...], "attn_ratio": [...], "mlp_ratio": [...], "angular_distance": [...],
     "mix_ds_error": [...], "mix_spectral_norm": [...], "mix_entropy": [...],
     "grad_norm": [...], "grad_norm_embedding": 0.41, "grad_norm_final_norm": 0.02, "grad_norm_head": 0.37,
     "grad_norm_global": 0.93}

and with n > 1 residual streams after those, one list of n values per block (index [l - 1][k - 1] = block l,
stream k): "variance_stream", "attn_ratio_stream", "mlp_ratio_stream", "grad_norm_stream".

A resumed run drops entries after the checkpoint's step (as metrics.jsonl does). Non-finite values are
written as NaN/Infinity (Python's json reads them).

TensorBoard (run.dir/tb): scalars layers/<stat>/lNN (NN = 01..L) for the per-block statistics and grad_norm,
layers/<stat>/lNN/sK (K = 1..n) for the per-stream ones,
layers/grad_norm_{embedding,final_norm,head,global}, and per measured step a histogram
layers/variance_vs_depth whose bucket l (x-axis: layer index 1..L) has height = variance of layer l (the
histogram tab then shows variance against depth over training). At the end of the run an image
layers/variance_vs_depth_image plots variance against depth for up to 8 measured steps.
"""
