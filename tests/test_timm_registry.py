"""Every ``vit_*`` / ``deit_*`` configuration in timm's registry, shrunk: it either matches the
naive VPT oracle (logits and gradients) or is refused with a reason; the models of
:data:`MUST_ACCEPT` must be wrapped, on the path named there.

A new timm release that changes a block, the attention or the embedding shows up here first.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from helpers import assert_matches_naive

import fastprompt

NAMES = sorted(set(timm.list_models("vit_*")) | set(timm.list_models("deit_*")))

# Models that must be accepted, one per variant fastprompt supports, and the path each runs:
# "fused" (keys/values of deep prompts), or "naive" where the block class is not timm's Block.
MUST_ACCEPT = {
    "vit_tiny_patch16_224": "fused",
    "vit_small_patch16_224": "fused",
    "vit_base_patch16_224": "fused",
    "vit_base_patch32_224": "fused",
    "deit_tiny_patch16_224": "fused",  # DeiT without distillation
    "vit_base_patch16_clip_224": "fused",  # norm_pre (CLIP's ln_pre)
    "vit_small_patch14_dinov2": "fused",  # layer scale
    "vit_small_patch14_reg4_dinov2": "fused",  # register tokens
    "vit_medium_patch16_gap_256": "fused",  # no class token, average pooling
    "vit_base_patch16_siglip_gap_224": "fused",  # no class token, average pooling, fc_norm
    "vit_base_r50_s16_224": "fused",  # a hybrid CNN stem
    "vit_small_r26_s32_224": "fused",
    "vit_base_patch16_rpn_224": "naive",  # ResPostBlock
    "vit_small_patch16_18x2_224": "naive",  # ParallelScalingBlock
    "vit_base_patch16_xp_224": "naive",  # ParallelThingsBlock
}

# Shrink each configuration; the second set keeps the widths for models whose architecture ties
# them together (hybrid CNN stems, per-block head counts).
SHRINK = (
    dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8),
    dict(depth=2),
)


def _tiny(name: str):
    for kw in SHRINK:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                return timm.create_model(name, pretrained=False, num_classes=3, **kw).eval()
        except Exception:
            continue
    return None


@pytest.mark.parametrize("name", NAMES)
def test_matches_naive_vpt_or_is_refused_with_its_reason(name):
    model = _tiny(name)
    if model is None:
        pytest.skip(f"{name}: no shrunk configuration of it can be built")
    if sum(p.numel() for p in model.parameters()) > 30e6:
        pytest.skip(f"{name}: the smallest buildable configuration is too large for a unit test")
    expected = MUST_ACCEPT.get(name)
    try:
        prompted = fastprompt.vpt(model, 3)
    except (TypeError, ValueError) as e:
        message = str(e)
        assert message.startswith("fastprompt.vpt: ") and len(message) > 40, message
        if "impl='naive'" not in message:
            assert expected is None, f"{name} must be accepted, got: {message}"
            return
        assert expected != "fused", f"{name} must run the fused path, got: {message}"
        prompted = fastprompt.vpt(model, 3, impl="naive")
    else:
        assert expected != "naive", f"{name} should be refused the fused path"
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    assert_matches_naive(prompted.train(), x)


def test_the_models_that_must_be_accepted_exist_in_this_timm():
    """The sweep checks them only if timm lists them; most must be there."""
    present = [n for n in MUST_ACCEPT if n in NAMES]
    assert len(present) >= 12, f"timm lists only {present} of the models that must be accepted"


# -- Swin: every swin* name (v1, S3, v2, v2-CR), shrunk ---------------------------------------

SWIN_NAMES = sorted(timm.list_models("swin*"))
# v1 models that must be accepted (fused path), and the families refused with their reason.
SWIN_MUST_ACCEPT = {
    "swin_tiny_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "swin_s3_tiny_224",
}
SWIN_REFUSED = {"swinv2_": "no official VPT code", "swinv2_cr_": "no official VPT code"}
SWIN_SHRINK = dict(
    img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2)
)


@pytest.mark.parametrize("name", SWIN_NAMES)
def test_swin_matches_the_official_vpt_swin_or_is_refused_with_its_reason(name):
    from swin_official import assert_matches_official

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=3, **SWIN_SHRINK)
        except Exception as e:  # a family that takes other arguments
            pytest.skip(f"{name}: no shrunk configuration ({type(e).__name__})")
    refused = next((why for prefix, why in SWIN_REFUSED.items() if name.startswith(prefix)), None)
    try:
        prompted = fastprompt.vpt(model.eval(), 3)
    except (TypeError, ValueError) as e:
        message = str(e)
        assert message.startswith("fastprompt.vpt: ") and len(message) > 40, message
        assert refused is not None and refused in message, f"{name}: {message}"
        return
    assert refused is None, f"{name} must be refused ({refused})"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_matches_official(prompted, x)


def test_the_swin_models_that_must_be_accepted_exist_in_this_timm():
    assert SWIN_MUST_ACCEPT <= set(SWIN_NAMES)


# Other families that attend within windows: no adapter, refused with the supported families.
OTHER_WINDOWED = [
    "maxvit_nano_rw_256",
    "nest_tiny",
    "twins_svt_small",
    "davit_tiny",
    "gcvit_xxtiny",
    "hiera_tiny_224",
    "mvitv2_tiny",
]


@pytest.mark.parametrize("name", OTHER_WINDOWED)
def test_other_windowed_families_are_refused_with_the_supported_ones(name):
    if name not in timm.list_models(name):
        pytest.skip(f"this timm has no {name}")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    with pytest.raises(TypeError, match=r"must be a timm VisionTransformer .*SwinTransformer"):
        fastprompt.vpt(model, 3)
