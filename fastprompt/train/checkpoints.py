"""A run's checkpoints: what an epoch writes (``last/``, ``best/``, metrics, curves) and the
trainer state a resume reads back.

``last/trainer.pt`` (optimiser, scaler, schedule, epoch, best so far, every process's random
state) is written with ``trainer.pt.sha256`` beside it (the ``sha256sum -c`` format); a resume
refuses a missing, truncated or altered file with its name and what is wrong. The prompt
checkpoints carry the run's class map and their own checksum (:mod:`fastprompt.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from fastprompt.checkpoint import save_prompts
from fastprompt.tensorfiles import FileDamaged, load_torch
from fastprompt.train.folder import RunError, save_dir, write_metrics
from fastprompt.train.loop import Trainer
from fastprompt.train.plot import plot_curves

__all__ = ["TRAINER_FILE", "read_trainer_state", "save_epoch", "sha256"]

TRAINER_FILE = "trainer.pt"


def sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_trainer_state(last: str, trainer: Trainer) -> dict[str, Any]:
    """``last/trainer.pt``, checked (present, whole, its checksum, its entries), loaded into
    ``trainer``."""
    path = os.path.join(last, TRAINER_FILE)
    if not os.path.isfile(path):
        raise RunError(
            f"{path} is missing, so the run cannot continue from {last} (the optimiser, "
            "schedule and random states are in that file); restore it, or start a new run"
        )
    digest = path + ".sha256"
    if os.path.isfile(digest):
        with open(digest) as f:
            want = f.read().split()[:1]
        if want != [sha256(path)]:
            raise RunError(
                f"{path} is damaged: it does not match the checksum in {digest} written with "
                "it (a flipped bit on disk, or a bad copy); restore it, or start a new run"
            )
    try:
        state = load_torch(path)
    except FileDamaged as e:
        raise RunError(f"{e}; restore it, or start a new run") from None
    try:
        trainer.load_state_dict(state["trainer"])
        state["best"]["val_acc"], state["rng"][0]
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise RunError(
            f"{path} is not a trainer state this run can continue from ({type(e).__name__}: {e})"
        ) from None
    return state


def save_epoch(run, model, trainer, best, rng, improved, rows, classes) -> None:
    """Write an epoch: ``metrics.jsonl``, ``best/`` when it improved, ``last/``, the curves."""
    state = {"trainer": trainer.state_dict(), "best": best, "rng": rng}

    def write_last(folder: str) -> None:
        save_prompts(model, folder, classes=classes)
        path = os.path.join(folder, TRAINER_FILE)
        torch.save(state, path)
        with open(path + ".sha256", "w") as f:
            f.write(f"{sha256(path)}  {TRAINER_FILE}\n")  # the format sha256sum -c reads

    def write_best(folder: str) -> None:
        save_prompts(model, folder, classes=classes)
        with open(os.path.join(folder, "best.json"), "w") as f:
            json.dump(rows[-1], f, indent=2)

    write_metrics(run, rows)
    if improved:
        save_dir(run, "best", write_best)
    save_dir(run, "last", write_last)
    plot_curves(rows, os.path.join(run, "curves.png"), title=os.path.basename(os.path.abspath(run)))
