"""fastprompt: fast, exact visual prompt tuning of frozen timm vision transformers."""

from fastprompt import ops
from fastprompt import vpt as vpt_module
from fastprompt.checkpoint import load_prompts, save_prompts
from fastprompt.ops import prompt_attention
from fastprompt.vpt import PromptedViT, VPTConfig, vpt

__version__ = "0.1.0"

__all__ = [
    "PromptedViT",
    "VPTConfig",
    "__version__",
    "load_prompts",
    "ops",
    "prompt_attention",
    "save_prompts",
    "vpt",
    "vpt_module",
]
