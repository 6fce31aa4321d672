"""Ops (tier 2): reference, registration, fake, autograd and backend choice per op."""

from fastprompt.ops.prompt_attention import prompt_attention, prompt_attention_ref

__all__ = ["prompt_attention", "prompt_attention_ref"]
