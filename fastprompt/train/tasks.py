"""``fastprompt.multitask``: a mixed-task model from run folders and prompted models.

Run folders (``fastprompt train --out RUN``) are loaded one at a time (:func:`load_run_model`),
so that besides the shared backbone only one task's backbone is in memory while the model is
built; their prompts and heads are kept, their backbones dropped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import torch

from fastprompt.mixed import MultiTaskViT, TaskInput
from fastprompt.prompted import PromptedViT
from fastprompt.train.run import load_run_model

__all__ = ["multitask"]


def multitask(
    tasks: Mapping[str, str | os.PathLike | PromptedViT],
    checkpoint: str = "best",
    device: str | torch.device | None = None,
    backend: str | None = None,
) -> MultiTaskViT:
    """One frozen backbone serving several tasks' prompts and heads, a task per image.

    Parameters
    ----------
    tasks : mapping of str to run folder or PromptedViT
        Task name → a run folder of ``fastprompt train`` (VPT-deep, a condensed run, E²VPT) or a
        prompted model. Every task must have the same backbone weights.
    checkpoint : {"best", "last", "init"}
        Which checkpoint of each run folder.
    device : str or torch.device, optional
        Where run folders are loaded (default CPU); prompted models are used where they are.
    backend : str, optional
        Prompt-attention backend.

    Returns
    -------
    MultiTaskViT
        ``model(images, task)`` with ``task`` a name or index per image; logits equal each task's
        own model's. Refused, with the reason: tasks of another backbone, VPT-shallow, PGN.
    """
    if not isinstance(tasks, Mapping):
        raise TypeError(f"fastprompt.multitask: tasks must be a mapping, got {type(tasks)}")
    inputs: dict[str, TaskInput] = {}
    for name, task in tasks.items():
        if isinstance(task, (str, os.PathLike)):
            folder = os.fspath(task)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"fastprompt.multitask: task {name!r}: no folder {folder}")
            inputs[name] = functools.partial(load_run_model, folder, checkpoint, device or "cpu")
        else:
            inputs[name] = task
    return MultiTaskViT(inputs, backend=backend)
