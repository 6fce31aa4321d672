"""Prompt Condensation of VPT-Swin (the paper condenses Swin-B): every score against a
per-sample oracle on the official computation written plainly, the condensed (packed per stage)
model against the official computation with exactly the kept prompts, checkpoints, the runner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, tiny_swin
from swin_official import official_vpt_swin
from torch import Tensor

import fastprompt

P = 4


def _trained(readout=None, dtype=torch.float64):
    torch.manual_seed(0)
    prompted = fastprompt.vpt(tiny_swin().to(dtype), P, readout=readout)
    with torch.no_grad():  # spread the prompts so scores differ clearly
        for t in _tensors(prompted):
            t.mul_(torch.rand(t.shape[:-1]).unsqueeze(-1) * 20)
    return prompted


def _tensors(prompted):
    return [prompted.prompt_embeddings] + [
        getattr(prompted, f"deep_prompt_embeddings_{s}") for s in range(3)
    ]


def _data(n=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _loader(x, y):
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2)]


def _sets(tensors):
    """Per block, its (P, C) set (views of the given per-stage tensors)."""
    shallow, *stages = tensors
    return [shallow[0], *stages[0].unbind(0), *stages[1].unbind(0), *stages[2].unbind(0)]


def _official(prompted, x, tensors=None, prompt_bias=None):
    shallow, *deep = tensors or _tensors(prompted)
    return official_vpt_swin(
        prompted.model,
        shallow,
        deep,
        x,
        mixing=False,
        readout=prompted.readout,
        prompt_bias=prompt_bias,
    )


def _loss(prompted, xb, yb, **kw):
    return F.cross_entropy(_official(prompted, xb, **kw), yb, reduction="sum")


def _taylor(prompted, xb, yb):
    tensors = [t.detach().requires_grad_() for t in _tensors(prompted)]
    grads = torch.autograd.grad(_loss(prompted, xb, yb, tensors=tensors), tensors)
    return torch.stack([(s * g).sum(-1) for s, g in zip(_sets(tensors), _sets(grads))])


def _gate(prompted, xb, yb):
    gates = [torch.zeros(P, dtype=xb.dtype, requires_grad=True) for _ in range(6)]
    return torch.stack(torch.autograd.grad(_loss(prompted, xb, yb, prompt_bias=gates), gates))


def _taylor_normed(prompted, xb, yb):
    """d/dt of the loss when each prompt's norm1 output h moves to h + t (h − β)."""
    blocks = [b for stage in prompted.model.layers for b in stage.blocks]
    ts = [torch.zeros(P, dtype=xb.dtype, requires_grad=True) for _ in blocks]
    handles = []
    for t, blk in zip(ts, blocks):

        def hook(module, inputs, out, t=t):
            rows = out[:, :P]
            return torch.cat([rows + t[None, :, None] * (rows - module.bias), out[:, P:]], 1)

        handles.append(blk.norm1.register_forward_hook(hook))
    try:
        return torch.stack(torch.autograd.grad(_loss(prompted, xb, yb), ts))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "method, oracle, readout",
    [
        ("taylor", _taylor, None),  # the official readout: the last block's prompts reach it
        ("taylor", _taylor, "patches"),
        ("gate", _gate, "patches"),
        ("taylor_normed", _taylor_normed, "patches"),
    ],
    ids=["taylor", "taylor-patches", "gate-patches", "taylor_normed-patches"],
)
def test_scores_equal_the_per_sample_oracle(method, oracle, readout):
    """Gradient scores on windows: the terms of an image's windows summed before |·|."""
    prompted = _trained(readout)
    x, y = _data()
    scores = fastprompt.score_prompts(prompted, _loader(x, y), method=method, progress=False)
    expected = sum(oracle(prompted, x[b : b + 1], y[b : b + 1]).abs() for b in range(len(x)))
    expected = expected / len(x)
    scale = expected.abs().max()
    assert_close(scores / scale, expected / scale, method, atol=1e-5, rtol=1e-4)


def test_leave_one_out_removes_the_prompt_everywhere_it_acts():
    prompted = _trained(dtype=torch.float32)
    x, y = _data(2, torch.float32)
    scores = fastprompt.score_prompts(prompted, [(x, y)], "leave_one_out", progress=False)
    with torch.no_grad():
        base = _loss(prompted, x, y).item()
        sets = _sets(_tensors(prompted))
        for block, j in [(0, 1), (3, 0), (5, 2)]:  # stage 0, stage 1, the last block (readout)
            kept = [
                s if i != block else s[[k for k in range(P) if k != j]] for i, s in enumerate(sets)
            ]
            tensors = [kept[0][None], kept[1:2], kept[2:4], kept[4:6]]
            change = (_loss(prompted, x, y, tensors=tensors).item() - base) / 2
            assert abs(scores[block, j].item() - change) < 1e-4 * (1 + abs(change)), (block, j)


def test_scores_that_see_attention_only_are_refused_when_the_readout_reads_prompts():
    prompted = _trained(dtype=torch.float32)
    x, y = _data(2, torch.float32)
    for method in ("gate", "taylor_normed"):
        with pytest.raises(ValueError, match=r"block\(s\) \[5\].*this model's: \['patches'\]"):
            fastprompt.score_prompts(prompted, [(x, y)], method, progress=False)
    mixed = fastprompt.vpt(tiny_swin(), P, window_mixing=True)
    with pytest.raises(ValueError, match="per-sample scores are not defined"):
        fastprompt.score_prompts(mixed, [(x, y)], "taylor", progress=False)


def test_a_given_mask_condenses_a_window_mixing_model():
    """Only scores need each image's loss to be its own: condensing by a mask keeps the official
    mixing (it used to be refused with the scores' reason)."""
    mixed = fastprompt.vpt(tiny_swin(), P, window_mixing=True).eval()
    keep = _blocks_keep_none()
    condensed = fastprompt.condense(mixed, keep).eval()
    assert condensed.backbone.window_mixing
    x = _data(3, torch.float32)[0]
    with torch.no_grad():
        got = condensed(x)
        condensed.impl = "naive"
        assert_close(got, condensed(x), "fused vs the official computation", atol=2e-5, rtol=1e-5)


def _nine_kept() -> Tensor:
    return fastprompt.select_prompts(
        torch.rand(6, P, generator=torch.Generator().manual_seed(0)), 9
    )


def _blocks_keep_none() -> Tensor:
    """Every other block keeps none, the last included (its prompt rows feed the readout)."""
    keep = torch.zeros(6, P, dtype=torch.bool)
    keep[0, 1] = keep[2, :2] = keep[4, 3] = True
    return keep


@pytest.mark.parametrize(
    "select", [_nine_kept, _blocks_keep_none], ids=["nine", "blocks-keep-none"]
)
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_the_condensed_model_is_the_official_one_with_the_kept_prompts(impl, select, tmp_path):
    """Blocks that keep no prompt, the last one included, used to fail on the fused path."""
    prompted = _trained(dtype=torch.float32)
    keep = select()
    condensed = fastprompt.condense(prompted, keep)
    condensed.impl = impl
    counts = tuple(keep.sum(1).tolist())
    assert condensed.config.layer_counts == counts
    shapes = {n: tuple(t.shape) for n, t in condensed.named_parameters() if "prompt" in n}
    assert shapes == {
        "prompt_embeddings": (1, counts[0], 16),
        "deep_prompt_embeddings_0": (counts[1], 16),
        "deep_prompt_embeddings_1": (counts[2] + counts[3], 32),
        "deep_prompt_embeddings_2": (counts[4] + counts[5], 64),
    }
    kept = [s.detach()[k] for s, k in zip(_sets(_tensors(prompted)), keep)]
    x = _data(2, torch.float32)[0]
    params = [p for n, p in condensed.named_parameters() if "prompt" in n]
    out = condensed.train()(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    leaves = [k.clone().requires_grad_() for k in kept]
    tensors = [leaves[0][None], leaves[1:2], leaves[2:4], leaves[4:6]]
    ref = _official(prompted, x, tensors=tensors)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    assert_close(out, ref, "logits", atol=2e-5, rtol=1e-5)
    expected = [
        ref_grads[0][None],
        *(torch.cat(ref_grads[a:b]) for a, b in ((1, 2), (2, 4), (4, 6))),
    ]
    for name, g, r in zip(shapes, grads, expected):
        assert_close(g, r, f"grad {name}", atol=2e-5, rtol=1e-4)
    condensed.save_prompts(tmp_path / "pc")
    loaded = fastprompt.load_prompts(tiny_swin(), tmp_path / "pc")
    assert torch.equal(fastprompt.kept_prompts(loaded), keep)
    for name, p in condensed.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name


def test_prompt_condensation_runs_on_swin(capsys):
    prompted = _trained(dtype=torch.float32)
    x, y = _data(4, torch.float32)
    condensed = fastprompt.prompt_condensation(
        prompted, _loader(x, y), keep=0.5, score="taylor", epochs=1, progress=False
    )
    assert sum(condensed.config.layer_counts) == 12
    assert "total   :   12 / 24" in capsys.readouterr().out
