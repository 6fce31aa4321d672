"""Prompt Generation Networks (Loedeman et al.; official code jochemloedeman/PGN): :func:`pgn`,
its checkpoint entry, and prompt inversion to pixels.

The model is the prompted core (:class:`fastprompt.prompted.PromptedViT`) with PGN's generated
per-image prompts (:class:`fastprompt.sources.generated.GeneratedPrompts`) or, with
``generator=None``, the paper's input-independent baseline (IIP). The backbone is frozen and kept
in eval mode; the generator (its BatchNorm in train mode while training, as the official code
runs it), the library and the head train.

Prompt inversion (``docs/design.md`` §2): the patch embedding is linear, so a latent prompt t maps
to the pixel patch x = W⁺(t − b − e), with e the positional embedding of the slot the patch will
occupy (zero: PGN's prompts carry none). :func:`invert_prompts` lays the patches out as extra rows
below each image; :func:`pixel_model` is a plain timm ViT that reads such an image and needs
nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.backbones import adapter_for
from fastprompt.deployment import deployment_forward, pixel_space_vit
from fastprompt.inversion import (
    InversionReport,
    PromptRows,
    append_prompt_rows,
    invert_tokens,
    prompt_rows,
)
from fastprompt.methods.common import (
    config_from_json,
    default_readout,
    init_head_vpt,
    integer,
    split_overrides,
    tied,
)
from fastprompt.prompted import PromptedViT
from fastprompt.registry import CliOptions, register_peft_method
from fastprompt.sources.generated import GeneratedPrompts, InputIndependentPrompts
from fastprompt.sources.generators import GENERATORS

__all__ = [
    "ACTIVATIONS",
    "HEAD_INITS",
    "PGNConfig",
    "PromptImages",
    "invert_prompts",
    "pgn",
    "pixel_logits",
    "pixel_model",
]

# "keep": the head the timm model was created with; "linear": a fresh nn.Linear init (the official
# --random_classifier); "vpt": VPT's kaiming-normal fan-out weight and bias −log 99.
HEAD_INITS = ("keep", "linear", "vpt")
ACTIVATIONS = ("softmax", "sigmoid")


def _count(config: PGNConfig, name: str) -> None:
    """config.<name> as a Python int >= 1 (a frozen config keeps the converted value)."""
    value = integer(getattr(config, name), name, "fastprompt.pgn")
    if value < 1:
        raise ValueError(f"fastprompt.pgn: {name} must be >= 1, got {value}")
    object.__setattr__(config, name, value)


@dataclass(frozen=True)
class PGNConfig:
    """How a PGN (or IIP) model is prompted; saved with its checkpoints.

    Attributes
    ----------
    num_prompts : int
        L, prompts per image (the official default 16).
    library_size : int
        M, tokens in the library (the official training scripts: 256).
    generator : str or None
        ``"resnet10"`` (official), ``"resnet18"``, or None for IIP (no generator, no library).
    activation : {"softmax", "sigmoid"}
        Over the M mixture logits of each prompt.
    resolution : int
        Shorter side the images are resized to for the generator (224).
    readout : str
        ``"cls"``, or for average-pooled backbones ``"patches+prompts"`` (prompt outputs pooled
        too, which is what a plain ViT reading the image with its prompt rows computes).
    generator_options : dict
        More arguments for the generator (``max_pool``, ``widths``, ``blocks_per_stage``).
    """

    num_prompts: int = 16
    library_size: int = 256
    generator: str | None = "resnet10"
    activation: str = "softmax"
    resolution: int = 224
    readout: str = "cls"
    generator_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _count(self, "num_prompts")
        _count(self, "library_size")
        _count(self, "resolution")
        if self.generator is not None and self.generator not in GENERATORS:
            raise ValueError(
                f"fastprompt.pgn: generator must be one of {GENERATORS} or None (IIP), got "
                f"{self.generator!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"fastprompt.pgn: activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if not isinstance(self.readout, str):
            raise TypeError(
                f"fastprompt.pgn: readout must be a str, got {type(self.readout).__name__}"
            )
        if not isinstance(self.generator_options, dict):
            raise TypeError(
                "fastprompt.pgn: generator_options must be a dict, got "
                f"{type(self.generator_options).__name__}"
            )


def build(
    model: nn.Module,
    config: PGNConfig,
    backend: str | None = None,
    head_init: str = "keep",
    impl: str = "naive",
) -> PromptedViT:
    """A PGN (or IIP) model from a full :class:`PGNConfig` (what :func:`pgn` and checkpoints
    call). PGN prompts are tokens in every block, so both ``impl`` give the plain computation."""
    if head_init not in HEAD_INITS:
        raise ValueError(
            f"fastprompt.pgn: head_init must be one of {HEAD_INITS}, got {head_init!r}"
        )
    if isinstance(model, PromptedViT):
        raise TypeError("fastprompt.pgn: this model is already prompted; call .unwrap() first")
    backbone = adapter_for(model, "fastprompt.pgn")
    width, _ = tied(backbone, "fastprompt.pgn")
    ref = next(model.parameters())
    kw = {"config": config, "device": ref.device, "dtype": ref.dtype}
    if config.generator is None:
        source = InputIndependentPrompts(config.num_prompts, width, **kw)
    else:
        source = GeneratedPrompts(
            config.num_prompts,
            config.library_size,
            config.generator,
            config.activation,
            config.resolution,
            width,
            config.generator_options,
            in_chans=_in_chans(model),
            **kw,
        )
    prompted = PromptedViT(
        model, source, readout=config.readout, impl=impl, backend=backend, method="pgn"
    )
    head = backbone.classifier()
    if head_init == "vpt":
        init_head_vpt(head)
    elif head_init == "linear" and isinstance(head, nn.Linear):
        head.reset_parameters()
    return prompted


def _in_chans(model: nn.Module) -> int:
    """Channels of the images the backbone takes (the generator reads the same images)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return int(getattr(proj, "in_channels", 3))


def pgn(
    model: nn.Module,
    num_prompts: int = 16,
    library_size: int = 256,
    generator: str | None = "resnet10",
    activation: str = "softmax",
    resolution: int = 224,
    readout: str | None = None,
    head_init: str = "keep",
    generator_options: Mapping[str, Any] | None = None,
    impl: str = "naive",
    backend: str | None = None,
) -> PromptedViT:
    """Wrap a timm VisionTransformer with a Prompt Generation Network (official PGN semantics).

    Parameters
    ----------
    model : timm VisionTransformer
        Frozen and kept in eval mode; its head trains.
    num_prompts : int
        L, prompts per image (official default 16).
    library_size : int
        M, library tokens (official training scripts: 256; released ViT checkpoints: 128).
    generator : {"resnet10", "resnet18"} or None
        The official ResNet-10 (widths 16-32-64-128, max-pool on as the official scripts run it),
        torchvision's ResNet-18 (from scratch), or None for IIP: one learned set of prompts for
        all images, the paper's baseline, in the same place.
    activation : {"softmax", "sigmoid"}
        Over the M mixture logits of each prompt.
    resolution : int
        Shorter side of the generator's input; images are resized to it (identity at 224).
    readout : {"cls", "patches+prompts"}, optional
        Default: the class token for ``global_pool="token"``; for average-pooled backbones the
        mean of every non-prefix token, prompt outputs included (what a plain ViT reading the
        image with its prompt rows computes, so pixel deployment stays exact).
    head_init : {"keep", "linear", "vpt"}
        Keep the timm model's head (default), re-initialise it as a fresh ``nn.Linear`` (the
        official ``--random_classifier``), or with VPT's init.
    generator_options : mapping, optional
        ``max_pool``, ``widths``, ``blocks_per_stage`` for the ResNet-10.
    impl : {"naive", "fused"}
        Recorded as asked; PGN prompts are tokens in every block, so both run the plain
        computation.
    backend : str, optional
        Prompt-attention backend (one of :data:`fastprompt.backends.NAMES`), checked here.

    Returns
    -------
    PromptedViT
        ``prompted.method == "pgn"``; trainable: ``generator.*`` and ``library`` (IIP:
        ``prompt_vectors``) and the head.
    """
    if readout is None:
        readout = default_readout(model, "fastprompt.pgn")
    config = PGNConfig(
        num_prompts,
        library_size,
        generator,
        activation,
        resolution,
        readout,
        dict(generator_options or {}),
    )
    return build(model, config, backend=backend, head_init=head_init, impl=impl)


def _check_pgn(prompted: object, who: str) -> None:
    if not isinstance(prompted, PromptedViT) or prompted.method != "pgn":
        got = getattr(prompted, "method", type(prompted).__name__)
        raise TypeError(f"{who}: expected a model from fastprompt.pgn(), got {got!r}")


# -- prompt inversion and pixel deployment ------------------------------------------------------


@dataclass(frozen=True)
class PromptImages:
    """Images with their prompts as pixel patches (:func:`invert_prompts`).

    Attributes
    ----------
    images : Tensor, shape (B, C, H + rows·p, W)
        The normalised images with the prompt patches as extra rows below them.
    patches : Tensor, shape (B, L, C, p, p)
        The prompt patches (normalised pixel units).
    layout : PromptRows
        Prompts per row, rows, empty slots of the last row.
    report : InversionReport
        Exact or least squares, round-trip error, share of pixels outside the valid range.
    """

    images: Tensor
    patches: Tensor
    layout: PromptRows
    report: InversionReport


@torch.no_grad()
def invert_prompts(
    prompted: PromptedViT,
    images: Tensor,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    fit_range: bool = False,
) -> PromptImages:
    """Each image with its PGN prompts as pixel patches in extra rows below it.

    Parameters
    ----------
    prompted : PromptedViT
        From :func:`pgn` (evaluated in eval mode: the generator's BatchNorm running statistics).
    images : Tensor, shape (B, C, H, W)
        Normalised as the model's input.
    mean, std : tuple of float, optional
        The input normalisation, for the valid-range figures; default the timm model's
        ``pretrained_cfg``.
    fit_range : bool
        Move each patch towards the valid pixel range among the patches giving the same token
        (needs 3·p² > D); see :func:`fastprompt.inversion.invert_tokens`.

    Returns
    -------
    PromptImages
    """
    _check_pgn(prompted, "invert_prompts")
    embed = prompted.model.patch_embed
    strict = getattr(embed, "strict_img_size", True) and not getattr(
        prompted.model, "dynamic_img_size", False
    )
    size = tuple(embed.img_size or ()) if strict else ()
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"invert_prompts: images must be (B, C, H, W), got {got}")
    if size and tuple(images.shape[-2:]) != size:
        # The prompt rows are laid out for the image width: the pixel model reads its own size.
        raise ValueError(
            f"invert_prompts: images must be {size[0]}×{size[1]}, the model's input size, got "
            f"{tuple(images.shape[-2:])}"
        )
    training = prompted.training
    prompted.eval()
    try:
        source = prompted.source
        tokens = source.prepare(images) if source.shared(0) is None else source.shared(0)
        tokens = tokens.expand(images.shape[0], -1, -1)
    finally:
        prompted.train(training)
    model = prompted.model
    if mean is None and std is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    inversion = invert_tokens(tokens, model, mean=mean, std=std, fit_range=fit_range)
    tall = append_prompt_rows(images, inversion.patches)
    layout = prompt_rows(tokens.shape[1], tuple(images.shape[-2:]), prompted.backbone.patch_size())
    return PromptImages(tall, inversion.patches, layout, inversion.report)


def pixel_model(prompted: PromptedViT) -> nn.Module:
    """A plain timm ViT (a copy, with the trained head) that reads an image with its prompt rows.

    Its positional table is the model's own followed by zeros for the prompt rows, so it sees the
    latent model's tokens exactly when the inversion is exact (3·p² ≥ D, full rank) and the
    prompts fill whole rows; a prompt count that leaves empty slots is refused (use
    :func:`pixel_logits`, which drops them).
    """
    _check_pgn(prompted, "pixel_model")
    _check_readout(prompted, "pixel_model")
    return pixel_space_vit(prompted.model, prompted.config.num_prompts)


def pixel_logits(prompted: PromptedViT, tall_images: Tensor) -> Tensor:
    """Logits of the frozen model (trained head) for images carrying their prompts as pixel rows;
    exact for any prompt count (empty slots of the last row are dropped)."""
    _check_pgn(prompted, "pixel_logits")
    _check_readout(prompted, "pixel_logits")
    return deployment_forward(prompted.model, tall_images, prompted.config.num_prompts)


def _check_readout(prompted: PromptedViT, who: str) -> None:
    own = prompted.backbone.default_readout()
    if prompted.readout != own:
        raise ValueError(
            f"{who}: the model reads out {prompted.readout!r}, but the plain model reads "
            f"{own!r} (its own pooling); pixel deployment would not match"
        )


# -- checkpoints and the registry entry -----------------------------------------------------


def _rebuild(model: nn.Module, saved: Mapping[str, Any], overrides: Mapping[str, Any]):
    config, run = split_overrides(config_from_json(PGNConfig, saved, "PGN"), overrides, ())
    return build(model, config, **run)


def _train_build(model: nn.Module, resolution: int | None = None, **kwargs: Any) -> PromptedViT:
    """:func:`pgn` as ``fastprompt train`` calls it: the generator's input defaults to the
    model's input size (the official ViT path resizes a 224 image to 224: no resize)."""
    if resolution is not None:
        return pgn(model, resolution=resolution, **kwargs)
    resolution = min(adapter_for(model, "fastprompt.pgn").image_size())
    try:
        return pgn(model, resolution=resolution, **kwargs)
    except ValueError as e:
        if "generator can take" not in str(e):
            raise
        # The value came from the model, not the user: say which option sets it.
        raise ValueError(
            f"{e}; it is the model's input size, the default of --pgn-resolution (method_args "
            "resolution): give one the generator takes (the image is resized for it)"
        ) from None


def _add_options(group: argparse._ArgumentGroup) -> None:
    from fastprompt.backbones import readouts

    group.add_argument("--prompts", type=int, help="prompts per image L (default 16)")
    group.add_argument("--library-size", type=int, help="library tokens M (default 256)")
    group.add_argument(
        "--generator", choices=[*GENERATORS, "none"], help="the generator; none = IIP"
    )
    group.add_argument("--activation", choices=ACTIVATIONS, help="mixing (default softmax)")
    group.add_argument(
        "--pgn-resolution",
        type=int,
        help="generator input's shorter side (default the model's input size: no resize)",
    )
    group.add_argument("--readout", choices=readouts(), help="default the model's own pooling")
    group.add_argument("--head-init", choices=list(HEAD_INITS), help="head initialisation")


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("prompts", "library_size", "pgn_resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return {
        "num_prompts": 16 if args.prompts is None else args.prompts,
        "library_size": 256 if args.library_size is None else args.library_size,
        "generator": None if args.generator == "none" else (args.generator or "resnet10"),
        "activation": args.activation or "softmax",
        "resolution": args.pgn_resolution,
        "readout": args.readout,
        "head_init": args.head_init or "keep",
    }


register_peft_method(
    name="pgn",
    config_cls=PGNConfig,
    build=_train_build,
    recipe="pgn",
    cli=CliOptions(add=_add_options, kwargs=_kwargs),
    describe=lambda prompted: asdict(prompted.config),
    rebuild=_rebuild,
)
