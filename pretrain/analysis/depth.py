"""`pretrain analyze-depth --checkpoint PATH --data PATH --out DIR`: how much each block of a trained model does.

For a training checkpoint (any TP/PP layout; loaded as one full model, no torch.distributed) and a bounded
number of validation micro-batches of `--data` (a prepared data folder or bundled:tinyshakespeare), per block
l = 1..L with input x_l, output y_l, attention branch a_l = attn_out_norm(Attn(attn_norm(x_l))), MLP branch
m_l = mlp_out_norm(MLP(mlp_norm(h_l))) added to the residual h_l, and alpha the scheme's residual weight (1 except
deepnorm); "mean over tokens" is over all B x T positions of all batches:

    angular_distance[l]    mean over tokens of arccos(cos(x_l, y_l)) / pi (Gromov et al., "The Unreasonable
                           Ineffectiveness of the Deeper Layers"; the same definition as diagnostics')
    skip_loss[l]           validation loss with block l replaced by the identity (y_l = x_l), all other blocks
                           intact -- the Curse of Depth paper's layer-pruning analysis
    skip_loss_increase[l]  skip_loss[l] - val_loss
    attn_contribution[l]   mean over tokens of ||a_l|| / ||alpha x_l||       (Csordas et al., "Do Language Models
    mlp_contribution[l]    mean over tokens of ||m_l|| / ||alpha h_l||        Use Their Depth Efficiently?": the
    block_contribution[l]  mean over tokens of ||a_l + m_l|| / ||alpha x_l||  sublayer's relative contribution)
    logit_lens_kl[l]       logit lens: mean over tokens of KL(p_l || p_L), p_l = softmax(head(final_norm(y_l))),
                           the distribution decoded from the residual after block l, p_L the model's output
                           (so the last entry is 0)
    skip_effect[s][l]      the effect of skipping block s on block l's contribution y_l - x_l: the max over
                           positions (and batches) of ||(y_l - x_l)_skip - (y_l - x_l)_orig|| / ||(y_l - x_l)_orig||
                           (Csordas et al.'s layer-skip heat map; per-token norms over the hidden dim,
                           denominators clamped at 1e-6). Row s = skipped block, column l = affected block;
                           1 on the diagonal (the skipped block contributes nothing) and 0 below it by definition.
    skip_output_change[s]  max over positions of ||softmax(logits_skip) - softmax(logits_orig)||_2, the skip's
                           effect on the output distribution

Cost: one forward with hooks gives everything but the skips; each skipped block s then re-runs blocks s+1..L
from x_s once, which gives skip_loss, skip_effect and skip_output_change together: L(L+1)/2 block forwards and
2L + 1 head evaluations per batch: with a head about as costly as a block (tiny and 1b alike), about
(L + 1) / 2 + 2 forward passes' worth of matmuls (14.5 for 24 layers).

Output (written to a temporary folder next to --out, then renamed; an existing --out is refused):

    DIR/depth.json   {"checkpoint", "step", "norm_scheme", "layers", "data", "split", "batches", "micro_batch_size",
                      "seq_len", "tokens", "val_loss", "seconds", and the per-layer lists above (index 0 = block 1;
                      skip_effect is L x L)}
    DIR/depth.png    all of them against layer, the skip effect as a heat map
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from pretrain.errors import UserError

PER_LAYER = ("angular_distance", "skip_loss", "skip_loss_increase", "attn_contribution", "mlp_contribution",
             "block_contribution", "logit_lens_kl", "skip_output_change")
EPS = 1e-6  # floor of the per-token denominators (Csordas et al.'s clamp)


class _BranchRecorder:
    """Forward hooks that keep each block's branch outputs a, m and the residual h the MLP branch is added to."""

    def __init__(self, blocks):
        self.a, self.h, self.m = {}, {}, {}
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles += [
                b.attn_out_norm.register_forward_hook(lambda mod, args, out, i=i: self.a.__setitem__(i, out)),
                b.mlp_norm.register_forward_pre_hook(lambda mod, args, i=i: self.h.__setitem__(i, args[0])),
                b.mlp_out_norm.register_forward_hook(lambda mod, args, out, i=i: self.m.__setitem__(i, out)),
            ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (a float64 model stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(_wide(x), dim=-1)  # [B, T]


@torch.no_grad()
def depth_analysis(model, batches, device=None) -> dict:
    """The per-layer analyses of the module docstring for a (TP = 1) `models.Llama` over `batches`."""
    model.eval()
    device = device or next(model.parameters()).device
    blocks = list(model.blocks)
    n_layers = len(blocks)
    cos_tab, sin_tab = model.rope_cos, model.rope_sin
    # Accumulated on the device in float64 and read once at the end: no host sync per layer on a GPU.
    sums = {k: torch.zeros(n_layers, dtype=torch.float64, device=device)
            for k in PER_LAYER if k not in ("skip_loss_increase", "skip_output_change")}
    base_sum = torch.zeros((), dtype=torch.float64, device=device)
    skip_effect = torch.eye(n_layers, dtype=torch.float64, device=device)  # 1 on the diagonal by definition
    out_change = torch.zeros(n_layers, dtype=torch.float64, device=device)
    tokens, n_batches = 0, 0

    def decode(x):
        return _wide(model.logits(model.final_norm(x)))

    def loss_sum(logits, labels):
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum").double()

    for tokens_, labels in batches:
        tokens_, labels = tokens_.to(device), labels.to(device)
        # --- one forward, branches recorded by hooks
        recorder = _BranchRecorder(blocks)
        try:
            hidden = [model.tok_emb(tokens_)]
            for block in blocks:
                hidden.append(block(hidden[-1], cos_tab, sin_tab))
        finally:
            recorder.remove()
        final_logits = decode(hidden[-1])
        final_logp = final_logits.log_softmax(-1)
        final_p = final_logp.exp()
        base_sum += loss_sum(final_logits, labels)
        tokens += labels.numel()
        n_batches += 1
        deltas, delta_norms = [], []
        for l, block in enumerate(blocks):
            x, y = hidden[l], hidden[l + 1]
            alpha = float(getattr(block, "residual_alpha", 1.0))
            x_norm = (alpha * _token_norm(x)).clamp_min(EPS)
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)
            sums["angular_distance"][l] += (torch.acos(cos) / math.pi).sum()
            a, m = recorder.a[l], recorder.m[l]
            sums["attn_contribution"][l] += (_token_norm(a) / x_norm).sum()
            sums["mlp_contribution"][l] += (_token_norm(m) / (alpha * _token_norm(recorder.h[l])).clamp_min(EPS)).sum()
            sums["block_contribution"][l] += (_token_norm(_wide(a) + _wide(m)) / x_norm).sum()
            logp = decode(y).log_softmax(-1)
            sums["logit_lens_kl"][l] += (logp.exp() * (logp - final_logp)).sum()
            deltas.append(y - x)
            delta_norms.append(_token_norm(y - x).clamp_min(EPS))
        del recorder, logp
        # --- each block skipped once: rerun the blocks after it from its input
        for s in range(n_layers):
            x = hidden[s]
            for l in range(s + 1, n_layers):
                y = blocks[l](x, cos_tab, sin_tab)
                change = (_token_norm((y - x) - deltas[l]) / delta_norms[l]).max()
                skip_effect[s, l] = torch.maximum(skip_effect[s, l], change.double())
                x = y
            logits = decode(x)
            sums["skip_loss"][s] += loss_sum(logits, labels)
            change = torch.linalg.vector_norm(logits.softmax(-1) - final_p, dim=-1).max()
            out_change[s] = torch.maximum(out_change[s], change.double())
    if tokens == 0:
        raise UserError("no validation batches to evaluate; lower --micro-batch-size or --seq-len")
    val_loss = base_sum.item() / tokens
    result = {"layers": n_layers, "batches": n_batches, "tokens": tokens, "val_loss": val_loss}
    for key, total in sums.items():
        result[key] = (total / tokens).tolist()
    result["skip_loss_increase"] = [s - val_loss for s in result["skip_loss"]]
    result["skip_output_change"] = out_change.tolist()
    result["skip_effect"] = skip_effect.tolist()
    return result


def depth_figure(result: dict):
    """Six panels: angular distance, contributions, logit lens, skip loss, skip output change, skip-effect map."""
    from matplotlib.figure import Figure

    layers = list(range(1, result["layers"] + 1))
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    ax_angle, ax_contrib, ax_lens = axes[0]
    ax_skip, ax_out, ax_map = axes[1]
    ax_angle.plot(layers, result["angular_distance"], "o-", ms=4)
    ax_angle.set(xlabel="layer", ylabel="angular distance / pi", title="Input vs output of each block")
    if "block_contribution" in result:  # depth.json files written before these analyses existed lack them
        for key, label in (("attn_contribution", "attention ||a||/||x||"), ("mlp_contribution", "MLP ||m||/||h||"),
                           ("block_contribution", "block ||a+m||/||x||")):
            ax_contrib.plot(layers, result[key], "o-", ms=3, label=label)
        ax_contrib.legend(fontsize=8)
        ax_lens.plot(layers, result["logit_lens_kl"], "o-", ms=4, color="C4")
        ax_out.bar(layers, result["skip_output_change"], color="C1")
        import numpy as np

        effect = np.array(result["skip_effect"], dtype=float)
        effect[np.tril_indices_from(effect, -1)] = np.nan  # before the skipped block: 0 by definition, left blank
        im = ax_map.imshow(effect, vmin=0, vmax=max(1.0, float(np.nanmax(effect))), cmap="viridis",
                           interpolation="nearest", extent=(0.5, result["layers"] + 0.5, result["layers"] + 0.5, 0.5))
        fig.colorbar(im, ax=ax_map, label="max relative change of contribution")
    ax_contrib.set(xlabel="layer", ylabel="relative contribution", yscale="log",
                   title="Sublayer contributions (Csordas et al.)")
    ax_lens.set(xlabel="layer", ylabel="KL(p_l || p_L)", title="Logit lens")
    increase = result["skip_loss_increase"]
    ax_skip.bar(layers, increase, color=["C3" if v > 0 else "C2" for v in increase])
    ax_skip.axhline(0.0, color="k", lw=0.8)
    ax_skip.set(xlabel="layer skipped", ylabel="validation loss increase",
                title=f"Skipping one block (val loss {result['val_loss']:.3f})")
    ax_out.set(xlabel="layer skipped", ylabel="max ||dp||_2", title="Skip: change of the output distribution")
    ax_map.set(xlabel="effect at layer", ylabel="layer skipped", title="Skip: effect on later contributions")
    for ax in (ax_angle, ax_contrib, ax_lens, ax_skip, ax_out, ax_map):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax is not ax_map:
            ax.grid(alpha=0.3)
    ax_map.yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{result.get('norm_scheme', '')} step {result.get('step', '?')}")
    return fig


def _load_batches(data: str, cfg, seq_len: int, micro_batch_size: int, num_batches: int, split: str):
    from pretrain.data.bundled import resolve_data_path
    from pretrain.data.loader import TokenDataset, check_vocab, validation_batches

    path = resolve_data_path(data, cfg.data.cache_dir)
    dataset = TokenDataset(path, seq_len, split)
    check_vocab(dataset, cfg.model.vocab_size)
    return path, list(validation_batches(dataset, num_batches * micro_batch_size * seq_len, micro_batch_size))


def cmd_analyze_depth(args) -> int:
    from models import Llama
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
    cfg, state = load_model_state(folder)  # UserError for a missing or incomplete checkpoint
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
    result = {
        "checkpoint": os.path.abspath(folder), "step": read_state(folder).get("step"),
        "norm_scheme": cfg.model.norm_scheme, "data": data_path, "split": args.split,
        "micro_batch_size": micro, "seq_len": seq_len,
    }
    started = time.perf_counter()
    result.update(depth_analysis(model, batches, device))
    result["seconds"] = time.perf_counter() - started

    import matplotlib

    matplotlib.use("Agg")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=parent)
    try:
        with open(os.path.join(tmp, "depth.json"), "w") as f:
            json.dump(result, f, indent=1)
        depth_figure(result).savefig(os.path.join(tmp, "depth.png"), dpi=120)
        try:
            os.rename(tmp, out)
        except OSError:
            raise UserError(f"{args.out} appeared while analyzing; choose a new --out directory") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    worst = max(range(result["layers"]), key=lambda l: result["skip_loss_increase"][l])
    print(
        f"wrote {args.out}/depth.json and depth.png: {cfg.model.norm_scheme} step {result['step']}, val loss "
        f"{result['val_loss']:.4f} on {result['tokens']:,} tokens; skipping block {worst + 1} hurts most "
        f"(+{result['skip_loss_increase'][worst]:.4f})"
    )
    return 0
