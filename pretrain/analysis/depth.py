"""`pretrain analyze-depth --checkpoint PATH --data PATH --out DIR`: how much each block of a trained model does.

For a training checkpoint (any TP/PP layout; loaded as one full model, no torch.distributed) and a bounded
number of validation micro-batches of `--data` (a prepared data folder or bundled:tinyshakespeare):

    angular_distance[l]    mean over tokens of arccos(cos(h_{l-1}, h_l)) / pi between the hidden states before
                           and after block l (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
                           Layers"; the same definition as diagnostics' angular_distance)
    skip_loss[l]           validation loss with block l replaced by the identity (h_l = h_{l-1}), all other
                           blocks intact -- the Curse of Depth paper's layer-pruning analysis
    skip_loss_increase[l]  skip_loss[l] - val_loss

Output (written to a temporary folder next to --out, then renamed; an existing --out is refused):

    DIR/depth.json   {"checkpoint", "step", "norm_scheme", "layers", "data", "split", "batches", "micro_batch_size",
                      "seq_len", "tokens", "val_loss", "angular_distance": [L], "skip_loss": [L],
                      "skip_loss_increase": [L]}   (index 0 = block 1)
    DIR/depth.png    angular distance and loss increase against layer
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from pretrain.errors import UserError


@torch.no_grad()
def depth_analysis(model, batches, device=None) -> dict:
    """Angular distances and single-block-skip losses of a (TP = 1) `models.Llama` over `batches`."""
    model.eval()
    device = device or next(model.parameters()).device
    n_layers = len(model.blocks)
    cos_tab, sin_tab = model.rope_cos, model.rope_sin
    base_sum, tokens = 0.0, 0
    skip_sum = torch.zeros(n_layers, dtype=torch.float64)
    angle_sum = torch.zeros(n_layers, dtype=torch.float64)

    def loss_sum(x, labels):
        logits = model.logits(model.final_norm(x))
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="sum").item()

    n_batches = 0
    for tokens_, labels in batches:
        tokens_, labels = tokens_.to(device), labels.to(device)
        hidden = [model.tok_emb(tokens_)]
        for block in model.blocks:
            hidden.append(block(hidden[-1], cos_tab, sin_tab))
        base_sum += loss_sum(hidden[-1], labels)
        tokens += labels.numel()
        n_batches += 1
        for l in range(n_layers):
            a, b = hidden[l].double(), hidden[l + 1].double()
            cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
            angle_sum[l] += (torch.acos(cos) / math.pi).sum().item()
            x = hidden[l]  # block l + 1 (1-based) skipped
            for block in model.blocks[l + 1:]:
                x = block(x, cos_tab, sin_tab)
            skip_sum[l] += loss_sum(x, labels)
    if tokens == 0:
        raise UserError("no validation batches to evaluate; lower --micro-batch-size or --seq-len")
    val_loss = base_sum / tokens
    skip = (skip_sum / tokens).tolist()
    return {
        "layers": n_layers, "batches": n_batches, "tokens": tokens, "val_loss": val_loss,
        "angular_distance": (angle_sum / tokens).tolist(), "skip_loss": skip,
        "skip_loss_increase": [s - val_loss for s in skip],
    }


def depth_figure(result: dict):
    from matplotlib.figure import Figure

    layers = list(range(1, result["layers"] + 1))
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_angle, ax_skip = fig.subplots(1, 2)
    ax_angle.plot(layers, result["angular_distance"], "o-", ms=4)
    ax_angle.set(xlabel="layer", ylabel="angular distance / pi", title="Input vs output of each block")
    increase = result["skip_loss_increase"]
    ax_skip.bar(layers, increase, color=["C3" if v > 0 else "C2" for v in increase])
    ax_skip.axhline(0.0, color="k", lw=0.8)
    ax_skip.set(xlabel="layer skipped", ylabel="validation loss increase",
                title=f"Skipping one block (val loss {result['val_loss']:.3f})")
    for ax in (ax_angle, ax_skip):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
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
    from pretrain.checkpoint import find_checkpoint, load_model_state, read_state

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
    result.update(depth_analysis(model, batches, device))

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
