"""The training layer: recipes, data, the loop, run folders, torchrun, Prompt Condensation runs.

- :func:`fit`, :func:`finetune`, :func:`evaluate`: the loop on any loader, three calls;
  :func:`prompt_condensation`: Prompt Condensation's Algorithm 1 on a trained model.
- :class:`Trainer`: one epoch of a recipe at a time (mixed precision, compile, DDP, state).
- :data:`RECIPES` / :class:`Recipe`: ``vpt``, ``e2vpt``, ``pgn``, ``pc-finetune``
  (:mod:`.recipes`); :func:`apply_changes`: a user's changes to a recipe, as ``fastprompt
  train`` and :func:`fit` both apply them.
- :func:`train` / :func:`continue_run` / :class:`RunConfig`: run folders with checkpoints,
  metrics, curves and resume, as ``fastprompt train`` runs them (:mod:`.run`).
- :func:`condense_run`: Prompt Condensation of a run folder into a new one (:mod:`.condense`).
"""

from fastprompt.train.condense import condense_run
from fastprompt.train.loop import Trainer, evaluate_model
from fastprompt.train.recipes import (
    RECIPES,
    VTAB1K_PROMPTS,
    Recipe,
    apply_changes,
    get_recipe,
    lr_factor,
)
from fastprompt.train.run import (
    DataConfig,
    ModelSpec,
    RunConfig,
    continue_run,
    load_run_model,
    prepare_run,
    train,
)
from fastprompt.train.simple import evaluate, finetune, fit, prompt_condensation

__all__ = [
    "RECIPES",
    "VTAB1K_PROMPTS",
    "DataConfig",
    "ModelSpec",
    "Recipe",
    "RunConfig",
    "Trainer",
    "apply_changes",
    "condense_run",
    "continue_run",
    "evaluate",
    "evaluate_model",
    "finetune",
    "fit",
    "get_recipe",
    "load_run_model",
    "lr_factor",
    "prepare_run",
    "prompt_condensation",
    "train",
]
