"""Runs: what ``fastprompt train``, ``condense`` and ``evaluate`` do with a run folder.

A run is *prepared* (:func:`prepare_run`: ``run.json`` and ``init/``, layout in
:mod:`fastprompt.train.folder`) and then *continued* (:func:`continue_run`: from ``last/`` if it
exists, else from ``init/``), so a fresh run, a resumed run and a condensed run
(:mod:`fastprompt.train.condense`) take the same path. Epoch order, augmentation seeds and random
states are restored, so on CPU a resumed run is bit-for-bit the run that was not interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from fastprompt import registry
from fastprompt.registry import RUN_OPTIONS
from fastprompt.train import data as D
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
    portable_rng,
    read_run,
    save_dir,
    seed_all,
    write_metrics,
)
from fastprompt.train.loop import Trainer, get_rng_state, set_rng_state
from fastprompt.train.plot import matplotlib_missing, plot_curves
from fastprompt.train.recipes import Recipe

__all__ = [
    "DataConfig",
    "ModelSpec",
    "RunConfig",
    "RunError",
    "continue_run",
    "create_backbone",
    "load_run_model",
    "open_data",
    "prepare_run",
    "read_run",
    "train",
]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RunError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    return state


def create_backbone(spec: ModelSpec, num_classes: int, seed: int = 0) -> nn.Module:
    """The timm backbone with a ``num_classes`` head (random-init parts seeded by ``seed``)."""
    import timm

    torch.manual_seed(seed)
    kw = dict(spec.args)
    pretrained = spec.pretrained and spec.weights is None
    model = timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, **kw)
    if spec.weights is not None:
        state = _read_state_dict(spec.weights)
        own = model.state_dict()
        head = {n for n in own if n.startswith(model.default_cfg.get("classifier", "head") + ".")}
        dropped = [n for n in head if n in state and state[n].shape != own[n].shape]
        for n in dropped:
            del state[n]
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [n for n in missing if n not in head]
        if missing or unexpected:
            raise RunError(
                f"--weights {spec.weights} does not fit {spec.name} {kw or ''}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    return model


def build_prompted(backbone: nn.Module, method: str, args: dict[str, Any]) -> nn.Module:
    """Wrap ``backbone`` with ``method``'s registered build function (``fastprompt.vpt``, ...)."""
    build = registry.get(method).build if method in registry.trainable() else None
    if build is None:
        raise RunError(
            f"method {method!r} is not available in this fastprompt (known: "
            f"{list(registry.trainable())})"
        )
    try:
        return build(backbone, **args)
    except (TypeError, ValueError) as e:
        raise RunError(str(e)) from None


def _run_options(config: RunConfig) -> dict[str, Any]:
    """How to run a loaded checkpoint (impl, backend), as the run was built."""
    return {k: config.method_args[k] for k in RUN_OPTIONS if k in config.method_args}


# -- data ----------------------------------------------------------------------------------------


def open_data(cfg: DataConfig, seed: int = 0) -> tuple[D.Dataset, D.Dataset, list[str], str]:
    """The raw (untransformed) train and validation datasets, the classes and how val was made.

    Raises
    ------
    DataError
        A bad path, no images, no validation data, classes that differ between the splits.
    """
    base = D.open_dataset(cfg.train, "train")
    if len(base) == 0:
        raise D.DataError(f"--data {cfg.train} holds no samples")
    if cfg.val is not None and cfg.val_split is not None:
        raise D.DataError("pass either --val or --val-split, not both")
    if cfg.val_split is not None:
        tr, va = D.split_dataset(len(base), cfg.val_split, seed)
        train, val, how = _Subset(base, tr), _Subset(base, va), f"--val-split {cfg.val_split}"
    elif cfg.val is not None:
        train, val, how = base, D.open_dataset(cfg.val, "val"), f"--val {cfg.val}"
    elif D.has_own_val(cfg.train):
        train, val, how = base, D.open_dataset(cfg.train, "val"), "the dataset's own split"
    else:
        raise D.DataError(
            f"--data {cfg.train} has no validation split; pass --val PATH or --val-split "
            "(a fraction, a count, or vtab-1k)"
        )
    if len(val) == 0:
        raise D.DataError(f"the validation data ({how}) holds no samples")
    classes = list(base.classes)
    val_classes = list(getattr(val, "classes", classes))
    if val_classes != classes:
        ints = all(c.isdigit() for c in classes + val_classes)
        if not ints:
            extra = sorted(set(val_classes) - set(classes))
            raise D.DataError(
                "the validation classes differ from the training classes"
                + (f" (not in training: {extra[:5]})" if extra else f": {val_classes[:5]}...")
            )
        classes = [str(i) for i in range(max(len(classes), len(val_classes)))]
    return train, val, classes, how


class _Subset(D.Dataset):
    def __init__(self, base, indices) -> None:
        self.base, self.indices = base, list(indices)
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def transforms_for(model: nn.Module, recipe: Recipe):
    size = D.image_size(model)
    mean, std = D.normalization(model, recipe.normalize)
    make = lambda kind: D.build_transform(
        kind, size, mean, std, recipe.interpolation, recipe.crop_pct
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
) -> None:
    """Create the run folder ``out``: check the data, build the starting model, write
    ``run.json`` and ``init/``.

    Parameters
    ----------
    config : RunConfig
    out : str
        A new folder (or an empty one).
    env : DistEnv, optional
        Under torchrun rank 0 writes; the others wait.
    extra : dict, optional
        More JSON stored in ``run.json`` (the command line, a condensed run's selection).
    start : PromptedViT, optional
        The starting model (a condensed one); default ``config.method`` on the backbone.

    Raises
    ------
    RunError, DataError
        ``out`` already holds a run; the data or the model cannot be used.
    """
    env = env or DistEnv()
    # Rank 0 alone looks: under torchrun another rank may get here after rank 0 wrote the run.
    if env.main and os.path.exists(os.path.join(out, RUN_FILE)):
        raise RunError(f"{out} already holds a run; continue it with --resume {out}")
    if env.main and os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a folder")
    train, val, classes, how = open_data(config.data, config.seed)
    if config.model.weights is not None:
        if not os.path.isfile(config.model.weights):
            raise RunError(f"--weights {config.model.weights} does not exist")
        config.model.weights = os.path.abspath(config.model.weights)
        config.model.weights_sha256 = sha256(config.model.weights)
    if env.main:
        if start is None:
            backbone = create_backbone(config.model, len(classes), config.seed)
            torch.manual_seed(config.seed)
            start = build_prompted(backbone, config.method, config.method_args)
        _, _, tinfo = transforms_for(start.model, config.recipe)
        os.makedirs(out, exist_ok=True)
        record = {
            "format": FORMAT,
            "config": config.to_dict(),
            "classes": classes,
            "data": {
                "train_samples": len(train),
                "val_samples": len(val),
                "validation": how,
                **tinfo,
            },
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            **(extra or {}),
        }
        import fastprompt

        record["fastprompt"] = fastprompt.__version__
        record["torch"] = torch.__version__
        save_dir(out, "init", start.save_prompts)
        with open(os.path.join(out, RUN_FILE), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    barrier(env)


def load_run_model(
    run: str,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    config: RunConfig | None = None,
    saved: dict[str, Any] | None = None,
) -> nn.Module:
    """The prompted model of a run folder at ``checkpoint`` (``best``, ``last`` or ``init``)."""
    from fastprompt.checkpoint import load_prompts

    if config is None or saved is None:
        config, saved = read_run(run)
    folder = checkpoint_dir(run, checkpoint)
    if folder is None:
        raise RunError(f"{run} has no {checkpoint}/ checkpoint yet")
    spec = config.model
    if spec.weights is not None:
        if not os.path.isfile(spec.weights):
            raise RunError(f"the run's backbone weights {spec.weights} are gone")
        if spec.weights_sha256 and sha256(spec.weights) != spec.weights_sha256:
            raise RunError(f"the run's backbone weights {spec.weights} changed since the run began")
    backbone = create_backbone(spec, len(saved["classes"]), config.seed)
    return load_prompts(backbone, folder, **_run_options(config)).to(device)


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

    Returns
    -------
    list of dict
        The metrics of every epoch done so far (``metrics.jsonl``).
    """
    config, saved = read_run(run)
    env = env or setup(config.device)
    log = Log(run, env, quiet)
    recipe = config.recipe
    if recipe.batch_size % env.world:
        raise RunError(
            f"the batch of {recipe.batch_size} does not split over {env.world} processes"
        )
    last = checkpoint_dir(run, "last")
    start = "last" if last is not None else "init"
    model = load_run_model(run, start, env.device, config, saved)
    train_raw, val_raw, classes, _ = open_data(config.data, config.seed)
    if classes != saved["classes"]:
        raise RunError(
            f"the run's data changed: classes {classes[:5]}... != {saved['classes'][:5]}"
        )
    train_tf, test_tf, _ = transforms_for(model.model, recipe)
    train_ds, val_ds = D.Transformed(train_raw, train_tf), D.Transformed(val_raw, test_tf)
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
        state = torch.load(os.path.join(last, "trainer.pt"), map_location="cpu", weights_only=True)
        trainer.load_state_dict(state["trainer"])
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
    missing = matplotlib_missing()
    if missing:
        log(f"note: no curves.png: {missing}")
    rows = metrics_upto(run, trainer.epoch)
    local_batch = recipe.batch_size // env.world
    pin = env.device.type == "cuda"
    workers = config.data.workers if workers is None else workers
    per_rank = -(-len(train_ds) // env.world)  # DistributedSampler pads to a multiple
    lone = per_rank % local_batch == 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.source.modules()
    )
    if lone:
        log("note: each epoch's last batch of 1 image is dropped (BatchNorm cannot train on it)")
    train_spec = D.LoaderSpec(
        local_batch, workers, True, config.seed, env.rank, env.world, pin, drop_last=lone
    )
    val_spec = D.LoaderSpec(local_batch, workers, False, config.seed, env.rank, env.world, pin)
    for epoch in range(trainer.epoch, recipe.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        train_ds.set_epoch(config.seed, epoch)
        m = trainer.train_epoch(D.make_loader(train_ds, train_spec, epoch), epoch)
        t0 = time.perf_counter()
        v = trainer.evaluate(D.make_loader(val_ds, val_spec))
        m.update(val_loss=v["loss"], val_acc=v["acc"], val_samples=v["samples"])
        m["eval_time_s"] = time.perf_counter() - t0
        improved = m["val_acc"] > best["val_acc"]
        if improved:
            best = {"epoch": epoch, "val_acc": m["val_acc"], "val_loss": m["val_loss"]}
        m["best_epoch"], m["best_val_acc"] = best["epoch"], best["val_acc"]
        rows.append(m)
        rng = all_gather_objects(env, portable_rng(get_rng_state()))
        if env.main:
            _save_epoch(run, model, trainer, best, rng, improved, rows)
        barrier(env)
        log(_line(m, recipe.epochs))
    if env.main and trainer.epoch >= recipe.epochs:
        log(
            f"done: best validation top-1 {100 * best['val_acc']:.2f}% at epoch "
            f"{best['epoch'] + 1}; checkpoints in {run}/best and {run}/last"
        )
    return rows


def _save_epoch(run, model, trainer, best, rng, improved, rows) -> None:
    state = {"trainer": trainer.state_dict(), "best": best, "rng": rng}

    def write_last(folder: str) -> None:
        model.save_prompts(folder)
        torch.save(state, os.path.join(folder, "trainer.pt"))

    def write_best(folder: str) -> None:
        model.save_prompts(folder)
        with open(os.path.join(folder, "best.json"), "w") as f:
            json.dump(rows[-1], f, indent=2)

    write_metrics(run, rows)
    if improved:
        save_dir(run, "best", write_best)
    save_dir(run, "last", write_last)
    plot_curves(rows, os.path.join(run, "curves.png"), title=os.path.basename(os.path.abspath(run)))


def train(
    config: RunConfig,
    out: str,
    stop_after: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Prepare the run folder ``out`` and train it (what ``fastprompt train`` does).

    Returns
    -------
    list of dict
        Per-epoch metrics.
    """
    env = setup(config.device)
    prepare_run(config, out, env, extra=extra)
    return continue_run(out, env, stop_after=stop_after, progress=progress, quiet=quiet)
