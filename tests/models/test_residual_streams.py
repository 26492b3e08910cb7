"""Multi-stream residuals (model.residual, models/streams.py): each against its formula written out by hand, mHC
against transformers' DeepSeek-V4 modules on equal weights, one stream bitwise the block it was, and the config's
refusals. The TP = 2 and pipeline equivalences are in tests/models/test_tensor_parallel.py and
tests/pretrain/train/, KV-cache generation in tests/models/test_sft_model.py.

Models run in float64 (the weights of mHC too: models/streams.py computes them in at least fp32); every stream
parameter is moved off its init, whose symmetric values (zero biases, unit scales, identity mixes) would hide a
transposed matrix or a swapped weight.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import ModelConfig
from models.llama import Llama
from models.norms import NORM_SCHEMES
from helpers.scheme_formulas import attention_formula, rms_norm

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = dict(vocab_size=32, d_model=8, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=16, max_seq_len=16)
STREAM_PARAMS = ("residual.", "streams_out.")


# Per residual, its shape: 3 streams; attn_res 2 blocks of 2 layers (a block boundary and a partial sum both met);
# siamese has its 2 streams.
STREAM_SHAPE = {"attn_res": dict(n_layers=4, residual_streams=2), "siamese": dict(residual_streams=None)}


def stream_model(residual: str, seed: int = 0, **overrides) -> tuple[ModelConfig, Llama]:
    cfg = ModelConfig(**{**SHAPE, "residual_streams": 3, **STREAM_SHAPE.get(residual, {}), "residual": residual,
                         **overrides})
    model = Llama(cfg, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in STREAM_PARAMS) or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return cfg, model


def tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# The formulas, by hand: loops over the streams, Sinkhorn-Knopp step by step

def sinkhorn_by_hand(logits, iters, eps=1e-6):
    e = logits.exp()
    c = e / e.sum(-1, keepdim=True) + eps  # softmax over each row, plus eps
    n = c.shape[-1]
    for it in range(iters):
        if it:  # rows (not in the first round), then columns
            c = torch.stack([c[..., i, :] / (sum(c[..., i, j] for j in range(n)) + eps)[..., None]
                             for i in range(n)], dim=-2)
        c = torch.stack([c[..., :, j] / (sum(c[..., i, j] for i in range(n)) + eps)[..., None]
                         for j in range(n)], dim=-1)
    return c


def mhc_sublayer(cfg, hc, S, F):
    """DeepSeek-V4's mHC around sublayer F: S [B, T, n, D] -> S'."""
    n, eps = S.shape[-2], 1e-6
    f = S.reshape(*S.shape[:-2], -1)
    f = f / torch.sqrt(f.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    z = f @ hc.fn.T
    s0, s1, s2 = hc.scale
    pre = torch.sigmoid(z[..., :n] * s0 + hc.base[:n]) + eps
    post = 2 * torch.sigmoid(z[..., n:2 * n] * s1 + hc.base[n:2 * n])
    comb = sinkhorn_by_hand(z[..., 2 * n:].reshape(*z.shape[:-1], n, n) * s2 + hc.base[2 * n:].view(n, n),
                            cfg.residual_sinkhorn_iters or 20)
    u = sum(pre[..., i, None] * S[..., i, :] for i in range(n))
    out = F(u)
    return torch.stack([post[..., k, None] * out + sum(comb[..., j, k, None] * S[..., j, :] for j in range(n))
                        for k in range(n)], dim=-2)


def hc_sublayer(cfg, hc, S, F):
    """Hyper-connections (Zhu et al., Algorithm 2) around sublayer F: alpha [n, n + 1], beta [n], dynamic or not."""
    n = S.shape[-2]
    alpha, beta = hc.static_alpha, hc.static_beta
    if hc.dynamic:
        mu = S.mean(-1, keepdim=True)
        h = (S - mu) / torch.sqrt((S - mu).pow(2).mean(-1, keepdim=True) + hc.norm.eps) * hc.norm.weight + hc.norm.bias
        alpha = alpha + hc.alpha_scale * torch.tanh(h @ hc.alpha_fn)
        beta = beta + hc.beta_scale * torch.tanh(h @ hc.beta_fn)
    u = sum(alpha[..., j, 0, None] * S[..., j, :] for j in range(n))
    out = F(u)
    return torch.stack([beta[..., k, None] * out + sum(alpha[..., j, k + 1, None] * S[..., j, :] for j in range(n))
                        for k in range(n)], dim=-2)


def depth_attention(cfg, depth, V):
    """Block AttnRes over the sources V (a list of [B, T, D]): alpha_j = softmax_j(w . RMSNorm(V_j)), then
    sum_j alpha_j V_j."""
    scores = torch.stack([rms_norm(v, depth.key_gain, cfg.norm_eps) @ depth.query for v in V], dim=-1)
    alpha = scores.exp() / scores.exp().sum(-1, keepdim=True)
    return sum(alpha[..., j, None] * v for j, v in enumerate(V))


def attn_res_by_hand(cfg, model, x, attn, mlp):
    """The official pseudocode (MoonshotAI/Attention-Residuals), block by block: blocks = [b_0], partial b_n^i."""
    S = cfg.n_layers // cfg.residual_streams
    blocks, partial = [x], None
    for l, block in enumerate(model.blocks):
        if l % S == 0 and partial is not None:  # a block boundary: the finished block joins the sources
            blocks, partial = blocks + [partial], None
        h = depth_attention(cfg, block.residual.depth[0], blocks + ([] if partial is None else [partial]))
        out = attn(block, h)
        partial = out if partial is None else partial + out
        h = depth_attention(cfg, block.residual.depth[1], blocks + [partial])
        partial = partial + mlp(block, h)
    return depth_attention(cfg, model.streams_out, blocks + [partial])


def siamese_by_hand(cfg, model, x, attn, mlp):
    """Qwen-Applications/SiameseNorm deit-model-siamesenorm.py Block.forward and forward_features, our norms."""
    N = lambda y, norm: rms_norm(y, norm.weight, cfg.norm_eps)  # noqa: E731
    y = x.clone()
    for l, block in enumerate(model.blocks):
        r = block.residual
        c = ((l + 1) * 2) ** 0.5
        x = N(x, r.post_norm[0])
        z = attn(block, x + N(y, r.pre_norm[0]))  # attn reads N_in = attn_norm
        x, y = x + z / c, y + z
        x = N(x, r.post_norm[1])
        z = mlp(block, x + N(y, r.pre_norm[1]))
        x, y = x + z / c, y + z
    return N(x, model.streams_out.x_norm) + N(y, model.streams_out.y_norm)


def model_by_hand(cfg, model, tok):
    n = cfg.residual_streams
    N = lambda y, norm: rms_norm(y, norm.weight, cfg.norm_eps)  # noqa: E731
    x = model.tok_emb.weight[tok]
    if cfg.residual in ("attn_res", "siamese"):
        attn = lambda b, u: attention_formula(cfg, b.attn, N(u, b.attn_norm), model.rope_cos,  # noqa: E731
                                              model.rope_sin)
        mlp = lambda b, u: b.mlp(N(u, b.mlp_norm))  # noqa: E731
        by_hand = attn_res_by_hand if cfg.residual == "attn_res" else siamese_by_hand
        return N(by_hand(cfg, model, x, attn, mlp), model.final_norm) @ model.head.weight.T
    S = torch.stack([x] * n, dim=-2)  # the embedding copied into the n streams
    sublayer = mhc_sublayer if cfg.residual == "mhc" else hc_sublayer
    for block in model.blocks:
        attn = lambda u: attention_formula(cfg, block.attn, N(u, block.attn_norm), model.rope_cos,  # noqa: E731
                                           model.rope_sin)
        S = sublayer(cfg, block.residual.hc[0], S, attn)
        S = sublayer(cfg, block.residual.hc[1], S, lambda u: block.mlp(N(u, block.mlp_norm)))
    if cfg.residual == "mhc":  # DeepseekV4HyperHead: its own pre weights
        head = model.streams_out
        f = S.reshape(*S.shape[:-2], -1)
        f = f / torch.sqrt(f.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        pre = torch.sigmoid(f @ head.fn.T * head.scale + head.base) + 1e-6
        y = sum(pre[..., i, None] * S[..., i, :] for i in range(n))
    else:  # the streams' sum
        y = sum(S[..., i, :] for i in range(n))
    return N(y, model.final_norm) @ model.head.weight.T


@pytest.mark.parametrize("residual", ["mhc", "hc", "hc_static", "attn_res", "siamese"])
def test_model_matches_the_formula_by_hand(residual):
    cfg, model = stream_model(residual)
    tok = tokens(cfg)
    with torch.no_grad():
        got = model(tok)
        want = model_by_hand(cfg, model, tok)
    assert (got - want).abs().max() <= 1e-10


def test_hc_starts_as_the_pre_norm_block_it_wraps():
    """Zhu et al.'s init (A_m = e_(k mod n), A_r = I, beta = 1, dynamic parts 0) makes one stream the Pre-Norm
    residual x + F(N(x)): with n = 1 the model starts as pre_ln (its other weights drawn alike from the seed)."""
    one = ModelConfig(**SHAPE, residual="hc", residual_streams=1)
    plain = ModelConfig(**SHAPE)
    tok = tokens(one)
    with torch.no_grad():
        torch.testing.assert_close(Llama(one, seed=2).double()(tok), Llama(plain, seed=2).double()(tok),
                                   rtol=0, atol=1e-12)


def test_sinkhorn_makes_the_comb_doubly_stochastic():
    from models.streams import sinkhorn_knopp

    logits = torch.randn(5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    comb = sinkhorn_knopp(logits, 20)
    torch.testing.assert_close(comb, sinkhorn_by_hand(logits, 20), rtol=0, atol=1e-14)
    assert (comb.sum(-2) - 1).abs().max() < 2e-6 and (comb.sum(-1) - 1).abs().max() < 2e-6  # 1 - eps, converged


# ---------------------------------------------------------------------------------------------------------
# transformers' DeepSeek-V4 modules on our weights

def test_mhc_matches_transformers_deepseek_v4(monkeypatch):
    """DeepseekV4HyperConnection and DeepseekV4HyperHead (transformers 5.25 models/deepseek_v4) loaded with each of
    our blocks' weights, around our attention and MLP as DeepseekV4DecoderLayer.forward composes them (its MoE and
    compressed attention are not ours; the composition is copied from it), and DeepseekV4Model's expansion of the
    embedding and collapse before the final norm: the same logits as our model, in float64."""
    ds = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    cfg, model = stream_model("mhc", residual_sinkhorn_iters=7)
    n = cfg.residual_streams
    config = DeepseekV4Config(hidden_size=cfg.d_model, hc_mult=n, hc_sinkhorn_iters=7, rms_norm_eps=cfg.norm_eps,
                              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, head_dim=cfg.head_dim)
    tok = tokens(cfg)
    with torch.no_grad():
        ours = model(tok)
        # theirs compute the weights in `.float()`; keep float64 for a 1e-10 comparison
        monkeypatch.setattr(torch.Tensor, "float", lambda self: self)

        def hc_of(ours_hc):
            theirs = ds.DeepseekV4HyperConnection(config).double()
            theirs.load_state_dict({"fn": ours_hc.fn, "base": ours_hc.base, "scale": ours_hc.scale})
            return theirs

        hidden = model.tok_emb(tok)
        hidden = hidden.unsqueeze(2).expand(-1, -1, n, -1).contiguous()  # DeepseekV4Model.forward
        for block in model.blocks:
            attn_hc, ffn_hc = hc_of(block.residual.hc[0]), hc_of(block.residual.hc[1])
            # DeepseekV4DecoderLayer.forward
            dtype = hidden.dtype
            post, comb, collapsed = attn_hc(hidden)
            attn_output = block.attn(block.attn_norm(collapsed), model.rope_cos, model.rope_sin)
            hidden = post.to(dtype).unsqueeze(-1) * attn_output.unsqueeze(-2) + torch.matmul(
                comb.to(dtype).transpose(-1, -2), hidden)
            post, comb, collapsed = ffn_hc(hidden)
            mlp_output = block.mlp(block.mlp_norm(collapsed))
            hidden = post.to(dtype).unsqueeze(-1) * mlp_output.unsqueeze(-2) + torch.matmul(
                comb.to(dtype).transpose(-1, -2), hidden)
        head = ds.DeepseekV4HyperHead(config).double()
        head.load_state_dict({"hc_fn": model.streams_out.fn, "hc_base": model.streams_out.base,
                              "hc_scale": model.streams_out.scale})
        theirs = model.head(model.final_norm(head(hidden)))
    assert (ours - theirs).abs().max() <= 1e-10


def test_mhc_init_is_deepseek_v4s():
    """DeepseekV4PreTrainedModel._init_weights: fn ~ N(0, initializer_range), base 0, scale 1; the same seed gives
    the same weights whatever else the model holds (drawn from the seed and the weight's name, as every matrix)."""
    cfg = ModelConfig(**{**SHAPE, "d_model": 64, "n_heads": 4}, residual="mhc")
    model = Llama(cfg, seed=5)
    hc = model.blocks[1].residual.hc[1]
    assert hc.fn.shape == (6 * 4, 4 * 64) and model.streams_out.fn.shape == (4, 4 * 64)
    assert torch.equal(hc.base, torch.zeros(24)) and torch.equal(hc.scale, torch.ones(3))
    assert abs(hc.fn.std().item() - 0.02) < 0.002
    n, D, L = 4, 64, cfg.n_layers  # per sublayer (2 + n) n weights from each of the n D inputs, their biases, 3 scales
    extra = L * 2 * ((2 + n) * n * n * D + (2 + n) * n + 3) + (n * n * D + n + 1)  # + the head's collapse
    assert model.num_params() == Llama.meta(dataclasses.replace(cfg, residual="single")).num_params() + extra
    again = Llama(dataclasses.replace(cfg, tie_embeddings=True), seed=5)
    assert torch.equal(again.blocks[1].residual.hc[1].fn, hc.fn)
    assert not torch.equal(model.blocks[0].residual.hc[0].fn, hc.fn)


# ---------------------------------------------------------------------------------------------------------
# One stream: every scheme exactly as it was

@pytest.mark.parametrize("scheme,extra", [(s, {}) for s in NORM_SCHEMES] + [("pre_ln", {"gpas": True}),
                                                                            ("deepnorm", {"gpas": True})])
def test_one_stream_is_the_block_as_it_was_bitwise(scheme, extra):
    """model.residual=single: the block computes h = P(R(x, a)), y = P'(R(h, m)) on [B, T, D] as before the stream
    state, bit for bit, and the model holds nothing more (no stream parameter, Identity expansion and collapse)."""
    cfg = ModelConfig(**SHAPE, norm_scheme=scheme, **extra)
    model = Llama(cfg, seed=3)
    if cfg.gpas:
        with torch.no_grad():
            for block in model.blocks:
                block.residual.gate.fill_(0.3)
    x = torch.randn(2, 7, cfg.d_model, generator=torch.Generator().manual_seed(4))
    cos, sin = model.rope_cos, model.rope_sin
    with torch.no_grad():
        for b in model.blocks:
            a = b.attn_out_norm(b.attn(b.attn_norm(x), cos, sin))
            h = b.attn_post_norm(b.residual(x, a, 0))
            want = b.mlp_post_norm(b.residual(h, b.mlp_out_norm(b.mlp(b.mlp_norm(h))), 1))
            assert torch.equal(b(x, cos, sin), want)
            x = want
    assert type(model.streams_in) is torch.nn.Identity and type(model.streams_out) is torch.nn.Identity
    assert not any(k.startswith("streams") for k in model.state_dict())


# ---------------------------------------------------------------------------------------------------------
# The config

@pytest.mark.parametrize("overrides,message", [
    (dict(norm_scheme="post_ln", residual="mhc"),
     r"^model\.residual=mhc does not compose with model\.norm_scheme=post_ln \(mHC \(DeepSeek-V4\), "
     r"hyper-connections, Attention Residuals and SiameseNorm wrap Pre-Norm blocks\); it composes with pre_ln$"),
    (dict(residual="mhc", gpas=True), r"^model\.residual=mhc does not compose with model\.gpas=True"),
    (dict(residual_streams=4), r"^model\.residual_streams: set for model\.residual=single"),
    (dict(residual="hc", residual_sinkhorn_iters=5), r"^model\.residual_sinkhorn_iters: .* model\.residual=mhc$"),
    (dict(residual="mhc", residual_streams=0), r"must be a positive integer, got 0"),
    (dict(residual="hc", removable_norms=True), r"norm removal does not cover residual streams"),
    (dict(norm_scheme="peri_ln", residual="attn_res"),
     r"^model\.residual=attn_res does not compose with model\.norm_scheme=peri_ln \(mHC \(DeepSeek-V4\), "
     r"hyper-connections, Attention Residuals and SiameseNorm wrap Pre-Norm blocks\); it composes with pre_ln$"),
    (dict(norm_scheme="post_ln", residual="siamese"), r"^model\.residual=siamese does not compose with "
                                                      r"model\.norm_scheme=post_ln"),
    (dict(residual="siamese", residual_streams=2), r"^model\.residual_streams: set for model\.residual=siamese"),
    (dict(residual="attn_res", residual_streams=2), r"^model\.residual_streams=2: attn_res groups the "
                                                    r"model\.n_layers=3 layers into blocks of equal size; set it to a "
                                                    r"divisor of 3$"),
    (dict(residual="attn_res", n_layers=12), r"^model\.residual_streams=8: attn_res groups"),
    (dict(residual="streams"), r"^model\.residual: 'streams' is not one of single, mhc, hc, hc_static, attn_res, "
                               r"siamese$"),
])
def test_config_refuses_what_streams_do_not_do(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SHAPE, **overrides})


def test_export_refuses_streams_with_the_reason():
    from models.hf.choose import NotExportable, export_target

    for residual in ("mhc", "hc", "hc_static", "attn_res", "siamese"):
        with pytest.raises(NotExportable, match=rf"^model\.residual={residual} cannot be exported .*DeepSeek-V4"):
            export_target(ModelConfig(**SHAPE, residual=residual))


# ---------------------------------------------------------------------------------------------------------
# The state between pipeline stages, with the packed-SFT extras beside it; every stream weight trains

def test_pipeline_stages_pass_the_state_and_the_packing_inputs():
    """Packed rows (positions, doc_ids) travel with the stream state through the block stages; chained, the stages
    give the model's loss bit for bit."""
    from models.pipeline import BlockStage, EmbeddingStage, HeadStage, ReadoutStage

    cfg = ModelConfig(**SHAPE, residual="mhc")
    model = Llama(cfg, seed=4)
    stages = [EmbeddingStage(cfg, None, 4), *(BlockStage(cfg, l, None, 4) for l in range(1, cfg.n_layers + 1)),
              ReadoutStage(cfg, 4), HeadStage(cfg, None, 4)]
    tok = tokens(cfg)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]] * 2)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 2)
    x = (tok, positions, doc_ids, tok)
    for stage in stages[:-2]:
        x = stage(x)
        assert x[0].shape == (2, 7, 4, cfg.d_model) and x[1] is positions and x[2] is doc_ids
    loss = stages[-1](stages[-2](x))
    assert torch.equal(loss, model(tok, tok, reduction="sum", positions=positions, doc_ids=doc_ids))


def zero_at_init(residual: str, name: str) -> bool:
    """The weights whose gradient is zero at their paper's init. Hyper-connections' dynamic scales s_a, s_b multiply
    tanh(0) = 0, and their LayerNorm is read only through W_a = w_b = 0. Block AttnRes's key gains are read only
    through the pseudo-queries w = 0, and the first sublayer's query softmaxes over one source (the embedding)."""
    if residual == "hc":
        return name.endswith(("alpha_scale", "beta_scale", "norm.weight", "norm.bias")) and ".hc." in name
    if residual == "attn_res":
        return name.endswith("key_gain") or name == "blocks.0.residual.depth.0.query"
    return False


@pytest.mark.parametrize("residual", ["mhc", "hc", "attn_res", "siamese"])
def test_every_stream_weight_gets_a_gradient(residual):
    """Every weight gets a gradient at init but those `zero_at_init` names, which get exactly zero until the weights
    in front of them move."""
    cfg = ModelConfig(**{**SHAPE, **STREAM_SHAPE.get(residual, {}), "residual_streams": None}, residual=residual)
    model = Llama(cfg, seed=0)
    tok = tokens(cfg)
    model(tok, tok).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.abs().max() == 0) == zero_at_init(residual, name), name
