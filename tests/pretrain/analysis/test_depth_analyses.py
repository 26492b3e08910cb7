"""`pretrain.analysis.depth.depth_analysis` against a hand computation on a 2-layer model (float64).

The hand side writes every block out from its parts (models/norms.py: h = attn_post_norm(alpha x + a),
y = mlp_post_norm(alpha h + m)) instead of hooks, runs the two skips explicitly (with the first `keep_first`
positions not skipped: the block's own output there, as Csordas et al.'s `merge_io`) and evaluates each definition
of the per-layer table (pretrain/diagnostics/measures.py, the entries with analyze_depth=True) directly, per token;
the logit lens starts at the embedding (layer 0). Every such entry needs its hand formula here, and reaches
depth.json and the figures with the table's labels.
"""

from __future__ import annotations

import math

import pytest
import torch

from models import Llama, ModelConfig
from pretrain.analysis.depth import PER_LAYER, depth_analysis
from pretrain.diagnostics.measures import BLOCK_PAIRS, DEPTH_MEASURES, DEPTH_PANELS, FROM_EMBEDDING, measure

RTOL = {"logit_lens_kl": 1e-8}  # default 1e-9


def block_parts(block, x, cos, sin):
    if x.ndim == 4:  # residual streams (models/streams.py): the block reads and writes the state through its mix
        u, mix = block.residual.read(x, 0)
        a = block.attn(block.attn_norm(u), cos, sin)
        h = block.residual(x, a, 0, mix)
        u, mix = block.residual.read(h, 1)
        m = block.mlp(block.mlp_norm(u))
        return a, h, m, block.residual(h, m, 1, mix)
    a = block.attn_out_norm(block.attn(block.attn_norm(x), cos, sin))
    h = block.attn_post_norm(block.residual_alpha * x + a)
    m = block.mlp_out_norm(block.mlp(block.mlp_norm(h)))
    return a, h, m, block.mlp_post_norm(block.residual_alpha * h + m)


def col(t):
    """The collapsed state the measures are defined on: the streams' sum (a single stream as it is)."""
    return t.sum(-2) if t.ndim == 4 else t


def kept(orig, skipped, keep_first):
    """The skipped block's output: its input, except at the first keep_first positions, where it ran."""
    return torch.cat([orig[:, :keep_first], skipped[:, keep_first:]], dim=1)


def hand_analysis(model, batches, keep_first=0):
    b1, b2 = model.blocks
    cos, sin = model.rope_cos, model.rope_sin
    decode = lambda x: model.logits(model.final_norm(model.streams_out(x)))  # noqa: E731
    per_token = {k: [[], []] for k in ("angle", "attn", "mlp", "block")}
    per_token["kl"] = [[], [], []]  # the embedding, block 1, block 2
    loss, skip_loss, n = 0.0, [0.0, 0.0], 0
    effect, out_change = 0.0, [0.0, 0.0]

    def nll(logits, labels):  # summed next-token loss written out
        return -logits.log_softmax(-1).gather(-1, labels[..., None]).sum().item()

    for tokens, labels in batches:
        # the embedding as the first block reads it (peri_ln: normalized; with streams: copied into them)
        e = model.streams_in(model.emb_out(model.tok_emb(tokens)))
        a1, hm1, m1, y1 = block_parts(b1, e, cos, sin)
        a2, hm2, m2, y2 = block_parts(b2, y1, cos, sin)
        final = decode(y2)
        p_final = final.softmax(-1)
        p_emb = decode(e).softmax(-1)
        per_token["kl"][0].append((p_emb * (p_emb.log() - p_final.log())).sum(-1))
        loss += nll(final, labels)
        n += labels.numel()
        for l, (x, y, a, hm, m, blk) in enumerate([(e, y1, a1, hm1, m1, b1), (y1, y2, a2, hm2, m2, b2)]):
            p = decode(y).softmax(-1)
            x, y, hm = col(x), col(y), col(hm)
            alpha = blk.residual_alpha
            per_token["angle"][l].append(torch.acos((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))) / math.pi)
            per_token["attn"][l].append(a.norm(dim=-1) / (alpha * x.norm(dim=-1)))
            per_token["mlp"][l].append(m.norm(dim=-1) / (alpha * hm.norm(dim=-1)))
            per_token["block"][l].append((a + m).norm(dim=-1) / (alpha * x.norm(dim=-1)))
            per_token["kl"][l + 1].append((p * (p.log() - p_final.log())).sum(-1))
        # skip block 1: block 2 runs on the embedding (on block 1's output at the kept positions)
        x2 = kept(y1, e, keep_first)
        y2_skip = block_parts(b2, x2, cos, sin)[3]
        change = (col(y2_skip - x2) - col(y2 - y1)).norm(dim=-1) / col(y2 - y1).norm(dim=-1)
        effect = max(effect, change.max().item())
        skip_loss[0] += nll(decode(y2_skip), labels)
        out_change[0] = max(out_change[0], (decode(y2_skip).softmax(-1) - p_final).norm(dim=-1).max().item())
        # skip block 2: the output is block 1's (block 2's at the kept positions)
        out = kept(y2, y1, keep_first)
        skip_loss[1] += nll(decode(out), labels)
        out_change[1] = max(out_change[1], (decode(out).softmax(-1) - p_final).norm(dim=-1).max().item())
    mean = {k: [torch.cat([t.flatten() for t in v[l]]).mean().item() for l in range(len(v))]
            for k, v in per_token.items()}
    return {
        "val_loss": loss / n, "tokens": n, "skip_loss": [s / n for s in skip_loss],
        "skip_loss_increase": [s / n - loss / n for s in skip_loss],
        "angular_distance": mean["angle"], "attn_contribution": mean["attn"], "mlp_contribution": mean["mlp"],
        "block_contribution": mean["block"], "logit_lens_kl": mean["kl"],
        "skip_effect": [[1.0, effect], [0.0, 1.0]], "skip_output_change": out_change,
    }


def two_layer_model(scheme: str = "pre_ln", **keys):
    """A float64 2-layer model with norm gains away from 1 (so that a wrong hook point changes the numbers) and
    three micro-batches."""
    cfg = ModelConfig(vocab_size=97, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=40, max_seq_len=16,
                      norm_scheme=scheme, **keys)
    torch.manual_seed(0)
    model = Llama(cfg, seed=3).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 97, (2, 11), generator=gen), torch.randint(0, 97, (2, 11), generator=gen))
               for _ in range(3)]
    return model, batches


def flat(values, m) -> list:
    return [v for row in values for v in row] if m.shape == BLOCK_PAIRS else values


@pytest.mark.parametrize("scheme,keep_first,keys", [("pre_ln", 0, {}), ("pre_ln", 1, {}), ("peri_ln", 0, {}),
                                                   ("deepnorm", 3, {}), ("pre_ln", 1, {"residual": "mhc"}),
                                                   ("pre_ln", 0, {"residual": "hc"})])
def test_depth_analysis_matches_hand_computation(scheme, keep_first, keys):
    """With residual streams (the last two cases: mhc, hc) the skip is the identity on the state and the measures are
    of the streams' sum; the logit lens decodes the state through the model's readout."""
    model, batches = two_layer_model(scheme, **keys)
    got = depth_analysis(model, batches, keep_first=keep_first)
    with torch.no_grad():
        want = hand_analysis(model, batches, keep_first)
    assert got["layers"] == 2 and got["batches"] == 3 and got["tokens"] == want["tokens"] == 66
    assert got["keep_first"] == keep_first
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-10)
    for m in DEPTH_MEASURES:  # every analyze-depth entry of the table, by its definition written out above
        assert m.name in want, f"no hand computation of {m.name}: write its definition out in hand_analysis"
        assert flat(got[m.name], m) == pytest.approx(flat(want[m.name], m), rel=RTOL.get(m.name, 1e-9),
                                                     abs=1e-12), m.name
    assert len(got["logit_lens_kl"]) == 3 and got["logit_lens_kl"][2] == 0.0
    assert got["logit_lens_kl"][0] > 0 and got["logit_lens_kl"][1] > 0
    assert 0 < got["skip_effect"][0][1] and got["skip_output_change"][0] > 0
    assert got["skip_loss_increase"] == pytest.approx([s - got["val_loss"] for s in got["skip_loss"]])


def test_keep_first_changes_only_the_skips():
    """Keeping position 0 unskipped changes the skip results (position 0 feeds every later position through
    attention) and nothing measured on the unskipped forward."""
    cfg = ModelConfig(vocab_size=97, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=40, max_seq_len=16)
    model = Llama(cfg, seed=3).double().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 97, (2, 11), generator=gen), torch.randint(0, 97, (2, 11), generator=gen))]
    plain, kept_one = depth_analysis(model, batches), depth_analysis(model, batches, keep_first=1)
    for key in ("val_loss", "angular_distance", "block_contribution", "logit_lens_kl"):
        assert plain[key] == kept_one[key], key
    assert all(a != b for a, b in zip(plain["skip_loss"], kept_one["skip_loss"]))
    assert plain["skip_effect"][0][1:] != kept_one["skip_effect"][0][1:]


def test_keep_first_defaults_to_one_only_when_every_sequence_starts_with_bos():
    from pretrain.cli.analyze_depth import default_keep_first

    bos = 2
    starts_with_bos = [(torch.tensor([[bos, 5, 6], [bos, 7, 8]]), None), (torch.tensor([[bos, 9, 9]]), None)]
    one_without = starts_with_bos + [(torch.tensor([[bos, 1, 1], [4, bos, 1]]), None)]
    assert default_keep_first(starts_with_bos, bos) == 1
    assert default_keep_first(one_without, bos) == 0
    assert default_keep_first(starts_with_bos, None) == 0 and default_keep_first(starts_with_bos, -1) == 0


def test_every_table_measure_reaches_depth_json_and_the_figures_with_its_labels():
    """The entries with analyze_depth=True (pretrain/diagnostics/measures.py) are exactly depth_analysis's per-layer
    results, with the table's shape; the report's depth figure has one panel per depth_panel entry and depth.png
    draws its panels with the table's labels and titles."""
    import matplotlib  # the headless backend, chosen before the figures draw

    matplotlib.use("Agg")
    from pretrain.analysis.figures import depth_figure, depth_runs_figure, skip_effect_figure
    from pretrain.analysis.report_table import Run

    model, batches = two_layer_model()
    result = depth_analysis(model, batches)
    L = result["layers"]
    rows = {k for k, v in result.items() if isinstance(v, list)}
    declared = {m.name for m in DEPTH_MEASURES}
    assert rows == declared, f"missing from depth_analysis: {declared - rows}; not in the table: {rows - declared}"
    assert set(PER_LAYER) == {m.name for m in DEPTH_MEASURES if m.shape != BLOCK_PAIRS}
    for m in DEPTH_MEASURES:
        want = {BLOCK_PAIRS: [L] * L, FROM_EMBEDDING: L + 1}.get(m.shape, L)
        got = [len(row) for row in result[m.name]] if m.shape == BLOCK_PAIRS else len(result[m.name])
        assert got == want, m.name
    result.update(step=5, norm_scheme="pre_ln")
    run = Run(path="r", name="r", config={}, scheme="pre_ln", depth=result)
    panels = [ax for ax in depth_runs_figure([run], "col").axes if ax.get_visible()]
    assert [(ax.get_title(), ax.get_ylabel()) for ax in panels] == [(m.title, m.label) for m in DEPTH_PANELS]
    assert [ax.get_yscale() for ax in panels] == ["log" if m.log_scale else "linear" for m in DEPTH_PANELS]
    # depth.png (laid out by hand): each single-measure panel titled and labelled by its entry
    png = {ax.get_ylabel(): ax for ax in depth_figure(result).axes}
    for name in ("angular_distance", "logit_lens_kl", "skip_loss_increase", "skip_output_change"):
        m = measure(name)
        assert m.label in png and png[m.label].get_title().startswith(m.title), name
    contributions = [ax for ax in png.values() if ax.get_legend() is not None]
    legend = [t.get_text() for t in contributions[0].get_legend().get_texts()]
    assert legend == [f"{sublayer} {measure(k).label}" for sublayer, k in
                      (("attention", "attn_contribution"), ("MLP", "mlp_contribution"), ("block", "block_contribution"))]
    colorbars = [ax.get_ylabel() for ax in skip_effect_figure([run], "col").axes]
    assert measure("skip_effect").label in colorbars
