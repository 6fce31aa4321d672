"""Ops (tier 2): reference, registration, fake, autograd and backend choice, one file per op.

``attention`` defines :func:`prompt_attention`, ``scores`` :func:`prompt_scores` and the scored
attention Prompt Condensation uses, ``gather`` :func:`gather_prompts`.
"""

from fastprompt.ops.attention import prompt_attention, prompt_attention_ref
from fastprompt.ops.gather import gather_prompts, gather_prompts_ref
from fastprompt.ops.scores import prompt_scores, prompt_scores_ref, scored_prompt_attention

__all__ = [
    "gather_prompts",
    "gather_prompts_ref",
    "prompt_attention",
    "prompt_attention_ref",
    "prompt_scores",
    "prompt_scores_ref",
    "scored_prompt_attention",
]
