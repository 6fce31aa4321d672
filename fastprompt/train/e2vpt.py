"""E²VPT's pruning and rewinding as one call: :func:`e2vpt_pruning`.

The official pipeline after the first run (``tune_vtab_PruningRewind_CVK.py``): score the masks on
the training set, then for every pair of candidate counts (pruned tokens, pruned segments) retrain
a freshly initialised model with those masks fixed, and keep the one best on the validation set
(ties: the one that pruned more tokens). The pieces are in
:mod:`fastprompt.methods.e2vpt.pruning`; this loop trains with :func:`fastprompt.fit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from fastprompt.batches import BatchFn
from fastprompt.methods.e2vpt.pruning import (
    MIN_SEGMENTS,
    MIN_TOKENS,
    mask_scores,
    prune_counts,
    rewind,
    select_masks,
)
from fastprompt.prompted import PromptedViT
from fastprompt.train.simple import evaluate, fit

__all__ = ["e2vpt_pruning"]


def e2vpt_pruning(
    prompted: PromptedViT,
    train_loader: Iterable,
    val_loader: Iterable,
    epochs: int | None = None,
    lr: float | None = None,
    tokens: Sequence[int] | None = None,
    segments: Sequence[int] | None = None,
    backbone: Callable[[], nn.Module] | None = None,
    batch_fn: BatchFn | None = None,
    progress: bool = False,
) -> tuple[PromptedViT, list[dict[str, Any]]]:
    """Score, prune and rewind an E²VPT model whose masks trained; the best rewound model.

    Parameters
    ----------
    prompted : PromptedViT
        The first run's E²VPT model (masks trained); left as it is.
    train_loader, val_loader : iterable of batches
        Training batches (scores and retraining) and validation batches (the choice).
    epochs, lr : optional
        Of each retraining with the ``e2vpt`` recipe (default the recipe's), applied as
        :func:`fastprompt.fit` and ``fastprompt train`` apply them: ``lr`` is the base lr, scaled
        by ``train_loader``'s batch / 256 (the recipe's 64 when the loader does not say), so
        giving the first run's base lr retrains at its peak, as the official rewind reuses the
        first run's scaled lr; fewer ``epochs`` rescale the warmup to the same share.
    tokens, segments : sequence of int, optional
        Candidate numbers of pruned tokens and segments; default the official ones
        (:func:`~fastprompt.methods.e2vpt.pruning.prune_counts`).
    backbone : callable, optional
        Returns a fresh backbone for each retraining; default a copy of ``prompted``'s.
    batch_fn : callable, optional
    progress : bool

    Returns
    -------
    best : PromptedViT
        The rewound model with the best validation accuracy.
    table : list of dict
        ``{"tokens", "segments", "val_acc"}`` for every pair, in the order trained.
    """
    token_scores, segment_scores = mask_scores(prompted, train_loader, batch_fn=batch_fn)
    p, s = segment_scores.shape
    tokens = prune_counts(p, MIN_TOKENS) if tokens is None else tuple(tokens)
    segments = prune_counts(s, MIN_SEGMENTS) if segments is None else tuple(segments)
    fresh = backbone or (lambda: copy.deepcopy(prompted.model))
    best, best_key, table = None, None, []
    for t in tokens:
        for g in segments:
            masks = select_masks(token_scores, segment_scores, t, g)
            model = rewind(prompted, *masks, model=fresh())
            fit(
                model,
                train_loader,
                epochs,
                lr,
                progress=progress,
                batch_fn=batch_fn,
                recipe="e2vpt",
            )
            acc = evaluate(model, val_loader, batch_fn=batch_fn)
            table.append({"tokens": t, "segments": g, "val_acc": acc})
            key = (acc, t)  # ties: more pruned tokens, as the official choice
            if best_key is None or key > best_key:
                best, best_key = model, key
    if best is None:
        raise ValueError("e2vpt_pruning: no candidate counts to try")
    return best, table
