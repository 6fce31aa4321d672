"""Training loops that mirror the official VPT recipe, and Prompt Condensation's fine-tuning.

VPT (KMnP/vpt): SGD with momentum 0.9, lr = base_lr · batch / 256, linear warmup then cosine,
stepped per epoch (epoch 0 at lr 0 when warming up), weight decay on everything but the head bias.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.batches import BatchFn, batches
from fastprompt.prompted import PromptedViT

__all__ = ["evaluate", "finetune", "fit"]


def _epoch_lr(epoch: int, epochs: int, warmup: int, base: float) -> float:
    if epoch < warmup:
        return base * epoch / warmup
    progress = (epoch - warmup) / max(epochs - warmup, 1)
    return 0.5 * base * (1.0 + math.cos(math.pi * progress))


def _param_groups(prompted: PromptedViT, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in prompted.trainable_parameters().items():
        (no_decay if name == "head.bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fit(
    prompted: PromptedViT,
    loader: Iterable,
    epochs: int,
    lr: float,
    warmup_epochs: int = 0,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    progress: bool = True,
    batch_fn: BatchFn | None = None,
) -> list[float]:
    """Train the prompts (+ projection) and head with the official VPT optimiser and schedule.

    Parameters
    ----------
    prompted : PromptedViT
    loader : iterable of (images (B, C, H, W), labels (B,))
    epochs : int
    lr : float
        Peak learning rate (already scaled by batch / 256 if you follow the official rule).
    warmup_epochs : int
        Linear warmup epochs; the official recipe uses 10 of 100.
    weight_decay : float
        On everything trainable but the head bias.
    momentum : float
    progress : bool
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for batches that are neither ``(images, labels,
        ...)`` nor a dict with image and label keys (:mod:`fastprompt.batches`).

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    device = next(iter(prompted.trainable_parameters().values())).device
    opt = torch.optim.SGD(_param_groups(prompted, weight_decay), lr=lr, momentum=momentum)
    losses = []
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="training", leave=False)
    for epoch in epoch_iter:
        for group in opt.param_groups:
            group["lr"] = _epoch_lr(epoch, epochs, warmup_epochs, lr)
        prompted.train()
        total, count = 0.0, 0
        for x, y in batches(loader, device, batch_fn):
            loss = F.cross_entropy(prompted(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * x.shape[0]
            count += x.shape[0]
        losses.append(total / max(count, 1))
    prompted.eval()
    return losses


def finetune(
    condensed: PromptedViT,
    loader: Iterable,
    epochs: int = 20,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    progress: bool = True,
    batch_fn: BatchFn | None = None,
) -> list[float]:
    """Prompt Condensation's fine-tuning: only the kept prompts and the head, dropout off.

    Parameters
    ----------
    condensed : PromptedViT
        From :func:`fastprompt.condense`.
    loader : iterable of (images, labels)
    epochs : int
        The paper uses 20.
    lr : float
        A reduced learning rate (cosine, no warmup).
    weight_decay : float
    progress : bool
    batch_fn : callable, optional
        As in :func:`fit`.

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    # Through the source's config, so a checkpoint saved afterwards reports dropout 0.
    condensed.source.set_dropout(0.0)
    return fit(condensed, loader, epochs, lr, 0, weight_decay, progress=progress, batch_fn=batch_fn)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, batch_fn: BatchFn | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode; a prompted model's prompt keys and
    values are computed once for the whole pass).

    Raises
    ------
    ValueError
        If the loader yields no sample.
    """
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, count = 0, 0
    frozen = model.frozen_prompts() if isinstance(model, PromptedViT) else contextlib.nullcontext()
    with frozen:
        for x, y in batches(loader, device, batch_fn):
            correct += int((model(x).argmax(-1) == y).sum())
            count += y.numel()
    model.train(training)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return correct / count
