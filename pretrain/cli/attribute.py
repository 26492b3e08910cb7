"""`pretrain attribute --checkpoint PATH --data DATA --out DIR`: exact direct logit attribution of a norm-free model
(pretrain/analysis/attribution.py); the model, batches and output rules are analyze-depth's
(pretrain/analysis/batches.py, pretrain/analysis/outputs.py)."""

from __future__ import annotations

from pretrain.cli.arguments import add_analysis_args


def register(sub) -> None:
    p = sub.add_parser("attribute", help="exact direct logit attribution per block of a norm-free (ln_free) model")
    add_analysis_args(p, checkpoint_help="an ln_free checkpoint (e.g. RUN_DIR/ln_free of remove-norms), step/"
                                         "checkpoints/run folder, or a Hugging Face directory (an ln_free export)",
                      out_help="output directory (must not exist): attribution.json and .png")
    p.set_defaults(func=run)


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    import torch
    from pretrain.analysis.attribution import check_norm_free, logit_attribution
    from pretrain.analysis.batches import analysis_batches
    from pretrain.analysis.figures import attribution_figure
    from pretrain.analysis.outputs import new_output_folder, publish
    from pretrain.state.sources import open_source

    out = new_output_folder(args.out)
    source = open_source(args.checkpoint, "--checkpoint")
    check_norm_free(source.model_config)
    settings, batches = analysis_batches(source, args.data, args.batches, args.micro_batch_size, args.seq_len,
                                         args.split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = source.build(device)
    result = {**source.description, "norm_scheme": source.model_config.norm_scheme, "data": settings["data"],
              "split": settings["split"], "batches": len(batches), "micro_batch_size": settings["micro_batch_size"],
              "seq_len": settings["seq_len"]}
    result.update(logit_attribution(model, batches, device))
    publish(out, args.out, "attribution", result, attribution_figure)
    parts = [("embedding", result["embedding"])] + [(f"attn {l + 1}", v) for l, v in enumerate(result["attn"])] + \
            [(f"mlp {l + 1}", v) for l, v in enumerate(result["mlp"])]
    top = max(parts, key=lambda p: abs(p[1]))
    print(f"wrote {args.out}/attribution.json and attribution.png: mean correct-token logit {result['logit']:.4f} "
          f"on {result['tokens']:,} tokens, largest direct part {top[0]} ({top[1]:+.4f}); parts sum to the logit "
          f"within {result['max_abs_error']:.1e}")
    return 0
