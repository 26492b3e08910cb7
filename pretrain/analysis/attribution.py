"""`pretrain attribute --checkpoint PATH --data PATH --out DIR`: exact direct logit attribution of a norm-free model.

Without any norm (scheme `ln_free`, e.g. the output of `pretrain remove-norms`) the residual stream entering the
head is a plain sum,

    x_L = e + sum_l (a_l + m_l)        e: token embedding, a_l / m_l: block l's attention / MLP branch output

and the head is linear, so the logit of the correct next token y splits exactly into direct contributions:

    logit_y = W_y . e + sum_l W_y . a_l + sum_l W_y . m_l          (W_y: the head's row of y)

For a model with norms the split is only approximate (a final norm divides by a per-token statistic), so the
command refuses them. The branch outputs are read with forward hooks on each block's `attn_out_norm` and
`mlp_out_norm` (identity for ln_free), the embedding with one on `tok_emb`, so the model's own forward runs.

Output (written to a temporary folder next to --out, then renamed; an existing --out is refused):

    DIR/attribution.json  {"checkpoint", "step", "norm_scheme", "layers", "data", "split", "batches", "tokens",
                           "logit": mean correct-token logit, "embedding": mean W_y . e,
                           "attn": [L], "mlp": [L] (mean W_y . a_l and W_y . m_l, index 0 = block 1),
                           "max_abs_error": max over tokens of |e + sum of contributions - logit|}
    DIR/attribution.png   the contributions against layer
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from pretrain.errors import UserError


def check_norm_free(model_cfg) -> None:
    from models.norms import NORM_SCHEMES

    if not NORM_SCHEMES[model_cfg.norm_scheme].norm_free:
        free = [name for name, scheme in NORM_SCHEMES.items() if scheme.norm_free]
        raise UserError(
            f"direct logit attribution is exact only without norms; this is a {model_cfg.norm_scheme} model: use a "
            f"{' or '.join(free)} checkpoint (e.g. RUN_DIR/ln_free of `pretrain remove-norms`)"
        )


@torch.no_grad()
def logit_attribution(model, batches, device=None) -> dict:
    """Mean direct contributions to the correct-token logit of a norm-free TP = 1 `models.Llama` over `batches`."""
    check_norm_free(model.cfg)
    model.eval()
    device = device or next(model.parameters()).device
    n_layers = len(model.blocks)
    head = model.tok_emb.weight if model.head is None else model.head.weight  # [V, D]
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = output
        return hook

    handles = [model.tok_emb.register_forward_hook(keep("embedding"))]
    for l, block in enumerate(model.blocks):
        handles.append(block.attn_out_norm.register_forward_hook(keep(f"attn{l}")))
        handles.append(block.mlp_out_norm.register_forward_hook(keep(f"mlp{l}")))
    sums = torch.zeros(2 * n_layers + 2, dtype=torch.float64)  # embedding, attn 1..L, mlp 1..L, logit
    tokens_seen, max_err = 0, 0.0
    try:
        for tokens, labels in batches:
            tokens, labels = tokens.to(device), labels.to(device)
            captured.clear()
            logits = model(tokens)
            keep_mask = labels != -100
            y = labels[keep_mask]
            w = head[y].double()  # [N, D]

            def direct(x):
                return (model.final_norm(x)[keep_mask].double() * w).sum(-1)  # final_norm: identity (linear)

            parts = [direct(captured["embedding"])]
            parts += [direct(captured[f"attn{l}"]) for l in range(n_layers)]
            parts += [direct(captured[f"mlp{l}"]) for l in range(n_layers)]
            logit = logits[keep_mask].gather(-1, y[:, None]).squeeze(-1).double()
            stacked = torch.stack(parts)  # [2L + 1, N]
            max_err = max(max_err, (stacked.sum(0) - logit).abs().max().item() if logit.numel() else 0.0)
            sums[:-1] += stacked.sum(-1).cpu()
            sums[-1] += logit.sum().cpu()
            tokens_seen += int(y.numel())
    finally:
        for h in handles:
            h.remove()
    if tokens_seen == 0:
        raise UserError("no tokens to attribute; raise --batches")
    mean = (sums / tokens_seen).tolist()
    return {
        "layers": n_layers, "tokens": tokens_seen, "logit": mean[-1], "embedding": mean[0],
        "attn": mean[1:1 + n_layers], "mlp": mean[1 + n_layers:1 + 2 * n_layers], "max_abs_error": max_err,
    }


def attribution_figure(result: dict):
    from matplotlib.figure import Figure

    layers = list(range(1, result["layers"] + 1))
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.4
    ax.bar([l - width / 2 for l in layers], result["attn"], width, label="attention")
    ax.bar([l + width / 2 for l in layers], result["mlp"], width, label="MLP")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set(xlabel="layer", ylabel="mean direct contribution to the correct-token logit",
           title=f"embedding {result['embedding']:.3f}, total logit {result['logit']:.3f}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"{result.get('norm_scheme', '')} step {result.get('step', '?')}")
    return fig


def cmd_attribute(args) -> int:
    from models import Llama
    from pretrain.analysis.depth import _load_batches
    from pretrain.state.checkpoint import find_checkpoint, load_model_state, read_state

    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise UserError(f"{args.out} already exists; choose a new --out directory")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"--out {args.out}: folder {parent} does not exist")
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")
    folder = find_checkpoint(args.checkpoint)
    cfg, state = load_model_state(folder)
    check_norm_free(cfg.model)
    seq_len = args.seq_len or cfg.data.seq_len
    if not 1 <= seq_len <= cfg.model.max_seq_len:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len {cfg.model.max_seq_len}")
    micro = args.micro_batch_size or cfg.train.micro_batch_size
    if micro < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {micro}")
    data_path, batches = _load_batches(args.data, cfg, seq_len, micro, args.batches, args.split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Llama(cfg.model)
    model.load_state_dict(state)
    model.to(device)
    result = {"checkpoint": os.path.abspath(folder), "step": read_state(folder).get("step"),
              "norm_scheme": cfg.model.norm_scheme, "data": data_path, "split": args.split, "batches": len(batches),
              "micro_batch_size": micro, "seq_len": seq_len}
    result.update(logit_attribution(model, batches, device))

    import matplotlib

    matplotlib.use("Agg")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=parent)
    try:
        with open(os.path.join(tmp, "attribution.json"), "w") as f:
            json.dump(result, f, indent=1)
        attribution_figure(result).savefig(os.path.join(tmp, "attribution.png"), dpi=120)
        try:
            os.rename(tmp, out)
        except OSError:
            raise UserError(f"{args.out} appeared while analyzing; choose a new --out directory") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    parts = [("embedding", result["embedding"])] + [(f"attn {l + 1}", v) for l, v in enumerate(result["attn"])] + \
            [(f"mlp {l + 1}", v) for l, v in enumerate(result["mlp"])]
    top = max(parts, key=lambda p: abs(p[1]))
    print(f"wrote {args.out}/attribution.json and attribution.png: mean correct-token logit {result['logit']:.4f} "
          f"on {result['tokens']:,} tokens, largest direct part {top[0]} ({top[1]:+.4f}); parts sum to the logit "
          f"within {result['max_abs_error']:.1e}")
    return 0
