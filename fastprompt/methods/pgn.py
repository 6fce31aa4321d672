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

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt import methods
from fastprompt.deployment import deployment_forward, pixel_space_vit
from fastprompt.inversion import (
    InversionReport,
    PromptRows,
    append_prompt_rows,
    invert_tokens,
    prompt_rows,
)
from fastprompt.models import vit
from fastprompt.prompted import PromptedViT
from fastprompt.sources.generated import GeneratedPrompts, InputIndependentPrompts, PGNConfig

__all__ = [
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


def build(
    model: nn.Module,
    config: PGNConfig,
    backend: str | None = None,
    head_init: str = "keep",
    impl: str = "naive",
) -> PromptedViT:
    """A PGN (or IIP) model from a full :class:`PGNConfig` (what :func:`pgn` and checkpoints
    call)."""
    if head_init not in HEAD_INITS:
        raise ValueError(
            f"fastprompt.pgn: head_init must be one of {HEAD_INITS}, got {head_init!r}"
        )
    if isinstance(model, PromptedViT):
        raise TypeError("fastprompt.pgn: this model is already prompted; call .unwrap() first")
    vit.check_wrappable(model, "fastprompt.pgn")
    ref = next(model.parameters())
    if config.generator is not None:
        in_chans = model.patch_embed.proj.in_channels
        source = GeneratedPrompts(config, model.embed_dim, ref.device, ref.dtype, in_chans)
    else:
        source = InputIndependentPrompts(config, model.embed_dim, ref.device, ref.dtype)
    # PGN prompts are real tokens in every block: the plain computation is the only one.
    prompted = PromptedViT(
        model, source, readout=config.readout, impl="naive", backend=backend, method="pgn"
    )
    head = model.get_classifier()
    if head_init == "vpt":
        vit.init_head_vpt(model)
    elif head_init == "linear" and isinstance(head, nn.Linear):
        head.reset_parameters()
    return prompted


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

    Returns
    -------
    PromptedViT
        ``prompted.method == "pgn"``; trainable: ``generator.*`` and ``library`` (IIP:
        ``prompt_vectors``) and the head.
    """
    if readout is None:
        readout = vit.default_readout(model)
    config = PGNConfig(
        num_prompts,
        library_size,
        generator,
        activation,
        resolution,
        readout,
        dict(generator_options or {}),
    )
    return build(model, config, head_init=head_init)


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
    layout = prompt_rows(tokens.shape[1], tuple(images.shape[-2:]), vit.patch_size(model))
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
    if prompted.readout != vit.default_readout(prompted.model):
        raise ValueError(
            f"{who}: the model reads out {prompted.readout!r}, but a plain ViT with "
            f"global_pool={prompted.model.global_pool!r} reads "
            f"{vit.default_readout(prompted.model)!r}; pixel deployment would not match"
        )


# -- checkpoints ------------------------------------------------------------------------------


def _rebuild(model: nn.Module, saved: Mapping[str, Any], overrides: Mapping[str, Any]):
    unknown = sorted(set(overrides) - {"impl", "backend"})
    if unknown:
        raise TypeError(f"load_prompts: {unknown} cannot be overridden for a PGN checkpoint")
    return build(model, PGNConfig(**saved), backend=overrides.get("backend"))


methods.register(methods.Method(name="pgn", describe=lambda p: asdict(p.config), rebuild=_rebuild))
