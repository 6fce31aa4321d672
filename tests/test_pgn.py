"""PGN against a plain computation on the unmodified timm model; IIP; checkpoints; inversion and
pixel deployment with the real PGN model; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, images, tiny_vit

import fastprompt
from fastprompt.sources.generators import generator_input

L, M = 4, 6


def _pgn(seed=0, model_kw=None, **kw):
    torch.manual_seed(seed)
    model = tiny_vit(**(model_kw or {}))
    kw = {"num_prompts": L, "library_size": M, "resolution": 32, **kw}
    return fastprompt.pgn(model, **kw)


def _plain_pgn(prompted, x):
    """Official PGN on the unmodified timm model, written out: generator → softmax → mix the
    library → append after the patches (after the positional embedding) → norm_pre → blocks."""
    m, src = prompted.model, prompted.source
    coeffs = src.generator(generator_input(x, prompted.config.resolution)).softmax(-1)
    prompts = coeffs @ src.library
    tokens = torch.cat([m._pos_embed(m.patch_embed(x)), prompts], dim=1)
    tokens = m.norm(m.blocks(m.norm_pre(tokens)))
    if prompted.readout == "cls":
        pooled = tokens[:, 0]
    else:
        pooled = tokens[:, m.num_prefix_tokens :].mean(1)
    return m.head(m.fc_norm(pooled))


CASES = {
    "cls": {},
    "pre-norm": dict(pre_norm=True),
    "no-class-token-avg": dict(class_token=False, global_pool="avg"),
    "registers": dict(reg_tokens=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_pgn_equals_the_plain_computation(case, batch):
    # At 32 pixels the generator's last map is 1×1: one image in train mode needs a larger input.
    prompted = _pgn(model_kw=CASES[case], resolution=32 if batch > 1 else 64).train()
    x = images(batch)
    params = list(prompted.trainable_parameters().values())
    names = list(prompted.trainable_parameters())
    assert {"library", "head.weight", "generator.output_net.2.weight"} <= set(names)
    state = {k: v.clone() for k, v in prompted.source.generator.state_dict().items()}
    got = prompted(x)
    g_got = torch.autograd.grad(got.square().sum(), params)
    prompted.source.generator.load_state_dict(state)  # BatchNorm running stats: as before
    expected = _plain_pgn(prompted, x)
    g_exp = torch.autograd.grad(expected.square().sum(), params)
    assert_close(got, expected, "logits", atol=2e-5, rtol=1e-5)
    for name, a, e in zip(names, g_got, g_exp):
        scale = e.abs().max().item() + 1e-12
        assert_close(a / scale, e / scale, f"grad {name}", atol=2e-5, rtol=1e-4)


def test_prompts_are_per_image_and_mixtures_sum_to_one():
    prompted = _pgn().eval()
    x = images(3)
    x[2] = x[0]
    with torch.no_grad():
        mix = prompted.source.mixture(x)
        prompts = prompted.source.prepare(x)
    assert mix.shape == (3, L, M)
    assert torch.allclose(mix.sum(-1), torch.ones(3, L))
    assert not torch.allclose(prompts[0], prompts[1])
    assert torch.equal(prompts[0], prompts[2])


def test_iip_equals_shallow_vpt_with_the_same_tokens():
    iip = _pgn(generator=None).eval()
    assert set(iip.trainable_parameters()) == {"prompt_vectors", "head.weight", "head.bias"}
    vpt = fastprompt.vpt(tiny_vit(), L, deep=False, head_init="keep").eval()
    with torch.no_grad():
        vpt.prompt_embeddings.copy_(iip.prompt_vectors.unsqueeze(0))
        vpt.head.load_state_dict(iip.head.state_dict())
        x = images(2)
        # Attention does not see where positional-embedding-free tokens sit: prompts after the
        # patches (IIP) or after the class token (VPT) give the same class-token output.
        assert_close(iip(x), vpt(x), "logits", atol=2e-5, rtol=1e-5)


def test_bn_trains_with_the_model_and_the_backbone_stays_in_eval():
    prompted = _pgn().train()
    assert prompted.source.generator.training and not prompted.model.training
    assert not any(m.training for m in prompted.model.modules())
    running = prompted.source.generator.input_net[1].running_mean.clone()
    prompted(images(2))
    assert not torch.equal(running, prompted.source.generator.input_net[1].running_mean)
    prompted.eval()
    assert not prompted.source.generator.training


def test_parameter_counts_of_the_official_configuration():
    gen = fastprompt.sources.generators.build_generator("resnet10", 16, 256)
    assert sum(p.numel() for p in gen.parameters()) == 835_696
    model = tiny_vit(embed_dim=768, num_heads=12, depth=1)
    prompted = fastprompt.pgn(model)
    head = sum(p.numel() for p in model.head.parameters())
    trainable = sum(p.numel() for p in prompted.trainable_parameters().values())
    assert trainable - head == 1_032_304  # generator + the 256 × 768 library


def test_checkpoint_round_trips_bit_exactly_and_methods_do_not_mix(tmp_path):
    prompted = _pgn(activation="sigmoid").train()
    prompted(images(2))  # move the BatchNorm statistics away from their init
    prompted.save_prompts(tmp_path / "pgn")
    loaded = fastprompt.load_prompts(tiny_vit(), tmp_path / "pgn")
    assert loaded.method == "pgn" and loaded.config == prompted.config
    for name, t in prompted.prompt_state().items():
        assert torch.equal(t, loaded.prompt_state()[name]), name
    prompted.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(prompted(images(2)), loaded(images(2)))
    fastprompt.vpt(tiny_vit(), 3).save_prompts(tmp_path / "vpt")
    with pytest.raises(ValueError, match="holds a 'vpt' model, not 'pgn'"):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "vpt", method="pgn")
    with pytest.raises(ValueError, match="holds a 'pgn' model, not 'vpt'"):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "pgn", method="vpt")


@pytest.mark.parametrize("num_prompts", [4, 8])
def test_pixel_deployment_equals_the_latent_model(num_prompts):
    """Tiny ViT: 3·8² = 192 ≥ D = 64, so the inversion is exact; 4 prompts fill a row."""
    prompted = _pgn(num_prompts=num_prompts).eval()
    x = images(2)
    shown = fastprompt.invert_prompts(prompted, x)
    assert shown.report.exact and shown.report.relative_error < 1e-5
    assert shown.images.shape == (2, 3, 32 + 8 * (num_prompts // 4), 32)
    assert shown.layout.per_row == 4 and shown.layout.padding == 0
    with torch.no_grad():
        latent = prompted(x)
        pixels = fastprompt.pixel_model(prompted)(shown.images)
        assert_close(pixels, latent, "pixel model vs latent", atol=1e-4, rtol=1e-4)
        assert_close(fastprompt.pixel_logits(prompted, shown.images), latent, "logits", atol=1e-4)


def test_pixel_deployment_with_an_incomplete_row_and_the_iip_baseline():
    prompted = _pgn(num_prompts=3).eval()
    x = images(2)
    shown = fastprompt.invert_prompts(prompted, x)
    assert shown.layout.padding == 1
    with pytest.raises(ValueError, match="empty slot"):
        fastprompt.pixel_model(prompted)
    with torch.no_grad():
        assert_close(
            fastprompt.pixel_logits(prompted, shown.images),
            prompted(x),
            "logits",
            atol=1e-4,
            rtol=1e-4,
        )
    iip = _pgn(generator=None).eval()
    shown = fastprompt.invert_prompts(iip, x)
    assert torch.equal(shown.patches[0], shown.patches[1])  # the same prompts for every image


def test_least_squares_inversion_says_so():
    """Patch 4: 3·4² = 48 < D = 64, the patch embedding cannot reach every token."""
    prompted = _pgn(model_kw=dict(patch_size=4)).eval()
    shown = fastprompt.invert_prompts(prompted, images(1))
    assert not shown.report.exact and shown.report.relative_error > 1e-3


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(library_size=0), ValueError, "library_size must be >= 1, got 0"),
        (dict(num_prompts=0), ValueError, "num_prompts must be >= 1, got 0"),
        (dict(num_prompts=2.0), TypeError, "num_prompts must be an int"),
        (dict(generator="vgg"), ValueError, "generator must be one of"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(resolution=16), ValueError, "resolution=16 is smaller than the resnet10"),
        (dict(head_init="zeros"), ValueError, "head_init must be one of"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, err, match):
    with pytest.raises(err, match=match):
        _pgn(**kwargs)


def test_numpy_integers_are_taken_as_counts():
    prompted = _pgn(num_prompts=np.int64(4), library_size=np.int32(8))
    assert type(prompted.config.num_prompts) is int and type(prompted.config.library_size) is int


def test_models_pgn_cannot_wrap_are_refused():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        fastprompt.pgn(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="global_pool='map'"):
        fastprompt.pgn(tiny_vit(global_pool="map"))
    with pytest.raises(TypeError, match=r"expected a model from fastprompt\.pgn"):
        fastprompt.invert_prompts(fastprompt.vpt(tiny_vit(), 2), images(1))


def test_invert_prompts_refuses_images_the_model_cannot_read():
    """16×16 images for a 32×32 model used to be inverted, their prompt rows laid out for the
    wrong width."""
    prompted = fastprompt.pgn(tiny_vit(), 4, 8, resolution=32).eval()
    with pytest.raises(ValueError, match=r"images must be 32×32, the model's input size, got"):
        fastprompt.invert_prompts(prompted, torch.randn(2, 3, 16, 16))
