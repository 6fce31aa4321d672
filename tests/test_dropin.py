"""A wrapped model stays the model a user changed: a qkv with a forward of its own (LoRA), hooks,
blocks replaced, added or removed after wrapping. Each either gives the official computation or
is refused with its reason, never ignored."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers import assert_close, assert_matches_naive, images, tiny_swin, tiny_vit
from swin_official import assert_matches_official
from timm.models.vision_transformer import Block
from torch import nn

import fastprompt


class LoRALinear(nn.Linear):
    """A linear layer plus a low-rank update, as LoRA adds one to a frozen qkv."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=g) / 4)
        self.b = nn.Parameter(torch.randn(base.out_features, rank, generator=g) / 4)

    def forward(self, x):
        return super().forward(x) + x @ self.a.t() @ self.b.t()


def _lora(blocks) -> None:
    for blk in blocks:
        blk.attn.qkv = LoRALinear(blk.attn.qkv).requires_grad_(False)


@pytest.mark.parametrize("after", [False, True], ids=["before", "after-wrapping"])
def test_prompt_keys_go_through_a_qkv_with_a_forward_of_its_own(after):
    model = tiny_vit()
    if not after:
        _lora(model.blocks)
    prompted = fastprompt.vpt(model, num_prompts=3, deep=True).eval()
    if after:
        _lora(prompted.blocks)
    assert_matches_naive(prompted, images())


def test_a_hook_on_qkv_reaches_the_prompt_keys_too():
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()
    for blk in prompted.blocks:
        blk.attn.qkv.register_forward_hook(lambda _m, _i, out: out * 1.5)
    assert_matches_naive(prompted, images())


def test_a_backward_hook_on_qkv_reaches_the_prompt_keys_too():
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()

    def doubled(_m, grad_in, _grad_out):
        return tuple(None if g is None else 2 * g for g in grad_in)

    for blk in prompted.blocks:
        blk.attn.qkv.register_full_backward_hook(doubled)
    assert_matches_naive(prompted, images())


def test_swin_prompt_keys_go_through_a_qkv_with_a_forward_of_its_own():
    model = tiny_swin()
    _lora(b for stage in model.layers for b in stage.blocks)
    assert_matches_official(fastprompt.vpt(model, num_prompts=2, deep=True).eval(), images(2))


def test_hooks_the_fused_path_skips_are_said_once_and_the_naive_path_runs_them():
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()
    seen = []
    prompted.blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with pytest.warns(UserWarning, match=r"hooks on blocks\.1 do not run"):
        prompted(images())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompted(images())  # said once
    assert seen == []
    prompted.impl = "naive"
    prompted(images())
    assert seen == [torch.Size([3, 1 + 16 + 3, 64])]


@pytest.mark.parametrize(
    "where", ["blocks", "attn", "model"], ids=["block-list", "attention", "wrapped-model"]
)
def test_a_hook_on_any_module_the_forward_computes_its_own_way_is_said(where):
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()
    module, name = {
        "blocks": (prompted.model.blocks, "blocks"),
        "attn": (prompted.blocks[0].attn, r"blocks\.0\.attn"),
        "model": (prompted.model, "the wrapped model"),
    }[where]
    module.register_forward_pre_hook(lambda _m, _i: None)
    with pytest.warns(UserWarning, match=f"hooks on {name} do not run"):
        prompted(images())


def test_swin_block_hooks_are_said_on_both_paths():
    for impl in ("fused", "naive"):
        prompted = fastprompt.vpt(tiny_swin(), num_prompts=2, deep=True, impl=impl).eval()
        prompted.model.layers[1].blocks[0].register_forward_hook(lambda *_: None)
        with pytest.warns(UserWarning, match=r"hooks on layers\.1\.blocks\.0 do"):
            prompted(images(2))


def test_observers_hooking_every_module_count_a_prompted_model():
    from fastprompt.bench import flops

    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert flops(prompted, images(1)) > 0
    prompted.blocks[1].register_forward_hook(lambda *_: None)  # a person's, after the count
    with pytest.warns(UserWarning, match=r"hooks on blocks\.1 do not run"):
        prompted(images(1))


def test_a_hooked_model_compiles_whole():
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()
    prompted.blocks[1].register_forward_hook(lambda *_: None)
    compiled = torch.compile(prompted, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(images()), prompted(images()))


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_compiled_with_dynamic_shapes_gives_the_eager_logits_and_prompt_gradients(make):
    """torch.compile(dynamic=True) traces a model's floats (the attention scale) symbolically:
    checking the scale's value there broke the graph."""
    prompted = fastprompt.vpt(make(), num_prompts=3, deep=True)
    compiled = torch.compile(prompted, fullgraph=True, dynamic=True, backend="eager")
    for batch in (2, 3):
        x = images(batch)
        got = compiled(x)
        (g_got,) = torch.autograd.grad(got.sum(), prompted.prompt_embeddings)
        expected = prompted(x)
        (g_expected,) = torch.autograd.grad(expected.sum(), prompted.prompt_embeddings)
        assert_close(got, expected, "logits", atol=1e-5, rtol=1e-5)
        assert_close(g_got, g_expected, "prompt gradient", atol=1e-5, rtol=1e-5)


class DoubledBlock(Block):
    def forward(self, x, **kwargs):
        return super().forward(x) * 2


def test_a_block_replaced_after_wrapping_is_checked_again():
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()
    new = DoubledBlock(64, 4, qkv_bias=True)
    new.load_state_dict(prompted.blocks[1].state_dict())
    prompted.blocks[1] = new.requires_grad_(False)
    for _ in range(2):  # refused at every forward, not only at the first
        with pytest.raises(TypeError, match="block 1 is DoubledBlock"):
            prompted(images())
    prompted.impl = "naive"
    assert_matches_naive(prompted, images())


@pytest.mark.parametrize("change", ["truncated", "appended"])
def test_blocks_added_or_removed_after_wrapping_are_refused(change):
    model = tiny_vit()
    prompted = fastprompt.vpt(model, num_prompts=3, deep=True).eval()
    if change == "truncated":
        model.blocks = model.blocks[:2]
    else:
        model.blocks.append(Block(64, 4))
    count = 2 if change == "truncated" else 4
    with pytest.raises(ValueError, match=rf"blocks per stage are now \[{count}\].*with \[3\]"):
        prompted(images())


def test_a_swin_block_replaced_by_another_kind_is_refused():
    prompted = fastprompt.vpt(tiny_swin(), num_prompts=2, deep=True).eval()
    prompted.model.layers[0].blocks[1] = Block(16, 2)
    with pytest.raises(TypeError, match="block 1 of stage 0 is Block"):
        prompted(images(2))


def test_timm_reads_the_wrapped_models_config_through_the_wrapper():
    import timm

    model = timm.create_model(
        "vit_base_patch16_clip_224.openai",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )
    prompted = fastprompt.vpt(model, num_prompts=2)
    config = timm.data.resolve_data_config(model=prompted)
    assert config == timm.data.resolve_data_config(model=model)
    assert config["mean"] == timm.data.OPENAI_CLIP_MEAN  # not timm's ImageNet default
    assert timm.data.resolve_model_data_config(prompted) == config
    assert prompted.default_cfg == model.pretrained_cfg
    assert (prompted.num_classes, prompted.num_features) == (5, 32)
    assert prompted.get_classifier() is model.get_classifier()
    prompted.reset_classifier(7)
    assert prompted.num_classes == 7 and prompted.get_classifier().out_features == 7
    assert prompted(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert prompted.feature_info == model.feature_info  # forward_intermediates: its own tests


def test_a_memory_policy_the_changed_blocks_no_longer_offer_is_refused():
    """memory='mlp' recomputes timm's MLP from its layers: a block replaced by one with its own
    forward ran as timm's Block under it (off by 2.8), the re-check notwithstanding."""
    prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True, impl="naive").eval()
    prompted.memory = "mlp"
    new = DoubledBlock(64, 4, qkv_bias=True)
    new.load_state_dict(prompted.blocks[1].state_dict())
    prompted.blocks[1] = new.requires_grad_(False)
    for _ in range(2):  # refused at every forward, not only at the first
        with pytest.raises(ValueError, match=r"memory='mlp' no longer applies"):
            prompted(images())
    prompted.memory = "none"
    assert_matches_naive(prompted, images())


def test_swin_pooling_arguments_of_reset_classifier_pass_through():
    prompted = fastprompt.vpt(tiny_swin(), num_prompts=2, deep=True).eval()
    prompted.reset_classifier(7, global_pool="max")  # the readout stays the wrapper's
    assert prompted(images(2)).shape == (2, 7)


@pytest.mark.parametrize("memory", ["none", "block"])
def test_the_hook_warning_points_at_the_forward_call(memory):
    """Not at a line inside fastprompt, however deep the block runs (a memory policy's
    recomputation, forward_intermediates)."""
    for call in ("forward", "forward_intermediates"):
        prompted = fastprompt.vpt(tiny_vit(), num_prompts=3, deep=True).eval()
        prompted.memory = memory
        prompted.blocks[1].register_forward_hook(lambda *_: None)
        x = images().requires_grad_(memory == "block")
        with pytest.warns(UserWarning, match=r"hooks on blocks\.1 do not run") as said:
            line = inspect.currentframe().f_lineno + 1
            prompted(x) if call == "forward" else prompted.forward_intermediates(x)
        assert (said[0].filename, said[0].lineno) == (__file__, line), call
