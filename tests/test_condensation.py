"""Prompt Condensation: each score against a per-sample autograd oracle, selection, the condensed
model against a naive VPT built with exactly the kept prompts, fine-tuning, save/load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, images, naive_vpt, naive_vpt_of, prompt_sets, tiny_vit

import fastprompt
from fastprompt.methods.condensation import layer_summary
from fastprompt.methods.condensation.scores import _score_vectors
from fastprompt.ops.gather import gather_prompts, gather_prompts_ref

P = 6


def _trained(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    prompted = fastprompt.vpt(tiny_vit(depth=3, **kw).to(dtype), P)
    with torch.no_grad():  # spread the prompts so scores differ clearly
        for t in (prompted.prompt_embeddings, prompted.deep_prompt_embeddings):
            t.mul_(torch.rand(t.shape[:-1]).unsqueeze(-1) * 20)
    return prompted


def _data(n=5, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _loader(x, y, batch=2):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def _per_sample(prompted, x, y, per_sample_score):
    """Mean over samples of |per-sample score| computed one sample at a time (the oracle)."""
    total = 0
    for b in range(x.shape[0]):
        total = total + per_sample_score(x[b : b + 1], y[b : b + 1]).abs()
    return total / x.shape[0]


def _taylor_oracle(prompted, xb, yb):
    sets = [s.detach().requires_grad_() for s in prompt_sets(prompted)]
    loss = F.cross_entropy(
        naive_vpt(prompted.model, sets, True, prompted.prompt_proj, 0.0, False, "cls", xb),
        yb,
        reduction="sum",
    )
    grads = torch.autograd.grad(loss, sets)
    return torch.stack([(s * g).sum(-1) for s, g in zip(sets, grads)])


def _taylor_normed_oracle(prompted, xb, yb):
    """∂L/∂h_i · (h_i − β) as d/dt of the loss when h_i moves to h_i + t (h_i − β)."""
    model = prompted.model
    npre = model.num_prefix_tokens
    ts = [torch.zeros(P, dtype=xb.dtype, requires_grad=True) for _ in model.blocks]
    handles = []
    for t, blk in zip(ts, model.blocks):

        def hook(module, inputs, out, t=t):
            rows = out[:, npre : npre + P]
            moved = rows + t[None, :, None] * (rows - module.bias)
            return torch.cat([out[:, :npre], moved, out[:, npre + P :]], 1)

        handles.append(blk.norm1.register_forward_hook(hook))
    try:
        loss = F.cross_entropy(naive_vpt_of(prompted, xb), yb, reduction="sum")
        return torch.stack(torch.autograd.grad(loss, ts))
    finally:
        for h in handles:
            h.remove()


def _gate_oracle(prompted, xb, yb):
    """Σ over heads and queries of dS for prompt key i = ∂L/∂(bias added to key i's scores)."""
    model = prompted.model
    n_tokens = model.num_prefix_tokens + P + model.patch_embed.num_patches
    gates = [torch.zeros(P, dtype=xb.dtype, requires_grad=True) for _ in model.blocks]
    masks = []
    for g in gates:
        zeros = torch.zeros(n_tokens - P, dtype=xb.dtype)
        bias = torch.cat([zeros[: model.num_prefix_tokens], g, zeros[model.num_prefix_tokens :]])
        masks.append(bias.view(1, 1, 1, n_tokens))
    loss = F.cross_entropy(naive_vpt_of(prompted, xb, attn_masks=masks), yb, reduction="sum")
    return torch.stack(torch.autograd.grad(loss, gates))


@pytest.mark.parametrize(
    "method, oracle",
    [("taylor", _taylor_oracle), ("taylor_normed", _taylor_normed_oracle), ("gate", _gate_oracle)],
)
@pytest.mark.parametrize(
    "model_kw", [{}, dict(qk_norm=True, init_values=0.1)], ids=["plain", "qknorm"]
)
def test_gradient_scores_equal_per_sample_oracle(method, oracle, model_kw):
    import inspect

    from timm.models.vision_transformer import Block

    if oracle is _gate_oracle and "attn_mask" not in inspect.signature(Block.forward).parameters:
        pytest.skip("the gate oracle adds a bias to attention scores: needs timm's attn_mask")
    # float64: the Taylor term is a dot that cancels to ~ε/var of its parts (LayerNorm's scale
    # invariance), which fp32 autograd in the oracle cannot resolve.
    prompted = _trained(dtype=torch.float64, **model_kw)
    x, y = _data(dtype=torch.float64)
    scores = fastprompt.score_prompts(prompted, _loader(x, y), method=method, progress=False)
    expected = _per_sample(prompted, x, y, lambda xb, yb: oracle(prompted, xb, yb))
    scale = expected.abs().max()
    assert_close(scores / scale, expected / scale, method, atol=1e-5, rtol=1e-4)


def test_taylor_vectors_equal_the_closed_form():
    """J_LN(p) p = γ ⊙ x̂ · ε / (var + ε), then the K/V rows of qkv (docs/design.md §3, fact 2)."""
    prompted = _trained()
    vectors = _score_vectors(prompted)
    for i, blk in enumerate(prompted.model.blocks):
        p = prompt_sets(prompted)[i].detach()
        ln = blk.norm1
        var = p.var(-1, unbiased=False, keepdim=True)
        xhat = (p - p.mean(-1, keepdim=True)) / torch.sqrt(var + ln.eps)
        jp = ln.weight * xhat * ln.eps / (var + ln.eps)
        width = blk.attn.num_heads * blk.attn.head_dim
        kv = jp @ blk.attn.qkv.weight[width:].t()
        heads = blk.attn.num_heads
        uk = kv[:, :width].view(P, heads, -1).transpose(0, 1)
        uv = kv[:, width:].view(P, heads, -1).transpose(0, 1)
        assert_close(vectors[i][0][0, 0], uk, "u_k", atol=1e-6, rtol=1e-4)
        assert_close(vectors[i][1][0, 0], uv, "u_v", atol=1e-6, rtol=1e-4)


def _cls_sim_oracle(prompted, x):
    """Mean over heads of the CLS query's attention to each prompt, read off the naive forward."""
    model, npre = prompted.model, prompted.model.num_prefix_tokens
    probs = []

    def hook(block, inputs, _out):
        tokens = block.norm1(inputs[0])
        attn = block.attn
        b, n, _ = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, -1)
        probs.append(weights[:, :, 0, npre : npre + P].mean(1).mean(0))

    handles = [blk.register_forward_hook(hook) for blk in model.blocks]
    try:
        with torch.no_grad():
            naive_vpt_of(prompted.eval(), x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(probs)


def test_cls_sim_equals_the_attention_of_the_naive_forward():
    prompted = _trained()
    x, y = _data(3)
    got = fastprompt.score_prompts(prompted, _loader(x, y, 2), method="cls_sim", progress=False)
    assert_close(got, _cls_sim_oracle(prompted, x), "cls_sim", atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_leave_one_out_is_the_loss_change_of_removing_the_prompt(dtype):
    """A float64 model's losses are subtracted in float64 (in float32 they were off by 2e-7)."""
    prompted = _trained().to(dtype)
    x, y = _data(3)
    x = x.to(dtype)
    loo = fastprompt.score_prompts(prompted, _loader(x, y, 3), "leave_one_out", progress=False)
    sets = [s.detach() for s in prompt_sets(prompted)]
    with torch.no_grad():
        base = F.cross_entropy(naive_vpt_of(prompted, x), y, reduction="sum")
        for layer, j in ((0, 0), (1, 4), (2, 5)):
            cut = list(sets)
            cut[layer] = torch.cat([sets[layer][:j], sets[layer][j + 1 :]])
            logits = naive_vpt(
                prompted.model, cut, True, prompted.prompt_proj, 0.0, False, "cls", x
            )
            removed = F.cross_entropy(logits, y, reduction="sum")
            expected = float(removed - base) / 3
            tol = 1e-5 if dtype == torch.float32 else 1e-7 * abs(expected) + 1e-12
            assert abs(float(loo[layer, j]) - expected) < tol


def test_random_is_seeded():
    prompted = _trained()
    a = fastprompt.score_prompts(prompted, [], method="random", seed=1)
    assert torch.equal(a, fastprompt.score_prompts(prompted, [], method="random", seed=1))
    assert not torch.equal(a, fastprompt.score_prompts(prompted, [], method="random", seed=2))


def test_taylor_in_fp32_agrees_with_float64():
    """LayerNorm's scale invariance makes p · ∂L/∂p cancel to ε/(var + ε) of its parts."""
    prompted = _trained()
    x, y = _data()
    got = fastprompt.score_prompts(prompted, _loader(x, y), method="taylor", progress=False)
    expected = fastprompt.score_prompts(
        prompted.double(), _loader(x.double(), y), method="taylor", progress=False
    )
    rel = ((got.double() - expected.double()).abs() / expected.double().abs()).max()
    assert rel < 1e-3, f"max relative error {rel:.2e}"


@pytest.mark.parametrize(
    "batch_of",
    [
        lambda x, y: (x, y, torch.arange(len(y))),
        lambda x, y: {"image": x, "label": y, "index": torch.arange(len(y))},
        lambda x, y: {"pixel_values": x, "labels": y},
    ],
    ids=["tuple-with-extra", "dict", "hf-dict"],
)
def test_every_loop_takes_the_same_batch_formats(batch_of):
    prompted = _trained()
    x, y = _data(4)
    loader = [batch_of(x[:2], y[:2]), batch_of(x[2:], y[2:])]
    expected = fastprompt.score_prompts(prompted, _loader(x, y), "gate", progress=False)
    got = fastprompt.score_prompts(prompted, loader, "gate", progress=False)
    assert_close(got, expected, "gate")
    assert 0.0 <= fastprompt.evaluate(prompted, loader) <= 1.0
    condensed = fastprompt.condense(prompted, fastprompt.select_prompts(got, 0.5))
    assert len(fastprompt.finetune(condensed, loader, epochs=1, progress=False)) == 1
    assert len(fastprompt.fit(prompted, loader, epochs=1, lr=0.01, progress=False)) == 1


def test_a_custom_batch_function():
    prompted = _trained()
    x, y = _data(2)
    loader = [{"pics": x, "classes": y}]
    with pytest.raises(TypeError, match="needs an image key"):
        fastprompt.score_prompts(prompted, loader, "gate", progress=False)
    got = fastprompt.score_prompts(
        prompted, loader, "gate", progress=False, batch_fn=lambda b: (b["pics"], b["classes"])
    )
    assert got.shape == (3, P)


def test_scoring_frozen_prompts_works_and_leaves_them_frozen():
    prompted = _trained()
    prompted.source.requires_grad_(False)
    x, y = _data(2)
    scores = fastprompt.score_prompts(prompted, _loader(x, y), "taylor_normed", progress=False)
    assert torch.isfinite(scores).all() and (scores > 0).any()
    assert not prompted.deep_prompt_embeddings.requires_grad


def test_empty_data_and_nan_scores_are_refused():
    prompted = _trained()
    for method in ("taylor", "gate", "cls_sim", "leave_one_out"):
        with pytest.raises(ValueError, match="no samples"):
            fastprompt.score_prompts(prompted, [], method, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        fastprompt.prompt_condensation(prompted, [], keep=0.5, epochs=0, progress=False)
    x, y = _data(2)
    with pytest.raises(ValueError, match="scores are NaN"):
        fastprompt.score_prompts(
            prompted,
            _loader(x, y),
            "gate",
            loss_fn=lambda o, t: o.sum() * float("nan"),
            progress=False,
        )
    scores = torch.rand(3, P)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 scores are NaN"):
        fastprompt.select_prompts(scores, 0.5)


def test_models_the_scores_cannot_read_are_refused_with_the_reason():
    from timm.models.vision_transformer import Block, ResPostBlock

    class Changed(Block):
        def forward(self, x, attn_mask=None):
            return super().forward(x, attn_mask) + 1

    x, y = _data(2)
    for block_fn, name in ((ResPostBlock, "ResPostBlock"), (Changed, "Changed")):
        prompted = fastprompt.vpt(tiny_vit(block_fn=block_fn), 2, impl="naive")
        with pytest.raises(TypeError, match=name):
            fastprompt.score_prompts(prompted, _loader(x, y), "taylor", progress=False)


def test_keep_one_as_an_int_warns():
    with pytest.warns(UserWarning, match="keep=1 is a count"):
        assert fastprompt.select_prompts(torch.rand(2, 3), 1).sum() == 1
    assert fastprompt.select_prompts(torch.rand(2, 3), 1.0).all()


def test_select_global_and_local_counts_and_ties():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0], [5.0, 4.0, 1.0, 1.0]])
    g = fastprompt.select_prompts(scores, 0.5, "global")
    # 5, 4, 3, then a four-way tie at 1 broken towards the earlier block and lower index.
    assert g.tolist() == [[True, True, False, False], [True, True, False, False]]
    local = fastprompt.select_prompts(scores, 2, "local")
    assert local.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert fastprompt.select_prompts(scores, 0.0).sum() == 0
    assert fastprompt.select_prompts(scores, 1.0, "local").all()
    assert fastprompt.select_prompts(scores, 3).tolist() == [
        [True] + [False] * 3,
        [True, True] + [False] * 2,
    ]
    zero_layer = fastprompt.select_prompts(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), 2)
    assert zero_layer.sum(1).tolist() == [0, 2]
    with pytest.raises(ValueError, match="keep ratio"):
        fastprompt.select_prompts(scores, 1.5)
    with pytest.raises(ValueError, match="keep count"):
        fastprompt.select_prompts(scores, 5, "local")


def test_gather_prompts_matches_reference_and_scatters_into_kept_rows():
    table = torch.randn(3, 5, 4, requires_grad=True)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    packed, counts = gather_prompts(table, keep)
    ref, ref_counts = gather_prompts_ref(table, keep)
    assert torch.equal(packed, ref) and counts.tolist() == ref_counts.tolist() == [2, 0, 5]
    (grad,) = torch.autograd.grad(packed.sum(), table)
    assert torch.equal(grad[..., 0] != 0, keep)


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_condensed_model_equals_naive_vpt_with_kept_prompts(impl):
    prompted = _trained()
    keep = fastprompt.select_prompts(
        torch.rand(3, P, generator=torch.Generator().manual_seed(0)), 7
    )
    condensed = fastprompt.condense(prompted, keep)
    condensed.impl = impl
    assert condensed.config.layer_counts == tuple(keep.sum(1).tolist())
    kept = [s.detach()[k] for s, k in zip(prompt_sets(prompted), keep)]
    x = images(2)
    condensed.eval()
    with torch.no_grad():
        expected = naive_vpt(prompted.model, kept, True, prompted.prompt_proj, 0.0, False, "cls", x)
        assert_close(condensed(x), expected, "logits", atol=2e-5, rtol=1e-5)
    condensed.train()
    out = condensed(x)
    grads = torch.autograd.grad(out.square().sum(), [condensed.deep_prompt_embeddings])
    sets = [s.detach().requires_grad_() for s in prompt_sets(condensed)]
    ref = naive_vpt(prompted.model, sets, True, condensed.prompt_proj, 0.0, True, "cls", x)
    ref_grads = torch.autograd.grad(ref.square().sum(), sets[1:])
    assert_close(grads[0], torch.cat(ref_grads), "grad", atol=1e-5, rtol=1e-4)


def test_finetune_updates_only_kept_prompts_and_head(tmp_path):
    prompted = _trained()
    prompted.source.set_dropout(0.3)
    keep = fastprompt.select_prompts(
        torch.rand(3, P, generator=torch.Generator().manual_seed(1)), 0.5
    )
    condensed = fastprompt.condense(prompted, keep)
    before = {n: p.detach().clone() for n, p in condensed.named_parameters()}
    original = prompted.deep_prompt_embeddings.detach().clone()
    x, y = _data(4)
    losses = fastprompt.finetune(condensed, _loader(x, y), epochs=2, lr=0.05, progress=False)
    assert len(losses) == 2
    changed = {n for n, p in condensed.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"prompt_embeddings", "deep_prompt_embeddings", "head.weight", "head.bias"}
    assert torch.equal(prompted.deep_prompt_embeddings, original)
    condensed.save_prompts(tmp_path / "pc")
    assert fastprompt.load_prompts(tiny_vit(depth=3), tmp_path / "pc").config.dropout == 0.0


def test_condensed_checkpoint_round_trips(tmp_path):
    prompted = _trained()
    keep = fastprompt.select_prompts(
        torch.rand(3, P, generator=torch.Generator().manual_seed(2)), 0.4
    )
    condensed = fastprompt.condense(prompted, keep)
    condensed.save_prompts(tmp_path / "pc")
    loaded = fastprompt.load_prompts(tiny_vit(depth=3), tmp_path / "pc")
    assert loaded.config.layer_counts == condensed.config.layer_counts
    assert torch.equal(fastprompt.kept_prompts(loaded), keep)
    for name, p in condensed.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name


def test_prompt_condensation_runner(capsys):
    prompted = _trained()
    x, y = _data(4)
    condensed = fastprompt.prompt_condensation(
        prompted, _loader(x, y), keep=0.5, score="taylor_normed", epochs=1, progress=False
    )
    assert sum(condensed.config.layer_counts) == 9
    out = capsys.readouterr().out
    assert "block  0" in out and "total   :    9 / 18" in out
    assert layer_summary(fastprompt.kept_prompts(condensed)).endswith("(50.0 %)")


def test_prompt_condensation_leaves_the_source_and_earlier_results_as_they_were():
    """A sweep of keep ratios from one trained model: each call condenses the trained model as it
    was, and a result keeps its logits after the next call fine-tunes (a condensed model shares
    its backbone and head with the model it was condensed from)."""
    prompted = _trained()
    x, y = _data(4)
    kw = dict(epochs=1, progress=False, verbose=False, finetune_kwargs={"lr": 0.5})
    with torch.no_grad():
        before = prompted.eval()(x)
    first = fastprompt.prompt_condensation(prompted, _loader(x, y), keep=0.5, **kw)
    with torch.no_grad():
        first_out = first.eval()(x)
    second = fastprompt.prompt_condensation(prompted, _loader(x, y), keep=0.3, **kw)
    with torch.no_grad():
        assert torch.equal(prompted.eval()(x), before)
        assert torch.equal(first.eval()(x), first_out)
        assert not torch.equal(second.eval()(x), first_out)
    assert prompted.trainable_parameters()["prompt_embeddings"].requires_grad


def test_bad_inputs():
    with pytest.raises(ValueError, match="VPT-deep"):
        fastprompt.score_prompts(fastprompt.vpt(tiny_vit(), 2, deep=False), [])
    with pytest.raises(ValueError, match="method must be one of"):
        fastprompt.score_prompts(_trained(), [], method="magic")
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape"):
        fastprompt.condense(_trained(), torch.ones(2, 2, dtype=torch.bool))


def test_scoring_says_nothing_of_pytorchs_own_deprecations():
    """The first forward-mode scores imported PyTorch's jvp decompositions, whose torch.jit.script
    raised a FutureWarning naming PyTorch's line: printed by every `fastprompt condense`."""
    code = (
        "import torch, fastprompt\n"
        "from helpers import tiny_vit\n"
        "m = fastprompt.vpt(tiny_vit(depth=2), 3)\n"
        "data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]\n"
        "fastprompt.score_prompts(m, data, method='taylor', progress=False)\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
