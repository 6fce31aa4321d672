"""Prompt Condensation's scores: every prompt of every block scored over a dataset.

The scores (``docs/design.md`` §3) read each block's prompt attention through
:meth:`PromptedViT.attention_override`; gradient scores take one backward per batch, the terms
fused into the attention backward (:func:`fastprompt.ops.scored_prompt_attention`). What they
need of the model goes through the prompt source's learned-set API (``raw``, ``projection``,
``prompt_parameters``) and the backbone adapter (``prompt_kv_parts``, ``class_token``), so any
method whose models receive a learned set of one size at every block can be scored.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.backbones import AttentionCall
from fastprompt.batches import BatchFn, batches, head_classes, input_dtype
from fastprompt.ops.scores import scored_prompt_attention
from fastprompt.prompted import PromptedViT, run_attention

__all__ = ["SCORES", "check_scorable", "score_prompts"]

SCORES = ("taylor", "taylor_normed", "gate", "cls_sim", "random", "leave_one_out")
_GRADIENT = ("taylor", "taylor_normed", "gate")


def check_scorable(prompted: PromptedViT, who: str, per_sample: bool = True) -> None:
    """Raise unless every block of ``prompted`` receives its own learned prompt set, all of one
    size (VPT-deep), and (``per_sample``, what scores need) each image's loss depends on its own
    prompts only."""
    if not isinstance(prompted, PromptedViT):
        raise TypeError(
            f"{who}: expected a VPT-deep model from fastprompt.vpt(), got {type(prompted).__name__}"
        )
    src, depth = prompted.source, prompted.depth
    counts = [src.count(i) if src.receives(i) else None for i in range(depth)]
    if None in counts or len(set(counts)) > 1 or not src.distinct_sets():
        raise ValueError(
            f"{who}: Prompt Condensation scores a VPT-deep model: every block receives its own "
            f"prompt set, all of one size (this {prompted.method!r} model's blocks receive "
            f"{counts}{'' if src.distinct_sets() else ', shared'})"
        )
    try:
        src.raw(0)  # a source without learned sets says why
    except TypeError as e:
        raise TypeError(f"{who}: {e}") from None
    if per_sample and getattr(prompted.backbone, "window_mixing", False):
        raise ValueError(
            f"{who}: with window_mixing (the official VPT-Swin's defect) an image's loss depends "
            "on the other images' prompts, so per-sample scores are not defined; rebuild with "
            "window_mixing=False"
        )


def _token_blocks(prompted: PromptedViT) -> list[int]:
    """Blocks whose prompt outputs are read (the last block of a readout that reads prompts):
    their prompts act through every path of the block, not only as keys/values."""
    return [i for i, kv in enumerate(prompted.keys_values_only()) if not kv]


def _check_method(prompted: PromptedViT, method: str, who: str) -> None:
    tokens = _token_blocks(prompted)
    if tokens and method in ("taylor_normed", "gate", "cls_sim"):
        backbone = prompted.backbone
        others = [r for r in backbone.readouts if not backbone.reads_prompts(r)]
        raise ValueError(
            f"{who}: readout={prompted.readout!r} reads the prompt outputs of block(s) {tokens}, "
            f"so {method!r}, which sees a prompt through attention only, would miss part of their "
            "effect; score with 'taylor' (every path), 'leave_one_out' or 'random', or with a "
            f"readout that reads no prompt (this model's: {others})"
        )


def _prompt_params(prompted: PromptedViT) -> list[Tensor]:
    return prompted.source.prompt_parameters()


@contextlib.contextmanager
def _scoring(
    prompted: PromptedViT, attend: Callable[[AttentionCall], Tensor], needs_grad: bool
) -> Iterator[None]:
    """Eval mode (dropout off), ``attend`` on every block, prompts differentiable if needed."""
    training = prompted.training
    params = _prompt_params(prompted)
    flags = [p.requires_grad for p in params]
    prompted.eval()
    try:
        with prompted.attention_override(attend):
            if needs_grad:
                for p in params:
                    p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        prompted.train(training)


def _jvp(fn: Callable, primals: tuple, tangents: tuple):
    """``torch.func.jvp``, without the FutureWarning about ``torch.jit.script`` that PyTorch's
    own forward-mode decompositions raise on their first use (torch >= 2.10; nothing a caller
    can change: it named PyTorch's line in every ``condense``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        return torch.func.jvp(fn, primals, tangents)


def _score_vectors(prompted: PromptedViT) -> list[tuple[Tensor, Tensor]]:
    """Per block, (u_k, u_v) of shape (2, 1, H, P, d): [taylor, taylor_normed] directions.

    ``u = J_kv(p) p`` (the paper's Taylor term as a dot with the K/V gradients) and
    ``u = J_kv(h) (h − β)``, by forward-mode AD, so qk-norm and projections are exact. They are
    computed in float64: ``J_LN(p) p`` is a difference of two terms that agree to a relative
    ε/(var + ε) (down to 1e-6 for trained prompts), which fp32 cannot resolve.
    """
    backbone, src = prompted.backbone, prompted.source
    proj = copy.deepcopy(src.projection()).double()
    acc = torch.promote_types(_prompt_params(prompted)[0].dtype, torch.float32)
    vectors = []
    for i in range(prompted.depth):
        parts = backbone.prompt_kv_parts(i, torch.float64)
        raw = src.raw(i).detach().double()

        def kv_of_raw(r, parts=parts):
            return parts.project(parts.normalize(proj(r).unsqueeze(0)))

        with torch.no_grad():
            _, (tk, tv) = _jvp(kv_of_raw, (raw,), (raw,))
            h = parts.normalize(proj(raw).unsqueeze(0))
            beta = parts.norm_bias
            direction = h - beta if beta is not None else h
            _, (nk, nv) = _jvp(parts.project, (h,), (direction,))
        vectors.append((torch.stack([tk, nk]).to(acc), torch.stack([tv, nv]).to(acc)))
    return vectors


def _progress(iterable: Iterable, show: bool, desc: str) -> Iterable:
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def score_prompts(
    prompted: PromptedViT,
    loader: Iterable,
    method: str = "taylor",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
    seed: int = 0,
    batch_fn: BatchFn | None = None,
) -> Tensor:
    """Score every prompt of every block of a VPT-deep model over a dataset.

    Parameters
    ----------
    prompted : PromptedViT
        VPT-deep, the same number of prompts per block, a model the fused path can run (the
        scores come from each block's prompt attention); scored in eval mode (dropout off),
        whether or not its prompts require gradients.
    loader : iterable of batches
        ``(images (B, C, H, W), labels (B,), ...)`` or dicts (:mod:`fastprompt.batches`).
    method : str
        One of ``SCORES``: ``"taylor"``, ``"taylor_normed"``, ``"gate"``, ``"cls_sim"``,
        ``"random"``, ``"leave_one_out"``.
    loss_fn : callable, optional
        Per-batch loss summed over samples, ``loss_fn(logits, labels)``; default cross-entropy
        with ``reduction="sum"`` (a sum, so each sample's gradient is its own).
    progress : bool
        Show a progress bar.
    seed : int
        For ``"random"``.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.

    Returns
    -------
    Tensor, shape (L, P), float32
        Higher means more important. Means over samples (``leave_one_out``: the mean loss
        increase when the prompt is removed, signed).

    Raises
    ------
    ValueError
        For an empty loader, or when a score is NaN (an overflowing loss or gradient).
    """
    who = "score_prompts"
    check_scorable(prompted, who)
    if method not in SCORES:
        raise ValueError(f"{who}: method must be one of {SCORES}, got {method!r}")
    _check_method(prompted, method, who)
    reasons = prompted.fused_unsupported_reasons()
    if reasons:
        raise TypeError(f"{who}: the scores need the fused path, which cannot run: {reasons}")
    depth, p = prompted.depth, prompted.source.count(0)
    if method == "random":
        return torch.rand(depth, p, generator=torch.Generator().manual_seed(seed))
    if method == "cls_sim" and prompted.backbone.class_token() is None:
        raise ValueError(f"{who}: 'cls_sim' needs a model with a class token")
    # The default loss takes class indices: check them as fit/evaluate do (a custom loss_fn
    # decides what its labels are).
    check = who if loss_fn is None else None
    loss_fn = loss_fn or _summed_cross_entropy
    device = _prompt_params(prompted)[0].device
    labelled = batches(
        loader, device, batch_fn, head_classes(prompted), check, input_dtype(prompted)
    )
    data = _progress(labelled, progress, f"scoring ({method})")
    if method == "leave_one_out":
        sums, count = _leave_one_out(prompted, data, loss_fn)
    elif method == "cls_sim":
        sums, count = _cls_sim(prompted, data)
    else:
        sums, count = _gradient_scores(prompted, data, loss_fn, method)
    if count == 0:
        raise ValueError(f"{who}: the loader yielded no samples; nothing to score")
    scores = (sums / count).float()
    bad = torch.isnan(scores)
    if bad.any():
        blocks = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"{who}: {int(bad.sum())} {method} scores are NaN (blocks {blocks}); the loss or its "
            "gradients overflowed. Check the model's outputs on this data."
        )
    if method in _GRADIENT and not scores.any():
        raise ValueError(
            f"{who}: every {method} score is zero (a loss that ignores every label, or prompts "
            "that are all zero); selecting from them would only follow the prompts' order"
        )
    return scores


def _summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    # In fp32 at least, a float64 model's in float64: leave-one-out subtracts two losses.
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), labels, reduction="sum")


def _per_image(values: Tensor, windows: int) -> Tensor:
    """Per-sequence values (..., S, P) summed over each image's ``windows`` sequences: a prompt
    shared by an image's windows has one gradient per image, their sum."""
    if windows == 1:
        return values
    *lead, s, p = values.shape
    return values.reshape(*lead, s // windows, windows, p).sum(-2)


def _token_vectors(prompted: PromptedViT, blocks: list[int]) -> dict[int, Tensor]:
    """Per token block, ``J_proj(raw) raw`` (P, W): the paper's Taylor term is its dot with the
    gradient of the prompt tokens entering the block."""
    src = prompted.source
    proj = copy.deepcopy(src.projection()).double()
    out = {}
    for i in blocks:
        raw = src.raw(i).detach().double()
        with torch.no_grad():
            out[i] = _jvp(proj, (raw,), (raw,))[1]
    return out


def _gradient_scores(prompted, data, loss_fn, method) -> tuple[Tensor, int]:
    depth, p = prompted.depth, prompted.source.count(0)
    sums = torch.zeros(depth, p, dtype=torch.float64)
    vectors = _score_vectors(prompted)
    which = _GRADIENT.index(method)
    token_blocks = _token_blocks(prompted)
    token_vectors = _token_vectors(prompted, token_blocks)
    leaves: dict[int, Tensor] = {}
    batch = [0]

    def tokens(block: int, prompts: Tensor) -> Tensor:
        # A copy per image: its gradient is each sample's own (the image's loss only).
        leaf = prompts.detach().expand(batch[0], -1, -1).clone().requires_grad_(True)
        leaves[block] = leaf
        return leaf

    def attend(call: AttentionCall) -> Tensor:
        if call.block in token_blocks:
            return run_attention(call)[0]

        def sink(terms: Tensor, gate: Tensor) -> None:
            chosen = _per_image(gate if method == "gate" else terms[which], call.windows)
            sums[call.block] += chosen.abs().sum(0).double().cpu()

        uk, uv = (u.to(call.q.device) for u in vectors[call.block])
        out, _ = scored_prompt_attention(
            call.q,
            call.k,
            call.v,
            call.prompt_k,
            call.prompt_v,
            uk,
            uv,
            sink,
            call.prompt_index,
            call.scale,
            call.backend,
            call.prompt_lengths,
            key_bias=call.key_bias,
        )
        return out

    count = 0
    params = _prompt_params(prompted)
    with _scoring(prompted, attend, needs_grad=True), prompted.token_override(tokens):
        for x, y in data:
            leaves.clear()
            batch[0] = x.shape[0]
            loss = loss_fn(prompted(x), y)
            blocks = list(leaves)
            grads = torch.autograd.grad(
                loss, params + [leaves[i] for i in blocks], allow_unused=True
            )
            for i, g in zip(blocks, grads[len(params) :]):
                term = (g.double() * token_vectors[i].to(g.device)).sum(-1)
                sums[i] += term.abs().sum(0).cpu()
            count += x.shape[0]
    return sums, count


def _cls_sim(prompted, data) -> tuple[Tensor, int]:
    depth, p = prompted.depth, prompted.source.count(0)
    sums = torch.zeros(depth, p, dtype=torch.float64)
    c = prompted.backbone.class_token()

    def attend(call: AttentionCall) -> Tensor:
        out, lse = run_attention(call)
        cls_q = call.q[:, :, c : c + 1].float()
        scores = cls_q @ call.prompt_k.float().transpose(-1, -2) * call.scale
        probs = torch.exp(scores - lse[:, :, c : c + 1, None])
        sums[call.block] += probs[:, :, 0].mean(1).sum(0).double().cpu()
        return out

    count = 0
    with _scoring(prompted, attend, needs_grad=False), torch.no_grad():
        for x, _ in data:
            prompted(x)
            count += x.shape[0]
    return sums, count


def _leave_one_out(prompted, data, loss_fn) -> tuple[Tensor, int]:
    depth, p = prompted.depth, prompted.source.count(0)
    sums = torch.zeros(depth, p, dtype=torch.float64)
    removed: list[tuple[int, int]] = []
    token_blocks = _token_blocks(prompted)

    def tokens(block: int, prompts: Tensor) -> Tensor:
        # A block whose prompt outputs are read loses the token itself (the readout too).
        if removed and removed[0][0] == block:
            keep = [j for j in range(prompts.shape[1]) if j != removed[0][1]]
            return prompts[:, keep]
        return prompts

    def attend(call: AttentionCall) -> Tensor:
        if removed and removed[0][0] == call.block and call.block not in token_blocks:
            keep = [j for j in range(call.prompt_k.shape[2]) if j != removed[0][1]]
            call = replace(
                call, prompt_k=call.prompt_k[:, :, keep], prompt_v=call.prompt_v[:, :, keep]
            )
        return run_attention(call)[0]

    count = 0
    with (
        _scoring(prompted, attend, needs_grad=False),
        prompted.token_override(tokens),
        torch.no_grad(),
    ):
        for x, y in data:
            base = float(loss_fn(prompted(x), y))
            for layer in range(depth):
                for j in range(p):
                    removed[:] = [(layer, j)]
                    sums[layer, j] += float(loss_fn(prompted(x), y)) - base
                    removed.clear()
            count += x.shape[0]
    return sums, count
