"""Training loops that mirror the official VPT recipe, and Prompt Condensation's fine-tuning.

VPT (KMnP/vpt): SGD with momentum 0.9, lr = base_lr · batch / 256, linear warmup then cosine,
stepped per epoch (epoch 0 at lr 0 when warming up), weight decay on everything but the head bias.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.vpt import PromptedViT

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

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    device = prompted.prompt_embeddings.device
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
        for x, y in loader:
            x, y = x.to(device), y.to(device)
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

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    condensed.prompt_dropout.p = 0.0
    return fit(condensed, loader, epochs, lr, 0, weight_decay, progress=progress)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, count = 0, 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        count += y.numel()
    model.train(training)
    return correct / max(count, 1)
