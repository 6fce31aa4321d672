"""Prompt Generation Network generators: small CNNs that map an image to mixture logits (B, L, M).

PGN (Loedeman et al.) gives every image its own L prompt tokens, each a mixture of the M tokens of
a learned library: ``prompts = act(logits) @ library`` with ``logits = generator(image)`` of shape
(B, L, M) and ``act`` a softmax over M (a sigmoid in the official code's option). This module holds
only the generators; the library, the mixing and the placement of the prompts in the ViT belong to
the PGN prompt source.

Two generators, both trained from scratch:

- ``"resnet10"`` (:class:`ResNet10Generator`): the official default. A 3×3 stride-2 stem (no bias)
  + BatchNorm + ReLU, a 3×3 stride-2 max-pool (on by default, as in the official training
  scripts), one basic block per stage at widths 16-32-64-128, every stage after the first halving
  the resolution in its first block with a biased 1×1 stride-2 convolution as the shortcut (no
  BatchNorm there), global average pooling and one Linear layer to L·M. Convolutions are
  initialised kaiming-normal (fan-out, ReLU gain), BatchNorm to (1, 0); the Linear layer and the
  shortcut biases keep PyTorch's default initialisation. 835,696 parameters for L·M = 4096.
- ``"resnet18"`` (:class:`ResNet18Generator`): torchvision's ResNet-18 with its ``fc`` replaced by a
  Linear layer to L·M (torchvision's own initialisation; the new ``fc`` PyTorch's default).

The generators are ordinary modules: BatchNorm uses batch statistics in ``train()`` mode and its
running statistics in ``eval()`` mode. The official code trains the generator in train mode and
evaluates it in eval mode (PyTorch Lightning's switching); a PGN wrapper must do the same while
keeping the frozen backbone in eval mode.

The official generator sees the same normalised image as the ViT, resized so its shorter side is
the generator's resolution (224 by default); :func:`generator_input` does that resize.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GENERATORS",
    "ResNet10Generator",
    "ResNet18Generator",
    "build_generator",
    "generator_input",
]

GENERATORS = ("resnet10", "resnet18")


def _check_count(value: object, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")
    return value


def _halve(size: int) -> int:
    # Every stride-2 layer of both generators (3×3/pad 1, 7×7/pad 3, 1×1/pad 0 convolutions and
    # the 3×3/pad 1 max-pool) maps n pixels to ceil(n / 2).
    return (size + 1) // 2


def _spans_processes(module: nn.Module) -> bool:
    """Whether every BatchNorm layer of ``module`` normalises the images of several processes
    (``processes()`` > 1: :class:`fastprompt.train.syncbn.SyncBatchNorm2d` under torchrun), so
    one image per process still gives each channel several values."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    spans = [getattr(m, "processes", None) for m in layers]
    return bool(layers) and all(f is not None and f() > 1 for f in spans)


class _Generator(nn.Module):
    """Shared input checks and the (B, L·M) -> (B, L, M) reshape."""

    num_prompts: int
    library_size: int
    in_chans: int
    _halvings: int

    @property
    def min_input_size(self) -> int:
        """Smallest image side accepted: the generator's total stride.

        Below it, stride-2 layers run on 1-pixel maps made mostly of zero padding and the
        spatial hierarchy collapses; such images are refused rather than silently degraded.
        """
        return 2**self._halvings

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the last feature map (before average pooling) for a given input."""
        for _ in range(self._halvings):
            height, width = _halve(height), _halve(width)
        return height, width

    def _check_images(self, images: object) -> None:
        who = type(self).__name__
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{who}: images must be a (B, C, H, W) tensor, got {got}")
        if not images.is_floating_point():
            raise ValueError(f"{who}: images must be floating point, got {images.dtype}")
        b, c, h, w = images.shape
        if c != self.in_chans:
            raise ValueError(
                f"{who}: images must have {self.in_chans} channels, got shape {tuple(images.shape)}"
            )
        m = self.min_input_size
        if h < m or w < m:
            raise ValueError(
                f"{who}: images are {h}x{w}, smaller than the generator's minimum input size "
                f"{m}x{m} (its total stride); resize them to the generator's resolution first "
                "(generator_input; the official PGN resizes every image to 224)"
            )
        if self.training:
            fh, fw = self.feature_size(h, w)
            if b * fh * fw < 2 and not _spans_processes(self):
                raise ValueError(
                    f"{who}: in train mode BatchNorm needs more than one value per channel, but "
                    f"images of shape {tuple(images.shape)} leave a {fh}x{fw} last feature map "
                    "for one image; use a batch of at least 2 images, larger images, or eval()"
                )

    def _features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Mixture logits for each image.

        Parameters
        ----------
        images : Tensor
            (B, C, H, W) floating point, H and W at least :attr:`min_input_size`.

        Returns
        -------
        Tensor
            (B, L, M) logits, L = ``num_prompts``, M = ``library_size``; the PGN source applies
            the softmax over M.
        """
        self._check_images(images)
        logits = self._features(images)
        return logits.view(images.shape[0], self.num_prompts, self.library_size)


class _BasicBlock(nn.Module):
    """3×3 conv-BN-ReLU, 3×3 conv-BN, plus the shortcut, then ReLU.

    A downsampling block halves the resolution in its first convolution and takes a biased 1×1
    stride-2 convolution (no BatchNorm) as its shortcut (``downsample``); otherwise the shortcut
    is the identity.
    """

    def __init__(self, c_in: int, c_out: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        # Registration order fixes the order in which the random init is drawn.
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.downsample = nn.Conv2d(c_in, c_out, 1, stride=2) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.net(x) + skip)


class ResNet10Generator(_Generator):
    """The official PGN generator: a ResNet-10 with widths 16-32-64-128 by default.

    Parameters
    ----------
    num_prompts : int
        L, prompts generated per image (official default 16).
    library_size : int
        M, tokens in the library each prompt mixes (official default 256).
    widths : sequence of int
        Channels per stage (official: 16 × 2^k for 4 stages).
    blocks_per_stage : int
        Basic blocks per stage (official default 1).
    max_pool : bool
        A 3×3 stride-2 max-pool after the stem (``init_max_pool``, on in the official scripts).
    in_chans : int
        Image channels.

    Notes
    -----
    Module names follow the official code (``input_net``, ``blocks.<i>.net``,
    ``blocks.<i>.downsample``, ``output_net``), so its state dicts, e.g. the released PGN
    checkpoints (keys under ``model.``), load directly. Modules are registered and initialised
    in the official order, so under the same seed the initial weights are the official ones.
    """

    def __init__(
        self,
        num_prompts: int = 16,
        library_size: int = 256,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 1,
        max_pool: bool = True,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.num_prompts = _check_count(num_prompts, "num_prompts", who)
        self.library_size = _check_count(library_size, "library_size", who)
        self.in_chans = _check_count(in_chans, "in_chans", who)
        _check_count(blocks_per_stage, "blocks_per_stage", who)
        widths = tuple(widths) if isinstance(widths, Sequence) else widths
        if not isinstance(widths, tuple) or not widths:
            raise ValueError(f"{who}: widths must be a non-empty sequence of ints, got {widths!r}")
        for w in widths:
            _check_count(w, "every entry of widths", who)
        self.widths = widths
        self.max_pool = bool(max_pool)
        self._halvings = 1 + int(self.max_pool) + len(widths) - 1

        stem = [nn.Conv2d(in_chans, widths[0], 3, stride=2, padding=1, bias=False)]
        stem += [nn.BatchNorm2d(widths[0]), nn.ReLU()]
        if self.max_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.input_net = nn.Sequential(*stem)
        blocks = []
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                downsample = stage > 0 and i == 0
                c_in = widths[stage - 1] if downsample else width
                blocks.append(_BasicBlock(c_in, width, downsample))
        self.blocks = nn.Sequential(*blocks)
        self.output_net = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], self.num_prompts * self.library_size),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _features(self, images: Tensor) -> Tensor:
        return self.output_net(self.blocks(self.input_net(images)))


class ResNet18Generator(_Generator):
    """torchvision's ResNet-18, from scratch, with ``fc`` replaced by a Linear layer to L·M.

    Parameters
    ----------
    num_prompts : int
        L, prompts generated per image.
    library_size : int
        M, tokens in the library.

    Notes
    -----
    torchvision's modules are registered directly on this module (``conv1``, ``bn1``,
    ``layer1``-``layer4``, ``fc``), so the state dict has torchvision's (and the official
    code's) keys. The official code can also start from ImageNet weights (``pretrained_pgn``, off
    by default); torchvision's ImageNet state dict, ``fc`` excepted, loads into this module.
    """

    def __init__(self, num_prompts: int = 16, library_size: int = 256) -> None:
        super().__init__()
        who = type(self).__name__
        self.num_prompts = _check_count(num_prompts, "num_prompts", who)
        self.library_size = _check_count(library_size, "library_size", who)
        self.in_chans = 3
        self._halvings = 5
        try:
            from torchvision.models import resnet18
        except ImportError as e:  # pragma: no cover - timm depends on torchvision
            raise ImportError(f"{who} needs torchvision installed") from e
        net = resnet18(weights=None)
        net.fc = nn.Linear(net.fc.in_features, self.num_prompts * self.library_size)
        for name, child in net.named_children():
            self.add_module(name, child)

    def _features(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


_BUILDERS = {"resnet10": ResNet10Generator, "resnet18": ResNet18Generator}


def build_generator(
    name: str, num_prompts: int, library_size: int, **options: object
) -> ResNet10Generator | ResNet18Generator:
    """Build a PGN generator by name.

    Parameters
    ----------
    name : {"resnet10", "resnet18"}
        The official ResNet-10 (default in the official code) or torchvision's ResNet-18.
    num_prompts : int
        L, prompts per image, >= 1.
    library_size : int
        M, library tokens, >= 1.
    **options
        Passed to the generator (``widths``, ``blocks_per_stage``, ``max_pool``, ``in_chans``
        for ``"resnet10"``; none for ``"resnet18"``).

    Returns
    -------
    nn.Module
        Maps (B, C, H, W) images to (B, L, M) logits.
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"build_generator: unknown generator {name!r}; choose one of {GENERATORS}")
    _check_count(num_prompts, "num_prompts", "build_generator")
    _check_count(library_size, "library_size", "build_generator")
    cls = _BUILDERS[name]
    try:
        return cls(num_prompts=num_prompts, library_size=library_size, **options)
    except TypeError as e:
        raise TypeError(f"build_generator: bad options for {name!r}: {e}") from e


def generator_input(images: Tensor, resolution: int | tuple[int, int] = 224) -> Tensor:
    """Resize images for the generator as the official code does.

    An int ``resolution`` sets the shorter side and keeps the aspect ratio (the longer side is
    truncated: ``int(resolution * long / short)``); a pair sets (height, width). Bilinear, no
    antialiasing, as torchvision's tensor resize did in the official code's version. Images
    already at the target size are returned unchanged (the official pipeline feeds 224×224 crops
    to a 224 generator, so there it is the identity).

    Parameters
    ----------
    images : Tensor
        (B, C, H, W) floating point.
    resolution : int or (int, int)

    Returns
    -------
    Tensor
        (B, C, H', W').
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (
            f"{tuple(images.shape)} {images.dtype}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise ValueError(
            f"generator_input: images must be a floating (B, C, H, W) tensor, got {got}"
        )
    h, w = images.shape[-2:]
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution >= 1:
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(resolution * long / short)
        size = (resolution, new_long) if h <= w else (new_long, resolution)
    elif (
        isinstance(resolution, tuple)
        and len(resolution) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in resolution)
    ):
        size = resolution
    else:
        raise ValueError(
            f"generator_input: resolution must be an int >= 1 or a pair of them, got {resolution!r}"
        )
    if (h, w) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
