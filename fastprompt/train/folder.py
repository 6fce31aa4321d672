"""Run folders on disk: the configuration (``run.json``), checkpoint folders, metrics, log.

The layout (:mod:`fastprompt.train.run` writes it):

```
.fastprompt-run the ownership marker: this folder is a run (fastprompt.train.owner)
.fastprompt-lock locked by the process writing the run (pid and host inside)
run.json        the resolved configuration (model, method, data, recipe, precision, seed, ...)
                and the class map (``classes``: label i is ``classes[i]``)
split.json      which samples train and which validate (ids and labels; fastprompt.train.splits)
init/           the prompt checkpoint training starts from (fastprompt.load_prompts reads it)
last/           the latest epoch: prompt checkpoint + trainer.pt (optimiser, scaler, schedule,
                epoch, best so far, every process's random state) + trainer.pt.sha256
best/           the epoch with the best validation top-1: prompt checkpoint + best.json
metrics.jsonl   one JSON line per epoch: lr, train/val loss and top-1, throughput, data wait
curves.png      loss and top-1 per epoch (with matplotlib)
log.txt         what was printed
```

Checkpoint folders are written whole under a temporary name and swapped in, so an interrupted
save leaves the previous one readable. A file a person put into a checkpoint folder is carried
into the new one, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import torch

from fastprompt.train.distributed import DistEnv, all_gather_objects, env_rank
from fastprompt.train.leftovers import (
    SWAP_MARK,
    only_ours,
    ours_swap,
    retire,
    settle_swap,
    swap_dir,
)
from fastprompt.train.recipes import Recipe

__all__ = [
    "FORMAT",
    "METRICS_FILE",
    "RUN_FILE",
    "DataConfig",
    "Log",
    "ModelSpec",
    "RunConfig",
    "RunError",
    "check_one_save",
    "checkpoint_dir",
    "metrics_upto",
    "no_checkpoint",
    "read_checkpoint",
    "read_run",
    "save_dir",
    "write_metrics",
]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
FORMAT = "fastprompt.run/1"

T = TypeVar("T")


class RunError(ValueError):
    """A run folder or configuration that cannot be used (the message says why)."""


@dataclass
class ModelSpec:
    """The frozen backbone: a timm model name, its constructor arguments and its weights.

    Attributes
    ----------
    name : str
        timm model name (``vit_base_patch16_224.orig_in21k``).
    args : dict
        More ``timm.create_model`` arguments (``img_size``, ``depth``, ...).
    weights : str, optional
        A local state dict (``.safetensors``, ``.pth``) for the backbone; its head is replaced
        when the class count differs.
    pretrained : bool
        Without ``weights``: timm's pretrained weights (downloaded by timm, cached) or a random
        init (reproducible from the run's seed).
    weights_sha256 : str, optional
        Of ``weights``, checked when the run is continued.
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = True
    weights_sha256: str | None = None


@dataclass
class DataConfig:
    """Where the images come from (:mod:`fastprompt.train.data`).

    ``train`` (and then ``val``) may be a list: a run over a mixture of datasets
    (:mod:`fastprompt.train.multi`). ``num_classes`` (one dataset only) is the task's class
    count, the head's outputs, as the official VTAB code's ``DATA.NUMBER_CLASSES``: integer labels
    index classes ``0 … num_classes − 1`` whether or not ``train`` holds images of every one
    (a VTAB-1k ``train800`` list may lack a few that its ``test`` list has); None: the training
    data's classes.
    """

    train: str | list[str]
    val: str | list[str] | None = None
    val_split: str | None = None
    workers: int = 0
    num_classes: int | None = None


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``run.json``.

    Attributes
    ----------
    model : ModelSpec
    method : str
        ``"vpt"`` or ``"pgn"`` (a condensed run records ``"prompt_condensation"``).
    method_args : dict
        The method entry point's arguments (``fastprompt.vpt`` / ``fastprompt.pgn``).
    data : DataConfig
    recipe : Recipe
    base_lr : float, optional
        For a recipe without lr (``pc-finetune``).
    precision : {"fp32", "bf16", "fp16"}
    compile : bool
    seed : int
    device : str, optional
        Default CUDA when available.
    init : dict, optional
        Where the starting prompts came from when not from ``method`` (a condensed run).
    """

    model: ModelSpec
    method: str
    method_args: dict[str, Any]
    data: DataConfig
    recipe: Recipe
    base_lr: float | None = None
    precision: str = "fp32"
    compile: bool = False
    seed: int = 0
    device: str | None = None
    init: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recipe"] = self.recipe.to_dict()
        if out["data"]["num_classes"] is None:  # run.json as before the field, which reads back
            del out["data"]["num_classes"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The configuration ``to_dict`` wrote.

        Raises
        ------
        KeyError, TypeError, ValueError
            A missing entry, an unknown field, a bad value.
        """
        for name, kind in (("model", ModelSpec), ("data", DataConfig)):
            unknown = sorted(set(d[name]) - {f.name for f in fields(kind)})
            if unknown:
                raise ValueError(f"unknown {name} fields {unknown}")
        return cls(
            model=ModelSpec(**d["model"]),
            method=d["method"],
            method_args=dict(d["method_args"]),
            data=DataConfig(**d["data"]),
            recipe=Recipe.from_dict(d["recipe"]),
            base_lr=d.get("base_lr"),
            precision=d.get("precision", "fp32"),
            compile=d.get("compile", False),
            seed=d.get("seed", 0),
            device=d.get("device"),
            init=d.get("init"),
        )


def read_run(path: str) -> tuple[RunConfig, dict[str, Any]]:
    """The configuration of the run in ``path`` and the whole ``run.json``."""
    file = os.path.join(path, RUN_FILE)
    if not os.path.isfile(file):
        what = "does not exist" if not os.path.exists(path) else f"holds no {RUN_FILE}"
        raise RunError(f"{path} {what}; is it a fastprompt run folder?")
    try:
        with open(file) as f:
            saved = json.load(f)
    except ValueError as e:
        raise RunError(
            f"{file} is not valid JSON ({e}): damaged or cut short; it holds the run's "
            "configuration, so the run cannot be read without it"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        got = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise RunError(f"{file} has format {got!r}, expected {FORMAT!r}")
    missing = [k for k in ("config", "classes") if k not in saved]
    if missing:
        raise RunError(f"{file} lacks {missing}; was it edited by hand?")
    try:
        config = RunConfig.from_dict(saved["config"])
    except KeyError as e:
        raise RunError(f"{file}: its config lacks {e}; was it edited by hand?") from None
    except (TypeError, ValueError) as e:
        raise RunError(f"{file}: its config cannot be used ({e})") from None
    classes = saved["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise RunError(f"{file}: 'classes' must be a list of class names, got {classes!r:.80}")
    return config, saved


def checkpoint_dir(run: str, name: str) -> str | None:
    """``run/name``, or where an interrupted save left it, as a resume settles it: the previous
    copy a swap moved aside (it bears the mark) or an older fastprompt's ``name.old``, when
    ``run/name`` is gone. None when the run has no such checkpoint."""
    final = os.path.join(run, name)
    if os.path.isfile(os.path.join(final, "prompts.safetensors")):
        return final
    if os.path.lexists(final):
        return None
    swap, legacy = swap_dir(run, name), os.path.join(run, name + ".old")
    if ours_swap(swap) and os.path.isfile(os.path.join(swap, "prompts.safetensors")):
        return swap
    if (
        os.path.isdir(legacy)
        and not os.path.islink(legacy)
        and only_ours(legacy)
        and os.path.isfile(os.path.join(legacy, "prompts.safetensors"))
    ):
        return legacy
    return None


def no_checkpoint(run: str, name: str) -> str:
    """Why :func:`checkpoint_dir` found no checkpoint ``name`` in ``run`` (a message)."""
    swap, final = swap_dir(run, name), os.path.join(run, name)
    if os.path.lexists(final):
        # Not a checkpoint still to come: one whose files were removed, or a copy cut short.
        return (
            f"{final} is there but holds no prompts.safetensors: the checkpoint is damaged or "
            "incomplete; restore it from a copy of the run, or use another of its checkpoints "
            "(best, last, init)"
        )
    if os.path.lexists(swap):
        return (
            f"{run} has no {name}/ checkpoint, and {swap} is not one a save of fastprompt moved "
            f"aside (it lacks the mark {SWAP_MARK}, or its prompts.safetensors): move it back to "
            f"{os.path.join(run, name)} if it is the checkpoint"
        )
    return f"{run} has no {name}/ checkpoint yet"


def read_checkpoint(run: str, name: str, read: Callable[[str], T], attempts: int = 5) -> T:
    """``read(folder)`` of the checkpoint ``name`` of ``run`` (:func:`checkpoint_dir`), as one
    save wrote it, without the run's lock: a `train` of the run may swap a new one in meanwhile.

    A save never changes a checkpoint folder's files in place: it swaps a new folder in and then
    removes the previous one's files. So a read during which the folder it read stayed where it
    was (and, read from where a save left it, no new one appeared) read one save's files; any
    other read is repeated.

    Raises
    ------
    RunError
        No such checkpoint, or one replaced during each of ``attempts`` reads.
    """
    for _ in range(attempts):
        folder = checkpoint_dir(run, name)
        if folder is None:
            raise RunError(no_checkpoint(run, name))
        try:
            pin = os.open(folder, os.O_RDONLY)  # keeps its inode from being reused meanwhile
        except FileNotFoundError:
            continue
        except OSError:  # a system that opens no folders (Windows): the identity alone
            pin = None
        try:
            before = os.fstat(pin) if pin is not None else _stat(folder)
            if before is None:
                continue
            try:
                result = read(folder)
            except (OSError, ValueError):
                if _in_place(run, name, folder, before):
                    raise
                continue
            if _in_place(run, name, folder, before):
                if folder != os.path.join(run, name) and env_rank() == 0:  # once under torchrun
                    print(
                        f"note: read {folder}, where an interrupted save left {name}/ (a "
                        f"train --resume of {run} puts it back)",
                        file=sys.stderr,
                    )
                return result
        finally:
            if pin is not None:
                os.close(pin)
    raise RunError(
        f"{os.path.join(run, name)} was replaced during each of {attempts} reads (a train of the "
        "run saving it): try again"
    )


def check_one_save(env: DistEnv, model: torch.nn.Module, run: str, checkpoint: str) -> None:
    """Refuse when the processes of a torchrun read different saves of ``checkpoint`` (each
    reads it without the run's lock, and a `train` of the run may save between their reads):
    their results would be summed as one model's.

    Raises
    ------
    RunError
        The trained parameters (prompts, head) differ between processes.
    """
    if not env.active:
        return
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    if len(set(all_gather_objects(env, digest.hexdigest()))) > 1:
        raise RunError(
            f"the {env.world} processes read different saves of {os.path.join(run, checkpoint)} "
            "(a train of the run saved it meanwhile): try again"
        )


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _in_place(run: str, name: str, folder: str, before: os.stat_result) -> bool:
    now = _stat(folder)
    if now is None or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
        return False
    # A previous copy stays whole until a new checkpoint is swapped in next to it.
    return folder == os.path.join(run, name) or not os.path.lexists(os.path.join(run, name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_dir(run: str, name: str, write) -> None:
    """Write a checkpoint folder whole, then swap it in (an interrupted save keeps the old one).

    Files in the old folder that fastprompt does not write (a person's notes) move into the new
    one: a checkpoint never replaces or removes a person's file, even when interrupted.
    """
    tmp = tempfile.mkdtemp(dir=run, prefix=f".{name}-")
    try:
        write(tmp)
        # mkdtemp/mkstemp make owner-only entries; a checkpoint is as readable as any file.
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for entry in os.listdir(tmp):
            os.chmod(os.path.join(tmp, entry), 0o666 & ~mask)
        final, previous = os.path.join(run, name), swap_dir(run, name)
        if os.path.islink(final) or os.path.islink(previous):
            raise OSError(f"{final}: a checkpoint folder may not be a symbolic link")
        settle_swap(run, name)  # an earlier save interrupted mid-swap
        if os.path.lexists(previous):
            raise OSError(
                f"{previous} is in the way: fastprompt did not make this folder, or its files "
                f"clash with {final}'s; move it away and run again"
            )
        if os.path.isdir(final):
            # Marked first: a previous copy bearing the mark is fastprompt's to remove.
            with open(os.path.join(final, SWAP_MARK), "w"):
                pass
            os.rename(final, previous)
        os.rename(tmp, final)
        if os.path.isdir(previous):
            retire(previous, final)
    finally:
        if os.path.isdir(tmp) and only_ours(tmp):
            shutil.rmtree(tmp)


def portable_rng(state: dict[str, Any]) -> dict[str, Any]:
    """The random state in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    out = dict(state)
    out["numpy"] = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss]
    version, internal, gauss_next = state["python"]
    out["python"] = [version, list(internal), gauss_next]
    return out


def native_rng(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    version, internal, gauss_next = state["python"]
    out["python"] = (version, tuple(internal), gauss_next)
    return out


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Log:
    def __init__(self, run: str, env: DistEnv, quiet: bool = False) -> None:
        self.path = os.path.join(run, "log.txt")
        self.main = env.main
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.main:
            return
        if not self.quiet:
            print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def metrics_upto(run: str, epochs: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` before epoch ``epochs``.

    Raises
    ------
    RunError
        A damaged file.
    """
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if r["epoch"] < epochs]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(
            f"{path} is damaged ({type(e).__name__}: {e}); it is the run's record"
        ) from None


def write_metrics(run: str, rows: list[dict[str, Any]]) -> None:
    path = os.path.join(run, METRICS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
