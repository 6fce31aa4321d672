"""PGN generators: the official ResNet-10's architecture and size, ResNet-18, inputs, BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastprompt.sources.generators import (
    GENERATORS,
    ResNet10Generator,
    ResNet18Generator,
    build_generator,
    generator_input,
)


def official_resnet10_count(widths=(16, 32, 64, 128), out=4096, in_chans=3, blocks=1):
    """Parameters of the official ResNet-10, counted layer by layer from its description.

    Stem: 3×3 conv without bias + BN. Per block: two 3×3 convs without bias + two BNs; the first
    block of every stage after the first adds a 1×1 conv with bias (no BN). Head: Linear.
    """
    n = 9 * in_chans * widths[0] + 2 * widths[0]
    c_in = widths[0]
    for stage, w in enumerate(widths):
        for i in range(blocks):
            n += 9 * c_in * w + 9 * w * w + 4 * w
            if stage > 0 and i == 0:
                n += c_in * w + w
            c_in = w
    return n + widths[-1] * out + out


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet10_parameter_count_matches_official():
    assert official_resnet10_count() == 835_696  # L·M = 16·256, as DESIGN.md says
    assert count(ResNet10Generator(16, 256)) == 835_696
    # The official released ViT/DINO checkpoints use a 128-token library.
    assert count(ResNet10Generator(16, 128)) == official_resnet10_count(out=2048) == 571_504
    # Max-pool has no parameters; a deeper variant still matches the layer-by-layer count.
    assert count(ResNet10Generator(16, 256, max_pool=False)) == 835_696
    g = ResNet10Generator(4, 8, widths=(8, 16, 32), blocks_per_stage=2)
    assert count(g) == official_resnet10_count((8, 16, 32), out=32, blocks=2)
    # Generator + a 256 × 768 library: the official CLIP ViT-B/32 PGN, about 1.03 M.
    assert count(ResNet10Generator(16, 256)) + 256 * 768 == 1_032_304


def test_resnet18_parameter_count():
    # torchvision's ResNet-18 without its fc (11,176,512) + a Linear 512 -> 4096.
    assert count(ResNet18Generator(16, 256)) == 11_176_512 + 512 * 4096 + 4096


def test_resnet10_architecture_and_init():
    torch.manual_seed(0)
    g = ResNet10Generator()
    conv, bn, _, pool = g.input_net
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1))
    assert conv.bias is None and isinstance(bn, nn.BatchNorm2d)
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride) == (3, 2)
    assert len(ResNet10Generator(max_pool=False).input_net) == 3
    assert [b.net[3].out_channels for b in g.blocks] == [16, 32, 64, 128]
    assert g.blocks[0].downsample is None
    for b in g.blocks[1:]:
        sc = b.downsample
        assert isinstance(sc, nn.Conv2d) and sc.kernel_size == (1, 1) and sc.stride == (2, 2)
        assert sc.bias is not None
        assert b.net[0].stride == (2, 2) and b.net[0].bias is None and b.net[3].bias is None
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 9  # stem + 2 per block; none in the shortcuts
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)
    # kaiming normal, fan-out, ReLU gain: std = sqrt(2 / (out_channels · k²)).
    w = g.blocks[3].net[3].weight
    assert abs(w.std().item() / (2 / (128 * 9)) ** 0.5 - 1) < 0.03
    assert abs(w.mean().item()) < 3e-3
    fc = g.output_net[-1]
    assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (128, 16 * 256)


def test_state_dict_keys_follow_the_official_code():
    """The released PGN checkpoints (keys under ``model.``) load without renaming."""
    keys = set(ResNet10Generator(16, 256).state_dict())
    for k in (
        "input_net.0.weight",
        "input_net.1.running_var",
        "blocks.0.net.0.weight",
        "blocks.0.net.4.bias",
        "blocks.3.net.3.weight",
        "blocks.3.downsample.weight",
        "blocks.3.downsample.bias",
        "output_net.2.weight",
    ):
        assert k in keys
    assert "blocks.0.downsample.weight" not in keys
    r18 = set(ResNet18Generator(2, 4).state_dict())
    assert {"conv1.weight", "layer4.1.bn2.running_mean", "fc.weight", "fc.bias"} <= r18
    tv = pytest.importorskip("torchvision.models")
    assert r18 == set(tv.resnet18(weights=None).state_dict())


@pytest.mark.parametrize("name", GENERATORS)
def test_output_shape(name):
    g = build_generator(name, num_prompts=3, library_size=5).eval()
    with torch.no_grad():
        assert g(torch.randn(2, 3, 64, 64)).shape == (2, 3, 5)
        assert g(torch.randn(1, 3, 40, 72)).shape == (1, 3, 5)


def test_resnet10_output_at_224_and_gradients():
    g = ResNet10Generator(16, 256).train()
    out = g(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 16, 256)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_min_input_size():
    assert ResNet10Generator().min_input_size == 32
    assert ResNet10Generator(max_pool=False).min_input_size == 16
    assert ResNet18Generator(2, 2).min_input_size == 32
    g = ResNet10Generator(2, 4).eval()
    assert g(torch.randn(1, 3, 32, 32)).shape == (1, 2, 4)
    with pytest.raises(ValueError, match=r"images are 31x64.*minimum input size 32x32"):
        g(torch.randn(1, 3, 31, 64))
    assert ResNet10Generator(2, 4, max_pool=False).eval()(torch.randn(1, 3, 16, 16)).shape[0] == 1


def test_train_mode_batch_of_one_at_minimum_size_is_refused():
    g = ResNet10Generator(2, 4).train()
    with pytest.raises(ValueError, match="BatchNorm needs more than one value per channel"):
        g(torch.randn(1, 3, 32, 32))
    assert g(torch.randn(2, 3, 32, 32)).shape == (2, 2, 4)
    assert g(torch.randn(1, 3, 64, 64)).shape == (1, 2, 4)  # 2×2 last map


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(3, 64, 64), r"\(B, C, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating point"),
        (torch.randn(1, 1, 64, 64), "3 channels"),
        ("image", r"\(B, C, H, W\)"),
    ],
)
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        ResNet10Generator(2, 4).eval()(bad)


@pytest.mark.parametrize("arg", ["num_prompts", "library_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, None])
def test_bad_sizes(arg, value):
    kw = {"num_prompts": 4, "library_size": 8, arg: value}
    with pytest.raises(ValueError, match=arg):
        build_generator("resnet10", **kw)
    with pytest.raises(ValueError, match=arg):
        ResNet18Generator(**kw)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match=r"unknown generator 'resnet50'.*resnet10"):
        build_generator("resnet50", 4, 8)
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator(None, 4, 8)
    with pytest.raises(TypeError, match="bad options for 'resnet18'"):
        build_generator("resnet18", 4, 8, widths=(8,))
    with pytest.raises(ValueError, match="widths"):
        ResNet10Generator(4, 8, widths=())
    with pytest.raises(ValueError, match="widths"):
        ResNet10Generator(4, 8, widths=(16, 0))
    with pytest.raises(ValueError, match="blocks_per_stage"):
        ResNet10Generator(4, 8, blocks_per_stage=0)


def test_factory_passes_options():
    g = build_generator("resnet10", 4, 8, widths=(8, 16), max_pool=False)
    assert isinstance(g, ResNet10Generator) and g.widths == (8, 16) and not g.max_pool
    assert isinstance(build_generator("resnet18", 4, 8), ResNet18Generator)


@pytest.mark.parametrize("name", GENERATORS)
def test_batchnorm_train_uses_batch_statistics_and_updates_running_stats(name):
    torch.manual_seed(0)
    g = build_generator(name, 2, 4).train()
    x = torch.randn(4, 3, 64, 64)
    bn = next(m for m in g.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with torch.no_grad():
        full = g(x)
        part = g(x[:2])
    assert bn.num_batches_tracked.item() == 2
    assert not torch.equal(bn.running_mean, before)
    # Batch statistics: an image's logits depend on the other images of its batch.
    assert not torch.allclose(full[:2], part, atol=1e-4)


@pytest.mark.parametrize("name", GENERATORS)
def test_batchnorm_eval_is_per_image_and_frozen(name):
    torch.manual_seed(0)
    g = build_generator(name, 2, 4)
    with torch.no_grad():
        g.train()(torch.randn(4, 3, 64, 64))  # move the running stats off their init
        g.eval()
        buffers = [b.clone() for b in g.buffers()]
        x = torch.randn(3, 3, 64, 64)
        full = g(x)
        single = torch.cat([g(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(buffers, g.buffers()))


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = ResNet10Generator(4, 8)
    torch.manual_seed(3)
    b = ResNet10Generator(4, 8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "shape", [(2, 3, 224, 224), (2, 3, 32, 32), (1, 3, 300, 200), (1, 3, 50, 90)]
)
def test_generator_input_matches_torchvision_resize(shape):
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.randn(*shape)
    ours = generator_input(x, 224)
    ref = tf.resize(x, 224, antialias=False)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_generator_input_identity_and_errors():
    x = torch.randn(1, 3, 224, 224)
    assert generator_input(x, 224) is x
    assert generator_input(x, (64, 32)).shape == (1, 3, 64, 32)
    for bad in (0, -3, (224,), (224, 0), 2.5, True):
        with pytest.raises(ValueError, match="resolution"):
            generator_input(x, bad)
    with pytest.raises(ValueError, match="images"):
        generator_input(torch.zeros(1, 3, 8, 8, dtype=torch.long), 16)
