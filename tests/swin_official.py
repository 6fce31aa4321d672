"""The official VPT-Swin (KMnP/vpt ``src/models/vit_prompt/swin_transformer.py`` and
``src/models/vit_backbones/swin_transformer.py``), transcribed plainly onto timm's modules.

Tokens are (B, L, C) with the prompts in front, as the official code keeps them. Per stage: the
deep sets replace the prompt tokens (stage 0: block 0 keeps the shallow set, block i takes deep set
i − 1; later stages: every block takes its own), the blocks run, then the patch merging (timm's
next stage's ``downsample`` weights; the official slicing of the four sub-patches, a prompt merged
as cat([p, p, p, p])). Per block: norm1 on every token, prompts split off, patches shifted and
partitioned, the prompts put in front of every window, the bias and mask padded with zeros for
them, attention written out, prompt outputs averaged over windows, residual and MLP on every
token. ``mixing=True`` hands out and averages the prompts window by window as the official code
does; ``mixing=False`` gives each image its own (the paper's rule). Readout: final norm, the mean
of every token, the classifier. Nothing here shares code with fastprompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import assert_close


def window_partition(x, ws):
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0], ws[1], c)


def window_reverse(windows, ws, h, w):
    b = int(windows.shape[0] / (h * w / ws[0] / ws[1]))
    x = windows.view(b, h // ws[0], w // ws[1], ws[0], ws[1], -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def prompted_attention(attn, x, mask, num_prompts, prompt_bias=None):
    """``PromptedWindowAttention.forward`` with the official zero rows/columns for prompts.

    ``prompt_bias`` (P,), a test probe: added to every score of each prompt key (the gate score's
    oracle is the loss gradient with respect to it)."""
    b_, n, _ = x.shape
    nh = attn.num_heads
    qkv = attn.qkv(x).reshape(b_, n, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn.scale
    scores = q @ k.transpose(-2, -1)
    m = attn.window_size[0] * attn.window_size[1]
    rel = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    rel = rel.view(m, m, -1).permute(2, 0, 1).contiguous()
    rel = torch.cat([torch.zeros(nh, num_prompts, m), rel], dim=1)
    rel = torch.cat([torch.zeros(nh, m + num_prompts, num_prompts), rel], dim=-1)
    scores = scores + rel.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        mask = torch.cat([torch.zeros(nw, num_prompts, m), mask], dim=1)
        mask = torch.cat([torch.zeros(nw, m + num_prompts, num_prompts), mask], dim=-1)
        scores = scores.view(b_ // nw, nw, nh, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, nh, n, n)
    if prompt_bias is not None:
        scores = scores + F.pad(prompt_bias, (0, n - num_prompts))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, -1)
    return attn.proj(out)


def prompted_block(blk, x, resolution, num_prompts, mixing, prompt_bias=None):
    """``PromptedSwinTransformerBlock.forward`` on (B, P + H·W, C)."""
    h, w = resolution
    b, _, c = x.shape
    shortcut = x
    x = blk.norm1(x)
    prompt = x[:, :num_prompts]
    x = x[:, num_prompts:].view(b, h, w, c)
    ws, shift = blk.window_size, blk.shift_size
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(x, ws).view(-1, ws[0] * ws[1], c)
    nw = windows.shape[0] // b
    if mixing:
        prompt = prompt.unsqueeze(0).expand(nw, -1, -1, -1).reshape(nw * b, num_prompts, c)
    else:
        prompt = prompt.unsqueeze(1).expand(-1, nw, -1, -1).reshape(nw * b, num_prompts, c)
    windows = torch.cat([prompt, windows], dim=1)
    out = prompted_attention(blk.attn, windows, blk.attn_mask, num_prompts, prompt_bias)
    prompt, out = out[:, :num_prompts], out[:, num_prompts:]
    if mixing:
        prompt = prompt.reshape(nw, b, num_prompts, c).mean(0)
    else:
        prompt = prompt.reshape(b, nw, num_prompts, c).mean(1)
    x = window_reverse(out.view(-1, ws[0], ws[1], c), ws, h, w)
    if any(shift):
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    x = torch.cat([prompt, x.view(b, h * w, c)], dim=1)
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


def prompted_merging(merge, x, resolution, num_prompts):
    """``PromptedPatchMerging.forward``: the official slicing; a prompt as cat([p, p, p, p])."""
    h, w = resolution
    b, _, c = x.shape
    prompt = x[:, :num_prompts]
    prompt = torch.cat([prompt, prompt, prompt, prompt], dim=-1)
    x = x[:, num_prompts:].view(b, h, w, c)
    x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
    x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
    x = torch.cat([prompt, x], dim=1)
    return merge.reduction(merge.norm(x))


def official_vpt_swin(
    model,
    shallow,
    deep,
    x,
    mixing=True,
    dropout=0.0,
    training=False,
    readout="patches+prompts",
    prompt_bias=None,
):
    """Logits of the official VPT-Swin.

    shallow: (1, P, C0); deep: a list per stage of its ``deep_prompt_embeddings_s`` (or of a list
    of (P_i, C_s) sets, which may differ in size: a condensed model), or None for VPT-shallow.
    Dropout as the official code draws it: the shallow set after expanding over the batch, then
    each stage's tensor whole, stage by stage. ``readout="patches"`` averages the patches only
    (timm's own pooling); ``prompt_bias``, a list of (P,) per block, is a test probe.
    """
    b = x.shape[0]
    tokens = model.patch_embed(x)
    resolution = tokens.shape[1:3]
    tokens = tokens.flatten(1, 2)
    prompt = F.dropout(shallow.expand(b, -1, -1), dropout, training)
    tokens = torch.cat([prompt, tokens], dim=1)
    held, block = shallow.shape[1], 0
    for s, stage in enumerate(model.layers):
        if deep is not None:
            stage_sets = deep[s]
            if isinstance(stage_sets, torch.Tensor):
                stage_sets = F.dropout(stage_sets, dropout, training)
        for i, blk in enumerate(stage.blocks):
            if deep is not None and (s > 0 or i > 0):
                new = stage_sets[i - 1 if s == 0 else i]
                tokens = torch.cat([new.expand(b, -1, -1), tokens[:, held:]], dim=1)
                held = new.shape[0]
            bias = None if prompt_bias is None else prompt_bias[block]
            tokens = prompted_block(blk, tokens, resolution, held, mixing, bias)
            block += 1
        if s + 1 < len(model.layers):
            tokens = prompted_merging(model.layers[s + 1].downsample, tokens, resolution, held)
            resolution = (resolution[0] // 2, resolution[1] // 2)
    tokens = model.norm(tokens)
    pooled = tokens[:, held:].mean(1) if readout == "patches" else tokens.mean(1)
    return model.head.fc(pooled)


def official_of(prompted, x, mixing=False, training=False):
    """:func:`official_vpt_swin` on a fastprompt VPT-Swin model's own parameters."""
    c = prompted.config
    stages = len(prompted.model.layers) if c.deep else 0
    deep = [getattr(prompted, f"deep_prompt_embeddings_{s}") for s in range(stages)]
    return official_vpt_swin(
        prompted.model,
        prompted.prompt_embeddings,
        deep if c.deep else None,
        x,
        mixing=mixing,
        dropout=c.dropout,
        training=training,
        readout=c.readout,
    )


def assert_matches_official(prompted, x, mixing=False, training=False, seed=0, tol=1.0):
    """Logits and the gradient of every prompt tensor and of the head equal the official
    computation's (the same seed before each, for dropout); ``tol`` scales the tolerances."""
    params = list(prompted.trainable_parameters().values())
    torch.manual_seed(seed)
    out = prompted(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    torch.manual_seed(seed)
    ref = official_of(prompted, x, mixing=mixing, training=training)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    assert_close(out, ref, "logits", atol=2e-5 * tol, rtol=1e-5 * tol)
    for name, g, r in zip(prompted.trainable_parameters(), grads, ref_grads):
        scale = r.abs().max().item() + 1e-12
        assert_close(g / scale, r / scale, f"grad {name}", atol=2e-5 * tol, rtol=1e-4 * tol)
