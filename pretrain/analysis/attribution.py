"""`pretrain attribute --checkpoint PATH --data PATH --out DIR`: exact direct logit attribution of a norm-free model.

Without any norm (scheme `ln_free`, e.g. the output of `pretrain remove-norms`) the residual stream entering the
head is a plain sum,

    x_L = e + sum_l (a_l + m_l)        e: token embedding, a_l / m_l: block l's attention / MLP branch output

and the head is linear, so the logit of the correct next token y splits exactly into direct contributions:

    logit_y = W_y . e + sum_l W_y . a_l + sum_l W_y . m_l          (W_y: the head's row of y)

For a model with norms the split is only approximate (a final norm divides by a per-token statistic), so the
command refuses them. The branch outputs and the embedding (block 1's input) are read through the block slot taps
the diagnostics use (pretrain/diagnostics/taps.py), so the model's own forward runs.

Output (written to a temporary folder next to --out, then renamed; an existing --out is refused):

    DIR/attribution.json  {"checkpoint", "step", "norm_scheme", "layers", "data", "split", "batches", "tokens",
                           "logit": mean correct-token logit, "embedding": mean W_y . e,
                           "attn": [L], "mlp": [L] (mean W_y . a_l and W_y . m_l, index 0 = block 1),
                           "max_abs_error": max over tokens of |e + sum of contributions - logit|}
    DIR/attribution.png   the contributions against layer
"""

from __future__ import annotations

import torch

from models.norms import NORM_SCHEMES
from models.parametrization import multipliers
from pretrain.diagnostics.taps import BlockActivations, BlockTaps
from pretrain.errors import UserError


def check_norm_free(model_cfg) -> None:
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
    branches: dict[int, BlockActivations] = {}
    taps = [BlockTaps(l, b, lambda act: branches.__setitem__(act.index, act)) for l, b in enumerate(model.blocks)]
    sums = torch.zeros(2 * n_layers + 2, dtype=torch.float64)  # embedding, attn 1..L, mlp 1..L, logit
    tokens_seen, max_err = 0, 0.0
    try:
        for tokens, labels in batches:
            tokens, labels = tokens.to(device), labels.to(device)
            branches.clear()
            logits = model(tokens)
            keep_mask = labels != -100
            y = labels[keep_mask]
            w = head[y].double() * multipliers(model.cfg).logits  # [N, D]; µP's fixed logit multiplier (1/m_d)

            def direct(x):
                return (model.readout(x)[keep_mask].double() * w).sum(-1)  # the readout is linear (ln_free: identity)

            parts = [direct(branches[0].x)]  # the token embedding: block 1's input
            parts += [direct(branches[l].a) for l in range(n_layers)]
            parts += [direct(branches[l].m) for l in range(n_layers)]
            logit = logits[keep_mask].gather(-1, y[:, None]).squeeze(-1).double()
            stacked = torch.stack(parts)  # [2L + 1, N]
            max_err = max(max_err, (stacked.sum(0) - logit).abs().max().item() if logit.numel() else 0.0)
            sums[:-1] += stacked.sum(-1).cpu()
            sums[-1] += logit.sum().cpu()
            tokens_seen += int(y.numel())
    finally:
        for t in taps:
            t.remove()
    if tokens_seen == 0:
        raise UserError("no tokens to attribute; raise --batches")
    mean = (sums / tokens_seen).tolist()
    return {
        "layers": n_layers, "tokens": tokens_seen, "logit": mean[-1], "embedding": mean[0],
        "attn": mean[1:1 + n_layers], "mlp": mean[1 + n_layers:1 + 2 * n_layers], "max_abs_error": max_err,
    }
