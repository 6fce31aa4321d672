"""Memory policies: what each block of a prompted model keeps for backward (``docs/design.md``
§4, "Memory").

The backbone is frozen, so backward needs data gradients only. ``"none"`` keeps what autograd
saves; ``"mlp"`` (an adapter's own policy) recomputes the MLP hidden from the block's middle
residual; ``"block"`` keeps each step's input and recomputes the step but the block's frozen tail.
timm's ``set_grad_checkpointing`` switch on the wrapped model runs ``"block"`` while it is on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from fastprompt.backbones import Backbone

__all__ = ["MEMORY_POLICIES", "MemoryPolicies", "step_under"]

# Everything autograd saves; all but the MLP hidden, recomputed from the block's middle
# residual; only the block's input.
MEMORY_POLICIES = ("none", "mlp", "block")


def step_under(
    memory: str,
    run: Callable[[Any, str], Any],
    tokens: Any,
    receives: bool,
    backbone: Backbone,
    block: int,
    recompute: tuple[str, ...],
) -> Any:
    """One step of the core's block loop under a memory policy.

    Parameters
    ----------
    memory : one of :data:`MEMORY_POLICIES`
    run : callable
        ``run(tokens, policy)``: the step on the token state (any pytree of tensors), with
        ``policy`` handed to the adapter's block (``"none"`` or one of ``recompute``).
    tokens : the token state entering the step
    receives : whether the step takes new prompts (a gradient flows through it then)
    backbone : the adapter, whose ``finish_block`` applies the tail kept outside a checkpoint
    block : the block's index
    recompute : the adapter's own policies (:meth:`Backbone.recompute_policies`)

    ``"block"`` checkpoints the whole step (non-reentrant, the random state replayed, so prompt
    dropout draws the same masks in the recomputation): backward keeps the step's input and
    recomputes the prompts, their keys/values and the block, but not the frozen tail that the
    adapter's ``finish_block`` computes outside the region when it lists ``"block"``. A step
    through which no gradient flows is not checkpointed.
    """
    if memory != "block":
        return run(tokens, memory)
    leaves, spec = pytree.tree_flatten(tokens)
    flows = receives or any(isinstance(t, Tensor) and t.requires_grad for t in leaves)
    if not (torch.is_grad_enabled() and flows):
        return run(tokens, "none")
    split = "block" in recompute

    def region(*leaves: Any) -> Any:
        return run(pytree.tree_unflatten(list(leaves), spec), "block" if split else "none")

    out = checkpoint(region, *leaves, use_reentrant=False, preserve_rng_state=True)
    return backbone.finish_block(block, out) if split else out


class MemoryPolicies:
    """The memory switches of :class:`fastprompt.PromptedViT` (``_backbone``, ``_recompute``:
    the adapter and its own policies; ``_memory``: the policy set)."""

    _backbone: Backbone
    _recompute: tuple[str, ...]
    _memory: str

    @property
    def memory(self) -> str:
        """What each block keeps for backward (``docs/design.md`` §4, "Memory"), one of
        :data:`MEMORY_POLICIES` that this model's backbone offers:

        - ``"none"``: everything autograd saves (a frozen linear saves no input);
        - ``"mlp"``: all but the MLP hidden, which backward recomputes from the block's middle
          residual (one extra GEMM of the MLP's first layer per token);
        - ``"block"``: the block's input only; backward recomputes the block but its frozen
          output projection (timm's per-block gradient checkpointing).

        Gradients are the same under every policy (bitwise where the same kernels run). The
        model's own switch (:meth:`set_grad_checkpointing`) overrides it with ``"block"``.
        """
        return self._memory

    @memory.setter
    def memory(self, policy: str) -> None:
        self.check_memory(policy)
        self._memory = policy

    def check_memory(self, policy: str) -> None:
        """Raise ``ValueError``, with the reason, if this model cannot run under ``policy``."""
        allowed = self.memory_policies()
        if policy not in allowed:
            why = f" (known: {MEMORY_POLICIES})"
            if policy in MEMORY_POLICIES:  # the first block the adapter cannot split says why
                reasons = self._backbone.recompute_reasons()
                why = f": {reasons[0]}" if reasons else ""
            raise ValueError(
                f"fastprompt: memory must be one of {allowed} for this model (a "
                f"{self._backbone.description}), got {policy!r}{why}"
            )

    def memory_policies(self) -> tuple[str, ...]:
        """The memory policies this model's backbone offers."""
        return tuple(p for p in MEMORY_POLICIES if p in ("none", "block") or p in self._recompute)

    def memory_policy(self) -> str:
        """The policy the next forward runs: ``"block"`` while the model's own gradient
        checkpointing switch is on, else :attr:`memory`."""
        return "block" if self._backbone.grad_checkpointing() else self._memory

    @property
    def grad_checkpointing(self) -> bool:
        """The wrapped model's own switch (timm's ``grad_checkpointing``)."""
        return self._backbone.grad_checkpointing()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: per-block gradient checkpointing (``memory="block"`` while on).

        It turns the wrapped model's own flag (``model.set_grad_checkpointing``), so a flag set
        on the model before or after wrapping is honoured the same way, and stays set after
        :meth:`unwrap`.
        """
        self._backbone.set_grad_checkpointing(bool(enable))
