"""`pretrain analyze-depth --checkpoint PATH --data PATH --out DIR`: how much each block of a trained model does.

For a training checkpoint (any TP/PP layout) or a Hugging Face directory (Llama, Qwen3, OLMo 2) (loaded as one full model, no
torch.distributed, by `pretrain.state.sources`; the command is pretrain/cli/analyze_depth.py) and a bounded
number of validation micro-batches of `--data` (a prepared data folder or bundled:tinyshakespeare): the measures
of the per-layer table marked `analyze_depth` (pretrain/diagnostics/measures.py, where each is defined and
labelled and its difference from the training-time diagnostics is stated): the angular distance (shared with the
diagnostics), Csordas et al.'s sublayer contributions, the logit lens and the skip-one-block analyses, "mean over
tokens" being over all B x T positions of all batches.

Skipping block s means y_s = x_s at every position except the first `keep_first` ones, where the block still runs
(y_s = block(x_s)): Csordas et al.'s `no_skip_front`, which keeps the attention sink a sequence-initial BOS token
becomes. skip_loss, skip_effect and skip_output_change all use that skip; at the kept positions nothing changes,
so they add zeros to the maxima and the loss is the model's own there. `pretrain analyze-depth --keep-first`
defaults to 1 when every analyzed sequence starts with the data's BOS token, else 0 (packed pretraining data
starts sequences mid-document, where no token is special); the diagonal of skip_effect is then still 1 by
definition, not measured.

With residual streams (model.residual, models/streams.py) each block reads and writes a state of n streams: a skip
is the identity on the whole state, the logit lens decodes a state through the model's own readout (its collapse,
then the final norm), and every other measure is taken on the collapsed state, the streams' sum (the same
`summed` as the diagnostics' taps).

Cost: one forward with hooks gives everything but the skips; each skipped block s then re-runs blocks s+1..L
from x_s once, which gives skip_loss, skip_effect and skip_output_change together: L(L+1)/2 block forwards and
2L + 1 head evaluations per batch: with a head about as costly as a block (tiny and 1b alike), about
(L + 1) / 2 + 2 forward passes' worth of matmuls (14.5 for 24 layers).

Output (written to a temporary folder next to --out, then renamed; an existing --out is refused):

    DIR/depth.json   {"checkpoint", "step", "norm_scheme", "layers", "data", "split", "batches", "micro_batch_size",
                      "seq_len", "keep_first", "tokens", "val_loss", "val_bpb" (bits per byte by the data's tokenizer, null
                      without one: pretrain/cli/analyze_depth.py), "seconds", and the per-layer lists above
                      (index 0 = block 1, except logit_lens_kl whose index 0 is the embedding; skip_effect is L x L)}; for an HF directory "step" is null and "hf_model_type" is added
    DIR/depth.png    all of them against layer, the skip effect as a heat map
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.streams import summed
from pretrain.diagnostics.measures import BLOCK_PAIRS, DEPTH_MEASURES
from pretrain.diagnostics.taps import BlockActivations, BlockTaps
from pretrain.errors import UserError

# depth.json's per-layer lists (every analyze_depth entry of the table but the L x L skip_effect)
PER_LAYER = tuple(m.name for m in DEPTH_MEASURES if m.shape != BLOCK_PAIRS)
EPS = 1e-6  # floor of the per-token denominators (Csordas et al.'s clamp)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (a float64 model stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(_wide(x), dim=-1)  # [B, T]


@torch.no_grad()
def depth_analysis(model, batches, device=None, keep_first: int = 0) -> dict:
    """The per-layer analyses of the module docstring for a (TP = 1) `models.Llama` over `batches`; the first
    `keep_first` positions of each sequence are never skipped."""
    if keep_first < 0:
        raise UserError(f"--keep-first must be >= 0, got {keep_first}")
    model.eval()
    device = device or next(model.parameters()).device
    blocks = list(model.blocks)
    n_layers = len(blocks)
    cos_tab, sin_tab = model.rope_cos, model.rope_sin
    # Sums over tokens, accumulated on the device in float64 and divided by the token count once at the end: no
    # host sync per layer on a GPU.
    sums = {k: torch.zeros(n_layers, dtype=torch.float64, device=device)
            for k in ("angular_distance", "skip_loss", "attn_contribution", "mlp_contribution", "block_contribution")}
    sums["logit_lens_kl"] = torch.zeros(n_layers + 1, dtype=torch.float64, device=device)  # index 0: the embedding
    base_sum = torch.zeros((), dtype=torch.float64, device=device)
    skip_effect = torch.eye(n_layers, dtype=torch.float64, device=device)  # 1 on the diagonal by definition
    out_change = torch.zeros(n_layers, dtype=torch.float64, device=device)
    tokens, n_batches = 0, 0

    def decode(x):
        return _wide(model.logits(model.readout(x)))

    def loss_sum(logits, labels):
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum").double()

    for tokens_, labels in batches:
        tokens_, labels = tokens_.to(device), labels.to(device)
        # --- one forward, branches recorded by hooks
        branches: dict[int, BlockActivations] = {}  # the same slot taps as the in-loop diagnostics
        taps = [BlockTaps(l, b, lambda act: branches.__setitem__(act.index, act)) for l, b in enumerate(blocks)]
        try:
            hidden = [model.embed(tokens_)]  # as the model feeds its first block
            for block in blocks:
                hidden.append(block(hidden[-1], cos_tab, sin_tab))
        finally:
            for t in taps:
                t.remove()
        final_logits = decode(hidden[-1])
        final_logp = final_logits.log_softmax(-1)
        final_p = final_logp.exp()
        base_sum += loss_sum(final_logits, labels)
        tokens += labels.numel()
        n_batches += 1
        deltas, delta_norms = [], []
        for l, block in enumerate(blocks):
            x, y = summed(hidden[l]), summed(hidden[l + 1])  # the collapsed state (module docstring)
            alpha = float(getattr(block, "residual_alpha", 1.0))
            x_norm = (alpha * _token_norm(x)).clamp_min(EPS)
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)
            sums["angular_distance"][l] += (torch.acos(cos) / math.pi).sum()
            a, m, h = branches[l].a, branches[l].m, branches[l].h
            sums["attn_contribution"][l] += (_token_norm(a) / x_norm).sum()
            sums["mlp_contribution"][l] += (_token_norm(m) / (alpha * _token_norm(h)).clamp_min(EPS)).sum()
            sums["block_contribution"][l] += (_token_norm(_wide(a) + _wide(m)) / x_norm).sum()
            deltas.append(y - x)
            delta_norms.append(_token_norm(y - x).clamp_min(EPS))
        for l, y in enumerate(hidden):  # the logit lens, from the embedding (l = 0) to the last block
            logp = decode(y).log_softmax(-1)
            sums["logit_lens_kl"][l] += (logp.exp() * (logp - final_logp)).sum()
        del branches, logp
        # --- each block skipped once (except at the first keep_first positions): rerun the blocks after it
        for s in range(n_layers):
            x = hidden[s]
            if keep_first:
                x = torch.cat([hidden[s + 1][:, :keep_first], x[:, keep_first:]], dim=1)
            for l in range(s + 1, n_layers):
                y = blocks[l](x, cos_tab, sin_tab)
                change = (_token_norm(summed(y - x) - deltas[l]) / delta_norms[l]).max()
                skip_effect[s, l] = torch.maximum(skip_effect[s, l], change.double())
                x = y
            logits = decode(x)
            sums["skip_loss"][s] += loss_sum(logits, labels)
            change = torch.linalg.vector_norm(logits.softmax(-1) - final_p, dim=-1).max()
            out_change[s] = torch.maximum(out_change[s], change.double())
    if tokens == 0:
        raise UserError("no validation batches to evaluate; lower --micro-batch-size or --seq-len")
    val_loss = base_sum.item() / tokens
    result = {"layers": n_layers, "batches": n_batches, "keep_first": keep_first, "tokens": tokens,
              "val_loss": val_loss}
    for key, total in sums.items():
        result[key] = (total / tokens).tolist()
    result["skip_loss_increase"] = [s - val_loss for s in result["skip_loss"]]
    result["skip_output_change"] = out_change.tolist()
    result["skip_effect"] = skip_effect.tolist()
    return result
