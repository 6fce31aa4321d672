"""E²VPT's pruning: mask importance, the official pruning counts, rewinding, and packing.

The official pipeline (``tune_vtab_PruningRewind_CVK.py``, ``src/engine/trainer.py``):

1. train with the token mask (P,) and segment mask (P, 16) as parameters (ones at init);
2. score (:func:`mask_scores`): the importance of every mask entry is the mean over the training
   batches of its *signed* gradient of the loss, with the model in eval mode (no prompt dropout);
   the official loop also takes an optimiser step after every batch (pass ``optimizer=`` to do
   the same; with the official recipe that step runs at the warmup's epoch-0 learning rate, 0);
3. candidates (:func:`prune_counts`): for 10, 20, …, 90 % of the P tokens and of the 16 segments,
   ``int(total · percent / 100)`` pruned, capped so that at least 1 token and 4 segments stay;
4. prune (:func:`select_masks`): the lowest scores go first (ties: the lower index first); each
   token loses its own lowest segments;
5. rewind (:func:`rewind`): a freshly initialised model (prompts, key-value prompts, head)
   retrains with the masks fixed at 0/1, once per pair of candidate counts, and the best on the
   validation split is kept (ties: more pruned tokens).

A pruned token stays in the model as a zero token (it still attends and is attended to, since
LayerNorm maps it to its bias); that is the official model. :func:`pack` is a separate, labelled
mode that removes the zero tokens to save their keys and values: the packed model's logits
differ from the official one's, and its config records which tokens it kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.batches import BatchFn, batches, input_dtype
from fastprompt.methods.common import as_int
from fastprompt.methods.e2vpt.model import METHOD, build
from fastprompt.prompted import PromptedViT
from fastprompt.sources.key_value import SEGMENT_MASK, TOKEN_MASK

__all__ = [
    "MIN_SEGMENTS",
    "MIN_TOKENS",
    "PERCENTS",
    "mask_scores",
    "pack",
    "prune_counts",
    "rewind",
    "select_masks",
]

# MIN_NUMBER_CLS_TOKEN, MIN_NUMBER_CLS_TOKEN_PIECE and CLS_TOKEN_(PIECE_)MASK_PERCENT.
MIN_TOKENS = 1
MIN_SEGMENTS = 4
PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _check(prompted: object, who: str, trained: bool = False) -> None:
    if not isinstance(prompted, PromptedViT) or prompted.method != METHOD:
        got = getattr(prompted, "method", type(prompted).__name__)
        raise TypeError(f"{who}: expected an E2VPT model from fastprompt.e2vpt(), got {got!r}")
    if not prompted.config.masks:
        raise ValueError(f"{who}: this E2VPT model has no masks (built with masks=False)")
    if trained and not prompted.config.train_masks:
        raise ValueError(
            f"{who}: this model's masks are fixed (a rewound model); score the model whose "
            "masks trained"
        )


def mask_scores(
    prompted: PromptedViT,
    loader: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_fn: BatchFn | None = None,
) -> tuple[Tensor, Tensor]:
    """The importance of every visual token and segment: the mean signed mask gradient.

    Parameters
    ----------
    prompted : PromptedViT
        An E²VPT model whose masks trained (the first run's).
    loader : iterable of batches
        The training set, ``(images, labels, ...)`` or dicts (:mod:`fastprompt.batches`).
    loss_fn : callable, optional
        ``loss_fn(logits, labels)``; default mean cross-entropy (the official softmax loss).
    optimizer : torch.optim.Optimizer, optional
        Stepped after every batch's backward, as the official loop does (which changes the
        model while it is scored); default: no step, and only the masks' gradients computed.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch layouts.

    Returns
    -------
    token_scores : Tensor, shape (P,)
    segment_scores : Tensor, shape (P, S)
        fp32, on the model's device; lower means prune first.
    """
    _check(prompted, "mask_scores", trained=True)
    token, segment = prompted.source.masks()
    loss_fn = loss_fn or F.cross_entropy
    device = token.device
    sums = [torch.zeros_like(m, dtype=torch.float64) for m in (token, segment)]
    count = 0
    training = prompted.training
    prompted.eval()  # the official scoring runs in eval mode: no prompt dropout
    try:
        for x, y in batches(loader, device, batch_fn, dtype=input_dtype(prompted)):
            if optimizer is not None:
                optimizer.zero_grad()
                loss_fn(prompted(x), y).backward()
                grads = [token.grad, segment.grad]
                if any(g is None for g in grads):
                    raise ValueError("mask_scores: the optimizer does not hold the masks' grads")
                grads = [g.clone() for g in grads]
                optimizer.step()
            else:
                grads = torch.autograd.grad(loss_fn(prompted(x), y), [token, segment])
            for s, g in zip(sums, grads):
                s += g.double()
            count += 1
    finally:
        prompted.train(training)
    if count == 0:
        raise ValueError("mask_scores: the loader yielded no batches")
    return sums[0].div(count).float(), sums[1].div(count).float()


def prune_counts(total: int, minimum: int, percents: Iterable[float] = PERCENTS) -> tuple[int, ...]:
    """The official candidate numbers of pruned tokens (``minimum`` 1) or segments (4).

    Parameters
    ----------
    total : int
        Tokens P, or segments per token S.
    minimum : int
        How many must stay; 0 for no bound.
    percents : iterable of float
        Pruned percentages, in increasing order.

    Returns
    -------
    tuple of int
        ``int(total · percent / 100)`` per percentage, the first one that leaves fewer than
        ``minimum`` replaced by ``total − minimum`` and the rest dropped; sorted, without
        repeats (P = 5 gives 0, 1, 2, 3, 4; S = 16 gives 1, 3, 4, 6, 8, 9, 11, 12).
    """
    percents = list(percents)
    if not 0 <= minimum <= total:
        raise ValueError(f"prune_counts: minimum must lie in [0, total={total}], got {minimum}")
    bad = [p for p in percents if not 0 <= p <= 100]
    if bad:
        raise ValueError(f"prune_counts: percents must lie in [0, 100], got {bad}")
    counts = []
    for percent in percents:
        n = int(total * percent / 100)
        if minimum > 0 and n > total - minimum:
            counts.append(total - minimum)
            break
        counts.append(n)
    return tuple(sorted(set(counts)))


def select_masks(
    token_scores: Tensor,
    segment_scores: Tensor,
    tokens: int,
    segments: int,
    min_tokens: int = MIN_TOKENS,
    min_segments: int = MIN_SEGMENTS,
) -> tuple[Tensor, Tensor]:
    """Masks that prune the ``tokens`` lowest-scored tokens and, in every token, its ``segments``
    lowest-scored segments.

    Parameters
    ----------
    token_scores : Tensor, shape (P,)
    segment_scores : Tensor, shape (P, S)
        From :func:`mask_scores`.
    tokens, segments : int
        How many to prune (:func:`prune_counts` lists the official candidates).
    min_tokens, min_segments : int
        How many must stay (official: 1 and 4).

    Returns
    -------
    token_mask : Tensor, shape (P,)
    segment_mask : Tensor, shape (P, S)
        0 where pruned, 1 elsewhere, fp32 on the scores' device. Ties prune the lower index
        first (the official stable sort).
    """
    if token_scores.dim() != 1 or segment_scores.dim() != 2:
        raise ValueError(
            f"select_masks: scores must be (P,) and (P, S), got {tuple(token_scores.shape)} and "
            f"{tuple(segment_scores.shape)}"
        )
    p, s = segment_scores.shape
    if token_scores.shape[0] != p:
        raise ValueError(f"select_masks: {token_scores.shape[0]} token scores for {p} tokens")
    for name, given, total, keep in (
        ("tokens", tokens, p, min_tokens),
        ("segments", segments, s, min_segments),
    ):
        value = as_int(given)
        if value is None or value < 0:
            raise ValueError(f"select_masks: {name} must be an int >= 0, got {given!r}")
        if p and value > total - keep:
            raise ValueError(
                f"select_masks: pruning {value} {name} of {total} leaves fewer than {keep}"
            )
    token_mask = torch.ones(p, device=token_scores.device)
    order = torch.sort(token_scores.detach().float(), stable=True).indices
    token_mask[order[:tokens]] = 0.0
    segment_mask = torch.ones(p, s, device=segment_scores.device)
    order = torch.sort(segment_scores.detach().float(), dim=1, stable=True).indices
    segment_mask.scatter_(1, order[:, :segments], 0.0)
    return token_mask, segment_mask


def rewind(
    prompted: PromptedViT,
    token_mask: Tensor,
    segment_mask: Tensor,
    model: torch.nn.Module | None = None,
) -> PromptedViT:
    """A freshly initialised E²VPT model with the masks fixed: the official rewinding step.

    Parameters
    ----------
    prompted : PromptedViT
        The E²VPT model that was scored (its config is reused, masks fixed).
    token_mask : Tensor, shape (P,)
    segment_mask : Tensor, shape (P, S)
        From :func:`select_masks`.
    model : nn.Module, optional
        The backbone to wrap (a fresh copy of the one ``prompted`` wraps). Default:
        ``prompted.unwrap()``, which ends ``prompted``.

    Returns
    -------
    PromptedViT
        New prompts, key-value prompts and head (VPT head init), the masks as buffers (fixed,
        saved in checkpoints), prompt dropout as ``prompted``'s.
    """
    _check(prompted, "rewind")
    own_token, own_segment = prompted.source.masks()
    pairs = (("token_mask", token_mask, own_token), ("segment_mask", segment_mask, own_segment))
    for name, mask, own in pairs:
        if not isinstance(mask, Tensor) or mask.shape != own.shape:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"rewind: {name} must have shape {tuple(own.shape)}, got {got}")
        if not ((mask == 0) | (mask == 1)).all():
            odd = mask[(mask != 0) & (mask != 1)].flatten()[:4].tolist()
            raise ValueError(f"rewind: {name} must hold 0 (pruned) or 1 (kept), got {odd}")
    config = replace(prompted.config, train_masks=False)
    impl, backend = prompted.impl, prompted.backend
    backbone = prompted.unwrap() if model is None else model
    fresh = build(backbone, config, impl=impl, backend=backend)
    with torch.no_grad():
        getattr(fresh, TOKEN_MASK).copy_(token_mask)
        getattr(fresh, SEGMENT_MASK).copy_(segment_mask)
    return fresh


def pack(prompted: PromptedViT) -> PromptedViT:
    """The model without its zero tokens (token mask 0): a separate, labelled mode.

    The official model keeps a pruned token as a zero token, which still attends and is attended
    to; removing it saves its keys and values but changes the logits. The packed model shares
    ``prompted``'s backbone and head; its prompts are new parameters holding the kept rows (and
    the kept rows of both masks), and its config records which tokens it kept
    (``kept_tokens``, ``tokens_before``).

    Returns
    -------
    PromptedViT
        Method ``"e2vpt"`` with ``config.kept_tokens`` set.
    """
    _check(prompted, "pack")
    src = prompted.source
    token, segment = src.masks()
    kept = (token != 0).nonzero().flatten().tolist()
    config = prompted.config
    before = config.num_prompts if config.kept_tokens is None else config.tokens_before
    original = kept if config.kept_tokens is None else [config.kept_tokens[k] for k in kept]
    new = replace(config, num_prompts=len(kept), kept_tokens=tuple(original), tokens_before=before)
    packed = build(
        prompted.model,
        new,
        impl=prompted.impl,
        backend=prompted.backend,
        head_init="keep",
        share_with=prompted,
    )
    rows = torch.tensor(kept, dtype=torch.long, device=token.device)
    dst = packed.source
    with torch.no_grad():
        dst.prompt_embeddings.copy_(src.prompt_embeddings[:, rows])
        if src.deep_prompt_embeddings is not None:
            dst.deep_prompt_embeddings.copy_(src.deep_prompt_embeddings[:, rows])
        for mine, theirs in zip(dst.masks(), (token, segment)):
            mine.copy_(theirs[rows])
        for mine, theirs in zip(dst.kv_parameters(), src.kv_parameters()):
            mine.copy_(theirs)
        dst.projection().load_state_dict(src.projection().state_dict())
    return packed
