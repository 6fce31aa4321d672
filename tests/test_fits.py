"""What fits in memory (``docs/design.md`` §4, "Memory"; ``fastprompt bench --fits``).

The per-token formula of what each variant keeps for backward is checked against the bytes
autograd saves on tiny models; the largest-batch estimate, measured on shallow copies and small
batches and scaled, against a step measured at the model's own depth and a larger batch. Nothing
is timed.
"""

from __future__ import annotations

import pytest
import timm
import torch

import fastprompt
from fastprompt import fits
from fastprompt.bench import activation_bytes

_KW = {"img_size": 32, "embed_dim": 64, "num_heads": 2}
_NAME = "vit_tiny_patch16_224"


def _saved(variant, depth, batch, prompts, **kw):
    torch.manual_seed(0)
    model = timm.create_model(_NAME, pretrained=False, depth=depth, num_classes=10, **kw).eval()
    x = torch.randn(batch, 3, kw["img_size"], kw["img_size"])
    prompted, impl, policy = fits.FIT_VARIANTS[variant]
    if not prompted:
        for p in model.parameters():
            p.requires_grad_(True)
        return activation_bytes(lambda: model(x), list(model.parameters()))
    wrapped = fastprompt.vpt(model, prompts, impl=impl, readout="cls").train()
    wrapped.memory = policy
    return activation_bytes(lambda: wrapped(x), list(wrapped.parameters()))


@pytest.mark.parametrize("img_size, width, heads", [(32, 64, 2), (48, 96, 4)])
@pytest.mark.parametrize("variant", list(fits.SAVED_PER_TOKEN))
def test_the_formula_gives_the_bytes_saved_per_image_per_block(variant, img_size, width, heads):
    kw = {"img_size": img_size, "embed_dim": width, "num_heads": heads}
    prompts, tokens = 4, 1 + (img_size // 16) ** 2

    def per_image(depth):
        return _saved(variant, depth, 2, prompts, **kw) - _saved(variant, depth, 1, prompts, **kw)

    measured = per_image(3) - per_image(2)  # one more block, one more image
    formula = fits.saved_bytes_per_image(variant, tokens, prompts, width, heads, 1)
    # Exact on the CPU; the bound leaves room for another version's attention saving its
    # statistics in another layout.
    assert 0.98 * formula <= measured <= 1.02 * formula, (variant, measured, formula)


def test_the_estimate_matches_a_step_measured_at_full_depth_and_a_larger_batch():
    kw = {**_KW, "depth": 5}
    prompts, batch = 4, 16
    # Batches large enough that activations, not a weight's gradient, make the peak (as with
    # the large models the defaults are for).
    found = fits.estimate_fits([_NAME], [0.02], prompts=prompts, batches=(4, 8), model_kwargs=kw)
    measured = fits._measure(
        _NAME, 5, batch, prompts, list(fits.FIT_VARIANTS), torch.device("cpu"), _KW
    )
    for fit in found:
        got = fit.fixed_bytes + batch * fit.per_image_bytes
        want = measured[fit.variant]
        assert abs(got - want) <= 0.01 * want, (fit.variant, got, want)
        # The peak holds at least what autograd saves for backward.
        assert fit.per_image_bytes >= 0.95 * fit.saved_per_image, fit
        assert fit.total(batch) == (
            fit.weights_bytes + fit.state_bytes + max(want, fit.grads_bytes) + got - want
        )
    largest = {f.variant: f.batches[0.02] for f in found}
    order = ["naive VPT", "fastprompt", "fastprompt, mlp", "fastprompt, block"]
    assert [largest[v] for v in order] == sorted(largest[v] for v in order), largest
    for f in found:  # the largest batch fits and one more does not
        b = f.batches[0.02]
        assert b == 0 or f.total(b) <= 0.02 * 2**30 < f.total(b + 1)


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    def two_at_once():
        a = torch.ones(1000)  # 4000 bytes
        b = a + 1  # 4000 more, while a is alive
        del a
        c = b * 2  # a is gone: 8000 alive
        return c

    assert fits.peak_tensor_bytes(two_at_once, []) == 8000
    w = torch.ones(500)
    assert fits.peak_tensor_bytes(lambda: w.view(-1).add_(1), [w]) == 0  # excluded, in place


def test_bad_variants_and_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        fits.estimate_fits([_NAME], [1], variants=["lora"])
    with pytest.raises(ValueError, match="need 0 < d1 < d2"):
        fits.estimate_fits([_NAME], [1], depths=(3, 2))
    with pytest.raises(ValueError, match="prompts must be an int >= 1, got 0"):
        fits.estimate_fits([_NAME], [1], prompts=0)
    with pytest.raises(ValueError, match=r"budgets_gib must be > 0, got \[0\]"):
        fits.estimate_fits([_NAME], [0])


def test_the_formula_names_its_variants_when_given_another():
    with pytest.raises(ValueError, match=r"variant must be one of \['full fine-tuning', .*'naive'"):
        fits.saved_bytes_per_image("naive", 197, 200, 768, 12, 12)


def test_a_model_that_is_not_a_vit_is_refused_before_anything_is_measured():
    said = []
    with pytest.raises(ValueError, match="SwinTransformer, not a ViT with one stack of blocks"):
        fits.estimate_fits([_NAME, "swin_tiny_patch4_window7_224"], [1], progress=said.append)
    assert said == []
    assert fits.model_shape(_NAME, _KW)[1:] == (12, 64, 2, 5)
