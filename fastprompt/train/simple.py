"""``fastprompt.fit``, ``finetune``, ``evaluate`` and ``prompt_condensation``: the loop as calls
on any loader.

They run :class:`fastprompt.train.Trainer` without a run folder: no checkpoints, no validation,
a recipe built from the arguments. For recipes by name, evaluation every epoch, checkpoints,
resume, mixed precision and torchrun, use ``fastprompt train`` or :func:`fastprompt.train.run`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from fastprompt._warnings import warn_at_caller
from fastprompt.batches import BatchFn, check_reiterable
from fastprompt.methods.condensation import (
    condense,
    layer_summary,
    score_prompts,
    select_prompts,
)
from fastprompt.prompted import PromptedViT
from fastprompt.train.loop import Trainer, evaluate_model
from fastprompt.train.recipes import Recipe, apply_changes, get_recipe

__all__ = ["evaluate", "finetune", "fit", "prompt_condensation"]


def fit(
    prompted: PromptedViT,
    loader: Iterable,
    epochs: int | None = None,
    lr: float | None = None,
    warmup_epochs: int | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
    progress: bool = True,
    batch_fn: BatchFn | None = None,
    precision: str = "fp32",
    recipe: str | Recipe | None = None,
) -> list[float]:
    """Train what the prompted model trains, with a recipe's optimiser and schedule.

    Without ``recipe``: the official VPT optimiser and schedule on the given numbers (SGD with
    momentum; the lr of epoch e is ``lr · e / warmup_epochs`` while warming up, epoch 0 at 0,
    then a half-cosine to 0 at ``epochs``; weight decay on everything but the head bias), ``lr``
    being the peak. With ``recipe`` (``"vpt"``, ``"e2vpt"``, ``"pgn"``, ``"pc-finetune"`` or a
    :class:`Recipe`): its optimiser and schedule, each number given here overriding the recipe's,
    applied as ``fastprompt train`` applies its options
    (:func:`fastprompt.train.recipes.apply_changes`): ``lr`` is the recipe's *base* lr, scaled
    to the peak as the recipe says (``vpt``/``e2vpt``: times batch / 256, the batch being the
    loader's ``batch_size`` when it has one, else the recipe's), and ``epochs`` without
    ``warmup_epochs`` rescales the warmup to the same share of the epochs (said once by a
    warning). A recipe's transforms apply in ``fastprompt train``; here the loader's batches are
    used as they are, moved to the model's device and floating dtype.

    Parameters
    ----------
    prompted : PromptedViT
    loader : iterable of batches
        ``(images (B, C, H, W), labels (B,), ...)`` or dicts (:mod:`fastprompt.batches`); labels
        of any integer dtype.
    epochs : int, optional
        Required without a recipe; 0 trains nothing (returns ``[]``), a negative count is an
        error. More than one epoch needs a loader that can be iterated again (not a generator).
    lr : float, optional
        Without a recipe the peak learning rate, and required; with one its base lr.
    warmup_epochs : int, optional
        Linear warmup epochs (VPT default without a recipe: 0; the official VPT recipe uses 10
        of 100, PGN's 50 of 100).
    weight_decay : float, optional
        On everything trainable but the recipe's exceptions (default 1e-4 without a recipe).
    momentum : float, optional
        Default 0.9.
    progress : bool
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the forward.
    recipe : str or Recipe, optional

    Returns
    -------
    list of float
        Mean training loss per epoch.
    """
    given = {
        "epochs": epochs,
        "lr": lr,
        "warmup_epochs": warmup_epochs,
        "weight_decay": weight_decay,
        "momentum": momentum,
    }
    given = {k: v for k, v in given.items() if v is not None}
    _check_epochs(given.get("epochs", 1), "fit")
    if given.get("epochs", 1) == 0:
        return []
    if recipe is None:
        missing = [k for k in ("epochs", "lr") if k not in given]
        if missing:
            raise TypeError(f"fit: {' and '.join(missing)} needed without a recipe")
        base = Recipe(
            name="fit",
            epochs=given["epochs"],
            batch_size=256,
            lr=given["lr"],
            lr_scaling="none",
            warmup_epochs=0,
        )
    else:
        base = get_recipe(recipe) if isinstance(recipe, str) else recipe
        if not isinstance(base, Recipe):
            raise TypeError(f"fit: recipe must be a name or a Recipe, got {type(recipe).__name__}")
        batch = getattr(loader, "batch_size", None)  # a DataLoader's; unknown otherwise
        if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
            given["batch_size"] = batch
    resolved, notes = apply_changes(base, given, "warmup_epochs={}")
    for note in notes:
        warn_at_caller(f"fit: {note}")
    check_reiterable(loader, resolved.epochs, "fit")
    trainer = Trainer(prompted, resolved, precision=precision, batch_fn=batch_fn, progress=progress)
    losses = [trainer.train_epoch(loader, e)["train_loss"] for e in range(resolved.epochs)]
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
    """Prompt Condensation's fine-tuning: only the kept prompts and the head, dropout off (a
    model with a prompt projection, ``project`` > -1, trains its projection too).

    Parameters
    ----------
    condensed : PromptedViT
        From :func:`fastprompt.condense`.
    loader : iterable of batches
    epochs : int
        The paper uses 20; 0 trains nothing, a negative count is an error.
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
    _check_epochs(epochs, "finetune")
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


def _check_epochs(epochs: object, who: str) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise TypeError(f"{who}: epochs must be an int >= 0, got {epochs!r}")
    if epochs < 0:
        raise ValueError(f"{who}: epochs must be >= 0 (0 trains nothing), got {epochs}")


def evaluate(model: nn.Module, loader: Iterable, batch_fn: BatchFn | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode; a prompted model's prompt keys and
    values are computed once for the whole pass).

    Raises
    ------
    ValueError
        If the loader yields no sample, or a label does not fit the model's head.
    """
    return evaluate_model(model, loader, batch_fn=batch_fn)["acc"]


def prompt_condensation(
    prompted: PromptedViT,
    train_loader: Iterable,
    keep: float | int = 0.3,
    score: str = "taylor",
    scope: str = "global",
    epochs: int = 20,
    lr: float | None = None,
    finetune_kwargs: dict | None = None,
    progress: bool = True,
    verbose: bool = True,
    batch_fn: BatchFn | None = None,
) -> PromptedViT:
    """Prompt Condensation's Algorithm 1: score, keep the top ``keep``, fine-tune only the kept
    prompts and the head.

    Parameters
    ----------
    prompted : PromptedViT
        A trained VPT-deep model.
    train_loader : iterable of batches
    keep : float or int
        Ratio or count, as :func:`fastprompt.select_prompts`.
    score : str
        One of :data:`fastprompt.methods.condensation.SCORES`; ``"taylor"`` is the paper's.
    scope : {"global", "local"}
        The paper's method is global.
    epochs : int
        Fine-tuning epochs (the paper: 20), prompt dropout off.
    lr : float, optional
        Fine-tuning learning rate; default that of :func:`finetune`.
    finetune_kwargs : dict, optional
        More arguments for :func:`finetune`.
    progress, verbose : bool
        Progress bars; print the per-block summary of kept prompts.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.

    Returns
    -------
    PromptedViT
        The condensed, fine-tuned model, on a copy of ``prompted``'s backbone: ``prompted`` is
        left as it was, so calls with other ``keep`` ratios start from the same trained model.
    """
    # Scoring is one pass, fine-tuning `epochs` more: a generator would be empty by then.
    check_reiterable(train_loader, 1 + epochs, "prompt_condensation")
    scores = score_prompts(
        prompted, train_loader, method=score, progress=progress, batch_fn=batch_fn
    )
    mask = select_prompts(scores, keep, scope)
    if verbose:
        print(f"Prompt Condensation ({score}, {scope}):\n{layer_summary(mask)}")
    # A condensed model shares its backbone and head with the model it was condensed from, so
    # fine-tuning it in place would move the caller's trained head (and every earlier result of
    # a sweep over keep ratios): condense a copy.
    condensed = condense(copy.deepcopy(prompted), mask)
    kwargs = dict(finetune_kwargs or {})
    if lr is not None:
        kwargs["lr"] = lr
    if epochs > 0:
        finetune(
            condensed, train_loader, epochs=epochs, progress=progress, batch_fn=batch_fn, **kwargs
        )
    return condensed
