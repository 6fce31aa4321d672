"""Ops (tier 2): registration, fake, autograd and backend choice, one file per op; the fp32
references apart, in :mod:`fastprompt.ops.reference` (it imports only torch).

``attention`` defines :func:`prompt_attention`, ``scores`` the scored attention Prompt
Condensation uses (and :func:`prompt_scores`, the reference score terms), ``gather``
:func:`gather_prompts`; ``checks`` holds the input checks the attention ops share.
"""

from fastprompt.ops.attention import prompt_attention
from fastprompt.ops.gather import gather_prompts, gather_prompts_ref
from fastprompt.ops.reference import prompt_attention_ref, prompt_scores_ref
from fastprompt.ops.scores import prompt_scores, scored_prompt_attention

__all__ = [
    "gather_prompts",
    "gather_prompts_ref",
    "prompt_attention",
    "prompt_attention_ref",
    "prompt_scores",
    "prompt_scores_ref",
    "scored_prompt_attention",
]
