"""Pixel-only deployment of PGN prompts: a frozen timm ViT reading an image with prompt rows.

PGN's "prompt inversion" trick (:mod:`fastprompt.inversion`): the prompt patches become extra
rows of patches below the image (ViT-B/32 at 224: 7 per row; the paper's 14 prompts fill 2 rows). A
plain ViT reading that taller image sees the image patches, then the prompt patches, in that
order: exactly the latent model's sequence ``[prefix, patches, prompts]`` provided

- the image patches keep their own positional embedding, and
- each prompt slot gets the positional embedding the inversion subtracted (e; zero by default,
  since PGN's latent prompts carry no positional embedding).

:func:`pixel_space_vit` builds such a plain timm ViT (a copy whose positional table is the original
one followed by e for the prompt rows); it is exact when the prompts fill whole rows.
:func:`deployment_forward` computes the same from a taller image for any prompt count, dropping
the empty slots of an incomplete last row. timm's own route to a taller input (``dynamic_img_size``
or resampling ``pos_embed`` to the new grid) interpolates the table: the image patches'
embeddings change and the prompt rows get interpolated values, so it is *not* exact.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fastprompt.backbones import adapter_for
from fastprompt.inversion import patch_embedding, prompt_rows

__all__ = ["deployment_forward", "deployment_tokens", "pixel_space_vit"]


def _check_vit(model: nn.Module, who: str) -> tuple[int, int]:
    """A timm VisionTransformer whose embedding step we reproduce; returns its image size."""
    backbone = adapter_for(model, who)  # what any wrapping refuses, this refuses too
    if backbone.family != "vit":
        raise TypeError(
            f"{who}: pixel deployment lays prompt patches out as rows of a timm "
            f"VisionTransformer's input; a {backbone.description} has no such path"
        )
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError(f"{who}: patch dropout (patch_drop_rate > 0) is not supported")
    if getattr(model.patch_embed, "dynamic_img_pad", False):
        raise ValueError(f"{who}: dynamic_img_pad=True is not supported")
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        raise ValueError(f"{who}: the model has no fixed image size (patch_embed.img_size is None)")
    patch_embedding(model)  # refuses a non-linear patch embedding
    return tuple(size)


def resamples_from_grid() -> bool:
    """Whether timm's dynamic-size ``_pos_embed`` resamples from ``patch_embed.grid_size``
    (newer timm: the identity on the taller grid :func:`pixel_space_vit` sets) rather than
    assuming a square table (older timm)."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    return "old_size" in inspect.getsource(VisionTransformer._pos_embed)


def deployment_tokens(
    model: nn.Module, tall_images: Tensor, num_prompts: int, prompt_pos: Tensor | None = None
) -> Tensor:
    """Tokens a frozen timm ViT should see for an image with prompt rows, before ``norm_pre``.

    Image patches get the model's own prefix tokens and positional embedding (``_pos_embed``);
    prompt patches get ``prompt_pos`` (zero by default) and follow the patches; empty slots of an
    incomplete last row are dropped. This is the latent model's sequence ``[prefix, patches,
    prompts]`` whenever the prompt patches invert the latent prompts with the same ``prompt_pos``.

    Parameters
    ----------
    model : timm VisionTransformer
    tall_images : Tensor
        (B, C, H + rows·p_h, W), (H, W) the model's image size; built by
        :func:`fastprompt.inversion.append_prompt_rows`.
    num_prompts : int
    prompt_pos : Tensor, optional
        (L, D) or (B, L, D).

    Returns
    -------
    Tensor
        (B, prefix + N + L, D).
    """
    who = "deployment_tokens"
    size = _check_vit(model, who)
    layout = prompt_rows(num_prompts, size, tuple(model.patch_embed.patch_size))
    want = (model.patch_embed.proj.in_channels, *layout.tall_size)
    if not isinstance(tall_images, Tensor) or tuple(tall_images.shape[1:]) != want:
        got = tuple(tall_images.shape) if isinstance(tall_images, Tensor) else type(tall_images)
        raise ValueError(f"{who}: tall_images must be (B, {', '.join(map(str, want))}), got {got}")
    b = tall_images.shape[0]
    gh, gw = size[0] // layout.patch_size[0], size[1] // layout.patch_size[1]
    x = model.patch_embed.proj(tall_images).flatten(2).transpose(1, 2)
    image, prompts = x[:, : gh * gw], x[:, gh * gw : gh * gw + num_prompts]
    if model.dynamic_img_size:
        image = image.reshape(b, gh, gw, -1)
    seq = model._pos_embed(image)
    if prompt_pos is not None:
        if (
            not isinstance(prompt_pos, Tensor)
            or prompt_pos.shape[-2:] != prompts.shape[-2:]
            or prompt_pos.ndim not in (2, 3)
        ):
            got = tuple(prompt_pos.shape) if isinstance(prompt_pos, Tensor) else type(prompt_pos)
            raise ValueError(
                f"{who}: prompt_pos must be ({num_prompts}, {x.shape[-1]}) or "
                f"(B, {num_prompts}, {x.shape[-1]}), got {got}"
            )
        prompts = prompts + prompt_pos
    return torch.cat([seq, prompts], dim=1)


def deployment_forward(
    model: nn.Module, tall_images: Tensor, num_prompts: int, prompt_pos: Tensor | None = None
) -> Tensor:
    """Logits of a frozen timm ViT for images carrying their prompts as pixel rows.

    :func:`deployment_tokens` followed by the model's own ``norm_pre``, blocks, ``norm`` and
    ``forward_head``. Equals the latent-space model (prompts appended after the patches, after
    ``_pos_embed``, before ``norm_pre``, same readout) up to the inversion's round-trip error.

    Returns
    -------
    Tensor
        (B, num_classes) logits (the head's output).
    """
    x = deployment_tokens(model, tall_images, num_prompts, prompt_pos)
    x = model.norm(model.blocks(model.norm_pre(x)))
    return model.forward_head(x)


def pixel_space_vit(
    model: nn.Module, num_prompts: int, prompt_pos: Tensor | None = None
) -> nn.Module:
    """A plain timm ViT that takes the image with its prompt rows and needs nothing else.

    A deep copy of ``model`` whose image size is the taller one and whose positional table is the
    original table followed by ``prompt_pos`` (zero by default) for the prompt rows. Its ordinary
    ``forward`` equals :func:`deployment_forward`, hence the latent model. Exact only when the
    prompts fill whole rows: a plain ViT would attend to empty slots, so padding is refused.

    Parameters
    ----------
    model : timm VisionTransformer
    num_prompts : int
        A multiple of W / p_w (the patches per row).
    prompt_pos : Tensor, optional
        (L, D) positional embedding of the prompt slots, the one the inversion subtracted.

    Returns
    -------
    timm VisionTransformer
        Same class and weights; ``patch_embed.img_size`` (H + rows·p_h, W); a longer ``pos_embed``.
    """
    who = "pixel_space_vit"
    size = _check_vit(model, who)
    if getattr(model, "dynamic_img_size", False) and not resamples_from_grid():
        raise ValueError(
            f"{who}: with dynamic_img_size=True this timm resamples pos_embed as a square grid, "
            "which the taller table is not; use deployment_forward (exact), or a newer timm"
        )
    layout = prompt_rows(num_prompts, size, tuple(model.patch_embed.patch_size))
    if layout.padding:
        raise ValueError(
            f"{who}: num_prompts={num_prompts} leaves {layout.padding} empty slot(s) in the last "
            f"row of {layout.per_row}; a plain ViT would attend to them, so it cannot reproduce "
            f"the latent model. Use a multiple of {layout.per_row} prompts, or "
            "deployment_forward, which drops the empty slots"
        )
    dim = model.embed_dim
    if prompt_pos is not None:
        if not isinstance(prompt_pos, Tensor) or prompt_pos.shape[-2:] != (num_prompts, dim):
            got = tuple(prompt_pos.shape) if isinstance(prompt_pos, Tensor) else type(prompt_pos)
            raise ValueError(f"{who}: prompt_pos must be ({num_prompts}, {dim}), got {got}")
        if prompt_pos.ndim > 3 or (prompt_pos.ndim == 3 and prompt_pos.shape[0] != 1):
            raise ValueError(
                f"{who}: prompt_pos must be shared by all images, got {tuple(prompt_pos.shape)}"
            )
    new = copy.deepcopy(model)
    pe = new.patch_embed
    pe.img_size = layout.tall_size
    pe.grid_size = (layout.tall_size[0] // layout.patch_size[0], size[1] // layout.patch_size[1])
    pe.num_patches = pe.grid_size[0] * pe.grid_size[1]
    if model.pos_embed is None:
        if prompt_pos is not None:
            raise ValueError(f"{who}: the model has no positional embedding to carry prompt_pos")
        return new
    old = model.pos_embed.detach()
    extra = (
        old.new_zeros(1, num_prompts, dim)
        if prompt_pos is None
        else prompt_pos.detach().reshape(1, num_prompts, dim).to(old)
    )
    new.pos_embed = nn.Parameter(
        torch.cat([old, extra], dim=1), requires_grad=model.pos_embed.requires_grad
    )
    return new
