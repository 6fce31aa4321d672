"""Prompt inversion: latent prompt tokens as pixel patches, laid out as rows below the image.

A timm ViT embeds a patch x (C, p_h, p_w) as t = W·vec(x) + b, a linear map (a Conv2d with kernel =
stride = patch size and no norm after it). A latent prompt token t that is to occupy a slot with
positional embedding e therefore has the pixel patch

    x = W⁺ (t − b − e)                      (W⁺ the Moore-Penrose pseudo-inverse of W, D × K),

with K = C·p_h·p_w and D the model width. When K >= D and W has rank D, W W⁺ = I and the round trip
pixels -> tokens gives t back up to float error (ViT-B/32: K = 3072 >= 768; ViT-B/16: 768 = 768).
Otherwise x is the least-squares patch and the round trip loses the part of t − b − e outside
W's range (ViT-L/16: 768 < 1024; ViT-L/14: 588 < 1024); :class:`InversionReport` says which case
holds and how large the error is, and how much of the patch lies outside the valid normalised
pixel range [(0 − mean)/std, (1 − mean)/std]. When K > D the solutions form an affine set, and
``fit_range=True`` moves the patch inside that set towards the valid range (alternating
projections), keeping the round trip exact.

The prompt patches go below the image as extra rows of patches
(:func:`fastprompt.prompt_layout.append_prompt_rows`);
:mod:`fastprompt.deployment` runs a frozen ViT on such an image so that it reproduces the
latent-space model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

# The row layout lived here; kept importable from this module.
from fastprompt.prompt_layout import PromptRows, append_prompt_rows, prompt_rows, split_prompt_rows

__all__ = [
    "InversionReport",
    "PatchEmbedding",
    "PromptInversion",
    "PromptRows",
    "append_prompt_rows",
    "invert_tokens",
    "out_of_range_fraction",
    "patch_embedding",
    "patches_to_tokens",
    "prompt_rows",
    "split_prompt_rows",
    "to_rgb",
    "tokens_to_patches",
    "valid_range",
]


@dataclass(frozen=True, eq=False)
class PatchEmbedding:
    """The affine map t = W·vec(x) + b of a ViT's patch embedding (frozen copy).

    Attributes
    ----------
    weight : Tensor
        (D, K), K = C·p_h·p_w, columns in (channel, row, column) order of a patch.
    bias : Tensor
        (D,), zeros when the embedding has no bias.
    patch_size : (int, int)
    in_chans : int
    """

    weight: Tensor
    bias: Tensor
    patch_size: tuple[int, int]
    in_chans: int

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def patch_dim(self) -> int:
        return self.weight.shape[1]

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.linalg.svd(self.weight.double(), full_matrices=False)

    @cached_property
    def _rtol(self) -> float:
        # Singular values below float32 resolution are noise: the weights are stored in float32.
        return max(self.weight.shape) * torch.finfo(torch.float32).eps

    @cached_property
    def rank(self) -> int:
        """Numerical rank of W at float32 resolution."""
        s = self._svd[1]
        return int((s > s[0] * self._rtol).sum()) if s.numel() else 0

    @property
    def exact(self) -> bool:
        """True when K >= D and W has full rank D: inversion then round-trips exactly."""
        return self.patch_dim >= self.embed_dim and self.rank == self.embed_dim

    @cached_property
    def condition_number(self) -> float:
        """σ_max / σ_min over W's min(D, K) singular values (inf when rank-deficient)."""
        s = self._svd[1]
        return float(s[0] / s[-1]) if self.rank == s.numel() else float("inf")

    @cached_property
    def pinv(self) -> Tensor:
        """W⁺ (K, D) in float64, singular values below float32 resolution dropped."""
        u, s, vh = self._svd
        keep = s > s[0] * self._rtol
        return (vh[keep].mT / s[keep]) @ u[:, keep].mT


def patch_embedding(model: nn.Module) -> PatchEmbedding:
    """Read the linear patch embedding of a timm ViT (or of its ``patch_embed`` module).

    Parameters
    ----------
    model : nn.Module
        A timm ``VisionTransformer`` or a timm ``PatchEmbed``: ``proj`` a Conv2d with kernel =
        stride = patch size, no padding, dilation or groups, and no norm after it.

    Returns
    -------
    PatchEmbedding
    """
    pe = getattr(model, "patch_embed", model)
    who = "patch_embedding"
    if hasattr(pe, "backbone"):
        raise ValueError(f"{who}: a hybrid (CNN backbone) patch embedding is not linear in pixels")
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(
            f"{who}: model.patch_embed.proj must be an nn.Conv2d, got {type(proj).__name__}"
        )
    k, s = tuple(proj.kernel_size), tuple(proj.stride)
    if (
        k != s
        or tuple(proj.padding) != (0, 0)
        or tuple(proj.dilation) != (1, 1)
        or proj.groups != 1
    ):
        raise ValueError(
            f"{who}: patch_embed.proj must have kernel = stride, no padding, dilation or groups; "
            f"got kernel {k}, stride {s}, padding {proj.padding}, dilation {proj.dilation}, "
            f"groups {proj.groups}"
        )
    declared = getattr(pe, "patch_size", None)
    if declared is not None and tuple(declared) != k:
        raise ValueError(f"{who}: patch_embed.patch_size {tuple(declared)} != proj kernel {k}")
    norm = getattr(pe, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(
            f"{who}: patch_embed.norm is {type(norm).__name__}; a normalised patch embedding is "
            "not linear in the pixels, so prompts cannot be inverted through it"
        )
    w = proj.weight.detach()
    b = proj.bias.detach() if proj.bias is not None else torch.zeros_like(w[:, 0, 0, 0])
    return PatchEmbedding(w.reshape(w.shape[0], -1).clone(), b.clone(), k, proj.in_channels)


def _as_embedding(source: nn.Module | PatchEmbedding) -> PatchEmbedding:
    return source if isinstance(source, PatchEmbedding) else patch_embedding(source)


def _check_tokens(tokens: object, emb: PatchEmbedding, who: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim < 2 or not tokens.is_floating_point():
        got = (
            f"{tuple(tokens.shape)} {tokens.dtype}"
            if isinstance(tokens, Tensor)
            else type(tokens).__name__
        )
        raise ValueError(f"{who}: tokens must be a floating (..., L, D) tensor, got {got}")
    if tokens.shape[-1] != emb.embed_dim:
        raise ValueError(
            f"{who}: tokens have width {tokens.shape[-1]}, the patch embedding {emb.embed_dim}"
        )
    return tokens


def _offset(emb: PatchEmbedding, pos: Tensor | None, shape: torch.Size, who: str) -> Tensor:
    """b + e, broadcast against tokens of ``shape`` (..., L, D)."""
    off = emb.bias
    if pos is None:
        return off
    if not isinstance(pos, Tensor) or pos.shape[-1] != emb.embed_dim:
        got = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
        raise ValueError(
            f"{who}: pos must be (L, D) or (B, L, D) with D = {emb.embed_dim}, got {got}"
        )
    try:
        torch.broadcast_shapes(pos.shape, shape)
    except RuntimeError as e:
        raise ValueError(
            f"{who}: pos {tuple(pos.shape)} does not broadcast against tokens {tuple(shape)}"
        ) from e
    return off.to(pos.dtype) + pos


def patches_to_tokens(
    patches: Tensor, embedding: nn.Module | PatchEmbedding, pos: Tensor | None = None
) -> Tensor:
    """The forward map: pixel patches to tokens, t = W·vec(x) + b (+ e).

    Parameters
    ----------
    patches : Tensor
        (..., L, C, p_h, p_w) normalised pixels.
    embedding : timm ViT, its ``patch_embed``, or PatchEmbedding
    pos : Tensor, optional
        (L, D) or (..., L, D) positional embedding of the slots, added.

    Returns
    -------
    Tensor
        (..., L, D) in the patches' dtype.
    """
    emb = _as_embedding(embedding)
    ph, pw = emb.patch_size
    if (
        not isinstance(patches, Tensor)
        or patches.ndim < 4
        or patches.shape[-3:]
        != (
            emb.in_chans,
            ph,
            pw,
        )
    ):
        got = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
        raise ValueError(
            f"patches_to_tokens: patches must be (..., L, {emb.in_chans}, {ph}, {pw}), got {got}"
        )
    flat = patches.flatten(-3)
    out = flat @ emb.weight.to(flat).mT
    return out + _offset(emb, pos, out.shape, "patches_to_tokens").to(out)


def tokens_to_patches(
    tokens: Tensor, embedding: nn.Module | PatchEmbedding, pos: Tensor | None = None
) -> Tensor:
    """The inversion: tokens to pixel patches, x = W⁺(t − b − e) (least squares when K < D).

    Parameters
    ----------
    tokens : Tensor
        (..., L, D) latent prompts.
    embedding : timm ViT, its ``patch_embed``, or PatchEmbedding
    pos : Tensor, optional
        (L, D) or (..., L, D) positional embedding of the slots the patches will occupy;
        None means zero (PGN's latent prompts carry no positional embedding).

    Returns
    -------
    Tensor
        (..., L, C, p_h, p_w) normalised pixels in the tokens' dtype; computed in float64.
    """
    emb = _as_embedding(embedding)
    tokens = _check_tokens(tokens, emb, "tokens_to_patches")
    off = _offset(emb, pos, tokens.shape, "tokens_to_patches")
    rhs = tokens.double() - off.to(tokens.device, torch.float64)
    x = rhs @ emb.pinv.to(tokens.device).mT
    return x.to(tokens.dtype).unflatten(-1, (emb.in_chans, *emb.patch_size))


def valid_range(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Per-channel bounds (lo, hi) of normalised pixels whose RGB values lie in [0, 1].

    Returns
    -------
    (Tensor, Tensor)
        Each (C, 1, 1) float64: (0 − mean)/std and (1 − mean)/std.
    """
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(-1, 1, 1)
    if m.shape != s.shape or bool((s <= 0).any()):
        raise ValueError(f"valid_range: mean {mean} and std {std} must match, std > 0")
    return (0 - m) / s, (1 - m) / s


def out_of_range_fraction(
    patches: Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> float:
    """Fraction of pixel values of (..., C, h, w) ``patches`` outside the valid normalised range."""
    lo, hi = valid_range(mean, std)
    if patches.ndim < 3 or patches.shape[-3] != lo.shape[0]:
        raise ValueError(
            f"out_of_range_fraction: patches {tuple(patches.shape)} do not have "
            f"{lo.shape[0]} channels at dim -3"
        )
    x = patches.detach().double()
    lo, hi = lo.to(x.device), hi.to(x.device)
    return float(((x < lo) | (x > hi)).double().mean()) if x.numel() else 0.0


def to_rgb(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Undo the normalisation: (..., C, h, w) normalised pixels to RGB (x·std + mean), unclamped."""
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).reshape(-1, 1, 1)
    return pixels * s + m


@dataclass(frozen=True)
class InversionReport:
    """How faithful an inversion is.

    Attributes
    ----------
    exact : bool
        K >= D and W has rank D: the round trip is the identity up to float error.
    rank, embed_dim, patch_dim : int
        Rank of W, D and K.
    condition_number : float
        σ_max/σ_min of W; it scales how float error in the tokens shows in the pixels.
    max_abs_error : float
        max |t − (W x + b + e)| over the batch (the round trip pixels -> tokens).
    relative_error : float
        ‖t − (W x + b + e)‖ / ‖t − b − e‖ over the batch (0 when exact, up to float error).
    out_of_range : float or None
        Fraction of pixel values outside [(0 − mean)/std, (1 − mean)/std]; None without
        mean/std.
    clipped_relative_error : float or None
        ``relative_error`` after clamping the patches to that range, as an RGB image in [0, 1]
        would hold them; None without mean/std.
    """

    exact: bool
    rank: int
    embed_dim: int
    patch_dim: int
    condition_number: float
    max_abs_error: float
    relative_error: float
    out_of_range: float | None
    clipped_relative_error: float | None


@dataclass(frozen=True)
class PromptInversion:
    """Pixel patches (..., L, C, p_h, p_w) of latent prompts and the :class:`InversionReport`."""

    patches: Tensor
    report: InversionReport


def _fit_range(x: Tensor, rhs: Tensor, emb: PatchEmbedding, lo: Tensor, hi: Tensor, iters: int):
    """Alternate clamping to the box and projecting back onto {x : W x = rhs} (K > D, exact)."""
    w = emb.weight.double().to(x.device)
    pinv = emb.pinv.to(x.device)
    flat_lo, flat_hi = lo.flatten(), hi.flatten()
    for _ in range(iters):
        clamped = torch.maximum(torch.minimum(x, flat_hi), flat_lo)
        x = clamped + (rhs - clamped @ w.mT) @ pinv.mT
    return x


def invert_tokens(
    tokens: Tensor,
    embedding: nn.Module | PatchEmbedding,
    pos: Tensor | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    fit_range: bool = False,
    fit_iters: int = 200,
) -> PromptInversion:
    """Invert latent prompts to pixel patches and report the round trip.

    Parameters
    ----------
    tokens : Tensor
        (..., L, D) latent prompts.
    embedding : timm ViT, its ``patch_embed``, or PatchEmbedding
    pos : Tensor, optional
        Positional embedding of the slots the patches will occupy, (L, D) or (..., L, D); zero
        by default.
    mean, std : tuple of float, optional
        The normalisation of the model's input; with them the report gives the fraction of pixel
        values outside the valid range. A timm model's ``pretrained_cfg`` supplies them when
        omitted and ``embedding`` is the model.
    fit_range : bool
        Among the patches giving the same token, move each towards the valid pixel range
        (alternating projections, which approach the point of the affine solution set nearest
        the range in L2, i.e. the one clamping damages least); needs mean/std and K > D with
        full rank. The round trip stays exact; clamping error falls, though the violation may be
        spread over more pixels.
    fit_iters : int
        Alternating-projection steps for ``fit_range``.

    Returns
    -------
    PromptInversion
        ``patches`` (..., L, C, p_h, p_w) in the tokens' dtype and the report.
    """
    emb = _as_embedding(embedding)
    tokens = _check_tokens(tokens, emb, "invert_tokens")
    if (mean is None) != (std is None):
        raise ValueError("invert_tokens: give both mean and std, or neither")
    if mean is None and isinstance(embedding, nn.Module):
        cfg = getattr(embedding, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    off = _offset(emb, pos, tokens.shape, "invert_tokens").to(tokens.device, torch.float64)
    rhs = tokens.double() - off
    x = rhs @ emb.pinv.to(tokens.device).mT
    if fit_range:
        if mean is None:
            raise ValueError("invert_tokens: fit_range=True needs mean and std")
        if not (emb.exact and emb.patch_dim > emb.embed_dim):
            raise ValueError(
                "invert_tokens: fit_range=True needs K > D and a full-rank patch embedding "
                f"(K = {emb.patch_dim}, D = {emb.embed_dim}, rank {emb.rank}); "
                "otherwise no other patch gives the same token"
            )
        lo, hi = valid_range(mean, std)
        lo = lo.expand(-1, *emb.patch_size).to(x.device)
        hi = hi.expand(-1, *emb.patch_size).to(x.device)
        x = _fit_range(x, rhs, emb, lo, hi, fit_iters)
    patches = x.to(tokens.dtype).unflatten(-1, (emb.in_chans, *emb.patch_size))
    denom = float(rhs.norm())

    def residual(p: Tensor) -> Tensor:
        # The round trip in the tokens' dtype, as the ViT will compute it.
        return rhs - (patches_to_tokens(p, emb).double() - emb.bias.double().to(tokens.device))

    resid = residual(patches)
    clipped = None
    if mean is not None:
        lo, hi = (v.to(patches) for v in valid_range(mean, std))
        clipped_resid = residual(torch.maximum(torch.minimum(patches, hi), lo))
        clipped = float(clipped_resid.norm()) / denom if denom > 0 else 0.0
    report = InversionReport(
        exact=emb.exact,
        rank=emb.rank,
        embed_dim=emb.embed_dim,
        patch_dim=emb.patch_dim,
        condition_number=emb.condition_number,
        max_abs_error=float(resid.abs().max()) if resid.numel() else 0.0,
        relative_error=float(resid.norm()) / denom if denom > 0 else 0.0,
        out_of_range=None if mean is None else out_of_range_fraction(patches, mean, std),
        clipped_relative_error=clipped,
    )
    return PromptInversion(patches, report)
