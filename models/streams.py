"""Multi-stream residuals (model.residual): the residual as a state of n streams, [B, T, n, D], carried between blocks.

Every block's residual slot (models/norms.py `BlockParts.residual`) is read before each sublayer and written after it:

    u, mix = residual.read(S, s)          the sublayer's input [B, T, D] from the state S, and what the write needs
    S'     = residual(S, F(u), s, mix)    the state after sublayer s (0 attention, 1 MLP)

The single-stream updates of models/parts.py read u = S and ignore `mix`, so every scheme without model.residual keeps
its [B, T, D] stream and its exact arithmetic. The model expands the embedding's output into the state
(`StreamExpand`) and collapses the state before the final norm (`MHCHead`, `StreamSum`); nothing else sees the streams
(the pipeline passes the state between stages as it passed x).

    mhc        (DeepSeek-V4; Xie et al., 2026; transformers DeepseekV4HyperConnection, its names in brackets)
               per sublayer, from f = RMS(flatten(S)) [B, T, nD] (unweighted RMSNorm, model.norm_eps):
               [pre, post, comb] = f W^T [fn] split n, n, n*n;  b [base], s [scale] (3 scalars):
               pre  = sigmoid(s_0 pre + b_pre) + eps
               post = 2 sigmoid(s_1 post + b_post)
               comb = SinkhornKnopp(softmax(s_2 comb + b_comb, rows) + eps), model.residual_sinkhorn_iters
               u = sum_i pre_i S_i;  S'_k = post_k F(u) + sum_j comb_jk S_j
               embedding copied into the n streams; collapsed by its own pre weights (DeepseekV4HyperHead) before
               the final norm. W ~ N(0, model.init_std), b = 0, s = 1 (DeepseekV4PreTrainedModel._init_weights);
               eps = 1e-6 (hc_eps). The projection and the weights in (at least) fp32, as there.
    hc         hyper-connections (Zhu et al., ICLR 2025, Algorithm 2 of its appendix), dynamic (DHC):
    hc_static  ... static (SHC):
               A = A_static + s_a tanh(LN(S) W_a) [n, n + 1],  beta = beta_static + s_b tanh(LN(S) w_b) [n]
               (static: the tanh terms left out); u = sum_j A_j0 S_j,  S'_k = beta_k F(u) + sum_j A_j,k+1 S_j.
               Init: A_static = [e_(k mod n) | I], beta_static = 1, W_a = w_b = 0, s_a = s_b = 0.01, k = 2(l - 1) + s
               the sublayer's index; LN a LayerNorm over D with gain and bias. The embedding copied into the n
               streams; their sum read out (the paper's).

    attn_res   Block Attention Residuals (Kimi Team, arXiv 2603.15031, its "Block AttnRes"; the official pseudocode of
               MoonshotAI/Attention-Residuals, the op as Liger-Kernel ops/attn_res.py): the L layers grouped into N
               blocks of S = L/N layers (model.residual_streams = N). b_0 = the embedding, b_n = the sum of the
               sublayer outputs of block n (b_n^i its partial sum after i of them). Each sublayer's input is
                   h = sum_j alpha_j V_j,  alpha = softmax_j(w . RMSNorm(V_j)),  over depth j,
               V = [b_0, ..., b_(n-1)] for the first sublayer of block n (its attention), [b_0, ..., b_(n-1), b_n^i]
               for the others; w [D] is the sublayer's pseudo-query (zero at init: a uniform mix), RMSNorm the key
               norm with its own gain (ones), eps model.norm_eps; scores and weights in (at least) fp32 as Liger.
               The sublayer's output joins b_n (b_n^(i+1) = b_n^i + F). The state holds [b_0, b_1, ..., b_N]
               ([B, T, N + 1, D], the blocks not reached yet zero): the embedding placed in slot 0; after the last
               block one more AttnRes, with its own pseudo-query and key norm, over [b_0, ..., b_N] gives the final
               norm's input: the pseudocode stops at the layer's (blocks, partial_block), and we read the output
               the way every layer reads its input (as the open reimplementations that aggregate at the end do).
    siamese    SiameseNorm (Li et al., ICML 2026, arXiv 2602.08064; Qwen-Applications/SiameseNorm, its DeiT block
               deit-model-siamesenorm.py, the OLMo patch's post_pre form): two streams, x Post-Norm-like and y
               Pre-Norm-like, both from the embedding (y = x.clone()), sharing each sublayer's update; per sublayer,
               with N_post, N_pre, N_in the run's norm (N_in the block's own attn_norm / mlp_norm), l = 1..L:
                   x <- N_post(x);  z = F(N_in(x + N_pre(y)));  x <- x + z / sqrt(2 l);  y <- y + z
               the state [x, y] ([B, T, 2, D]); before the final norm N_x(x) + N_y(y) (DeiT's pre_norm(x) +
               post_norm(y)), then the final norm. Every norm gain from ones.

Under tensor parallelism the state and every weight here are replicated and the mixing is computed whole on each
rank (it reads the replicated state, which the row-parallel outputs already all-reduced): exact, no communication.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HC_EPS = 1e-6  # DeepseekV4Config.hc_eps


def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float = HC_EPS) -> torch.Tensor:
    """DeepSeek-V4's comb weight from its logits [..., n, n]: softmax over each row plus eps, then `iters`
    normalizations toward a doubly-stochastic matrix (columns first, then rows and columns iters - 1 times)."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _wide(x: torch.Tensor) -> torch.dtype:
    """fp32, as DeepSeek-V4 computes the weights (`.float()`); a float64 model stays float64 (the tests' formulas)."""
    return torch.promote_types(x.dtype, torch.float32)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepseekV4UnweightedRMSNorm on fp32 input."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def seeded(p: nn.Parameter) -> nn.Parameter:
    """A replicated weight that models.llama `init_weights` draws from the run's seed and its name, as it draws the
    split ones: the same weights at every TP/PP layout."""
    p.seeded_init = True
    return p


class MHCWeights(nn.Module):
    """One sublayer's mHC weights from the state (DeepseekV4HyperConnection): pre [B, T, n], post [B, T, n] and comb
    [B, T, n, n], in fp32."""

    def __init__(self, d_model: int, streams: int, sinkhorn_iters: int, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.norm_eps = streams, sinkhorn_iters, norm_eps
        self.fn = seeded(nn.Parameter(torch.empty((2 + streams) * streams, streams * d_model)))
        self.base = nn.Parameter(torch.zeros((2 + streams) * streams))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, wide = self.n, _wide(state)
        flat = unweighted_rms(state.flatten(-2).to(wide), self.norm_eps)
        pre_w, post_w, comb_w = F.linear(flat, self.fn.to(wide)).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.to(wide).split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.to(wide).unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + HC_EPS
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = sinkhorn_knopp(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), self.iters)
        return pre, post, comb

    def reset_parameters(self) -> None:  # fn is drawn by init_weights (`seeded`)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return f"streams={self.n}, sinkhorn_iters={self.iters}"


def collapse(weights: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """sum_i w_i S_i: [B, T, n] weights, [B, T, n, D] state -> [B, T, D] in the state's dtype."""
    return (weights.unsqueeze(-1) * state).sum(dim=-2).to(state.dtype)


def write(post: torch.Tensor, comb: torch.Tensor, state: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """S'_k = post_k F + sum_j comb_jk S_j (comb read transposed, as DeepseekV4DecoderLayer does)."""
    dtype = state.dtype
    return post.to(dtype).unsqueeze(-1) * branch.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), state)


class MHCResidual(nn.Module):
    """A block's mHC residual: one `MHCWeights` per sublayer (attention's, the MLP's)."""

    def __init__(self, d_model: int, streams: int, sinkhorn_iters: int, norm_eps: float):
        super().__init__()
        self.hc = nn.ModuleList(MHCWeights(d_model, streams, sinkhorn_iters, norm_eps) for _ in range(2))

    def weights(self, state: torch.Tensor, sublayer: int) -> dict[str, torch.Tensor]:
        """The sublayer's mixing weights (diagnostics: pretrain/diagnostics/streams.py)."""
        pre, post, comb = self.hc[sublayer](state)
        return {"pre": pre, "post": post, "comb": comb}

    def read(self, state: torch.Tensor, sublayer: int):
        pre, post, comb = self.hc[sublayer](state)
        return collapse(pre, state), (post, comb)

    def forward(self, state: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        post, comb = mix
        return write(post, comb, state, branch)


class HCWeights(nn.Module):
    """One sublayer's hyper-connection (Zhu et al., Algorithm 2): static alpha [n, n + 1] and beta [n], and with
    `dynamic` their input-dependent parts."""

    def __init__(self, d_model: int, streams: int, index: int, dynamic: bool):
        super().__init__()
        self.n, self.index, self.dynamic = streams, index, dynamic
        self.static_alpha = nn.Parameter(torch.empty(streams, streams + 1))
        self.static_beta = nn.Parameter(torch.empty(streams))
        if dynamic:
            self.norm = nn.LayerNorm(d_model)
            self.alpha_fn = nn.Parameter(torch.empty(d_model, streams + 1))
            self.alpha_scale = nn.Parameter(torch.empty(1))
            self.beta_fn = nn.Parameter(torch.empty(d_model))
            self.beta_scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha [B, T, n, n + 1] (or [n, n + 1] static) and beta [B, T, n] (or [n])."""
        alpha, beta = self.static_alpha, self.static_beta
        if self.dynamic:
            h = self.norm(state)
            alpha = alpha + torch.tanh(h @ self.alpha_fn) * self.alpha_scale
            beta = beta + torch.tanh(h @ self.beta_fn) * self.beta_scale
        return alpha.to(state.dtype), beta.to(state.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.static_alpha.zero_()
        self.static_alpha[self.index % self.n, 0] = 1.0
        self.static_alpha[:, 1:] = torch.eye(self.n)
        self.static_beta.fill_(1.0)
        if self.dynamic:
            self.norm.reset_parameters()
            self.alpha_fn.zero_()
            self.beta_fn.zero_()
            self.alpha_scale.fill_(0.01)
            self.beta_scale.fill_(0.01)

    def extra_repr(self) -> str:
        return f"streams={self.n}, index={self.index}, {'dynamic' if self.dynamic else 'static'}"


class HCResidual(nn.Module):
    """A block's hyper-connections: one `HCWeights` per sublayer, sublayer k = 2(l - 1) + s of the network."""

    def __init__(self, d_model: int, streams: int, layer: int, dynamic: bool):
        super().__init__()
        self.hc = nn.ModuleList(HCWeights(d_model, streams, 2 * (layer - 1) + s, dynamic) for s in range(2))

    def weights(self, state: torch.Tensor, sublayer: int) -> dict[str, torch.Tensor]:
        alpha, beta = self.hc[sublayer](state)
        return {"pre": alpha[..., 0], "post": beta, "comb": alpha[..., 1:]}

    def read(self, state: torch.Tensor, sublayer: int):
        alpha, beta = self.hc[sublayer](state)
        mixed = torch.matmul(alpha.transpose(-1, -2), state)  # [B, T, n + 1, D]: the input, then the n streams
        return mixed[..., 0, :], (beta, mixed[..., 1:, :])

    def forward(self, state: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        beta, streams = mix
        return beta.unsqueeze(-1) * branch.unsqueeze(-2) + streams


class AttnResDepth(nn.Module):
    """One depth attention of Block AttnRes: values [B, T, m, D] -> sum_j alpha_j V_j, alpha = softmax_j(w .
    RMSNorm(V_j)) with the pseudo-query w (zeros) and the key norm's gain g (ones); fp32 scores (Liger's op)."""

    def __init__(self, d_model: int, norm_eps: float):
        super().__init__()
        self.norm_eps = norm_eps
        self.query = nn.Parameter(torch.zeros(d_model))
        self.key_gain = nn.Parameter(torch.ones(d_model))

    def weights(self, values: torch.Tensor) -> torch.Tensor:
        """alpha [B, T, m], in (at least) fp32."""
        wide = _wide(values)
        keys = unweighted_rms(values.to(wide), self.norm_eps) * self.key_gain.to(wide)
        return torch.softmax(keys @ self.query.to(wide), dim=-1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return collapse(self.weights(values), values)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.query.zero_()
        self.key_gain.fill_(1.0)


class AttnResResidual(nn.Module):
    """Block l's Block AttnRes: one `AttnResDepth` per sublayer; block l belongs to depth block n = (l - 1) // S + 1,
    whose sum is slot n of the state [B, T, N + 1, D]."""

    def __init__(self, d_model: int, norm_eps: float, layer: int, layers_per_block: int):
        super().__init__()
        self.slot = (layer - 1) // layers_per_block + 1
        self.starts_block = (layer - 1) % layers_per_block == 0
        self.depth = nn.ModuleList(AttnResDepth(d_model, norm_eps) for _ in range(2))

    def sources(self, sublayer: int) -> int:
        """How many slots the sublayer attends over: b_0..b_(n-1), and b_n^i once block n has begun."""
        return self.slot if sublayer == 0 and self.starts_block else self.slot + 1

    def depth_weights(self, state: torch.Tensor, sublayer: int) -> torch.Tensor:
        """The sublayer's alpha over its sources [B, T, m] (the mixing weights of mhc/hc are `weights`)."""
        return self.depth[sublayer].weights(state[..., :self.sources(sublayer), :])

    def read(self, state: torch.Tensor, sublayer: int):
        return self.depth[sublayer](state[..., :self.sources(sublayer), :]), None

    def forward(self, state: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        after = state.shape[-2] - 1 - self.slot  # b_n += F: F placed in slot n (zeros elsewhere: exact)
        return state + F.pad(branch.unsqueeze(-2), (0, 0, self.slot, after))

    def extra_repr(self) -> str:
        return f"slot={self.slot}, starts_block={self.starts_block}"


class AttnResExpand(nn.Module):
    """The embedding [B, T, D] as b_0 of the state [B, T, N + 1, D], the N block sums zero."""

    def __init__(self, blocks: int):
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x.unsqueeze(-2), (0, 0, 0, self.blocks))

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}"


class AttnResHead(AttnResDepth):
    """The final norm's input: one more depth attention over [b_0, ..., b_N], with its own pseudo-query and key norm."""


class SiameseResidual(nn.Module):
    """Block l's SiameseNorm: per sublayer the Post-Norm stream's norm and the Pre-Norm stream's read-out norm (the
    run's norm, `norm` a factory of it); the state [x, y]."""

    def __init__(self, norm: Callable[[], nn.Module], layer: int):
        super().__init__()
        self.post_norm = nn.ModuleList(norm() for _ in range(2))  # DeiT Block.post_norm1/2: x <- N_post(x)
        self.pre_norm = nn.ModuleList(norm() for _ in range(2))  # DeiT Block.pre_norm1/2: read y as N_pre(y)
        self.c = math.sqrt(2 * layer)  # ((index + 1) * 2) ** 0.5, index = l - 1

    def read(self, state: torch.Tensor, sublayer: int):
        x = self.post_norm[sublayer](state[..., 0, :])
        return x + self.pre_norm[sublayer](state[..., 1, :]), x  # the block's attn_norm / mlp_norm is N_in

    def forward(self, state: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        return torch.stack([mix + branch / self.c, state[..., 1, :] + branch], dim=-2)

    def extra_repr(self) -> str:
        return f"c={self.c:.4g}"


class SiameseHead(nn.Module):
    """SiameseNorm's two streams into the final norm's input: N_x(x) + N_y(y) (DeiT forward_features)."""

    def __init__(self, norm: Callable[[], nn.Module]):
        super().__init__()
        self.x_norm, self.y_norm = norm(), norm()

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.x_norm(state[..., 0, :]) + self.y_norm(state[..., 1, :])


class StreamExpand(nn.Module):
    """The embedding's output [B, T, D] copied into the n streams [B, T, n, D] (DeepseekV4Model, hyper-connections)."""

    def __init__(self, streams: int):
        super().__init__()
        self.n = streams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1]).contiguous()

    def extra_repr(self) -> str:
        return f"streams={self.n}"


class MHCHead(nn.Module):
    """mHC's last collapse before the final norm (DeepseekV4HyperHead): sum_i pre_i S_i, pre = sigmoid(s f w_i + b_i)
    + eps from f = RMS(flatten(S)); w ~ N(0, model.init_std), b = 0, s = 1."""

    def __init__(self, d_model: int, streams: int, norm_eps: float):
        super().__init__()
        self.norm_eps = norm_eps
        self.fn = seeded(nn.Parameter(torch.empty(streams, streams * d_model)))
        self.base = nn.Parameter(torch.zeros(streams))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        wide = _wide(state)
        flat = unweighted_rms(state.flatten(-2).to(wide), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.fn.to(wide)) * self.scale.to(wide) + self.base.to(wide)) + HC_EPS
        return collapse(pre, state)

    def reset_parameters(self) -> None:  # fn is drawn by init_weights (`seeded`)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)


class StreamSum(nn.Module):
    """The streams' sum [B, T, n, D] -> [B, T, D] (hyper-connections' read-out)."""

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return state.sum(dim=-2)


def summed(x: torch.Tensor) -> torch.Tensor:
    """The collapsed state the diagnostics and analyses measure: a state [B, T, n, D]'s sum over the streams, a single
    stream [B, T, D] itself. Under mHC's doubly-stochastic comb the sum moves as one residual stream does:
    sum_k S'_k = sum_j S_j + (sum_k post_k) F."""
    return x.sum(dim=-2) if x.ndim == 4 else x
