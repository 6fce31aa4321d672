"""The training loop: one epoch of a recipe at a time, evaluation, and the state a resume needs.

:class:`Trainer` trains what a prompted model trains (``trainable_parameters()``) with a recipe's
SGD and per-epoch learning rate, under autocast (``bf16``/``fp16``, a ``GradScaler`` for fp16),
optionally compiled (``torch.compile(fullgraph=True)``: a graph break is an error), and under
torchrun in ``DistributedDataParallel`` over the trainable tensors only (the frozen backbone is
neither broadcast nor reduced). Metrics are summed over processes. Every loop takes the batch
formats of :mod:`fastprompt.batches`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.batches import (
    BatchFn,
    LabelError,
    check_batch,
    head_classes,
    input_dtype,
    split_batch,
    to_model,
)
from fastprompt.prompted import PromptedViT
from fastprompt.train.distributed import DistEnv, all_reduce_sum
from fastprompt.train.multi import STAT_COLUMNS, domain_stats, upcast
from fastprompt.train.recipes import Recipe, check_no_decay, classifier_name, make_optimizer
from fastprompt.train.syncbn import count_batchnorm, sync_batchnorm

__all__ = [
    "PRECISIONS",
    "LabelError",
    "Trainer",
    "check_recipe_fits",
    "evaluate_model",
    "get_rng_state",
    "set_rng_state",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(total: int | None, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def _frozen(model: nn.Module):
    return model.frozen_prompts() if isinstance(model, PromptedViT) else contextlib.nullcontext()


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    forward: nn.Module | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    batch_fn: BatchFn | None = None,
    env: DistEnv | None = None,
    progress: bool = False,
    desc: str = "evaluating",
    domains: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``loader``, summed over processes.

    Eval mode; a prompted model's prompt keys/values are computed once for the pass
    (:meth:`PromptedViT.frozen_prompts`). ``forward`` (e.g. the compiled model) replaces
    ``model``'s call. ``domains`` (a mixture of datasets: the dataset index of every class,
    :func:`fastprompt.train.multi.class_domains`) adds the per-dataset sums.

    Returns
    -------
    dict
        ``loss``, ``acc`` and ``samples`` (over every process); with ``domains`` also
        ``domain_sums``, (G, 5) per dataset (:data:`fastprompt.train.multi.STAT_COLUMNS`).

    Raises
    ------
    ValueError
        If no process saw a sample.
    """
    env = env or DistEnv()
    device = device or next(model.parameters()).device
    call = forward if forward is not None else model
    classes = head_classes(model)
    dtype = input_dtype(model)
    training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    groups = None
    if domains is not None:
        groups = torch.zeros(int(domains.max()) + 1, len(STAT_COLUMNS), dtype=torch.float64)
        groups = groups.to(device)
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    bar = _progress(total, desc, progress and env.main)
    try:
        with _frozen(model), _autocast(device, precision):
            for batch in loader:
                x, y = check_batch(*split_batch(batch, batch_fn), classes, "evaluate")
                x, y = to_model(x, y, device, dtype)
                logits = upcast(call(x))
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(-1) == y).sum()
                count += y.numel()
                if groups is not None:
                    groups += domain_stats(logits, y, domains)  # type: ignore[arg-type]
                bar.update(1)
    finally:
        bar.close()
        model.train(training)
    sums = all_reduce_sum(
        env, torch.stack([loss_sum, correct.double(), torch.tensor(count, device=device).double()])
    ).tolist()
    if sums[2] == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    out: dict[str, Any] = {"loss": sums[0] / sums[2], "acc": sums[1] / sums[2]}
    out["samples"] = int(sums[2])
    if groups is not None:
        out["domain_sums"] = all_reduce_sum(env, groups).tolist()
    return out


def check_recipe_fits(model: PromptedViT, recipe: Recipe, base_lr: float | None = None) -> None:
    """Refuse a recipe that cannot train this model, before anything is written or run: no lr,
    nothing trainable, ``no_decay`` names the model lacks, prompt dropout it does not have, a
    memory policy its backbone does not offer.

    Raises
    ------
    ValueError
    """
    recipe.peak_lr(base_lr)  # a recipe without lr needs base_lr
    named = model.trainable_parameters()
    if not named:
        raise ValueError("Trainer: the model has no trainable parameters")
    check_no_decay(model, named, recipe)
    if recipe.batch_norm == "sync" and not count_batchnorm(model.source):
        raise ValueError(
            f"recipe {recipe.name!r} sets batch_norm='sync', but a {model.method!r} model's "
            "prompts have no BatchNorm to synchronise"
        )
    p = recipe.prompt_dropout
    if p is not None and p > 0 and not hasattr(model.source, "set_dropout"):
        raise ValueError(
            f"recipe {recipe.name!r} sets prompt_dropout={p}, but a {model.method!r} model has "
            "no prompt dropout"
        )
    if recipe.memory is not None:
        model.check_memory(recipe.memory)


class Trainer:
    """Train a prompted model with a recipe, one epoch at a time.

    Parameters
    ----------
    model : PromptedViT
        What trains is ``model.trainable_parameters()``; the frozen backbone stays in eval mode.
    recipe : Recipe
        Optimiser and per-epoch learning rate (:mod:`fastprompt.train.recipes`).
    base_lr : float, optional
        Replaces a recipe without an lr (``pc-finetune``: a tenth of the source run's).
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the forward; fp16 adds a ``GradScaler``. Parameters stay fp32.
    compile : bool or str
        ``torch.compile(model, fullgraph=True)``; a string names the compile backend
        (``"inductor"`` when True).
    env : DistEnv, optional
        This process's rank and device (:func:`fastprompt.train.distributed.setup`); under
        torchrun the model trains in ``DistributedDataParallel`` over its trainable tensors.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.
    progress : bool
        Progress bars (rank 0).
    """

    def __init__(
        self,
        model: PromptedViT,
        recipe: Recipe,
        base_lr: float | None = None,
        precision: str = "fp32",
        compile: bool | str = False,
        env: DistEnv | None = None,
        batch_fn: BatchFn | None = None,
        progress: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.recipe = recipe
        self.base_lr = base_lr
        check_recipe_fits(model, recipe, base_lr)
        self.precision = precision
        self.batch_fn = batch_fn
        self.progress = progress
        named = model.trainable_parameters()
        self.device = next(iter(named.values())).device
        self.env = env or DistEnv(device=self.device)
        self.classes = head_classes(model)
        if recipe.prompt_dropout is not None and hasattr(model.source, "set_dropout"):
            model.source.set_dropout(recipe.prompt_dropout)
        if recipe.memory is not None:
            model.memory = recipe.memory
        if recipe.batch_norm == "sync":
            sync_batchnorm(model.source)
        self.optimizer = make_optimizer(named, recipe, classifier_name(model))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.epoch = 0  # epochs completed
        # Compile the model itself, fullgraph (a graph break is an error); DDP wraps the compiled
        # module, since DistributedDataParallel's own forward cannot be traced whole.
        target: nn.Module = model
        if compile:
            backend = "inductor" if compile is True else compile
            target = torch.compile(model, fullgraph=True, backend=backend)
        self.eval_forward = target
        self.forward = self._ddp(target) if self.env.active else target

    def _ddp(self, target: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        keep = set(self.model.prompt_state())
        prefix = "_orig_mod." if target is not self.model else ""
        # The frozen backbone is identical on every rank: neither broadcast nor reduced.
        ignore = [n for n, _ in self.model.named_parameters() if n not in keep]
        ignore += [n for n, _ in self.model.named_buffers() if n not in keep]
        DDP._set_params_and_buffers_to_ignore_for_model(target, [prefix + n for n in ignore])
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DDP(target, device_ids=ids)

    # -- one epoch -------------------------------------------------------------------------------

    def lr_at(self, epoch: int) -> float:
        return self.recipe.lr_at(epoch, self.base_lr)

    def train_epoch(self, loader: Iterable, epoch: int | None = None) -> dict[str, float]:
        """Train one epoch (``epoch`` 0-based; default the next one) and return its metrics.

        Returns
        -------
        dict
            ``epoch``, ``lr``, ``train_loss``, ``train_acc``, ``train_samples`` (over every
            process), ``time_s``, ``images_per_s`` and ``data_wait`` (the share of the epoch this
            process spent waiting for its next batch).
        """
        epoch = self.epoch if epoch is None else epoch
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model, device = self.model, self.device
        dtype = input_dtype(model)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        count, steps, wait = 0, 0, 0.0
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = _progress(total, f"epoch {epoch}", self.progress and self.env.main)
        start = time.perf_counter()
        batches = iter(loader)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                wait += time.perf_counter() - t0
                x, y = check_batch(*split_batch(batch, self.batch_fn), self.classes, "train")
                x, y = to_model(x, y, device, dtype)
                with _autocast(device, self.precision):
                    logits = self.forward(x)
                loss = F.cross_entropy(upcast(logits), y)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                loss_sum += loss.detach().double() * y.numel()
                correct += (logits.detach().argmax(-1) == y).sum()
                count += y.numel()
                steps += 1
                bar.update(1)
                if steps % 10 == 1 and not bar.disable:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        finally:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        sums = all_reduce_sum(
            self.env,
            torch.stack(
                [
                    loss_sum,
                    correct.double(),
                    torch.tensor(float(count), dtype=torch.float64, device=device),
                    torch.tensor(wait / max(elapsed, 1e-12), dtype=torch.float64, device=device),
                ]
            ),
        ).tolist()
        if sums[2] == 0:
            raise ValueError(f"train: epoch {epoch}: the training loader yielded no samples")
        train_loss = sums[0] / sums[2]
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"train: epoch {epoch}: the training loss is {train_loss} (the run diverged); "
                f"lower the learning rate (it was {lr:.4g})"
            )
        self.epoch = epoch + 1
        return {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": sums[1] / sums[2],
            "train_samples": int(sums[2]),
            "time_s": elapsed,
            "images_per_s": sums[2] / max(elapsed, 1e-12),
            "data_wait": sums[3] / self.env.world,
        }

    def evaluate(
        self, loader: Iterable, progress: bool | None = None, domains: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``loss``, ``acc`` and ``samples`` of the model on ``loader`` (summed over processes);
        per-dataset sums with ``domains`` (:func:`evaluate_model`)."""
        return evaluate_model(
            self.model,
            loader,
            forward=self.eval_forward,
            device=self.device,
            precision=self.precision,
            batch_fn=self.batch_fn,
            env=self.env,
            progress=self.progress if progress is None else progress,
            domains=domains,
        )

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, scaler, schedule and epoch (the model's tensors live in its checkpoint)."""
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": {
                "recipe": self.recipe.to_dict(),
                "base_lr": self.base_lr,
                "next_epoch": self.epoch,
                "next_lr": self.lr_at(self.epoch) if self.epoch < self.recipe.epochs else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = Recipe.from_dict(state["schedule"]["recipe"])
        if saved != self.recipe:
            raise ValueError(
                "Trainer.load_state_dict: the state was saved with another recipe "
                f"({saved} vs {self.recipe})"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
