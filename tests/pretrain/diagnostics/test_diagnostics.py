"""Per-layer diagnostics: the statistics by hand, the same numbers under TP / PP / ZeRO-2, and the Curse of Depth."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers.train import metrics, run_train

from models import Llama, ModelConfig
from pretrain.diagnostics.probes import ActivationProbe, counted, grad_square_sums, local_blocks, parameter_groups
from pretrain.diagnostics.stats import ACTIVATION_STATS, STREAM_ROWS
from pretrain.diagnostics.writer import LAYER_STATS_FILE as FILE
from pretrain.diagnostics.writer import make_record

STATS = tuple(s.name for s in ACTIVATION_STATS)
STREAM = STREAM_ROWS  # the per-stream entries, grad_norm_stream among them

pytestmark = pytest.mark.compat

SMALL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
         "max_seq_len": 32}


def layer_stats(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def hand_stats(model: Llama, tokens: torch.Tensor) -> dict[str, list[float]]:
    """The documented definitions, written out from the block's submodules (no diagnostics code)."""
    out = {name: [] for name in STATS}
    x = model.emb_out(model.tok_emb(tokens))  # the embedding as the first block reads it (peri_ln: normalized)
    for blk in model.blocks:
        alpha = blk.residual_alpha
        a = blk.attn_out_norm(blk.attn(blk.attn_norm(x), model.rope_cos, model.rope_sin))
        h = blk.attn_post_norm(alpha * x + a)
        m = blk.mlp_out_norm(blk.mlp(blk.mlp_norm(h)))
        y = blk.mlp_post_norm(alpha * h + m)
        D = y.shape[-1]
        centered = y - y.sum(-1, keepdim=True) / D
        out["variance"].append(((centered**2).sum(-1) / D).mean().item())
        out["rms"].append(math.sqrt((y**2).mean().item()))
        out["attn_ratio"].append(math.sqrt((a**2).sum().item()) / math.sqrt(((alpha * x) ** 2).sum().item()))
        out["mlp_ratio"].append(math.sqrt((m**2).sum().item()) / math.sqrt(((alpha * h) ** 2).sum().item()))
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        out["angular_distance"].append((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item())
        mix_by_hand(out, torch.tensor([[alpha]], dtype=y.dtype))  # one stream: its mix is [alpha]
        x = y
    return out


def mix_by_hand(out: dict, C: torch.Tensor) -> None:
    """The mixing-matrix statistics of C [..., n, n], written out: row and column sums, the largest singular value
    (the square root of C^T C's largest eigenvalue) and the rows' entropy of |C| normalized."""
    n = C.shape[-1]
    rows = [sum(C[..., j, k] for k in range(n)) for j in range(n)]
    cols = [sum(C[..., j, k] for j in range(n)) for k in range(n)]
    out["mix_ds_error"].append(max((t - 1).abs().max().item() for t in rows + cols))
    out["mix_spectral_norm"].append(torch.linalg.eigvalsh(C.transpose(-1, -2) @ C)[..., -1].sqrt().mean().item())
    entropy = []
    for j in range(n):
        p = C[..., j, :].abs() / C[..., j, :].abs().sum(-1, keepdim=True)
        entropy.append(-(p * p.log()).nan_to_num().sum(-1))
    out["mix_entropy"].append(torch.stack(entropy).mean().item())


def probe_stats(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    probe = ActivationProbe(local_blocks(model), len(model.blocks))
    probe.arm()
    with torch.no_grad():
        model(tokens)
    return probe.result()


@pytest.mark.parametrize("scheme", ["pre_ln", "peri_ln", "deepnorm", "ln_free"])
def test_activation_stats_match_hand_computation(scheme):
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL, norm_scheme=scheme), seed=1).double()
    tokens = torch.randint(0, 64, (3, 16))
    got = probe_stats(model, tokens)
    with torch.no_grad():
        want = hand_stats(model, tokens)
    for i, name in enumerate(STATS):
        assert got[i].tolist() == pytest.approx(want[name], rel=1e-10), name
    if scheme == "deepnorm":
        assert model.blocks[0].residual_alpha != 1.0  # the ratios' alpha is exercised


@pytest.mark.parametrize("residual", ["mhc", "hc"])
def test_activation_stats_of_residual_streams_are_those_of_the_streams_sum(residual):
    """With model.residual the block's x, h and y are states [B, T, n, D]: the statistics are the documented ones of
    their sum over the streams, the branches a and m the sublayers' outputs; the mixing statistics those of both
    sublayers' comb."""
    model = Llama(ModelConfig(**SMALL, residual=residual), seed=1).double()
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    got = probe_stats(model, tokens)
    want = {name: [] for name in STATS}
    with torch.no_grad():
        S = model.embed(tokens)
        assert S.shape == (3, 16, 4, SMALL["d_model"])
        for blk in model.blocks:
            C = torch.stack([blk.residual.weights(S, 0)["comb"]])
            u, mix = blk.residual.read(S, 0)
            a = blk.attn(blk.attn_norm(u), model.rope_cos, model.rope_sin)
            H = blk.residual(S, a, 0, mix)
            u, mix = blk.residual.read(H, 1)
            m = blk.mlp(blk.mlp_norm(u))
            Y = blk.residual(H, m, 1, mix)
            C = torch.cat([C, blk.residual.weights(H, 1)["comb"][None]])
            mix_by_hand(want, C)
            x, h, y = S.sum(2), H.sum(2), Y.sum(2)
            want["variance"].append(y.var(-1, unbiased=False).mean().item())
            want["rms"].append(math.sqrt((y**2).mean().item()))
            want["attn_ratio"].append(a.norm().item() / x.norm().item())
            want["mlp_ratio"].append(m.norm().item() / h.norm().item())
            cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
            want["angular_distance"].append((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item())
            S = Y
    for i, name in enumerate(STATS):
        assert got[i].tolist() == pytest.approx(want[name], rel=1e-10), name


def stream_probe_stats(model: Llama, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The per-stream statistics [len(STREAM_ROWS), L, n] of one forward (and with labels, its backward)."""
    n = model.blocks[0].residual.hc[0].n
    probe = ActivationProbe(local_blocks(model), len(model.blocks), n)
    probe.arm()
    if labels is None:
        with torch.no_grad():
            model(tokens)
    else:
        model(tokens, labels).backward()
    return probe.stream_result()


@pytest.mark.parametrize("residual", ["mhc", "hc"])
def test_per_stream_stats_match_hand_computation(residual):
    """The per-stream entries (pretrain/diagnostics/measures.py) written out per stream k from the states X, H, Y
    [B, T, n, D]: variance_stream = var(Y_k) over the hidden dim averaged over tokens, attn_ratio_stream =
    ||H_k - X_k||_F / ||X_k||_F, mlp_ratio_stream = ||Y_k - H_k||_F / ||H_k||_F and grad_norm_stream =
    ||dl/dX_k||_F, l the model's mean token loss, by autograd on the hand-built states. The mixing weights are
    perturbed away from their init so that the streams differ (hyper-connections' init keeps them copies)."""
    model = Llama(ModelConfig(**SMALL, residual=residual), seed=1).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for blk in model.blocks:
            for p in blk.residual.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    tokens, labels = torch.randint(0, 64, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    got = stream_probe_stats(model, tokens, labels)
    n = 4
    assert got.shape == (len(STREAM), 2, n)
    want = {name: [] for name in STREAM}
    X = model.embed(tokens)
    inputs = []
    for blk in model.blocks:
        X.retain_grad()
        inputs.append(X)
        u, mix = blk.residual.read(X, 0)
        H = blk.residual(X, blk.attn(blk.attn_norm(u), model.rope_cos, model.rope_sin), 0, mix)
        u, mix = blk.residual.read(H, 1)
        Y = blk.residual(H, blk.mlp(blk.mlp_norm(u)), 1, mix)
        streams = [(X[:, :, k].detach(), H[:, :, k].detach(), Y[:, :, k].detach()) for k in range(n)]
        want["variance_stream"].append([y.var(-1, unbiased=False).mean().item() for _, _, y in streams])
        want["attn_ratio_stream"].append([((h - x).norm() / x.norm()).item() for x, h, _ in streams])
        want["mlp_ratio_stream"].append([((y - h).norm() / h.norm()).item() for _, h, y in streams])
        X = Y
    model.head_loss(model.readout(X), labels).backward()  # the model's own mean token loss
    want["grad_norm_stream"] = [[X.grad[:, :, k].norm().item() for k in range(n)] for X in inputs]
    for i, name in enumerate(STREAM):
        for l in range(2):
            assert got[i, l].tolist() == pytest.approx(want[name][l], rel=1e-10), (name, l)
        assert len(set(got[i].flatten().tolist())) == 2 * n, name  # the streams (and layers) differ


@pytest.mark.parametrize("residual", ["hc", "hc_static"])
def test_per_stream_stats_of_copied_streams_are_the_collapsed_ones_scaled(residual):
    """Hyper-connections at init (A = [e_(k mod n) | I], beta = 1) read one stream, write the whole branch into
    every stream and keep the n streams copies of the embedding's: Y_k = y / n and H_k - X_k = a. So per stream
    variance_stream = variance / n^2, attn_ratio_stream = ||a|| / ||x / n|| = n attn_ratio, mlp_ratio_stream =
    n mlp_ratio: the per-stream values agree with the collapsed ones where the streams' sum is n times a stream."""
    model = Llama(ModelConfig(**SMALL, residual=residual, residual_streams=3), seed=1).double()
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    collapsed, per_stream = probe_stats(model, tokens), stream_probe_stats(model, tokens)
    n, scale = 3, {"variance_stream": (0, 1 / 9), "attn_ratio_stream": (2, 3.0), "mlp_ratio_stream": (3, 3.0)}
    assert [STATS[i] for i, _ in scale.values()] == ["variance", "attn_ratio", "mlp_ratio"]
    for name, (i, factor) in scale.items():
        j = STREAM.index(name)
        for l in range(2):
            assert per_stream[j, l].tolist() == pytest.approx([factor * collapsed[i, l].item()] * n, rel=1e-10)


@pytest.mark.parametrize("residual, n", [("siamese", 2), ("attn_res", 1)])
def test_per_stream_stats_are_of_side_by_side_streams_only(residual, n):
    """SiameseNorm's two streams are measured like mHC's, X_k, H_k, Y_k its Post-Norm-like and Pre-Norm-like streams;
    Block AttnRes's state holds the embedding and the finished blocks' sums, a history and not streams, so it gets
    no per-stream statistics (measured_streams 1), while its collapsed statistics are still taken."""
    from models.norms import measured_streams

    cfg = ModelConfig(**SMALL, residual=residual)
    assert measured_streams(cfg) == n
    model = Llama(cfg, seed=1).double()
    tokens, labels = torch.randint(0, 64, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    probe = ActivationProbe(local_blocks(model), len(model.blocks), n)
    probe.arm()
    model(tokens, labels).backward()
    assert probe.result().shape == (len(STATS), 2) and bool((probe.result()[0] > 0).all())
    if n == 1:
        assert probe.measured_streams == {} and probe.measured_grads == {}
        return
    got = probe.stream_result()
    assert got.shape == (len(STREAM), 2, n) and bool(torch.isfinite(got).all()) and bool((got > 0).all())
    with torch.no_grad():  # variance_stream by hand on block 1's output state
        X = model.embed(tokens)
        Y = model.blocks[0](X, model.rope_cos, model.rope_sin)
    assert got[STREAM.index("variance_stream"), 0].tolist() == pytest.approx(
        [Y[:, :, k].var(-1, unbiased=False).mean().item() for k in range(n)], rel=1e-10)


def test_one_stream_records_have_no_per_stream_keys_and_n_streams_have_them(tmp_path):
    """n = 1: the record (and so layer_stats.jsonl and the trackers) is the one it was before the per-stream entries;
    n > 1: each per-stream entry is a list of L lists of n values, logged as layers/<stat>/lNN/sK."""
    from pretrain.diagnostics.measures import LAYER_STATS, PER_STREAM
    from pretrain.diagnostics.writer import tracked

    L, n = 2, 3
    sq, counts = torch.ones(L + 4, dtype=torch.float64), torch.ones(L + 4, dtype=torch.float64)
    act = torch.zeros(len(STATS), L)
    single = make_record(1, L, "pre_ln", act, sq, counts)
    assert not set(STREAM) & set(single) and not any("/s" in k.split("/l")[-1] for k in tracked(single))
    assert [k for k in single if isinstance(single[k], list)] == [s.name for s in LAYER_STATS if s.shape != PER_STREAM]
    values = torch.arange(len(STREAM) * L * n, dtype=torch.float64).view(len(STREAM), L, n)
    multi = make_record(1, L, "pre_ln", act, sq, counts, values)
    assert {k: v for k, v in multi.items() if k not in STREAM} == single
    for i, name in enumerate(STREAM):
        assert multi[name] == values[i].tolist()
        assert tracked(multi)[f"{name}/l02/s3"] == values[i, 1, 2].item()


def test_hooks_measure_the_first_forward_only_and_leave_nothing_behind():
    model = Llama(ModelConfig(**SMALL), seed=1)
    probe = ActivationProbe(local_blocks(model), 2)
    first, second = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    probe.arm()
    with torch.no_grad():
        model(first)
        model(second)  # a later micro-batch of the same step: not measured
    got = probe.result()
    assert torch.equal(got, probe_stats(model, first))
    modules = [m for blk in model.blocks for m in (blk, blk.attn_out_norm, blk.attn_post_norm, blk.mlp_norm,
                                                   blk.mlp_out_norm)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    probe.arm()
    probe.disarm()  # armed but never run (e.g. a rank without these blocks' forward): removed as well
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_compiled_blocks_are_measured_and_stay_compiled():
    """train.compile compiles each block; hooks added afterwards would be ignored inside the compiled code."""
    torch._dynamo.reset()
    model = Llama(ModelConfig(**SMALL, norm_scheme="peri_ln"), seed=1).double()
    for blk in model.blocks:
        blk.compile(backend="eager", dynamic=False)  # dynamo's hook handling without inductor's C++ build
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model(tokens)  # compiled without hooks
        want = hand_stats(model, tokens)
    compiled = [blk._compiled_call_impl for blk in model.blocks]
    got = probe_stats(model, tokens)
    for i, name in enumerate(STATS):
        assert got[i].tolist() == pytest.approx(want[name], rel=1e-10), name
    assert [blk._compiled_call_impl for blk in model.blocks] == compiled


def test_negative_interval_is_a_user_error():
    from pretrain.config import load_config
    from pretrain.errors import UserError

    with pytest.raises(UserError, match="diagnostics.interval"):
        load_config(None, ["diagnostics.interval=-5"])


def test_gradient_groups_and_norms():
    model = Llama(ModelConfig(**SMALL), seed=1).double()
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, tokens).backward()
    L = 2
    entries = parameter_groups(model, L)
    assert len(entries) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for p, group in entries:
        name = names[id(p)]
        top = name.split(".")[0]
        expected = int(name.split(".")[1]) if top == "blocks" else L + ["tok_emb", "final_norm", "head"].index(top)
        assert group == expected, name
    sq, counts = grad_square_sums(entries, L + 4)
    record = make_record(7, L, "pre_ln", torch.zeros(len(STATS), L), sq, counts)
    for l, blk in enumerate(model.blocks):
        want = math.sqrt(sum((p.grad**2).sum().item() for p in blk.parameters()))
        assert record["grad_norm"][l] == pytest.approx(want, rel=1e-12)
    assert record["grad_norm_head"] == pytest.approx(model.head.weight.grad.norm().item(), rel=1e-12)
    assert record["grad_norm_embedding"] == pytest.approx(model.tok_emb.weight.grad.norm().item(), rel=1e-12)
    total = math.sqrt(sum((p.grad**2).sum().item() for p in model.parameters()))
    assert record["grad_norm_global"] == pytest.approx(total, rel=1e-12)
    # ln_free with tied embeddings: no final norm, no head -> null
    tied = Llama(ModelConfig(**SMALL, norm_scheme="ln_free", tie_embeddings=True), seed=1)
    tied(tokens, tokens).backward()
    sq, counts = grad_square_sums(parameter_groups(tied, L), L + 4)
    record = make_record(1, L, "ln_free", torch.zeros(len(STATS), L), sq, counts)
    assert record["grad_norm_final_norm"] is None and record["grad_norm_head"] is None
    assert record["grad_norm_embedding"] > 0


def test_counting_rule_for_tp_and_pipeline_copies():
    sharded, replicated, tied_copy = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    sharded.tensor_model_parallel = True
    tied_copy.ds_pipe_replicated = True
    assert counted(sharded, 0) and counted(sharded, 1)
    assert counted(replicated, 0) and not counted(replicated, 1)
    assert not counted(tied_copy, 0)


def test_pre_ln_variance_grows_with_depth_more_than_lns_with_the_same_weights():
    """Curse of Depth: at init, Pre-LN's residual variance grows much faster with depth than LayerNorm
    Scaling's (same weights; LNS only scales the norm outputs by 1/sqrt(l))."""
    L = 8
    pre = Llama(ModelConfig.from_preset("tiny", n_layers=L, norm_scheme="pre_ln"), seed=0)
    lns = Llama(ModelConfig.from_preset("tiny", n_layers=L, norm_scheme="lns"), seed=0)
    lns.load_state_dict(pre.state_dict())
    tokens = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(0))
    v_pre, v_lns = probe_stats(pre, tokens)[0], probe_stats(lns, tokens)[0]
    assert v_pre[0] == pytest.approx(v_lns[0].item(), rel=1e-6)  # block 1: 1/sqrt(1) = 1, identical
    ratio_pre, ratio_lns = (v_pre[-1] / v_pre[0]).item(), (v_lns[-1] / v_lns[0]).item()
    assert ratio_pre > 2 * ratio_lns > 2, (ratio_pre, ratio_lns)
    assert all(b > a for a, b in zip(v_pre.tolist(), v_pre[1:].tolist()))  # monotone growth


# ----------------------------------------------------------------------------------------------------------
# End to end: `pretrain train ... diagnostics.interval=1` under several layouts

STEPS = ["train.steps=2", "diagnostics.interval=1"]  # gbs 8, mbs 4: two micro-batches per step on one rank


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run = str(tmp_path_factory.mktemp("single"))
    run_train(run, *STEPS, cache_dir=data_cache)
    return run


def assert_same_stats(got: list[dict], want: list[dict], rel=1e-4):
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want):
        for key, value in w.items():
            if isinstance(value, list) and value and isinstance(value[0], list):  # per stream: L lists of n
                value, g[key] = [v for row in value for v in row], [v for row in g[key] for v in row]
            if isinstance(value, (list, float)):
                assert g[key] == pytest.approx(value, rel=rel), f"step {w['step']} {key}"
            else:
                assert g[key] == value, key


def assert_global_norm_is_the_engines(run_dir: str):
    engine = {m["step"]: m["grad_norm"] for m in metrics(run_dir) if "grad_norm" in m}
    for r in layer_stats(run_dir):
        assert r["grad_norm_global"] == pytest.approx(engine[r["step"]], rel=1e-5)


@pytest.mark.processes
def test_logged_step_matches_hand_computation(reference, data_cache):
    """Step 1's logged numbers are the init weights' statistics on the first micro-batch, and the gradient
    norms of the mean loss over the step's two micro-batches, computed by hand in fp64."""
    from pretrain.config import load_config
    from pretrain.data.loader import DataLoader
    from pretrain.data.resolve import open_dataset

    cfg = load_config(os.path.join(reference, "config.yaml"))
    model = Llama(cfg.model, seed=cfg.train.seed).double()
    loader = DataLoader(open_dataset(cfg.data.paths, cfg.data.seq_len, "train", cache_dir=data_cache),
                        micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
    (t1, l1), (t2, l2) = next(loader), next(loader)
    logged = layer_stats(reference)[0]
    assert logged["step"] == 1 and logged["layers"] == cfg.model.n_layers and logged["norm_scheme"] == "pre_ln"
    assert not set(STREAM) & set(logged)  # one stream: no per-stream keys, the file as before them
    with torch.no_grad():
        want = hand_stats(model, t1)
    for name in STATS:
        assert logged[name] == pytest.approx(want[name], rel=1e-4), name
    ((model(t1, l1) + model(t2, l2)) / 2).backward()
    for l, blk in enumerate(model.blocks):
        norm = math.sqrt(sum((p.grad**2).sum().item() for p in blk.parameters()))
        assert logged["grad_norm"][l] == pytest.approx(norm, rel=1e-4)
    assert logged["grad_norm_embedding"] == pytest.approx(model.tok_emb.weight.grad.norm().item(), rel=1e-4)
    assert logged["grad_norm_head"] == pytest.approx(model.head.weight.grad.norm().item(), rel=1e-4)
    assert logged["grad_norm_final_norm"] == pytest.approx(model.final_norm.weight.grad.norm().item(), rel=1e-4)
    assert_global_norm_is_the_engines(reference)
    # TensorBoard: per-layer scalars and the variance-against-depth histogram
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(reference, "tb"), size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    tb = [e.value for e in acc.Scalars("layers/variance/l03")]
    assert tb == pytest.approx([r["variance"][2] for r in layer_stats(reference)], rel=1e-6)
    assert [e.step for e in acc.Histograms("layers/variance_vs_depth")] == [1, 2]
    assert "layers/variance_vs_depth_image" in acc.Tags()["images"]


@pytest.mark.parametrize(
    "layout, nproc",
    [(["parallel.tp=2"], 2), (["parallel.pp=2"], 2), (["parallel.zero_stage=2"], 2),
     # recomputation in backward must not run the taps again (models/llama.py `recompute`)
     (["train.activation_checkpointing=full"], None), (["parallel.pp=2", "train.activation_checkpointing=selective"], 2)],
    ids=["tp2", "pp2", "dp2-zero2", "full-recompute", "pp2-selective-recompute"],
)
@pytest.mark.processes
def test_parallel_layouts_log_the_single_process_stats(tmp_path, data_cache, reference, layout, nproc):
    run_train(str(tmp_path), *STEPS, *layout, nproc=nproc, cache_dir=data_cache)
    assert_same_stats(layer_stats(str(tmp_path)), layer_stats(reference))
    assert_global_norm_is_the_engines(str(tmp_path))


MHC = ["model.residual=mhc", "model.residual_streams=2", *STEPS]


@pytest.fixture(scope="module")
def mhc_reference(tmp_path_factory, data_cache):
    run = str(tmp_path_factory.mktemp("mhc_single"))
    run_train(run, *MHC, cache_dir=data_cache)
    return run


# PP = 2 in the default run (the state and the per-stream hooks across stages); the others repeat layout cases of
# test_parallel_layouts_log_the_single_process_stats with residual streams, so they are slow.
@pytest.mark.parametrize(
    "layout, nproc",
    [pytest.param(["parallel.tp=2"], 2, id="tp2", marks=pytest.mark.slow),
     pytest.param(["parallel.pp=2"], 2, id="pp2"),
     pytest.param(["parallel.zero_stage=2"], 2, id="dp2-zero2", marks=pytest.mark.slow),
     pytest.param(["train.activation_checkpointing=full"], None, id="full-recompute", marks=pytest.mark.slow)],
)
@pytest.mark.processes
def test_residual_streams_log_the_single_process_stats(tmp_path, data_cache, mhc_reference, layout, nproc):
    """mHC's per-stream statistics (and the collapsed ones) under TP = 2, PP = 2 and DP = 2 equal one process's: the
    state is replicated on the TP ranks and travels between the stages; grad_norm_stream is of the same micro-batch's
    mean loss whatever the micro-batches per rank (two here, one at DP = 2) and with the block recomputed in backward
    (its hook is on the kept input). One stream's record has no per-stream keys (the reference run's,
    test_logged_step_matches_hand_computation)."""
    run_train(str(tmp_path), *MHC, *layout, nproc=nproc, cache_dir=data_cache)
    want, got = layer_stats(mhc_reference), layer_stats(str(tmp_path))
    for name in STREAM:
        assert [len(row) for row in want[0][name]] == [2] * want[0]["layers"], name
        assert all(math.isfinite(v) and v > 0 for row in want[0][name] for v in row), name
    assert_same_stats(got, want)
    assert_global_norm_is_the_engines(str(tmp_path))


@pytest.mark.processes
def test_tied_embeddings_under_pipeline_counted_once(tmp_path, data_cache):
    tied = ["model.tie_embeddings=true", *STEPS]
    run_train(str(tmp_path / "single"), *tied, cache_dir=data_cache)
    run_train(str(tmp_path / "pp2"), *tied, "parallel.pp=2", nproc=2, cache_dir=data_cache)
    want, got = layer_stats(str(tmp_path / "single")), layer_stats(str(tmp_path / "pp2"))
    assert want[0]["grad_norm_head"] is None and want[0]["grad_norm_embedding"] > 0
    assert_same_stats(got, want)
    assert_global_norm_is_the_engines(str(tmp_path / "pp2"))


def test_every_registered_statistic_reaches_file_tensorboard_plot_and_report(tmp_path):
    """A table entry with training=True (pretrain/diagnostics/measures.py) and its function (stats.py) are all a new
    per-layer statistic needs: each training entry is in the layer_stats.jsonl record, has its TensorBoard scalars,
    and (stats_panel=True) its panel in `pretrain plot` and in the report's layer figure, titled and labelled by the
    table; the record has no per-layer list the table does not declare."""
    import matplotlib

    matplotlib.use("Agg")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.analysis.figures import label_runs, layer_stats_figure, plot_figure
    from pretrain.analysis.report_table import read_run
    from pretrain.config import load_config, save_config
    from pretrain.diagnostics.measures import FIGURE_STATS, LAYER_STATS, PER_STREAM
    from pretrain.diagnostics.stats import ACTIVATION_FUNCTIONS, STREAM_FUNCTIONS, STREAM_GRADIENT_STAT, STREAM_STATS
    from pretrain.diagnostics.writer import LayerStatsWriter
    from pretrain.train.trackers import TensorBoardTracker

    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    save_config(load_config(None, [f"run.dir={run_dir}"]), os.path.join(run_dir, "config.yaml"))
    L = 3
    tb = TensorBoardTracker(run_dir, 0)
    writer = LayerStatsWriter(run_dir, 0, [tb], tb=tb.writer)
    act = torch.arange(1, len(ACTIVATION_STATS) * L + 1, dtype=torch.float64).view(len(ACTIVATION_STATS), L) / 10
    sq, counts = torch.ones(L + 4, dtype=torch.float64), torch.ones(L + 4, dtype=torch.float64)
    n = 2  # residual streams: the per-stream entries are in the record too
    streams = torch.arange(len(STREAM) * L * n, dtype=torch.float64).view(len(STREAM), L, n)
    writer.write(make_record(5, L, "pre_ln", act, sq, counts, streams))
    tb.close()
    with open(os.path.join(run_dir, FILE)) as f:
        record = json.loads(f.readline())
    events = EventAccumulator(os.path.join(run_dir, "tb")).Reload()
    for stat in LAYER_STATS:
        assert len(record[stat.name]) == L, stat.name
        tag = f"layers/{stat.name}/l01" + ("/s2" if stat.shape == PER_STREAM else "")
        assert tag in events.Tags()["scalars"], stat.name
    assert {k for k, v in record.items() if isinstance(v, list)} == {s.name for s in LAYER_STATS}
    # no function for an entry not measured
    assert set(ACTIVATION_FUNCTIONS) == {s.name for s in ACTIVATION_STATS}
    per_stream = {s.name for s in LAYER_STATS if s.shape == PER_STREAM}
    assert set(STREAM_FUNCTIONS) == {s.name for s in STREAM_STATS} == per_stream - {STREAM_GRADIENT_STAT}
    run = read_run(run_dir)
    label_runs([run])
    plot_axes = plot_figure([run]).axes
    report_axes = layer_stats_figure([run], "col").axes
    assert len(plot_axes) == len(FIGURE_STATS) + 1  # and the loss panel
    for stat in FIGURE_STATS:
        for axes in (plot_axes, report_axes):
            panel = [ax for ax in axes if ax.get_title().startswith(stat.title)]
            assert len(panel) == 1, (stat.name, [ax.get_title() for ax in axes])
            assert panel[0].get_ylabel() == stat.label, stat.name
            assert panel[0].get_yscale() == ("log" if stat.log_scale else "linear"), stat.name


def test_measure_table_entries_say_who_has_them_and_how_they_differ():
    """Each entry of the per-layer table (pretrain/diagnostics/measures.py) is read by a consumer, is drawn only by a
    consumer that has it, states its difference, and names one measure."""
    from pretrain.diagnostics.measures import BLOCK_PAIRS, FROM_EMBEDDING, LAYER_MEASURES, PER_BLOCK, PER_STREAM

    names = [m.name for m in LAYER_MEASURES]
    assert len(set(names)) == len(names)
    for m in LAYER_MEASURES:
        assert m.training or m.analyze_depth, m.name
        assert m.training or not m.stats_panel, m.name
        assert m.analyze_depth or not m.depth_panel, m.name
        assert m.label and m.title and m.definition and m.difference, m.name
        assert m.shape in (PER_BLOCK, FROM_EMBEDDING, BLOCK_PAIRS, PER_STREAM), m.name
        # layer_stats.jsonl holds one value per block, or per block a list of one value per stream
        assert not m.training or m.shape in (PER_BLOCK, PER_STREAM), m.name
        assert m.shape != PER_STREAM or not (m.analyze_depth or m.stats_panel), m.name  # drawn per block only
