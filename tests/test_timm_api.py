"""timm's model API on a prompted model, as a researcher who knows timm uses it: attributes of
the wrapped model, timm's optimizer factory (weight decay and layer-wise LR decay), resizing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_matches_naive, tiny_swin, tiny_vit
from swin_official import assert_matches_official

import fastprompt
from fastprompt.methods import e2vpt as E

optim = pytest.importorskip("timm.optim")


def _created(family):
    """The tiny test models through timm.create_model (random init), which gives them the
    pretrained_cfg that timm's optimizer factory reads."""
    import timm

    torch.manual_seed(0)
    if family == "swin":
        kw = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4))
        return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, num_classes=5, **kw)
    kw = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, **kw)


MODELS = {
    "vpt-vit": lambda: fastprompt.vpt(_created("vit"), 3, deep=True),
    "vpt-swin": lambda: fastprompt.vpt(_created("swin"), 2, deep=True),
    "pgn": lambda: fastprompt.pgn(_created("vit"), num_prompts=2, library_size=4, resolution=32),
    "e2vpt": lambda: E.e2vpt(_created("vit"), 3, 2),
}


def _groups(optimizer, model):
    """{parameter name: (lr_scale, weight_decay)} of a timm optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"])
        for g in optimizer.param_groups
        for p in g["params"]
    }


@pytest.mark.parametrize("case", MODELS)
def test_layer_decay_keeps_the_prompts_at_the_full_rate_with_the_head(case):
    """timm scaled the prompts down as if they were the stem (0.65^3 on a 3-block ViT: without
    a group_matcher it guessed the groups from the module order); they are new, as the head."""
    prompted = MODELS[case]()
    opt = optim.create_optimizer_v2(prompted, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    got = _groups(opt, prompted)
    assert set(got) == set(prompted.trainable_parameters())
    assert {n: s for n, (s, _) in got.items()} == dict.fromkeys(got, 1.0)


def test_layer_decay_of_an_unfrozen_block_is_timms():
    """A block trained with the prompts gets the rate timm gives it on the bare model."""
    prompted = fastprompt.vpt(_created("vit"), 3, deep=True)
    prompted.blocks[1].requires_grad_(True)
    bare = _created("vit")
    bare.requires_grad_(False)
    bare.blocks[1].requires_grad_(True)
    bare.head.requires_grad_(True)
    kw = dict(lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    got = _groups(optim.create_optimizer_v2(prompted, "sgd", **kw), prompted)
    want = _groups(optim.create_optimizer_v2(bare, "sgd", **kw), bare)
    assert {n: got[n] for n in want} == want
    assert got["blocks.1.attn.qkv.weight"][0] == pytest.approx(0.65**2)


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_weight_decay_spares_what_the_model_spares(make):
    """Unfrozen whole (requires_grad_(True)), the positional embedding and class token (a
    Swin's relative-position tables) take no weight decay, as timm's factory gives the model;
    they took it (the wrapper had no no_weight_decay)."""
    prompted = fastprompt.vpt(make(), 2).requires_grad_(True)
    bare = make()
    got = _groups(optim.create_optimizer_v2(prompted, "adamw", weight_decay=0.05), prompted)
    want = _groups(optim.create_optimizer_v2(bare, "adamw", weight_decay=0.05), bare)
    assert {n: got[n] for n in want} == want
    assert got["prompt_embeddings"] == (1.0, 0.05)
    assert prompted.no_weight_decay() == bare.no_weight_decay()


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_head_hidden_size_and_set_input_size_answer_on_the_wrapper(make):
    prompted = fastprompt.vpt(make(), 2, deep=True).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    prompted.set_input_size(img_size=48)
    assert prompted.model.patch_embed.img_size == (48, 48)
    pre = prompted.forward_head(prompted.forward_features(x), pre_logits=True)
    assert pre.shape == (2, prompted.head_hidden_size)
    check = assert_matches_naive if make is tiny_vit else assert_matches_official
    check(prompted, x)
    assert not any(p.requires_grad for n, p in prompted.model.named_parameters() if "head" not in n)


def test_what_set_input_size_rebuilds_stays_frozen():
    """timm 1.0.9's Swin rebuilt each relative-position bias table as a new parameter that
    trains (newer timm keeps the old one's flag): after the wrapper's set_input_size the
    backbone trained those tables. A replaced entry takes its predecessor's flag."""
    prompted = fastprompt.vpt(tiny_swin(), 2, deep=True)
    model = prompted.model
    timm_set_input_size = model.set_input_size

    def as_timm_1_0_9(*args, **kwargs):
        timm_set_input_size(*args, **kwargs)
        for layer in model.layers:
            for blk in layer.blocks:
                table = blk.attn.relative_position_bias_table
                blk.attn.relative_position_bias_table = torch.nn.Parameter(table.detach().clone())

    model.set_input_size = as_timm_1_0_9
    prompted.set_input_size(img_size=48)
    trains = sorted(n for n, p in prompted.named_parameters() if p.requires_grad)
    assert trains and all(n.startswith(("head", "prompt", "deep_prompt")) for n in trains)


def _grads(prompted, x):
    names = [n for n, p in prompted.named_parameters() if p.requires_grad]
    params = [p for n, p in prompted.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(prompted(x).square().sum(), params)))


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_an_unfrozen_backbone_trains_as_the_naive_path_or_is_refused_clearly(make):
    """requires_grad_(True) (fine-tuning with the prompts): the fused path gives every weight
    the naive path's gradient, except a Swin's relative-position bias table, which the prompt
    attention op takes as a constant: that is refused naming the table (it used to fail inside
    the op, asking for a key_bias.detach() the person never passed)."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    fused, naive = (fastprompt.vpt(make(), 2, deep=True, impl=i).eval() for i in ("fused", "naive"))
    for prompted in (fused, naive):
        prompted.requires_grad_(True)
    if make is tiny_swin:
        with pytest.raises(TypeError, match=r"layers\.0\.blocks\.0\.attn\.relative_position_bias"):
            fused(x)
        with torch.no_grad():
            assert_close(fused(x), naive(x), "no_grad logits", atol=2e-5, rtol=1e-5)
        for prompted in (fused, naive):
            for name, p in prompted.named_parameters():
                p.requires_grad_("relative_position_bias_table" not in name)
    got, want = _grads(fused, x), _grads(naive, x)
    assert got.keys() == want.keys() and "norm.weight" in got
    for name in want:
        scale = want[name].abs().max().item() + 1e-12
        assert_close(got[name] / scale, want[name] / scale, name, atol=2e-5, rtol=1e-4)


def test_a_family_without_timms_optimizer_hooks_still_gets_an_optimizer():
    """A model of a family of one's own lacking no_weight_decay and group_matcher: timm's
    factory looks them up with a default and falls back, as on the bare model; the wrapper's
    methods raised AttributeError from inside, so create_optimizer_v2 failed on it."""
    from test_seams import Staged, StagedBackbone, WidthPrompts

    from fastprompt import backbones
    from fastprompt.prompted import PromptedViT

    key = f"{Staged.__module__}.{Staged.__qualname__}"
    backbones.register_backbone(Staged, StagedBackbone)
    try:
        prompted = PromptedViT(
            Staged(), WidthPrompts((True, True, True), [32, 32, 48]), readout="patches"
        )
        assert not hasattr(prompted, "no_weight_decay")
        assert not hasattr(prompted, "group_matcher")
        for kw in ({}, {"layer_decay": 0.65}):
            opt = optim.create_optimizer_v2(prompted, "adamw", lr=1e-3, weight_decay=0.05, **kw)
            assert set(_groups(opt, prompted)) == {
                n for n, p in prompted.named_parameters() if p.requires_grad
            }
    finally:
        backbones._REGISTRY.pop(key)


# The wrapped model's configuration a timm user reads off a model, answered on the wrapper where
# the model has it (global_pool is the wrapper's own, below).
CONFIG = (
    "in_chans",
    "embed_dim",
    "dynamic_img_size",
    "num_prefix_tokens",
    "num_reg_tokens",
    "has_class_token",
    "no_embed_class",
    "pool_include_prefix",
    "num_layers",
)


@pytest.mark.parametrize("case", MODELS)
def test_the_models_configuration_answers_on_the_wrapper(case):
    """``prompted.embed_dim``, ``num_prefix_tokens``, ``global_pool``... raised AttributeError
    (hasattr said False) where the model has them."""
    prompted = MODELS[case]()
    model = prompted.model
    for name in CONFIG:
        assert hasattr(prompted, name) == hasattr(model, name), name
        if hasattr(model, name):
            assert getattr(prompted, name) == getattr(model, name), name
    assert "num_prefix_tokens" in dir(prompted) and hasattr(prompted, "embed_dim")
    assert prompted.global_pool == model.global_pool  # the default readout follows it
    assert not hasattr(prompted, "output_fmt")  # forward_features is (B, tokens, C), not NHWC
    with pytest.raises(AttributeError):
        prompted.embed_dim = 3


READOUTS = {
    "vpt-cls": lambda: fastprompt.vpt(_created("vit"), 3, deep=True, readout="cls"),
    "vpt-patches": lambda: fastprompt.vpt(_created("vit"), 3, deep=True, readout="patches"),
    "vpt-patches+prompts": lambda: fastprompt.vpt(
        _created("vit"), 3, deep=True, readout="patches+prompts"
    ),
    "pgn-patches+prompts": lambda: fastprompt.pgn(
        _created("vit"), num_prompts=2, library_size=4, resolution=32, readout="patches+prompts"
    ),
    "e2vpt-patches+prompts": lambda: E.e2vpt(_created("vit"), 3, 2, readout="patches+prompts"),
    "swin-patches": lambda: fastprompt.vpt(_created("swin"), 2, deep=True, readout="patches"),
    "swin-patches+prompts": lambda: fastprompt.vpt(_created("swin"), 2, deep=True),
}


@pytest.mark.parametrize("case", READOUTS)
def test_num_prefix_tokens_and_global_pool_lay_out_forward_features(case):
    """What a timm user computes from them holds on the wrapper: the readout pools
    ``forward_features(x)[:, num_prefix_tokens:]`` as ``global_pool`` says, and a readout that
    reads no prompt leaves timm's layout (prefix tokens, then the patches)."""
    prompted = READOUTS[case]().eval()
    model = prompted.model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    features = prompted.forward_features(x)
    prefix = getattr(prompted, "num_prefix_tokens", 0)  # a Swin has no prefix tokens
    if prompted.global_pool == "avg":
        pooled = features[:, prefix:].mean(dim=1)
    else:
        pooled = features[:, 0]
    pooled = getattr(model, "fc_norm", torch.nn.Identity())(pooled)
    assert_close(prompted.forward_head(features, pre_logits=True), pooled, "pooled", atol=1e-6)
    own = model.forward_features(x)  # the model's tokens: (B, N, D), a Swin's (B, H, W, C)
    prompts = prompted.config.num_prompts if prompted.readout == "patches+prompts" else 0
    assert features.shape[1] == own[0, ..., 0].numel() + prompts
    if not prompts:
        assert features.shape == own.flatten(1, -2).shape
    assert prompted.global_pool == ("token" if prompted.readout == "cls" else "avg")


def test_global_pool_is_the_readouts_after_reset_classifier_changes_the_models():
    prompted = fastprompt.vpt(_created("vit"), 3, deep=True)
    prompted.reset_classifier(7, global_pool="avg")
    assert (prompted.model.global_pool, prompted.global_pool) == ("avg", "token")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_dynamic_img_size_is_the_wrappers_too(family):
    """A model built with dynamic_img_size=True: the prompted forward takes other image sizes,
    the fused path as the naive one."""
    import timm

    torch.manual_seed(0)
    if family == "swin":
        name = "swin_tiny_patch4_window7_224"
        kw = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    else:
        name, kw = "vit_tiny_patch16_224", dict(patch_size=8, depth=2)
    model = timm.create_model(name, img_size=32, num_classes=5, dynamic_img_size=True, **kw)
    fused = fastprompt.vpt(model, 2, deep=True).eval()
    if not hasattr(model, "dynamic_img_size"):
        pytest.skip("this timm's Swin has no dynamic_img_size (before 1.0.31: strict_img_size)")
    assert fused.dynamic_img_size is True
    naive = copy.deepcopy(fused)
    naive.impl = "naive"
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    assert_close(fused(x), naive(x), "logits", atol=2e-5, rtol=1e-5)
