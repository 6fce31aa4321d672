"""Runs: what ``fastprompt train``, ``condense`` and ``evaluate`` do with a run folder.

A run is *prepared* (:func:`prepare_run`: ``run.json``, ``split.json`` and ``init/``, layout in
:mod:`fastprompt.train.folder`) and then *continued* (:func:`continue_run`: from ``last/`` if it
exists, else from ``init/``), so a fresh run, a resumed run and a condensed run
(:mod:`fastprompt.train.condense`) take the same path. Epoch order, augmentation seeds and random
states are restored, so on CPU a resumed run is bit-for-bit the run that was not interrupted.

A run writes only into a folder it owns and holds its lock while it writes
(:mod:`fastprompt.train.owner`); its data is read through its class map and split as stored
(:mod:`fastprompt.train.splits`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from fastprompt.checkpoint import save_prompts
from fastprompt.registry import RUN_OPTIONS
from fastprompt.train import data as D
from fastprompt.train import leftovers, owner
from fastprompt.train import multi as M
from fastprompt.train.build import build_prompted, create_backbone
from fastprompt.train.checkpoints import read_trainer_state, save_epoch, sha256
from fastprompt.train.distributed import DistEnv, all_gather_objects, barrier, setup
from fastprompt.train.folder import (
    FORMAT,
    RUN_FILE,
    DataConfig,
    Log,
    ModelSpec,
    RunConfig,
    RunError,
    checkpoint_dir,
    metrics_upto,
    native_rng,
    no_checkpoint,
    portable_rng,
    read_checkpoint,
    read_run,
    save_dir,
    seed_all,
)
from fastprompt.train.loop import Trainer, check_recipe_fits, get_rng_state, set_rng_state
from fastprompt.train.plot import matplotlib_missing
from fastprompt.train.recipes import Recipe
from fastprompt.train.splits import SPLIT_FILE, RunData, open_data, run_data, write_split

__all__ = [
    "DataConfig",
    "ModelSpec",
    "RunConfig",
    "RunData",
    "RunError",
    "continue_run",
    "create_backbone",
    "load_run_model",
    "open_data",
    "prepare_run",
    "read_run",
    "train",
]


def _run_options(config: RunConfig) -> dict[str, Any]:
    """How to run a loaded checkpoint (impl, backend), as the run was built."""
    return {k: config.method_args[k] for k in RUN_OPTIONS if k in config.method_args}


def transforms_for(model: nn.Module, recipe: Recipe):
    size = D.image_size(model)
    mean, std = D.normalization(model, recipe.normalize)
    make = lambda kind: D.build_transform(
        kind, size, mean, std, recipe.interpolation, recipe.crop_pct, recipe.resize_rounding
    )
    info = {
        "image_size": list(size),
        "mean": list(mean),
        "std": list(std),
        "normalize": recipe.normalize,
        "train_transform": recipe.train_transform,
        "test_transform": recipe.test_transform,
    }
    return make(recipe.train_transform), make(recipe.test_transform), info


# -- run folders ---------------------------------------------------------------------------------


def prepare_run(
    config: RunConfig,
    out: str,
    env: DistEnv | None = None,
    extra: dict[str, Any] | None = None,
    start: nn.Module | None = None,
    overwrite: bool = False,
    data: RunData | None = None,
    keep_lock: bool = False,
    quiet: bool = False,
) -> None:
    """Create the run folder ``out``: check the data, build the starting model, write
    ``split.json``, ``init/`` and ``run.json``.

    Parameters
    ----------
    config : RunConfig
    out : str
        A new folder, an empty one, or (``overwrite``) any folder, whose content is moved aside.
    env : DistEnv, optional
        Under torchrun rank 0 writes; the others wait.
    extra : dict, optional
        More JSON stored in ``run.json`` (the command line, a condensed run's selection).
    start : PromptedViT, optional
        The starting model (a condensed one); default ``config.method`` on the backbone.
    overwrite : bool
        Move a non-empty ``out`` aside to ``<out>.old-<date>-<time>`` (nothing is deleted).
    data : RunData, optional
        The run's data, already opened (a condensed run takes its source's split).
    keep_lock : bool
        Keep holding ``out``'s lock afterwards (:func:`train` does, until the run ends).
    quiet : bool

    Raises
    ------
    RunError, DataError
        ``out`` is not the run's to write (it holds a run, a person's files, or another process
        is using it); the data or the model cannot be used.
    """
    env = env or DistEnv()
    # Rank 0 alone looks: under torchrun another rank may get here after rank 0 wrote the run.
    # What --overwrite must not move aside with the old content.
    keep = [*M.spec_paths(config.data.train), *M.spec_paths(config.data.val), config.model.weights]
    if env.main:
        _owned(owner.check_out, out, overwrite, "--out", keep)
    config.data.train = M.absolute_specs(config.data.train)
    config.data.val = M.absolute_specs(config.data.val)
    if data is None:
        data = open_data(config.data, config.seed, exclude=[out])
    keep += _image_folders(data, overwrite)  # a list's images may live under --out
    if config.model.weights is not None:
        if not os.path.isfile(config.model.weights):
            raise RunError(f"--weights {config.model.weights} does not exist")
        config.model.weights = os.path.abspath(config.model.weights)
        config.model.weights_sha256 = sha256(config.model.weights)
    if env.main:
        if start is None:
            backbone = create_backbone(config.model, len(data.classes), config.seed)
            torch.manual_seed(config.seed)
            start = build_prompted(backbone, config.method, config.method_args)
        try:
            check_recipe_fits(start, config.recipe, config.base_lr)
        except ValueError as e:
            raise RunError(str(e)) from None
        _, _, tinfo = transforms_for(start.model, config.recipe)
        moved = _owned(owner.claim, out, overwrite, "--out", keep)
        try:
            record = {
                "format": FORMAT,
                "config": config.to_dict(),
                "classes": data.classes,
                "data": {
                    "train_samples": len(data.train),
                    "val_samples": len(data.val),
                    "validation": data.how,
                    "split": SPLIT_FILE,
                    **tinfo,
                },
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                **({"moved_aside": moved} if moved else {}),
                **(extra or {}),
            }
            import fastprompt

            record["fastprompt"] = fastprompt.__version__
            record["torch"] = torch.__version__
            if moved:
                Log(out, env, quiet)(f"note: --overwrite moved what {out} held to {moved}")
            write_split(out, data)
            save_dir(out, "init", lambda f: save_prompts(start, f, classes=data.classes))
            _write_json(os.path.join(out, RUN_FILE), record)
        finally:
            if not keep_lock:
                owner.release(out)
    barrier(env)


def _image_folders(data: RunData, links: bool = False) -> list[str]:
    """The folders holding the run's images: a list names images anywhere, and --overwrite must
    not move them aside with what --out held. With ``links`` also the images that are symbolic
    links (one may lead into --out from a folder outside it)."""
    sources = [
        source
        for part in (data.train, data.val)
        for source, _ in getattr(part, "samples", [])
        if isinstance(source, str)
    ]
    folders = {os.path.dirname(source) for source in sources}
    if links:
        folders.update(source for source in sources if os.path.islink(source))
    return sorted(folders)


def _owned(call, *args):
    try:
        return call(*args)
    except owner.OwnerError as e:
        raise RunError(str(e)) from None


def _write_json(path: str, record: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_run_model(
    run: str,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    config: RunConfig | None = None,
    saved: dict[str, Any] | None = None,
    run_options: dict[str, Any] | None = None,
) -> nn.Module:
    """The prompted model of a run folder at ``checkpoint`` (``best``, ``last`` or ``init``).

    ``run_options`` replace how the run was built to run (``impl``, ``backend``: None is the
    automatic choice); the results are the same.

    Raises
    ------
    RunError
        No such checkpoint, a damaged one, one of another run (other classes), backbone weights
        gone or changed.
    """
    from fastprompt.checkpoint import checkpoint_info, load_prompts

    if config is None or saved is None:
        config, saved = read_run(run)
    spec = config.model
    if spec.weights is not None:
        if not os.path.isfile(spec.weights):
            raise RunError(f"the run's backbone weights {spec.weights} are gone")
        if spec.weights_sha256 and sha256(spec.weights) != spec.weights_sha256:
            raise RunError(f"the run's backbone weights {spec.weights} changed since the run began")

    backbones: list[nn.Module] = []  # a load that read a swapped checkpoint takes another

    def load(folder: str) -> nn.Module:
        classes = checkpoint_info(folder).get("classes")
        if classes is not None and classes != saved["classes"]:
            raise RunError(
                f"{folder} holds a checkpoint for classes {classes[:6]}, but {run}/{RUN_FILE} "
                f"lists {saved['classes'][:6]}: was it copied from another run?"
            )
        backbone = backbones.pop() if backbones else fresh()
        return load_prompts(backbone, folder, **{**_run_options(config), **(run_options or {})})

    def fresh() -> nn.Module:
        return create_backbone(spec, len(saved["classes"]), config.seed)

    if checkpoint_dir(run, checkpoint) is None:  # said before a backbone is built for nothing
        raise RunError(no_checkpoint(run, checkpoint))
    # Built before the checkpoint is read: the read is short, and a save less likely to overlap.
    backbones.append(fresh())

    try:
        # Without the run's lock (evaluate during training): a save may swap it meanwhile.
        return read_checkpoint(run, checkpoint, load).to(device)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, RunError):
            raise
        raise RunError(str(e)) from None


def _line(m: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {m['epoch'] + 1:>{len(str(epochs))}}/{epochs}  lr {m['lr']:.4g}  "
        f"train loss {m['train_loss']:.4f} acc {100 * m['train_acc']:.2f}%  "
        f"val loss {m['val_loss']:.4f} acc {100 * m['val_acc']:.2f}%  "
        f"(best {100 * m['best_val_acc']:.2f}% @ {m['best_epoch'] + 1})  "
        f"{m['images_per_s']:.1f} img/s  data wait {100 * m['data_wait']:.1f}%  "
        f"{m['time_s'] + m['eval_time_s']:.1f} s"
    )


def continue_run(
    run: str,
    env: DistEnv | None = None,
    stop_after: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    run_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train the run in ``run`` from its last checkpoint (or its start) to its last epoch.

    Parameters
    ----------
    run : str
        A folder made by :func:`prepare_run`.
    env : DistEnv, optional
        Default: :func:`fastprompt.train.distributed.setup` with the run's device.
    stop_after : int, optional
        Stop once this many epochs are done (a pre-emptible job; continue it later).
    workers : int, optional
        Data-loading processes per training process (default the run's).
    progress, quiet : bool
        Progress bars; no printing (``log.txt`` is still written).
    run_options : dict, optional
        How to run it instead of as it was built (``backend``), as :func:`load_run_model` takes
        them: the same results.

    Returns
    -------
    list of dict
        The metrics of every epoch done so far (``metrics.jsonl``).

    Raises
    ------
    RunError, DataError
        Another process holds the run; a damaged file; the run's data gone or changed.
    """
    config, saved = read_run(run)
    env = env or setup(config.device)
    if not env.main:
        return _continue(run, env, config, saved, stop_after, workers, progress, quiet, run_options)
    _owned(owner.hold_lock, run, "--resume")
    try:
        owner.mark(run)  # a run folder written before markers existed becomes a marked one
        leftovers.clean_stale(run, Log(run, env, quiet))
        left = leftovers.leftover_swaps(run)
        if left:  # a save would refuse after an epoch: say so before any work
            raise RunError(
                f"{left[0]} is in the way of the run's checkpoints (a folder fastprompt did not "
                "make, or files clashing with the checkpoint's); move it away and resume again"
            )
        return _continue(run, env, config, saved, stop_after, workers, progress, quiet, run_options)
    finally:
        owner.release(run)


def _continue(run, env, config, saved, stop_after, workers, progress, quiet, run_options):
    log = Log(run, env, quiet)
    recipe = config.recipe
    if recipe.batch_size % env.world:
        raise RunError(
            f"the batch of {recipe.batch_size} does not split over {env.world} processes"
        )
    last = checkpoint_dir(run, "last")
    start = "last" if last is not None else "init"
    if last is None and os.path.isfile(os.path.join(run, "metrics.jsonl")):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            trained = any(line.strip() for line in f)
        if trained:  # starting over would cut its history and replace best/
            raise RunError(
                f"{run} has trained epochs (metrics.jsonl) but no last/ checkpoint to continue "
                "from; restore last/ (an older fastprompt's interrupted save leaves last.old) "
                "and resume again"
            )
    model = load_run_model(run, start, env.device, config, saved, run_options)
    data = run_data(run, config, saved)
    train_tf, test_tf, _ = transforms_for(model.model, recipe)
    train_ds, val_ds = D.Transformed(data.train, train_tf), D.Transformed(data.val, test_tf)
    trainer = Trainer(
        model,
        recipe,
        base_lr=config.base_lr,
        precision=config.precision,
        compile=config.compile,
        env=env,
        progress=progress and sys.stderr.isatty(),
    )
    best = {"epoch": -1, "val_acc": -1.0, "val_loss": float("inf")}
    if last is not None:
        state = read_trainer_state(last, trainer)
        best = state["best"]
        if len(state["rng"]) == env.world:
            set_rng_state(native_rng(state["rng"][env.rank]))
        else:
            log(
                f"note: the run was saved by {len(state['rng'])} processes and continues on "
                f"{env.world}: random states are re-seeded, so it is not bit-for-bit"
            )
            seed_all(D.epoch_seed(config.seed, trainer.epoch, env.rank))
        log(f"resuming {run} after epoch {trainer.epoch} (best {100 * best['val_acc']:.2f}%)")
    else:
        seed_all(D.epoch_seed(config.seed, 0, env.rank))
        log(recipe.describe(config.base_lr))
        for note in saved.get("recipe_notes", []):  # what the options changed unasked
            log(note)
    for note in data.notes:  # after every refusal: a refused resume writes nothing
        log(note)
    missing = matplotlib_missing()
    if missing:
        log(f"note: no curves.png: {missing}")
    rows = metrics_upto(run, trainer.epoch)
    local_batch = recipe.batch_size // env.world
    pin = env.device.type == "cuda"
    workers = config.data.workers if workers is None else workers
    per_rank = -(-len(train_ds) // env.world)  # DistributedSampler pads to a multiple
    # Each process's BatchNorm cannot train on a last batch of 1 image of its share; a
    # synchronised one normalises the global batch (an image of every process), so it drops what
    # one process would (a global last batch of 1), and N processes train the images one does.
    lone = per_rank % local_batch == 1
    if recipe.batch_norm == "sync":
        lone = lone and len(train_ds) % recipe.batch_size == 1
    lone = lone and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.source.modules()
    )
    if lone:
        log("note: each epoch's last batch of 1 image is dropped (BatchNorm cannot train on it)")
    train_spec = D.LoaderSpec(
        local_batch, workers, True, config.seed, env.rank, env.world, pin, drop_last=lone
    )
    val_spec = D.LoaderSpec(local_batch, workers, False, config.seed, env.rank, env.world, pin)
    names, domains = (
        M.class_domains(data.classes) if M.is_mixture(config.data.train) else ([], None)
    )
    for epoch in range(trainer.epoch, recipe.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        train_ds.set_epoch(config.seed, epoch)
        m = trainer.train_epoch(D.make_loader(train_ds, train_spec, epoch), epoch)
        t0 = time.perf_counter()
        v = trainer.evaluate(D.make_loader(val_ds, val_spec), domains=domains)
        m.update(val_loss=v["loss"], val_acc=v["acc"], val_samples=v["samples"])
        if domains is not None:
            m["val_datasets"] = M.per_dataset(v["domain_sums"], names)
        m["eval_time_s"] = time.perf_counter() - t0
        if recipe.best_by == "val_loss":
            improved = m["val_loss"] < best["val_loss"]
        else:
            improved = m["val_acc"] > best["val_acc"]
        if improved:
            best = {"epoch": epoch, "val_acc": m["val_acc"], "val_loss": m["val_loss"]}
        m["best_epoch"], m["best_val_acc"] = best["epoch"], best["val_acc"]
        rows.append(m)
        rng = all_gather_objects(env, portable_rng(get_rng_state()))
        if env.main:
            save_epoch(run, model, trainer, best, rng, improved, rows, data.classes)
        barrier(env)
        log(_line(m, recipe.epochs))
        if domains is not None:
            log(f"  validation top-1 per dataset: {M.describe(m['val_datasets'])}")
    if env.main and trainer.epoch >= recipe.epochs:
        last_acc = f"{100 * rows[-1]['val_acc']:.2f}%" if rows else "(no metrics.jsonl)"
        log(
            f"done: last epoch's validation top-1 {last_acc} ({run}/last; the official protocol "
            f"reports the last epoch); best {100 * best['val_acc']:.2f}% at epoch "
            f"{best['epoch'] + 1} ({run}/best, selected on this validation data by "
            f"{recipe.best_by})"
        )
        if domains is not None:
            M.report_domains(run, config, log, env.device)
    return rows


def train(
    config: RunConfig,
    out: str,
    stop_after: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Prepare the run folder ``out`` and train it (what ``fastprompt train`` does), holding
    its lock throughout; ``overwrite`` moves a non-empty ``out`` aside first.

    Returns
    -------
    list of dict
        Per-epoch metrics.
    """
    env = setup(config.device)
    prepare_run(config, out, env, extra=extra, overwrite=overwrite, keep_lock=True, quiet=quiet)
    try:
        return continue_run(out, env, stop_after=stop_after, progress=progress, quiet=quiet)
    finally:
        if env.main:
            owner.release(out)
