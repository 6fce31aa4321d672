"""Prompt Condensation of a run folder: score, select, condense, fine-tune — into a new run folder.

``fastprompt condense RUN --keep 0.3 --score taylor_normed --finetune-epochs 20`` loads RUN's
checkpoint (``best`` by default), scores every prompt over RUN's training set (with the test
transform, so the scores are deterministic), keeps the top ``keep`` (global or per block), and
fine-tunes only the kept prompts and the head with the ``pc-finetune`` recipe (on the source run's
transforms and normalisation) in a new run folder whose ``init/`` is the condensed model before
fine-tuning. The new folder is an ordinary run:
``--resume`` continues it, ``fastprompt evaluate`` reads it. Under torchrun each process scores
its shard of the training set and the per-prompt sums are added up.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from fastprompt import registry
from fastprompt.train import data as D
from fastprompt.train import owner
from fastprompt.train.distributed import DistEnv, all_reduce_sum, setup
from fastprompt.train.loop import evaluate_model
from fastprompt.train.recipes import DATA_FIELDS, get_recipe
from fastprompt.train.run import (
    RunConfig,
    RunError,
    _owned,
    _run_options,
    continue_run,
    load_run_model,
    prepare_run,
    read_run,
    transforms_for,
)
from fastprompt.train.splits import run_data

__all__ = ["condense_run", "default_out", "not_condensable"]


def not_condensable(config: RunConfig) -> str | None:
    """Why Prompt Condensation cannot condense a run of ``config`` (its method's registry entry
    says), or None."""
    support = registry.get(config.method).condensation
    if support is None:
        return (
            f"is a {config.method!r} run; Prompt Condensation condenses runs of "
            f"{[n for n in registry.names() if registry.get(n).condensation is not None]}"
        )
    return support.check(config.method_args)


@contextlib.contextmanager
def _reading(source: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(owner.reading(source, "condense RUN"))
        except owner.OwnerError as e:
            raise RunError(str(e)) from None
        yield


def default_out(source: str, keep: float | int, score: str) -> str:
    """``<source>-pc30-taylor_normed`` for a ratio of 0.3, ``<source>-pc120p-...`` for a count."""
    tag = f"{round(100 * keep)}" if isinstance(keep, float) else f"{keep}p"
    return f"{os.path.normpath(source)}-pc{tag}-{score}"


def condense_run(
    source: str,
    keep: float | int = 0.3,
    score: str = "taylor",
    scope: str = "global",
    checkpoint: str = "best",
    out: str | None = None,
    epochs: int = 20,
    lr: float | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str | None = None,
    env: DistEnv | None = None,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    weight_decay: float | None = None,
    momentum: float | None = None,
    device: str | None = None,
    run_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Condense the VPT-deep run in ``source`` and fine-tune the result in a new run folder.

    Parameters
    ----------
    source : str
        A run folder of a VPT-deep model.
    keep : float or int
        Ratio of prompts kept (float) or count (int), as :func:`fastprompt.select_prompts`.
    score : str
        One of :data:`fastprompt.methods.condensation.SCORES` (``taylor`` is the paper's).
    scope : {"global", "local"}
    checkpoint : {"best", "last"}
        Which of the source run's checkpoints to condense.
    out : str, optional
        The new run folder (default :func:`default_out`).
    epochs : int
        Fine-tuning epochs (the paper: 20).
    lr : float, optional
        Fine-tuning base lr, scaled by batch / 256 as the source run's was (not under its
        ``lr_scaling="none"``); default a tenth of the source run's.
    batch_size, workers, precision : optional
        Default the source run's.
    env : DistEnv, optional
    progress, quiet : bool
    stop_after : int, optional
        Stop the fine-tuning after this many epochs (continue with ``--resume``).
    extra : dict, optional
        Stored in the new ``run.json``.
    overwrite : bool
        Move a non-empty ``out`` aside first (``<out>.old-<date>-<time>``); without it only a
        new or empty folder is written.
    weight_decay, momentum : float, optional
        Of the fine-tuning's SGD; default the source run's (its ``no_decay`` too): the paper
        fine-tunes in the source's training setup, whose weight decay VPT tunes per task.
    device : str, optional
        Where to condense and fine-tune (``cpu``, ``cuda:1``); default the source run's. The
        new run records it, so ``--resume`` continues there.
    run_options : dict, optional
        How to run the source's checkpoint instead of as it was built (``backend``: None is the
        automatic choice), as :func:`fastprompt.train.run.load_run_model` takes them; the new
        run records it. The same results.

    Returns
    -------
    list of dict
        The fine-tuning run's per-epoch metrics.
    """
    from fastprompt.methods.condensation import (
        METHOD,
        condense,
        layer_summary,
        score_prompts,
        select_prompts,
    )

    # Everything condense takes from the source run (its record, checkpoint and split) is read
    # under the source's shared lock, into memory: a `train --resume` or `--overwrite` of the
    # source is refused meanwhile, and this is refused while one runs.
    with _reading(source):
        config, saved = read_run(source)
        device = device or config.device
        env = env or setup(device)
        out = out or default_out(source, keep, score)
        if env.main:
            _owned(owner.check_out, out, overwrite, "--out", [source])  # never moved aside
        reason = not_condensable(config)
        if reason is not None:
            raise RunError(f"{source} {reason}")
        src_lr = config.recipe.lr if config.recipe.lr is not None else config.base_lr
        # The source run's data pipeline (a VTAB-1k preset's resize and ImageNet statistics), and
        # its lr convention: a tenth of a peak given with lr_scaling=none is a tenth of that peak,
        # not a base lr scaled again by batch / 256.
        pipeline = {k: getattr(config.recipe, k) for k in DATA_FIELDS}
        recipe = get_recipe("pc-finetune").override(
            epochs=epochs,
            batch_size=batch_size or config.recipe.batch_size,
            lr_scaling=config.recipe.lr_scaling,
            # The source run's optimiser (a tuned weight decay), unless told otherwise.
            weight_decay=config.recipe.weight_decay if weight_decay is None else weight_decay,
            momentum=config.recipe.momentum if momentum is None else momentum,
            no_decay=config.recipe.no_decay,
            **pipeline,
        )
        base_lr = lr if lr is not None else src_lr / 10
        model = load_run_model(source, checkpoint, env.device, config, saved, run_options)
        data = run_data(source, config, saved)
    _, test_tf, _ = transforms_for(model.model, config.recipe)
    workers = config.data.workers if workers is None else workers
    spec = D.LoaderSpec(
        recipe.batch_size // env.world, workers, False, config.seed, env.rank, env.world
    )
    train_loader = D.make_loader(D.Transformed(data.train, test_tf), spec)
    show = progress and env.main

    t0 = time.perf_counter()
    local = score_prompts(model, train_loader, method=score, progress=show)
    seconds = time.perf_counter() - t0
    n_local = len(train_loader.sampler)  # type: ignore[arg-type]
    totals = all_reduce_sum(
        env, torch.cat([local.double().flatten() * n_local, torch.tensor([float(n_local)])])
    )
    scores = (totals[:-1] / totals[-1]).reshape(local.shape).float()
    mask = select_prompts(scores, keep, scope)
    condensed = condense(model, mask)
    val_loader = D.make_loader(D.Transformed(data.val, test_tf), spec)
    before = evaluate_model(condensed, val_loader, env=env)
    summary = layer_summary(mask)
    if env.main and not quiet:
        print(f"Prompt Condensation of {source} ({checkpoint}): {score}, {scope}, keep {keep}")
        print(summary)
        print(
            f"scoring took {seconds:.1f} s; before fine-tuning: val top-1 "
            f"{100 * before['acc']:.2f}%, loss {before['loss']:.4f}"
        )
    new = RunConfig(
        model=config.model,
        method=METHOD,
        method_args={**_run_options(config), **(run_options or {})},
        data=config.data,
        recipe=recipe,
        base_lr=base_lr,
        precision=precision or config.precision,
        compile=config.compile,
        seed=config.seed,
        device=device,
        init={
            "condensed_from": os.path.abspath(source),
            "checkpoint": checkpoint,
            "score": score,
            "scope": scope,
            "keep": keep,
            "layer_counts": [int(n) for n in mask.sum(1).tolist()],
            "kept_total": int(mask.sum()),
            "prompts_before": int(mask.numel()),
            "val_before_finetune": before,
            "scoring_time_s": seconds,
        },
    )
    prepare_run(new, out, env, extra, condensed, overwrite, data, keep_lock=True, quiet=quiet)
    try:
        if env.main:
            torch.save(scores, os.path.join(out, "scores.pt"))
            with open(os.path.join(out, "condensation.json"), "w") as f:
                json.dump({**new.init, "summary": summary.splitlines()}, f, indent=2)
        return continue_run(
            out, env, stop_after=stop_after, workers=workers, progress=progress, quiet=quiet
        )
    finally:
        if env.main:
            owner.release(out)
