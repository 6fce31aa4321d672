"""The official VPT ablations (one method file, one registry entry) against their computation
written out as the official ``vit_ablations.py`` forward does it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, images, tiny_vit

import fastprompt

DEPTH = 4


def naive_ablation(prompted, x):
    """KMnP/vpt ``vit_ablations.py``, written out (fastprompt's one documented difference: the
    reverse path inserts its first set in front of the patches instead of overwriting P of them).

    ``forward_deep_prompt``: ``prompt_embeddings`` enters block 0; before block i, 1 ≤ i ≤ k − 1,
    the prompt tokens are overwritten by deep set i − 1 (or by ``prompt_embeddings`` again when
    shared); later blocks get the tokens as they come. ``forward_reverse_deep_prompt``: no prompts
    in blocks 0 … L − k − 1, deep set j before block L − k + j.
    """
    c, m = prompted.config, prompted.model
    b, npre, p = x.shape[0], m.num_prefix_tokens, c.num_prompts
    k = c.num_deep_layers or DEPTH
    proj = prompted.prompt_proj

    def tokens(raw):
        return F.dropout(proj(raw).unsqueeze(0).expand(b, -1, -1), c.dropout, prompted.training)

    h = m._pos_embed(m.patch_embed(x))
    held = 0
    if not c.reverse_deep:
        h = torch.cat([h[:, :npre], tokens(prompted.prompt_embeddings[0]), h[:, npre:]], 1)
        held = p
    for i, block in enumerate(m.blocks):
        new = None
        if c.reverse_deep and i >= DEPTH - k:
            new = tokens(prompted.deep_prompt_embeddings[i - (DEPTH - k)])
        elif not c.reverse_deep and 1 <= i <= k - 1:
            shared = prompted.prompt_embeddings[0]
            new = tokens(shared if c.deep_shared else prompted.deep_prompt_embeddings[i - 1])
        if new is not None:
            h = torch.cat([h[:, :npre], new, h[:, npre + held :]], 1)
            held = p
        if i == 0:
            h = m.norm_pre(h)  # on everything entering block 0
        h = block(h)
    h = m.norm(h)
    if c.readout == "cls":
        pooled = h[:, 0]
    elif c.readout == "patches":
        pooled = h[:, npre + held :].mean(1)
    else:
        pooled = h[:, npre:].mean(1)
    return m.head(m.fc_norm(pooled))


CASES = {
    "first1": dict(num_deep_layers=1),
    "first2": dict(num_deep_layers=2),
    "first4": dict(num_deep_layers=4),
    "last1": dict(num_deep_layers=1, reverse_deep=True),
    "last2": dict(num_deep_layers=2, reverse_deep=True),
    "last4_pre_norm": dict(num_deep_layers=4, reverse_deep=True, model=dict(pre_norm=True)),
    "shared": dict(deep_shared=True),
    "shared_first3": dict(deep_shared=True, num_deep_layers=3),
    "first2_projected_avg": dict(
        num_deep_layers=2, project=16, model=dict(class_token=False, global_pool="avg")
    ),
    "last2_patches": dict(num_deep_layers=2, reverse_deep=True, readout="patches"),
    "shared_prompt_readout": dict(deep_shared=True, readout="patches+prompts"),
}


def _model(case, impl="fused", dropout=0.0):
    kw = dict(CASES[case])
    torch.manual_seed(0)
    backbone = tiny_vit(depth=DEPTH, **kw.pop("model", {}))
    prompted = fastprompt.vpt_ablation(backbone, 3, dropout=dropout, impl=impl, **kw)
    with torch.no_grad():  # away from the init, so that every prompt matters
        for param in prompted.trainable_parameters().values():
            param.add_(0.5 * torch.randn_like(param))
    return prompted


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_equal_the_official_computation(case, impl):
    prompted = _model(case, impl, dropout=0.2).train()
    x = images(2)
    params = list(prompted.trainable_parameters().values())
    torch.manual_seed(3)
    out = prompted(x)
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    torch.manual_seed(3)
    ref = naive_ablation(prompted, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    assert_close(out, ref, "logits", atol=2e-5, rtol=1e-5)
    for name, g, r in zip(prompted.trainable_parameters(), grads, ref_grads):
        if r is None or g is None:  # the empty deep set of k = 1 (the official code has it too)
            assert (r is None or not r.any()) and (g is None or not g.any()), name
            continue
        scale = r.abs().max().item() + 1e-12
        assert_close(g / scale, r / scale, f"grad {name}", atol=2e-5, rtol=1e-4)


def test_parameters_are_the_official_ones():
    shapes = {
        case: {n: tuple(p.shape) for n, p in _model(case).trainable_parameters().items()}
        for case in ("first2", "last2", "shared")
    }
    assert shapes["first2"]["prompt_embeddings"] == (1, 3, 64)
    assert shapes["first2"]["deep_prompt_embeddings"] == (1, 3, 64)  # k − 1 sets
    assert "prompt_embeddings" not in shapes["last2"]  # the official code deletes it
    assert shapes["last2"]["deep_prompt_embeddings"] == (2, 3, 64)  # k sets
    assert "deep_prompt_embeddings" not in shapes["shared"]


def test_only_blocks_whose_prompt_outputs_are_read_compute_them():
    """The fused path runs a block on the prompts' keys/values exactly when the next block
    overwrites them (and the readout does not read them): the attention override sees those."""
    for case, expected in (("first2", [0]), ("last2", [2, 3]), ("shared", [0, 1, 2, 3])):
        prompted = _model(case).eval()
        blocks = []

        def attend(call, blocks=blocks):
            blocks.append(call.block)
            return fastprompt.prompted.run_attention(call)[0]

        with torch.no_grad(), prompted.attention_override(attend):
            prompted(images(1))
        assert blocks == expected, (case, blocks)
    prompted = _model("shared_prompt_readout").eval()
    assert prompted._plan()[-1].as_tokens  # the readout reads the last block's prompt outputs


def test_frozen_prompts_and_eval_match():
    for case in ("first2", "last2", "shared"):
        prompted = _model(case).eval()
        with torch.no_grad():
            plain = prompted(images(2))
            with prompted.frozen_prompts():
                cached = prompted(images(2))
            ref = naive_ablation(prompted, images(2))
        assert_close(cached, plain, f"{case} frozen", atol=2e-5, rtol=1e-5)
        assert_close(plain, ref, f"{case} eval", atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["first2", "last2", "shared_first3"])
def test_checkpoints_round_trip(case, tmp_path):
    prompted = _model(case).eval()
    prompted.save_prompts(tmp_path / "run")
    torch.manual_seed(5)
    loaded = fastprompt.load_prompts(tiny_vit(depth=DEPTH), tmp_path / "run").eval()
    assert loaded.method == "vpt_ablation" and loaded.config == prompted.config
    for name, p in prompted.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name
    with torch.no_grad():
        assert torch.equal(prompted(images(2)), loaded(images(2)))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(reverse_deep=True), ValueError, "reverse_deep needs num_deep_layers"),
        (dict(num_deep_layers=0), ValueError, "num_deep_layers must be None or an int >= 1"),
        (dict(num_deep_layers=5), ValueError, "num_deep_layers=5 exceeds the model's 4 blocks"),
        (dict(num_deep_layers=2, reverse_deep=True, deep_shared=True), ValueError, "ignores"),
        (dict(backend="bogus"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, err, match):
    with pytest.raises(err, match=match):
        fastprompt.vpt_ablation(tiny_vit(depth=DEPTH), 2, **kwargs)


def test_prompt_condensation_refuses_the_ablations():
    with pytest.raises(ValueError, match="every block receives its own prompt set"):
        fastprompt.score_prompts(_model("first2"), [], progress=False)
    with pytest.raises(ValueError, match="shared"):
        fastprompt.condense(_model("shared"), torch.ones(DEPTH, 3, dtype=torch.bool))
