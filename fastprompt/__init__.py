"""fastprompt: fast, exact visual prompt tuning of frozen timm vision transformers."""

from fastprompt import ops
from fastprompt import vpt as vpt_module
from fastprompt.checkpoint import load_prompts, save_prompts
from fastprompt.condensation import (
    condense,
    prompt_condensation,
    score_prompts,
    select_prompts,
)
from fastprompt.ops import prompt_attention
from fastprompt.train import evaluate, finetune, fit
from fastprompt.vpt import PromptedViT, VPTConfig, vpt

__version__ = "0.1.0"

__all__ = [
    "PromptedViT",
    "VPTConfig",
    "__version__",
    "condense",
    "evaluate",
    "finetune",
    "fit",
    "load_prompts",
    "ops",
    "prompt_attention",
    "prompt_condensation",
    "save_prompts",
    "score_prompts",
    "select_prompts",
    "vpt",
    "vpt_module",
]
