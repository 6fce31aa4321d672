"""Shared test helpers: tolerances, the reference-vs-kernel rule, input makers, tiny models.

Nothing here touches CUDA at import, so collection works on any machine.
"""

from __future__ import annotations

import torch

# Shapes shared with benchmarks/: (B, H, N, d) of ViT-S/B and the prompt counts to cover.
VIT_SHAPES = {"vit_s16": (2, 6, 197, 64), "vit_b16": (2, 12, 197, 64)}
PROMPT_COUNTS = (0, 1, 7, 50, 200)

# Floor tolerances per dtype for comparisons against the fp32 reference.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
}


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, name: str) -> str:
    """The worst element, its index and both values."""
    diff = (actual.double() - expected.double()).abs()
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return (
        f"{name}: max abs error {diff.max().item():.3e} at {idx}: "
        f"got {actual[idx].item():.6g}, expected {expected[idx].item():.6g}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor", **tol) -> None:
    tol = tol or TOL[actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    ok = torch.allclose(actual.double(), expected.double(), **tol)
    assert ok, describe_mismatch(actual, expected, name)


def assert_close_vs_ref(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    name: str = "tensor",
    factor: float = 2.0,
) -> None:
    """flash-attention's rule: error vs the fp32 reference ≤ factor × PyTorch's same-dtype error.

    ``factor`` is 2 for values and 3 for gradients; a small floor absorbs exact ties.
    """
    err = (actual.double() - ref_fp32.double()).abs().max().item()
    base = (torch_same_dtype.double() - ref_fp32.double()).abs().max().item()
    floor = TOL[actual.dtype]["atol"]
    assert err <= factor * base + floor, (
        f"{name}: error {err:.3e} > {factor} × PyTorch's {base:.3e} (+{floor:.0e}); "
        + describe_mismatch(actual, ref_fp32, name)
    )


def make_qkv(b, h, n, d, dtype=torch.float32, non_contiguous=False, seed=0, device="cpu"):
    """q, k, v (B, H, N, d); non-contiguous ones view a (B, N, 3, H, d) buffer, as timm's do."""
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:
        qkv = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)
        return tuple(t for t in qkv.unbind(0))
    return tuple(torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3))


def make_prompts(t, h, p, d, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, p, d, generator=g).to(device, dtype) for _ in range(2))


def tiny_vit(seed: int = 0, **kw):
    """A small random-init timm ViT (32×32 images, patch 8 → 16 patches)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args)


def images(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def naive_vpt(model, sets, deep, proj, dropout, training, readout, x, attn_masks=None):
    """Official VPT (KMnP/vpt), written out: prompts are real tokens after the CLS (and registers).

    sets: prompt sets per block, each (P_l, Dp) (only sets[0] when shallow); proj: Dp -> D.
    Dropout is drawn after expanding over the batch (a mask per image), block after block.
    attn_masks: optional additive attention bias per block (the gate oracle uses it).
    """
    import torch.nn.functional as F

    b = x.shape[0]
    npre = model.num_prefix_tokens

    def prompt_tokens(raw):
        return F.dropout(proj(raw).unsqueeze(0).expand(b, -1, -1), dropout, training)

    tokens = model._pos_embed(model.patch_embed(x))
    tokens = torch.cat([tokens[:, :npre], prompt_tokens(sets[0]), tokens[:, npre:]], dim=1)
    tokens = model.norm_pre(tokens)
    p_prev = sets[0].shape[0]
    for i, block in enumerate(model.blocks):
        if deep and i > 0:
            rest = tokens[:, npre + p_prev :]
            tokens = torch.cat([tokens[:, :npre], prompt_tokens(sets[i]), rest], 1)
            p_prev = sets[i].shape[0]
        mask = None if attn_masks is None else attn_masks[i]
        tokens = block(tokens) if mask is None else block(tokens, attn_mask=mask)
    tokens = model.norm(tokens)
    if readout == "cls":
        pooled = tokens[:, 0]
    elif readout == "patches":
        pooled = tokens[:, npre + p_prev :].mean(1)
    else:
        pooled = tokens[:, npre:].mean(1)
    return model.head(model.fc_norm(pooled))


def prompt_sets(prompted):
    """The prompt parameters of a PromptedViT as one (P_l, Dp) tensor per block."""
    sets = [prompted.prompt_embeddings[0]]
    deep = prompted.deep_prompt_embeddings
    if deep is None:
        return sets
    counts = prompted.config.layer_counts
    if counts is None:
        return sets + list(deep.unbind(0))
    return sets + list(deep.split(list(counts[1:]), 0))


def naive_vpt_of(prompted, x, **kw):
    c = prompted.config
    return naive_vpt(
        prompted.model,
        prompt_sets(prompted),
        c.deep,
        prompted.prompt_proj,
        c.dropout,
        prompted.training,
        c.readout,
        x,
        **kw,
    )


def assert_matches_naive(prompted, x, seed=0, atol=2e-5):
    """Logits and every trainable gradient of ``prompted`` equal the naive VPT oracle's.

    ``atol`` is for fp32 roundoff: a 12-block ViT-B accumulates more than the tiny test models.
    """
    params = list(prompted.trainable_parameters().values())
    torch.manual_seed(seed)
    fused = prompted(x)
    g_fused = torch.autograd.grad(fused.square().sum(), params)
    torch.manual_seed(seed)
    naive = naive_vpt_of(prompted, x)
    g_naive = torch.autograd.grad(naive.square().sum(), params)
    assert_close(fused, naive, "logits", atol=atol, rtol=1e-5)
    for name, a, e in zip(prompted.trainable_parameters(), g_fused, g_naive):
        scale = (e.abs().max().item() if e.numel() else 0.0) + 1e-12
        assert_close(a / scale, e / scale, f"grad {name}", atol=atol, rtol=1e-4)


def tiny_swin(seed: int = 0, **kw):
    """A small random-init timm Swin v1 (32×32 images, patch 2, window 4): stage 0 has 16
    windows per image and a shifted block, a patch merging, stage 1 has 4 windows (shifted),
    stage 2 one window."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    args = dict(
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2, 2),
        num_heads=(2, 2, 4),
        num_classes=5,
    )
    args.update(kw)
    return SwinTransformer(**args).eval()
