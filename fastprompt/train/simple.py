"""``fastprompt.fit``, ``finetune`` and ``evaluate``: the loop as three calls on any loader.

They run :class:`fastprompt.train.Trainer` without a run folder: no checkpoints, no validation,
a recipe built from the arguments. For recipes by name, evaluation every epoch, checkpoints,
resume, mixed precision and torchrun, use ``fastprompt train`` or :func:`fastprompt.train.run`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fastprompt.batches import BatchFn
from fastprompt.prompted import PromptedViT
from fastprompt.train.loop import Trainer, evaluate_model
from fastprompt.train.recipes import Recipe

__all__ = ["evaluate", "finetune", "fit"]


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
    precision: str = "fp32",
) -> list[float]:
    """Train the prompts (+ projection) and head with the official VPT optimiser and schedule.

    SGD with momentum; the lr of epoch e is ``lr · e / warmup_epochs`` while warming up (epoch 0
    at 0), then a half-cosine to 0 at ``epochs``; weight decay on everything but the head bias.

    Parameters
    ----------
    prompted : PromptedViT
    loader : iterable of batches
        ``(images (B, C, H, W), labels (B,), ...)`` or dicts (:mod:`fastprompt.batches`).
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
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the forward.

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    if epochs <= 0:
        return []
    recipe = Recipe(
        name="fit",
        epochs=epochs,
        batch_size=256,
        lr=lr,
        lr_scaling="none",
        warmup_epochs=warmup_epochs,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    trainer = Trainer(prompted, recipe, precision=precision, batch_fn=batch_fn, progress=progress)
    losses = [trainer.train_epoch(loader, e)["train_loss"] for e in range(epochs)]
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
    precision: str = "fp32",
) -> list[float]:
    """Prompt Condensation's fine-tuning: only the kept prompts and the head, dropout off.

    Parameters
    ----------
    condensed : PromptedViT
        From :func:`fastprompt.condense`.
    loader : iterable of batches
    epochs : int
        The paper uses 20.
    lr : float
        A reduced peak learning rate (cosine, no warmup).
    weight_decay : float
    progress : bool
    batch_fn : callable, optional
        As in :func:`fit`.
    precision : {"fp32", "bf16", "fp16"}

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    # Through the source's config, so a checkpoint saved afterwards reports dropout 0.
    condensed.source.set_dropout(0.0)
    return fit(
        condensed,
        loader,
        epochs,
        lr,
        0,
        weight_decay,
        progress=progress,
        batch_fn=batch_fn,
        precision=precision,
    )


def evaluate(model: nn.Module, loader: Iterable, batch_fn: BatchFn | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode; a prompted model's prompt keys and
    values are computed once for the whole pass).

    Raises
    ------
    ValueError
        If the loader yields no sample, or a label does not fit the model's head.
    """
    return evaluate_model(model, loader, batch_fn=batch_fn)["acc"]
