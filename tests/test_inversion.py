"""Prompt inversion (tokens <-> pixel patches), the row layout and the pixel-only deployment."""

from __future__ import annotations

import pytest
import torch
from helpers import images as make_images
from helpers import tiny_vit
from torch import nn

from fastprompt.deployment import deployment_forward, deployment_tokens, pixel_space_vit
from fastprompt.inversion import (
    append_prompt_rows,
    invert_tokens,
    out_of_range_fraction,
    patch_embedding,
    patches_to_tokens,
    prompt_rows,
    split_prompt_rows,
    to_rgb,
    tokens_to_patches,
)

HALF = (0.5, 0.5, 0.5)  # mean = std = 0.5: valid normalised pixels lie in [-1, 1]


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def latent_logits(model, images, prompts):
    """The latent-space PGN forward, written out: prompts appended after the patches, after
    ``_pos_embed``, before ``norm_pre``, then the unmodified model's blocks and head."""
    x = model._pos_embed(model.patch_embed(images))
    x = torch.cat([x, prompts], dim=1)
    x = model.norm(model.blocks(model.norm_pre(x)))
    return model.forward_head(x)


# --- the linear maps -----------------------------------------------------------------------------


def test_forward_map_matches_the_models_patch_embedding():
    model = tiny_vit().eval()
    patches = randn(2, 16, 3, 8, 8)
    # A 32×32 image whose 16 patches (row-major) are `patches`.
    img = patches.view(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
    torch.testing.assert_close(patches_to_tokens(patches, model), model.patch_embed(img))
    # The same row-major order as the prompt rows: below an 8-high strip, 16 prompts = 4 rows.
    split = split_prompt_rows(torch.cat([torch.zeros(2, 3, 8, 32), img], 2), 8, 16, 8)[1]
    torch.testing.assert_close(split, patches)


def test_round_trip_exact_when_patches_are_wider_than_tokens():
    model = tiny_vit().eval()  # K = 3·8·8 = 192 >= D = 64
    tokens = randn(2, 5, 64, scale=0.5)
    inv = invert_tokens(tokens, model)
    r = inv.report
    assert (r.exact, r.rank, r.embed_dim, r.patch_dim) == (True, 64, 64, 192)
    assert inv.patches.shape == (2, 5, 3, 8, 8) and inv.patches.dtype == torch.float32
    assert r.relative_error < 2e-6 and r.max_abs_error < 1e-5
    assert r.out_of_range is None  # no mean/std known for a bare VisionTransformer
    torch.testing.assert_close(patches_to_tokens(inv.patches, model), tokens, atol=1e-5, rtol=0)
    # In float64 the round trip is exact to float64 error.
    model64 = tiny_vit().double().eval()
    r64 = invert_tokens(tokens.double(), model64).report
    assert r64.relative_error < 1e-13


def test_round_trip_exact_in_the_square_case():
    model = tiny_vit(patch_size=4, embed_dim=48).eval()  # K = 48 = D (ViT-B/16's situation)
    r = invert_tokens(randn(1, 3, 48), model).report
    assert r.exact and r.rank == 48 and r.relative_error < 1e-5


def test_least_squares_when_patches_are_narrower_than_tokens():
    model = tiny_vit(patch_size=4, embed_dim=64).eval()  # K = 48 < D = 64 (ViT-L/16's situation)
    emb = patch_embedding(model)
    tokens = randn(3, 4, 64)
    inv = invert_tokens(tokens, emb)
    r = inv.report
    assert not r.exact and r.rank == 48 and r.patch_dim == 48
    # Isotropic tokens lose about the (D - K)/D share of their energy: sqrt(16/64) = 0.5.
    assert 0.3 < r.relative_error < 0.7
    # It is the least-squares patch: the residual is orthogonal to W's range ...
    w = emb.weight.double()
    rhs = tokens.double() - emb.bias.double()
    resid = rhs - inv.patches.double().flatten(-3) @ w.mT
    assert (resid @ w).abs().max() < 1e-4
    # ... and the unique minimiser (W has full column rank).
    ref = torch.linalg.lstsq(w, rhs.reshape(-1, 64).mT).solution.mT.reshape(3, 4, 48)
    torch.testing.assert_close(inv.patches.flatten(-3), ref.float(), atol=1e-5, rtol=1e-5)


def test_rank_deficient_embedding_is_not_exact():
    model = tiny_vit().eval()
    with torch.no_grad():
        model.patch_embed.proj.weight[:8] = 0  # 8 output channels see nothing: rank 56 < 64
    r = invert_tokens(randn(1, 3, 64), model).report
    assert not r.exact and r.rank == 56 and r.condition_number == float("inf")
    assert r.relative_error > 0.1


def test_positional_embedding_of_the_slot_is_subtracted():
    model = tiny_vit().eval()
    tokens, pos = randn(2, 4, 64), randn(4, 64, seed=1)
    with_pos = tokens_to_patches(tokens, model, pos=pos)
    torch.testing.assert_close(with_pos, tokens_to_patches(tokens - pos, model))
    torch.testing.assert_close(
        patches_to_tokens(with_pos, model, pos=pos), tokens, atol=1e-5, rtol=0
    )
    per_image = randn(2, 4, 64, seed=2)
    r = invert_tokens(tokens, model, pos=per_image).report
    assert r.relative_error < 2e-6


def test_out_of_range_fraction():
    x = torch.zeros(2, 4, 3, 2, 2)
    assert out_of_range_fraction(x, HALF, HALF) == 0.0
    x[0] = 1.5  # half the values beyond (1 - 0.5) / 0.5 = 1
    assert out_of_range_fraction(x, HALF, HALF) == 0.5
    x[1, 0, 0] = -1.01
    assert out_of_range_fraction(x, HALF, HALF) == 0.5 + 4 / 96
    # Per channel: ImageNet statistics give channel-specific bounds.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = torch.zeros(1, 3, 1, 1)
    y[0, 2] = (1 - 0.406) / 0.225 + 1e-3
    assert out_of_range_fraction(y, mean, std) == pytest.approx(1 / 3)
    torch.testing.assert_close(
        to_rgb(torch.zeros(1, 3, 1, 1), mean, std).flatten(), torch.tensor(mean)
    )


def test_report_range_from_arguments_and_from_pretrained_cfg():
    model = tiny_vit().eval()
    tokens = randn(2, 6, 64, scale=1.0)
    r = invert_tokens(tokens, model, mean=HALF, std=HALF).report
    assert 0.0 < r.out_of_range < 1.0 and r.clipped_relative_error > r.relative_error
    timm = pytest.importorskip("timm")
    cfg_model = timm.create_model(
        "vit_base_patch32_224", pretrained=False, img_size=64, embed_dim=64, depth=1, num_heads=2
    )
    assert invert_tokens(randn(1, 2, 64), cfg_model).report.out_of_range is not None
    with pytest.raises(ValueError, match="both mean and std"):
        invert_tokens(tokens, model, mean=HALF)


def test_fit_range_keeps_the_round_trip_and_reduces_clamping_damage():
    model = tiny_vit().eval()
    tokens = randn(2, 6, 64, scale=0.3)
    plain = invert_tokens(tokens, model, mean=HALF, std=HALF).report
    fitted = invert_tokens(tokens, model, mean=HALF, std=HALF, fit_range=True)
    assert plain.out_of_range > 0
    assert fitted.report.out_of_range == 0.0
    assert fitted.report.relative_error < 2e-6
    assert fitted.report.clipped_relative_error < 1e-5 < plain.clipped_relative_error
    with pytest.raises(ValueError, match="needs mean and std"):
        invert_tokens(tokens, model, fit_range=True)
    narrow = tiny_vit(patch_size=4, embed_dim=48).eval()  # K = D: no freedom
    with pytest.raises(ValueError, match="K > D"):
        invert_tokens(randn(1, 2, 48), narrow, mean=HALF, std=HALF, fit_range=True)


def test_patch_embed_norm_is_refused():
    model = tiny_vit()
    model.patch_embed.norm = nn.LayerNorm(64)
    with pytest.raises(ValueError, match=r"patch_embed.norm is LayerNorm.*not linear"):
        patch_embedding(model)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(m.patch_embed, "proj", nn.Linear(3, 64)), "must be an nn.Conv2d"),
        (
            lambda m: setattr(m.patch_embed, "proj", nn.Conv2d(3, 64, 8, stride=4)),
            "kernel = stride",
        ),
        (lambda m: setattr(m.patch_embed, "proj", nn.Conv2d(3, 64, 4, stride=4)), "patch_size"),
    ],
)
def test_non_linear_or_odd_patch_embeddings_are_refused(mutate, match):
    model = tiny_vit()
    mutate(model)
    with pytest.raises(ValueError, match=match):
        patch_embedding(model)


def test_bad_tokens_and_pos():
    model = tiny_vit()
    with pytest.raises(ValueError, match="width 32, the patch embedding 64"):
        tokens_to_patches(randn(1, 2, 32), model)
    with pytest.raises(ValueError, match="floating"):
        tokens_to_patches(torch.zeros(1, 2, 64, dtype=torch.long), model)
    with pytest.raises(ValueError, match="does not broadcast"):
        tokens_to_patches(randn(1, 2, 64), model, pos=randn(3, 64))
    with pytest.raises(ValueError, match="patches must be"):
        patches_to_tokens(randn(1, 2, 3, 4, 4), model)


# --- the row layout ------------------------------------------------------------------------------


def test_prompt_rows_layout():
    vit_b32 = prompt_rows(14, 224, 32)
    assert (vit_b32.per_row, vit_b32.rows, vit_b32.padding, vit_b32.tall_size) == (
        7,
        2,
        0,
        (288, 224),
    )
    sixteen = prompt_rows(16, 224, 32)
    assert (sixteen.rows, sixteen.padding, sixteen.tall_size) == (3, 5, (320, 224))
    assert prompt_rows(1, (32, 64), (8, 16)).per_row == 4
    with pytest.raises(ValueError, match="num_prompts"):
        prompt_rows(0, 224, 32)
    with pytest.raises(ValueError, match="does not tile"):
        prompt_rows(4, 230, 32)
    with pytest.raises(ValueError, match="patch_size"):
        prompt_rows(4, 224, 0)


def test_prompt_rows_take_any_integer_type():
    """numpy's ints and 0-d integer tensors, as everywhere else in fastprompt (a sweep over
    ``np.arange``); bools and floats are refused."""
    import numpy as np

    want = prompt_rows(16, 224, 32)
    assert prompt_rows(np.int64(16), np.int32(224), torch.tensor(32)) == want
    assert prompt_rows(16, (np.int64(224), 224), [32, np.int16(32)]) == want
    assert type(prompt_rows(np.int64(16), 224, 32).num_prompts) is int
    for bad in [True, 16.0, torch.tensor([16])]:
        with pytest.raises(ValueError, match="num_prompts must be an int >= 1"):
            prompt_rows(bad, 224, 32)
    with pytest.raises(ValueError, match="image_size"):
        prompt_rows(4, 224.0, 32)
    images, patches = split_prompt_rows(
        torch.zeros(1, 3, 320, 224), np.int64(224), np.int64(16), 32
    )
    assert images.shape[-2] == 224 and patches.shape[1] == 16


@pytest.mark.parametrize("num_prompts", [8, 6])
def test_append_and_split_prompt_rows(num_prompts):
    imgs = make_images(2)
    patches = randn(2, num_prompts, 3, 8, 8, seed=3)
    tall = append_prompt_rows(imgs, patches, pad_value=-7.0)
    assert tall.shape == (2, 3, 32 + 2 * 8, 32)
    torch.testing.assert_close(tall[:, :, :32], imgs)
    for i in range(num_prompts):
        r, c = divmod(i, 4)
        block = tall[:, :, 32 + 8 * r : 40 + 8 * r, 8 * c : 8 * c + 8]
        torch.testing.assert_close(block, patches[:, i])
    if num_prompts == 6:  # slots 6 and 7 of the second row are padding
        assert bool((tall[:, :, 40:, 16:] == -7.0).all())
    back_imgs, back_patches = split_prompt_rows(tall, 32, num_prompts, 8)
    torch.testing.assert_close(back_imgs, imgs)
    torch.testing.assert_close(back_patches, patches)


def test_append_prompt_rows_bad_input():
    imgs = make_images(2)
    with pytest.raises(ValueError, match="batch size or channels"):
        append_prompt_rows(imgs, randn(3, 4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"patches must be \(B, L, C, p_h, p_w\)"):
        append_prompt_rows(imgs, randn(2, 4, 3, 8))
    with pytest.raises(ValueError, match="does not tile"):
        append_prompt_rows(imgs, randn(2, 4, 3, 8, 6))
    with pytest.raises(ValueError, match="needs 48"):
        split_prompt_rows(torch.zeros(1, 3, 40, 32), 32, 8, 8)


# --- deployment ----------------------------------------------------------------------------------

VARIANTS = {
    "cls": {},
    "pre_norm": {"pre_norm": True},  # CLIP-style: norm_pre = LayerNorm, bias-free patch embed
    "avg_no_cls": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True, "reg_tokens": 1},
    "dynamic_img_size": {"dynamic_img_size": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_pos", [False, True])
def test_deployment_equals_latent_model(variant, with_pos):
    from fastprompt.deployment import resamples_from_grid

    if variant == "dynamic_img_size" and not resamples_from_grid():
        pytest.skip("this timm resamples a dynamic-size pos_embed as a square grid")
    model = tiny_vit(**VARIANTS[variant]).double().eval()
    imgs = make_images(2).double()
    num_prompts = 8  # two full rows of 4
    prompts = randn(2, num_prompts, 64, seed=4, scale=0.5, dtype=torch.float64)
    pos = randn(num_prompts, 64, seed=5, scale=0.1, dtype=torch.float64) if with_pos else None
    inv = invert_tokens(prompts, model, pos=pos)
    assert inv.report.relative_error < 1e-12
    tall = append_prompt_rows(imgs, inv.patches)
    with torch.no_grad():
        want = latent_logits(model, imgs, prompts)
        got = deployment_forward(model, tall, num_prompts, prompt_pos=pos)
        plain = pixel_space_vit(model, num_prompts, prompt_pos=pos)
        got_plain = plain(tall)  # an ordinary timm forward on pixels only
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_plain, want, atol=1e-10, rtol=1e-10)
    assert plain.patch_embed.img_size == (48, 32) and model.patch_embed.img_size == (32, 32)


def test_deployment_drops_the_padding_of_an_incomplete_row():
    model = tiny_vit().double().eval()
    imgs = make_images(3).double()
    prompts = randn(3, 6, 64, seed=6, scale=0.5, dtype=torch.float64)
    tall = append_prompt_rows(imgs, invert_tokens(prompts, model).patches, pad_value=3.0)
    with torch.no_grad():
        torch.testing.assert_close(
            deployment_forward(model, tall, 6), latent_logits(model, imgs, prompts)
        )
    with pytest.raises(ValueError, match=r"2 empty slot.*multiple of 4"):
        pixel_space_vit(model, 6)


def test_deployment_tokens_layout():
    model = tiny_vit(reg_tokens=2).eval()
    imgs = make_images(2)
    prompts = randn(2, 4, 64, seed=7, scale=0.5)
    tall = append_prompt_rows(imgs, invert_tokens(prompts, model).patches)
    tokens = deployment_tokens(model, tall, 4)
    assert tokens.shape == (2, 3 + 16 + 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(tokens[:, :19], model._pos_embed(model.patch_embed(imgs)))
    torch.testing.assert_close(tokens[:, 19:], prompts, atol=1e-5, rtol=0)


def test_deployment_in_float32():
    model = tiny_vit(pre_norm=True).eval()
    imgs = make_images(2)
    prompts = randn(2, 4, 64, seed=8, scale=0.5)
    tall = append_prompt_rows(imgs, invert_tokens(prompts, model).patches)
    with torch.no_grad():
        want = latent_logits(model, imgs, prompts)
        torch.testing.assert_close(deployment_forward(model, tall, 4), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pixel_space_vit(model, 4)(tall), want, atol=1e-4, rtol=1e-4)


def test_timm_resampled_positional_embedding_is_not_exact():
    """timm's own route to a taller image resamples pos_embed: the image patches' embeddings
    change, so the logits differ from the latent model's. The extended table is the exact path."""
    model = tiny_vit(dynamic_img_size=True).double().eval()
    imgs = make_images(2).double()
    prompts = randn(2, 4, 64, seed=9, scale=0.5, dtype=torch.float64)
    tall = append_prompt_rows(imgs, invert_tokens(prompts, model).patches)
    with torch.no_grad():
        want = latent_logits(model, imgs, prompts)
        resampled = model(tall)  # dynamic_img_size: bicubic resampling of the 4×4 table to 6×4
        exact = deployment_forward(model, tall, 4)
    # Far above float64 error (the exact path agrees to ~1e-15); the size of the gap depends on
    # the table's magnitude (here timm's random init, std 0.02).
    assert (resampled - want).abs().max() > 1e-5
    assert (exact - want).abs().max() < 1e-10


def test_deployment_bad_input():
    model = tiny_vit().eval()
    tall = torch.zeros(1, 3, 40, 32)
    with pytest.raises(ValueError, match=r"tall_images must be \(B, 3, 48, 32\)"):
        deployment_forward(model, tall, 8)
    with pytest.raises(ValueError, match="num_prompts"):
        deployment_forward(model, tall, 0)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        deployment_forward(nn.Linear(2, 2), tall, 4)
    with pytest.raises(ValueError, match="prompt_pos must be"):
        deployment_forward(model, torch.zeros(1, 3, 40, 32), 4, prompt_pos=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="prompt_pos must be"):
        pixel_space_vit(model, 4, prompt_pos=torch.zeros(4, 32))
    with pytest.raises(ValueError, match="shared by all images"):
        pixel_space_vit(model, 4, prompt_pos=torch.zeros(2, 4, 64))
    normed = tiny_vit()
    normed.patch_embed.norm = nn.LayerNorm(64)
    with pytest.raises(ValueError, match="not linear"):
        pixel_space_vit(normed, 4)
