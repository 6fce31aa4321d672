"""The fused VPT path against an independent, plainly written naive VPT (the official algorithm)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import assert_close, assert_matches_naive, images, tiny_vit

import fastprompt
from fastprompt.backbones.vit import READOUTS


def _compare(prompted, x, seed=0, atol=2e-5):
    assert_matches_naive(prompted, x, seed, atol)


CASES = {
    "deep": (dict(), dict(deep=True)),
    "shallow": (dict(), dict(deep=False)),
    "deep-dropout": (dict(), dict(deep=True, dropout=0.3)),
    "deep-project": (dict(), dict(deep=True, project=16)),
    "registers": (dict(reg_tokens=2), dict(deep=True)),
    "no-class-token-avg": (dict(class_token=False, global_pool="avg"), dict(deep=True)),
    "no-embed-class": (dict(no_embed_class=True), dict(deep=True)),
    "layerscale-qknorm": (dict(init_values=0.1, qk_norm=True), dict(deep=True)),
    "fc-norm-avg": (dict(global_pool="avg", fc_norm=True), dict(deep=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_matches_naive_vpt(case, mode):
    model_kw, vpt_kw = CASES[case]
    prompted = fastprompt.vpt(tiny_vit(**model_kw), num_prompts=7, **vpt_kw)
    prompted.train(mode == "train")
    _compare(prompted, images(3))


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("deep", [True, False])
def test_each_readout_matches_naive(readout, deep):
    prompted = fastprompt.vpt(tiny_vit(global_pool="avg"), 5, deep=deep, readout=readout)
    _compare(prompted, images(2))


@pytest.mark.parametrize("num_prompts", [0, 1])
def test_batch_one_and_few_prompts(num_prompts):
    prompted = fastprompt.vpt(tiny_vit(), num_prompts, dropout=0.1).train()
    _compare(prompted, images(1))


def test_zero_prompts_equals_the_plain_model():
    model = tiny_vit()
    prompted = fastprompt.vpt(model, 0, head_init="keep").eval()
    x = images(2)
    with torch.no_grad():
        assert_close(prompted(x), model(x), "logits")


def test_naive_impl_gives_same_logits():
    fused = fastprompt.vpt(tiny_vit(), 6).eval()
    naive = fastprompt.vpt(tiny_vit(), 6, impl="naive").eval()
    naive.load_state_dict(fused.state_dict())
    x = images(2)
    with torch.no_grad():
        assert_close(fused(x), naive(x), "logits", atol=2e-5, rtol=1e-5)


def test_dropout_masks_differ_per_image():
    prompted = fastprompt.vpt(tiny_vit(), 4, dropout=0.5).train()
    torch.manual_seed(0)
    p = prompted.source.tokens(1, 8)
    assert p.shape[0] == 8 and not torch.equal(p[0], p[1])


def test_init_matches_official_vpt():
    prompted = fastprompt.vpt(tiny_vit(), 50)
    bound = (6.0 / (3 * 8 * 8 + 64)) ** 0.5
    for t in (prompted.prompt_embeddings, prompted.deep_prompt_embeddings):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    assert prompted.prompt_embeddings.shape == (1, 50, 64)
    assert prompted.deep_prompt_embeddings.shape == (2, 50, 64)
    assert torch.allclose(prompted.model.head.bias, torch.full((5,), -4.59512), atol=1e-4)


def test_vit_b16_init_is_uniform_within_0_0625():
    model = tiny_vit(img_size=32, patch_size=16, embed_dim=768, depth=1, num_heads=12)
    p = fastprompt.vpt(model, 200).prompt_embeddings.detach()
    # 153,600 draws of uniform(-v, v), v = sqrt(6 / (3·16·16 + 768)) = 0.0625.
    assert 0.0624 < p.abs().max() <= 0.0625
    assert abs(p.mean()) < 1e-3 and abs(p.std() - 0.0625 / 3**0.5) < 1e-3


def test_backbone_frozen_and_in_eval_mode():
    prompted = fastprompt.vpt(tiny_vit(drop_rate=0.5), 4, project=8).train()
    trainable = set(prompted.trainable_parameters())
    assert trainable == {
        "prompt_embeddings",
        "deep_prompt_embeddings",
        "prompt_proj.weight",
        "prompt_proj.bias",
        "head.weight",
        "head.bias",
    }
    assert not prompted.model.training and all(not m.training for m in prompted.model.modules())
    assert prompted.prompt_dropout.training and prompted.prompt_proj.training


def test_state_dict_keys_are_the_models_plus_vpts():
    model = tiny_vit()
    model_keys = list(model.state_dict())
    prompted = fastprompt.vpt(model, 3)
    keys = set(prompted.state_dict())
    assert keys == set(model_keys) | {"prompt_embeddings", "deep_prompt_embeddings"}
    assert (
        dict(prompted.named_parameters())["blocks.0.attn.qkv.weight"]
        is model.blocks[0].attn.qkv.weight
    )


def test_unwrap_restores_flags_and_modes():
    model = tiny_vit().train()
    model.blocks[1].eval()
    model.patch_embed.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    prompted = fastprompt.vpt(model, 3)
    assert not any(m.training for m in model.modules())
    back = prompted.unwrap()
    assert back is model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_print_trainable_parameters(capsys):
    fastprompt.vpt(tiny_vit(), 2).print_trainable_parameters()
    assert "trainable params: 709" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model, kwargs, err, match",
    [
        (torch.nn.Linear(2, 2), dict(num_prompts=3), TypeError, "timm VisionTransformer"),
        (None, dict(num_prompts=-1), ValueError, "num_prompts must be >= 0"),
        (None, dict(num_prompts=2.0), TypeError, "num_prompts must be an int, got float"),
        (None, dict(num_prompts=True), TypeError, "num_prompts must be an int, got bool"),
        (None, dict(num_prompts=2, readout="max"), ValueError, "readout must be one of"),
        (None, dict(num_prompts=2, dropout=1.0), ValueError, "dropout must be in"),
        (None, dict(num_prompts=2, project=0), ValueError, "project must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, kwargs, err, match):
    with pytest.raises(err, match=match):
        fastprompt.vpt(model if model is not None else tiny_vit(), **kwargs)


@pytest.mark.parametrize("count", [np.int64(3), np.int32(3), torch.tensor(3)], ids=repr)
def test_integer_types_other_than_int_are_taken_as_counts(count):
    """A sweep over np.arange hands numpy integers: the config keeps a Python int (it goes into
    JSON and checkpoints); numpy floats and bools stay refused (above)."""
    prompted = fastprompt.vpt(tiny_vit(), count)
    assert type(prompted.config.num_prompts) is int and prompted.prompt_count(0) == 3
    json.dumps(dataclasses.asdict(prompted.config))
    with pytest.raises(TypeError, match="num_prompts must be an int, got bool"):
        fastprompt.vpt(tiny_vit(), np.bool_(True))


@pytest.mark.parametrize("count", [torch.tensor(True), torch.tensor([3]), torch.tensor(3.0)])
def test_tensors_other_than_0d_integers_are_refused_as_counts(count):
    """A tensor's __index__ takes a bool tensor (as 1) and a one-element tensor of any shape."""
    with pytest.raises(TypeError, match="num_prompts must be an int, got Tensor"):
        fastprompt.vpt(tiny_vit(), count)


def test_unsupported_timm_models_say_why():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    deit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4)
    with pytest.raises(TypeError, match="overrides VisionTransformer"):
        fastprompt.vpt(deit, 2)
    with pytest.raises(ValueError, match="global_pool='map'"):
        fastprompt.vpt(tiny_vit(global_pool="map"), 2)
    with pytest.raises(TypeError, match="already prompted"):
        fastprompt.vpt(fastprompt.vpt(tiny_vit(), 2), 2)
    with pytest.raises(ValueError, match="class token"):
        fastprompt.vpt(tiny_vit(class_token=False, global_pool="avg"), 2, readout="cls")


def test_other_timm_blocks_work_naively_and_are_refused_fused():
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit(block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="impl='naive'"):
        fastprompt.vpt(model, 2)
    prompted = fastprompt.vpt(model, 2, impl="naive")
    _compare(prompted, images(2))


@pytest.mark.slow
def test_vit_b16_fused_matches_naive():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    prompted = fastprompt.vpt(model, 20).train()
    x = torch.randn(2, 3, 224, 224)
    _compare(prompted, x, atol=1e-4)
