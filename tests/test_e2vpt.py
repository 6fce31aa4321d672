"""E²VPT against the official computation (ChengHan111/E2VPT), written out plainly below: logits
and every prompt gradient, with trained, pruned and packed masks; init, parameter count, pruning,
rewinding and checkpoints (ours and the official code's)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, images, tiny_swin, tiny_vit

import fastprompt
from fastprompt.methods import e2vpt as E
from fastprompt.sources.key_value import SEGMENT_MASK, TOKEN_MASK


def official_e2vpt(model, src, x, training=False, rows=None):
    """The official forward (``vit_prompt_VK.py`` + ``vit_changeVK.py``) on a timm ViT.

    Visual prompts: projected, expanded over the batch, dropped out per image, times the segment
    mask repeated along the width, times the token mask; inserted after the class (and register)
    tokens before block 0 and overwriting the prompt positions before every later block (deep).
    Attention: the key-value prompts go in front of each head's keys and values
    (``LAYER_BEHIND``), after the qkv projection, then softmax(q kᵀ / √d) v. ``rows`` keeps only
    those visual tokens (what a packed model computes).
    """
    b, width = x.shape[0], model.embed_dim
    npre = model.num_prefix_tokens
    masks = src.masks()
    keep = slice(None) if rows is None else rows

    def visual(raw):
        e = src.prompt_proj(raw[keep]).unsqueeze(0).expand(b, -1, -1)
        e = F.dropout(e, src.prompt_dropout.p, training)
        if masks is not None:
            token, segment = masks[0][keep], masks[1][keep]
            e = e * segment.repeat((1, width // segment.shape[1])).repeat(b, 1, 1)
            e = e * token.view(-1, 1).repeat(1, width).repeat(b, 1, 1)
        return e

    sets = [src.prompt_embeddings[0]]
    if src.deep_prompt_embeddings is not None:
        sets += list(src.deep_prompt_embeddings)
    shared = hasattr(src, "deep_QKV_embeddings")
    kk = src.deep_QKV_embeddings if shared else src.deep_QKV_embeddings_K
    vv = src.deep_QKV_embeddings if shared else src.deep_QKV_embeddings_V
    h = model._pos_embed(model.patch_embed(x))
    first = visual(sets[0])
    p = first.shape[1]
    h = model.norm_pre(torch.cat([h[:, :npre], first, h[:, npre:]], 1))
    for i, blk in enumerate(model.blocks):
        if 0 < i < len(sets):
            h = torch.cat([h[:, :npre], visual(sets[i]), h[:, npre + p :]], 1)
        attn, n = blk.attn, h.shape[1]
        y = blk.norm1(h)
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if i < kk.shape[0] and kk.shape[2]:
            k = torch.cat([kk[i].expand(b, -1, -1, -1), k], 2)
            v = torch.cat([vv[i].expand(b, -1, -1, -1), v], 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        o = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(b, n, -1)
        h = h + blk.ls1(attn.proj(o))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.head(model.norm(h)[:, 0])


def _scramble_masks(prompted, pruned=False, seed=5):
    """Trained-looking masks (not ones), with zeros where ``pruned``."""
    g = torch.Generator().manual_seed(seed)
    token, segment = prompted.source.masks()
    with torch.no_grad():
        token.copy_(0.5 + torch.rand(token.shape, generator=g))
        segment.copy_(0.5 + torch.rand(segment.shape, generator=g))
        if pruned:
            token[1] = 0.0
            segment[:, [0, 3, 5]] = 0.0
            segment[0, 7] = 0.0


def _check_against_official(prompted, x, training=False, rows=None, reference=None):
    prompted.train(training)
    params = dict(prompted.trainable_parameters())
    names = list(params)
    torch.manual_seed(11)
    out = prompted(x)
    grads = torch.autograd.grad(out.square().sum(), [params[n] for n in names], allow_unused=True)
    ref_model = reference or prompted
    torch.manual_seed(11)
    ref = official_e2vpt(ref_model.model, ref_model.source, x, training, rows)
    ref_params = dict(ref_model.trainable_parameters())
    ref_grads = torch.autograd.grad(
        ref.square().sum(), [ref_params[n] for n in names], allow_unused=True
    )
    assert_close(out, ref, "logits", atol=2e-5, rtol=1e-5)
    for name, g, r in zip(names, grads, ref_grads):
        if r is None:
            assert g is None or not g.any(), name
            continue
        if rows is not None and name in ("prompt_embeddings", "deep_prompt_embeddings"):
            r = r[:, rows]
        elif rows is not None and name in (TOKEN_MASK, SEGMENT_MASK):
            r = r[rows]
        atol = 3e-5
        if name == TOKEN_MASK:
            # Its exact value is LayerNorm's eps term (README), what is left of terms the size of
            # the segment gradients: fp32 rounds it at their scale.
            segment = ref_grads[names.index(SEGMENT_MASK)]
            atol *= max(1.0, segment.abs().max().item())
        assert_close(g, r, f"grad {name}", atol=atol, rtol=1e-4)
    return out


CASES = {
    "default": (dict(), dict()),
    "unshared": (dict(), dict(shared_kv=False)),
    "shallow-visual": (dict(), dict(deep=False)),
    "kv-block-0": (dict(), dict(kv_deep=False)),
    "no-masks": (dict(), dict(masks=False)),
    "registers-qknorm": (dict(reg_tokens=2, qk_norm=True, init_values=0.1), dict()),
    "project": (dict(), dict(project=32)),
}


NAIVE = [("default", "naive"), ("shallow-visual", "naive")]


@pytest.mark.parametrize("case, impl", [(c, "fused") for c in CASES] + NAIVE)
def test_matches_the_official_computation(case, impl):
    model_kw, kw = CASES[case]
    prompted = E.e2vpt(tiny_vit(**model_kw), 3, 2, impl=impl, **kw)
    if prompted.config.masks:
        _scramble_masks(prompted)
    _check_against_official(prompted, images(3))


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_pruned_zero_tokens_match_the_official_computation(impl):
    prompted = E.e2vpt(tiny_vit(), 4, 2, impl=impl)
    _scramble_masks(prompted, pruned=True)
    out = _check_against_official(prompted, images(3))
    prompted.eval()
    with torch.no_grad(), prompted.frozen_prompts():
        assert_close(prompted(images(3)), out.detach(), "frozen", atol=2e-5, rtol=1e-5)


def test_dropout_is_drawn_per_image_before_the_masks():
    prompted = E.e2vpt(tiny_vit(), 4, 2, dropout=0.3)
    _scramble_masks(prompted, pruned=True)
    _check_against_official(prompted, images(3), training=True)
    prompted.train()
    tokens = prompted.source.tokens(1, 4)
    assert tokens.shape[0] == 4 and not torch.equal(tokens[0], tokens[1])
    assert not tokens[:, 1].any()  # a pruned token stays zero under dropout


def test_packing_removes_the_zero_tokens_and_is_labelled():
    prompted = E.e2vpt(tiny_vit(), 4, 2).eval()
    _scramble_masks(prompted, pruned=True)
    x = images(3)
    with torch.no_grad():
        official = prompted(x)
    packed = E.pack(prompted)
    assert packed.config.kept_tokens == (0, 2, 3) and packed.config.tokens_before == 4
    assert packed.source.count(0) == 3
    rows = torch.tensor([0, 2, 3])
    out = _check_against_official(packed, x, rows=rows, reference=prompted)
    # Removing a zero token changes the logits: packing is its own mode, never the default.
    assert (out.detach() - official).abs().max() > 1e-4
    twice = E.pack(packed)
    assert twice.config.kept_tokens == (0, 2, 3) and twice.config.tokens_before == 4


def test_trainable_set_and_the_vit_b16_parameter_count():
    import timm

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    prompted = E.e2vpt(model, 5, 5)
    counts = {n: p.numel() for n, p in prompted.trainable_parameters().items()}
    assert counts.pop("head.weight") == 7680 and counts.pop("head.bias") == 10
    assert counts == {
        "prompt_embeddings": 3840,
        "deep_prompt_embeddings": 42240,
        "deep_QKV_embeddings": 46080,
        TOKEN_MASK: 5,
        SEGMENT_MASK: 80,
    }
    assert sum(counts.values()) == 92245


def test_the_official_initialisation():
    torch.manual_seed(0)
    prompted = E.e2vpt(tiny_vit(), 50, 40)
    visual = math.sqrt(6 / (3 * 8 * 8 + 64))
    for t in (prompted.prompt_embeddings, prompted.deep_prompt_embeddings):
        assert visual * 0.9 < t.abs().max() <= visual
    kv = math.sqrt(6 / (40 * 16))  # kaiming-uniform, fan_in = N·d_h
    assert kv * 0.9 < prompted.deep_QKV_embeddings.abs().max() <= kv
    token, segment = prompted.source.masks()
    assert torch.equal(token, torch.ones(50)) and torch.equal(segment, torch.ones(50, 16))
    assert torch.allclose(prompted.head.bias, torch.full((5,), -math.log(99)))
    other = E.e2vpt(tiny_vit(), 2, 40, kv_init="uniform").deep_QKV_embeddings
    assert other.abs().max() <= math.sqrt(6 / (3 * 64 + 16))
    assert E.e2vpt(tiny_vit(), 2, 4, kv_init="trunc_normal").deep_QKV_embeddings.abs().max() < 0.1


def test_a_width_the_segments_do_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"width 60 .* multiple of segments; .*masks=False"):
        E.e2vpt(tiny_vit(embed_dim=60, num_heads=4), 2, 2)
    assert E.e2vpt(tiny_vit(embed_dim=60, num_heads=4), 2, 2, masks=False).source.masks() is None


def test_official_prune_counts():
    assert E.prune_counts(5, E.MIN_TOKENS) == (0, 1, 2, 3, 4)
    assert E.prune_counts(10, E.MIN_TOKENS) == tuple(range(1, 10))
    assert E.prune_counts(1, E.MIN_TOKENS) == (0,)
    assert E.prune_counts(32, E.MIN_TOKENS) == (3, 6, 9, 12, 16, 19, 22, 25, 28)
    assert E.prune_counts(16, E.MIN_SEGMENTS) == (1, 3, 4, 6, 8, 9, 11, 12)


def test_select_masks_prunes_the_lowest_signed_scores_first():
    tokens = torch.tensor([0.3, -0.2, 0.3, 0.1])
    segments = torch.arange(64.0).reshape(4, 16).flip(1)
    segments[2, :] = 0.0  # ties: the lower index goes first
    token_mask, segment_mask = E.select_masks(tokens, segments, 2, 3)
    assert token_mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert (segment_mask[0] == 0).nonzero().flatten().tolist() == [13, 14, 15]
    assert (segment_mask[2] == 0).nonzero().flatten().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="pruning 4 tokens of 4 leaves fewer than 1"):
        E.select_masks(tokens, segments, 4, 0)
    with pytest.raises(ValueError, match="pruning 13 segments of 16 leaves fewer than 4"):
        E.select_masks(tokens, segments, 0, 13)


def _batches(n=2, b=3):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 5, (b,), generator=g))
        for _ in range(n)
    ]


def test_mask_scores_are_the_mean_signed_mask_gradient():
    prompted = E.e2vpt(tiny_vit(), 4, 2, dropout=0.5).train()
    _scramble_masks(prompted)
    data = _batches()
    token_scores, segment_scores = E.mask_scores(prompted, data)
    assert prompted.training  # the mode is restored
    src = prompted.source
    expected = [torch.zeros(4), torch.zeros(4, 16)]
    for x, y in data:  # eval mode: no prompt dropout
        loss = F.cross_entropy(official_e2vpt(prompted.model, src, x), y)
        for e, g in zip(expected, torch.autograd.grad(loss, list(src.masks()))):
            e += g / len(data)
    assert_close(token_scores, expected[0], "token scores", atol=1e-6, rtol=1e-4)
    assert_close(segment_scores, expected[1], "segment scores", atol=1e-6, rtol=1e-4)
    assert (token_scores < 0).any() or (segment_scores < 0).any()  # signed, not magnitudes


def test_token_scores_of_deep_prompts_are_layernorms_epsilon_term():
    """A token mask scales a whole deep prompt, which reaches the model through LayerNorm only:
    with LayerNorm's eps at 0 its score vanishes (float64), the segments' does not (README)."""
    model = tiny_vit()
    for block in model.blocks:
        block.norm1.eps = 0.0
    prompted = E.e2vpt(model, 4, 2).double()
    data = [(x.double(), y) for x, y in _batches()]
    token_scores, segment_scores = E.mask_scores(prompted, data)
    assert token_scores.abs().max() < 1e-12 * segment_scores.abs().max()


def test_mask_scores_take_optimiser_steps_as_the_official_loop():
    prompted = E.e2vpt(tiny_vit(), 4, 2)
    params = list(prompted.trainable_parameters().values())
    data = _batches()
    still = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # the official epoch-0 learning rate
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            E.mask_scores(prompted, data, optimizer=still), E.mask_scores(prompted, data)
        )
    )
    before = prompted.prompt_embeddings.detach().clone()
    moving = torch.optim.SGD(params, lr=0.5)
    E.mask_scores(prompted, data, optimizer=moving)
    assert not torch.equal(prompted.prompt_embeddings, before)


def test_rewinding_retrains_a_fresh_model_with_fixed_masks(tmp_path):
    model = tiny_vit()
    prompted = E.e2vpt(model, 4, 2)
    token_mask, segment_mask = E.select_masks(torch.arange(4.0), torch.rand(4, 16), 1, 3)
    old = prompted.prompt_embeddings.detach().clone()
    rewound = E.rewind(prompted, token_mask, segment_mask)
    assert rewound.model is model and not torch.equal(rewound.prompt_embeddings, old)
    assert rewound.config.train_masks is False
    assert TOKEN_MASK not in rewound.trainable_parameters()
    assert torch.equal(rewound.source.masks()[0], token_mask)
    _check_against_official(rewound, images(2))
    rewound.save_prompts(tmp_path / "ck")
    back = fastprompt.load_prompts(tiny_vit(), tmp_path / "ck")
    assert torch.equal(back.source.masks()[1], segment_mask)
    with pytest.raises(ValueError, match="masks are fixed"):
        E.mask_scores(back, _batches(1))


@pytest.mark.parametrize("kind", ["trained", "packed", "unshared"])
def test_checkpoints_round_trip_exactly(tmp_path, kind):
    prompted = E.e2vpt(tiny_vit(), 4, 2, shared_kv=kind != "unshared").eval()
    _scramble_masks(prompted, pruned=True)
    if kind == "packed":
        prompted = E.pack(prompted)
    prompted.save_prompts(tmp_path / "ck")
    back = fastprompt.load_prompts(tiny_vit(seed=0), tmp_path / "ck").eval()
    assert back.method == "e2vpt" and back.config == prompted.config
    x = images(2)
    with torch.no_grad():
        assert torch.equal(back(x), prompted(x))


def _official_state_dict(prompted):
    """Our tensors under the official code's names (``Checkpointer.save``'s ``"model"``)."""
    src = prompted.source
    out = {
        "enc.transformer.embeddings.cls_token": torch.zeros(1, 1, 64),
        "enc.transformer.prompt_embeddings": src.prompt_embeddings,
        "enc.transformer.deep_prompt_embeddings": src.deep_prompt_embeddings,
        f"enc.transformer.{TOKEN_MASK}": src.masks()[0],
        f"enc.transformer.{SEGMENT_MASK}": src.masks()[1],
        "head.last_layer.weight": prompted.head.weight,
        "head.last_layer.bias": prompted.head.bias,
    }
    for i, kv in enumerate(src.deep_QKV_embeddings):
        out[f"enc.transformer.encoder.layer.{i}.attn.deep_QKV_embeddings"] = kv
        out[f"enc.transformer.encoder.layer.{i}.attn.query.weight"] = torch.zeros(64, 64)
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("pruned", [False, True])
def test_official_checkpoints_load(tmp_path, pruned):
    prompted = E.e2vpt(tiny_vit(), 4, 2).eval()
    _scramble_masks(prompted, pruned=pruned)
    torch.save({"model": _official_state_dict(prompted)}, tmp_path / "last_model.pth")
    back = fastprompt.load_prompts(tiny_vit(), tmp_path / "last_model.pth").eval()
    assert back.method == "e2vpt" and back.config.train_masks is not pruned
    x = images(2)
    with torch.no_grad():
        assert_close(back(x), prompted(x), "logits", atol=1e-6, rtol=1e-6)
    vpt = fastprompt.vpt(tiny_vit(), 3).state_dict()
    plain = {k: v for k, v in vpt.items() if "prompt" in k or k.startswith("head.")}
    assert fastprompt.load_prompts(tiny_vit(), plain).method == "vpt"
    with pytest.raises(ValueError, match="not E2VPT"):
        fastprompt.load_prompts(tiny_vit(), plain, method="e2vpt")


def test_an_official_e2vpt_checkpoint_is_never_read_as_vpt():
    """It holds VPT's prompt names too: read as VPT (``method="vpt"``, or an official variant
    whose key-value prompts the E2VPT reader does not take, as SHARED_ACCROSS's one set in the
    encoder), its key-value prompts and masks would be dropped without a word."""
    official = _official_state_dict(E.e2vpt(tiny_vit(), 4, 2))
    with pytest.raises(ValueError, match="an E2VPT checkpoint, not VPT's"):
        fastprompt.load_prompts(tiny_vit(), official, method="vpt")
    shared = {k: v for k, v in official.items() if "layer." not in k}
    shared["enc.transformer.encoder.deep_QKV_embeddings"] = torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="an E2VPT checkpoint, not VPT's") as refused:
        fastprompt.load_prompts(tiny_vit(), shared)
    assert "are not one per ViT block" in str(refused.value)
    # The official E2VPT-Swin (swin_transformer_prompt_VK.py) keeps VPT-Swin's per-stage names.
    swin = fastprompt.vpt(tiny_swin(), 3)
    official = {f"enc.{k}": v for k, v in swin.prompt_state().items() if "prompt" in k}
    official["head.last_layer.weight"], official["head.last_layer.bias"] = swin.head.fc.parameters()
    official[f"enc.{TOKEN_MASK}"] = torch.ones(3)
    official["enc.layers.0.blocks.0.attn.deep_QKV_embeddings"] = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="an E2VPT checkpoint, not VPT's") as refused:
        fastprompt.load_prompts(tiny_swin(), official)
    assert "are not one per ViT block" in str(refused.value)
    # Nor is a fastprompt E2VPT model's own state dict (key-value prompts stacked).
    with pytest.raises(ValueError, match="an E2VPT checkpoint, not VPT's"):
        fastprompt.load_prompts(tiny_vit(), E.e2vpt(tiny_vit(), 4, 2).state_dict())


def test_prompt_condensation_refuses_e2vpt_with_the_reason():
    prompted = E.e2vpt(tiny_vit(), 3, 2)
    with pytest.raises(TypeError, match="E2VPT prunes with its own masks"):
        fastprompt.score_prompts(prompted, _batches(1), progress=False)
    with pytest.raises(TypeError, match="E2VPT prunes with its own masks"):
        fastprompt.condense(prompted, torch.ones(3, 3, dtype=torch.bool))


def test_impossible_masks_and_prune_counts_are_refused():
    """rewind took a mask of 2.0 or NaN and fixed it into the model; prune_counts returned
    negative counts or more tokens than there are."""
    prompted = E.e2vpt(tiny_vit(), 4, 2)
    for bad in (torch.full((4,), 2.0), torch.full((4,), float("nan"))):
        with pytest.raises(ValueError, match=r"token_mask must hold 0 \(pruned\) or 1 \(kept\)"):
            E.rewind(prompted, bad, torch.ones(4, 16))
    with pytest.raises(ValueError, match=r"minimum must lie in \[0, total=3\], got 5"):
        E.prune_counts(3, 5)
    with pytest.raises(ValueError, match=r"percents must lie in \[0, 100\], got \[150\]"):
        E.prune_counts(10, 0, (150,))


def test_condensation_refuses_an_e2vpt_model_naming_the_call():
    prompted = E.e2vpt(tiny_vit(), 3, 2)
    x, y = images(2), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"^score_prompts: E2VPT's key-value prompts"):
        fastprompt.score_prompts(prompted, [(x, y)], "taylor", progress=False)
    with pytest.raises(TypeError, match=r"^condense: E2VPT's key-value prompts"):
        fastprompt.condense(prompted, torch.ones(3, 3, dtype=torch.bool))
