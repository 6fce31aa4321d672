"""Every ``vit_*`` / ``deit_*`` configuration in timm's registry, shrunk: it either matches the
naive VPT oracle (logits and gradients) or is refused with a reason.

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
    try:
        prompted = fastprompt.vpt(model, 3)
    except (TypeError, ValueError) as e:
        message = str(e)
        assert message.startswith("fastprompt.vpt: ") and len(message) > 40, message
        if "impl='naive'" not in message:
            return
        prompted = fastprompt.vpt(model, 3, impl="naive")
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    assert_matches_naive(prompted.train(), x)
