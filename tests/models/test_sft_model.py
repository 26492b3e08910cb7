"""SFT model math: masked labels, exact packing, token-weighted gradients through the engine, HF init, KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.distributed import run_distributed_test
from helpers.sft import pack
from helpers.train import BatchIter
from models.config import ModelConfig
from models.generate import KVCache, Sampling, generate
from models.llama import Llama
from models.parallel import cross_entropy
from pretrain.data.loader import IGNORE_INDEX
from pretrain.data.sft_loader import SFTBatch

# The compatibility set (CI's other stacks) takes the model's math and its HF paths; the DP x accumulation engine
# step stays on the main stack (DeepSpeed is the same release on every stack, and its bf16 ZeRO path is in the set).
pytestmark = [pytest.mark.usefixtures("single_thread")]
COMPAT = pytest.mark.compat
CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64,
                  init_std=0.1)
EOS = 3


def example(n: int, prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of an example needing n positions: the first `prompt` labels ignored, the last one EOS."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, CFG.vocab_size, (n + 1,), generator=g)
    tokens[0], tokens[-1] = 2, EOS
    labels = tokens[1:].clone()
    labels[:prompt] = IGNORE_INDEX
    return tokens[:-1], labels




@COMPAT
def test_masked_positions_contribute_exactly_zero_loss_and_gradient():
    model = Llama(CFG, seed=0)
    x, y = example(20, prompt=12, seed=1)
    logits = model(x[None]).detach().requires_grad_()
    loss = cross_entropy(logits, y[None], None, reduction="sum")
    loss.backward()
    masked = y == IGNORE_INDEX
    assert torch.count_nonzero(logits.grad[0, masked]) == 0  # exactly zero gradient from every ignored position
    assert bool((logits.grad[0, ~masked].abs().sum(dim=-1) > 0).all())  # every trained one, EOS included, counts
    per_token = torch.nn.functional.cross_entropy(logits[0].detach(), y.clamp(min=0), reduction="none")
    assert float(loss.detach()) == pytest.approx(float(per_token[~masked].sum()), rel=1e-6)  # zero loss from ignored ones
    # Parameter gradients: those of the trained positions' token losses alone.
    params = list(model.parameters())
    masked_grads = torch.autograd.grad(model(x[None], y[None], reduction="sum"), params)
    per_token = torch.nn.functional.cross_entropy(model(x[None])[0], y.clamp(min=0), reduction="none")
    trained_grads = torch.autograd.grad(per_token[~masked].sum(), params)
    for a, b in zip(masked_grads, trained_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    eos_only = torch.full_like(y, IGNORE_INDEX)
    eos_only[-1] = EOS
    assert float(model(x[None], eos_only[None], reduction="sum")) > 0  # EOS is trained


@COMPAT
def test_packed_batch_equals_each_example_alone():
    model = Llama(CFG, seed=2)
    rows = [[example(7, 3, 10), example(11, 4, 11), example(5, 1, 12)], [example(17, 9, 13), example(9, 2, 14)]]
    batch = pack(rows, T=32)
    params = list(model.parameters())
    logits = model(batch.tokens, **batch.model_kwargs())
    for r, row in enumerate(rows):
        t = 0
        for d, (x, y) in enumerate(row):
            alone = model(x[None])
            assert torch.allclose(logits[r, t:t + len(x)], alone[0], atol=1e-5, rtol=1e-5)
            # this example's loss and gradient, taken inside the packed batch
            only = torch.full_like(batch.labels, IGNORE_INDEX)
            only[r, t:t + len(x)] = y
            packed_loss = model(batch.tokens, only, reduction="sum", **batch.model_kwargs())
            alone_loss = model(x[None], y[None], reduction="sum")
            assert float(packed_loss) == pytest.approx(float(alone_loss), rel=1e-5)
            g_packed = torch.autograd.grad(packed_loss, params)
            g_alone = torch.autograd.grad(alone_loss, params)
            for a, b in zip(g_packed, g_alone):
                assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max()) + 1e-8, rtol=1e-5)
            t += len(x)
    # the padding rows of a batch change nothing either
    total = sum(float(model(x[None], y[None], reduction="sum")) for row in rows for x, y in row)
    assert float(model(batch.tokens, batch.labels, reduction="sum", **batch.model_kwargs())) == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------- token weighting


def _micro_batches() -> list[SFTBatch]:
    """Four micro-batches (two per dp rank, two accumulation steps) with 3 to 40-odd trained tokens."""
    shapes = [[[(20, 19)]], [[(12, 2), (18, 3)]], [[(30, 29)], [(10, 9)]], [[(25, 1)], [(6, 0), (14, 2)]]]
    out = []
    for i, rows in enumerate(shapes):
        batch_rows = [[example(n, p, seed=100 * i + 10 * r + j) for j, (n, p) in enumerate(row)] for r, row in enumerate(rows)]
        b = pack(batch_rows, T=32)
        if len(batch_rows) == 1:  # micro-batches of 2 rows: a fully ignored second row
            b = SFTBatch(*(torch.cat([t, f]) for t, f in zip(b, pack([[]], 32))))
        out.append(b)
    return out


def _engine_step(overrides: list[str]):
    """One train_step of the real engine (dp = world size) on _micro_batches; returns loss and averaged gradients."""
    from pretrain.config import load_config
    from pretrain.train.distributed import init_distributed
    from pretrain.train.engine import build_engine
    from pretrain.train.steps import train_step

    cfg = load_config(None, ["model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.ffn_hidden=48", "model.max_seq_len=64", "model.init_std=0.1",
                             "train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_clip=0",
                             "data.seq_len=32", *overrides])
    topo = init_distributed(1, 1)
    torch.manual_seed(cfg.train.seed)
    built = build_engine(cfg, topo)
    captured = {}
    optimizer = built.engine.optimizer
    step = optimizer.step

    def capture(*a, **k):
        captured.update({n: p.grad.detach().clone() for n, p in built.model.named_parameters()})
        return step(*a, **k)

    optimizer.step = capture
    batches = _micro_batches()
    mine = [batches[k * topo.dp + topo.dp_rank] for k in range(len(batches) // topo.dp)]  # the loader's dealing
    loss = train_step(built, BatchIter(mine, token_weighted=True), topo)
    return {"loss": loss, "grads": captured}


def _reference(mean_of_means: bool = False):
    model = Llama(CFG, seed=0)
    batches = _micro_batches()
    n = sum(b.trained_tokens() for b in batches)
    if mean_of_means:  # what a per-micro-batch mean gives (transformers before PR #34191)
        loss = sum(model(b.tokens, b.labels, **b.model_kwargs()) for b in batches) / len(batches)
    else:
        loss = sum(model(b.tokens, b.labels, reduction="sum", **b.model_kwargs()) for b in batches) / n
    loss.backward()
    return float(loss), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.processes
def test_token_weighted_loss_over_micro_batches_and_data_parallel_ranks():
    """dp = 2 ranks x 2 accumulation steps of micro-batches with 3..49 trained tokens give the gradient (and the
    logged loss) of the whole batch's token sum / its token count, as one batch holding all of them."""
    results = run_distributed_test(_engine_step, world_size=2, args=(["parallel.zero_stage=0"],), timeout=240)
    loss, grads = _reference()
    _, wrong = _reference(mean_of_means=True)
    for r in results:
        assert r["loss"] == pytest.approx(loss, rel=1e-6)
        for k, g in grads.items():
            assert torch.allclose(r["grads"][k], g, rtol=1e-5, atol=1e-6 * float(g.abs().max())), k
    # the check can fail: the per-micro-batch mean gives another gradient
    k = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(wrong[k], grads[k], rtol=1e-2, atol=1e-2 * float(grads[k].abs().max()))
    assert results[0]["grads"][k].abs().max() > 0


# ---------------------------------------------------------------------------------------------- HF and generation


@COMPAT
def test_init_from_hf_llama_reproduces_its_logits_packed_and_greedy(tmp_path):
    import transformers

    from models.hf import to_hf_config
    from pretrain.config import load_config
    from pretrain.state.sources import load_weights, resolve_model

    hf_cfg = to_hf_config(CFG)
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = resolve_model(load_config(None, [f"train.init_from={tmp_path / 'hf'}", "data.seq_len=32"]), None)
    assert cfg.model.d_model == 32 and cfg.model.n_kv_heads == 2
    model = Llama(cfg.model)
    model.load_state_dict(load_weights(cfg))
    model.eval()
    rows = [[example(9, 2, 1), example(13, 5, 2)], [example(20, 3, 3)]]
    batch = pack(rows, T=24)
    with torch.no_grad():
        ours = model(batch.tokens, **batch.model_kwargs())
        for r, row in enumerate(rows):
            t = 0
            for x, _ in row:
                theirs = hf(input_ids=x[None]).logits[0]
                assert torch.allclose(ours[r, t:t + len(x)], theirs, atol=1e-4, rtol=1e-4)
                t += len(x)
        prompt = rows[0][1][0][:6]
        hf_out = hf.generate(prompt[None], attention_mask=torch.ones(1, 6, dtype=torch.long), do_sample=False,
                             max_new_tokens=10, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert generate(model, [prompt.tolist()], eos_id=-1, sampling=Sampling(max_new_tokens=10))[0] == hf_out


KV_CASES = [dict(), dict(qk_norm="head"), dict(qk_norm="full"), dict(attn_gate="elementwise", gpas=True),
            dict(norm_scheme="hybridnorm_star"), dict(norm_scheme="ngpt"), dict(norm_scheme="gemma4"),
            dict(norm_scheme="muse_glimmer"), dict(residual="mhc"), dict(residual="hc"),
            dict(residual="attn_res"), dict(residual="siamese")]


@COMPAT
@pytest.mark.parametrize("keys", KV_CASES, ids=["-".join(f"{v}" for v in c.values()) or "plain" for c in KV_CASES])
def test_generation_with_kv_cache_equals_generation_without(keys):
    """Every attention slot (q/k/v norms, q/k scales after RoPE, the output gate) sees the new tokens only; the cache
    holds the keys as attention used them."""
    model = Llama(dataclasses.replace(CFG, **keys), seed=3).eval()
    prompts = [[2, 17, 40], [2, 5, 9, 33, 60, 61, 12, 80, 4], [2, 70, 71, 72, 73]]
    for sampling in (Sampling(max_new_tokens=12), Sampling(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=4)):
        cached = generate(model, prompts, eos_id=-1, sampling=sampling)
        assert cached == generate(model, prompts, eos_id=-1, sampling=sampling, use_cache=False)
        # and a prompt's completion does not depend on the batch it runs in
        assert cached == [generate(model, [p], eos_id=-1, sampling=sampling, first_index=i)[0] for i, p in enumerate(prompts)]
        assert all(len(c) == 12 for c in cached)
    # the cached logits, step by step, are the full forward's
    seq = prompts[1] + cached[1]
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
        cache = KVCache(CFG.n_layers)
        n = len(prompts[1])
        steps = [model(torch.tensor([seq[:n]]), positions=torch.arange(n)[None], cache=cache)[0]]
        for t in range(n, len(seq)):
            steps.append(model(torch.tensor([[seq[t]]]), positions=torch.tensor([[t]]), cache=cache)[0])
    assert torch.allclose(torch.cat(steps), full, atol=1e-5, rtol=1e-5)
    # generation stops at EOS and does not return it
    first = generate(model, prompts[:1], eos_id=-1, sampling=Sampling(max_new_tokens=12))[0]
    stop = first[4]
    assert generate(model, prompts[:1], eos_id=stop, sampling=Sampling(max_new_tokens=12))[0] == first[:first.index(stop)]
