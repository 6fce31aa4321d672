"""fastprompt: fast, exact visual prompt tuning of frozen timm vision transformers.

The methods, checkpoints and the prompted core load with the package; the training layer
(``fit``, ``finetune``, ``evaluate``, ``prompt_condensation``, ``multitask``, ``fastprompt.train``)
loads on first use, so importing fastprompt to wrap a model does not import the training loop.
"""

import importlib
from typing import Any

from fastprompt import backends, ops
from fastprompt.backbones import AttentionCall
from fastprompt.batches import split_batch
from fastprompt.checkpoint import load_prompts, save_prompts
from fastprompt.methods.condensation import (
    condense,
    kept_prompts,
    score_prompts,
    select_prompts,
)
from fastprompt.methods.e2vpt import E2VPTConfig, e2vpt
from fastprompt.methods.pgn import PGNConfig, invert_prompts, pgn, pixel_logits, pixel_model
from fastprompt.methods.vpt import VPTConfig, vpt
from fastprompt.methods.vpt_ablation import VPTAblationConfig, vpt_ablation
from fastprompt.mixed import MultiTaskViT
from fastprompt.ops import prompt_attention
from fastprompt.prompted import PromptedViT
from fastprompt.registry import register_peft_method

__version__ = "0.1.0"

# Public names of the training layer, loaded on first access.
_LAZY = {
    "e2vpt_pruning": "fastprompt.train.e2vpt",
    "evaluate": "fastprompt.train.simple",
    "finetune": "fastprompt.train.simple",
    "fit": "fastprompt.train.simple",
    "multitask": "fastprompt.train.tasks",
    "prompt_condensation": "fastprompt.train.simple",
}

__all__ = [
    "AttentionCall",
    "E2VPTConfig",
    "MultiTaskViT",
    "PGNConfig",
    "PromptedViT",
    "VPTAblationConfig",
    "VPTConfig",
    "__version__",
    "backends",
    "condense",
    "e2vpt",
    "e2vpt_pruning",
    "evaluate",
    "finetune",
    "fit",
    "invert_prompts",
    "kept_prompts",
    "load_prompts",
    "multitask",
    "ops",
    "pgn",
    "pixel_logits",
    "pixel_model",
    "prompt_attention",
    "prompt_condensation",
    "register_peft_method",
    "save_prompts",
    "score_prompts",
    "select_prompts",
    "split_batch",
    "vpt",
    "vpt_ablation",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
