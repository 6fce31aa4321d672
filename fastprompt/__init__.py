"""fastprompt: fast, exact visual prompt tuning of frozen timm vision transformers."""

from fastprompt import backends, ops
from fastprompt.batches import split_batch
from fastprompt.checkpoint import load_prompts, save_prompts
from fastprompt.methods.condensation import (
    condense,
    kept_prompts,
    prompt_condensation,
    score_prompts,
    select_prompts,
)
from fastprompt.methods.pgn import PGNConfig, invert_prompts, pgn, pixel_logits, pixel_model
from fastprompt.methods.vpt import VPTConfig, vpt
from fastprompt.models.vit import AttentionCall
from fastprompt.ops import prompt_attention
from fastprompt.prompted import PromptedViT
from fastprompt.train import evaluate, finetune, fit

__version__ = "0.1.0"

__all__ = [
    "AttentionCall",
    "PGNConfig",
    "PromptedViT",
    "VPTConfig",
    "__version__",
    "backends",
    "condense",
    "evaluate",
    "finetune",
    "fit",
    "invert_prompts",
    "kept_prompts",
    "load_prompts",
    "ops",
    "pgn",
    "pixel_logits",
    "pixel_model",
    "prompt_attention",
    "prompt_condensation",
    "save_prompts",
    "score_prompts",
    "select_prompts",
    "split_batch",
    "vpt",
]
