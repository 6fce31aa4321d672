"""The prompted core: a backbone adapter plus a prompt source; no method, no timm attribute.

:class:`PromptedViT` wraps a model without patching it. It asks the model's backbone adapter
(:mod:`fastprompt.backbones`) for every step of the forward and its prompt source
(:mod:`fastprompt.sources`) for the prompts, and registers the model's submodules and parameters
under their own names, and the source's under theirs, so ``state_dict()`` keys are the model's
plus the method's official ones.

Parameters are *adopted*: the wrapper is their one owner (:mod:`fastprompt.ownership`). The model
and the source keep entries that point at the wrapper's objects and are re-pointed whenever the
wrapper's change, so the forward never reads a stale copy; a model has one live wrapper.

The forward runs block by block. A block's prompt outputs are needed only when the next block
receives no new set (they flow on as tokens) or when the block is the last and the readout reads
them; otherwise only the prompts' keys and values matter (``docs/design.md`` §3). So per block:

- *tokens*: the prompts are tokens of the block (the official computation), inserted when the
  block receives a set, overwriting the prompt outputs of the block before;
- *keys/values*: the block receives a set whose outputs nobody reads: only its keys/values are
  computed (once for the batch, or per image) and the other tokens' queries attend to
  ``[K_p; K]`` through :func:`fastprompt.ops.prompt_attention`; prompt rows of Q, attention
  output, projection, LN2 and MLP are never computed.

That loop is :mod:`fastprompt.block_loop`'s, which ``forward_features`` and timm's
``forward_intermediates`` (:mod:`fastprompt.intermediates`) share.

``impl="naive"`` runs every block as tokens; ``impl="fused"`` (default) uses keys/values wherever
the rule allows, which covers VPT-deep, VPT-shallow (tokens throughout), prompt readouts and the
official ablations with the same numbers. Prompt keys/values can be computed once and reused at
inference inside :meth:`PromptedViT.frozen_prompts`; methods that need to see each block's
prompt attention (Prompt Condensation's scores) plug in through
:meth:`PromptedViT.attention_override`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.backbones import AttentionCall, AttentionFn, Backbone, PromptKV, adapter_for
from fastprompt.backends import NAMES as BACKENDS
from fastprompt.backends import get as get_backend
from fastprompt.block_loop import BlockLoop, run_attention
from fastprompt.intermediates import Intermediates
from fastprompt.memory import MEMORY_POLICIES, MemoryPolicies
from fastprompt.ownership import OwningWrapper
from fastprompt.sources import POSITIONS, PromptSource
from fastprompt.timm_facing import TimmFacing

__all__ = ["IMPLS", "MEMORY_POLICIES", "AttentionCall", "PromptedViT", "TokenFn", "run_attention"]

IMPLS = ("fused", "naive")

# (block, prompt tokens (T, P, W)) -> the prompt tokens the block receives instead.
TokenFn = Callable[[int, Tensor], Tensor]


class PromptedViT(BlockLoop, Intermediates, MemoryPolicies, TimmFacing, OwningWrapper):
    """A backbone with prompts from a :class:`~fastprompt.sources.PromptSource`.

    Build one with a method's entry point (:func:`fastprompt.vpt`); this class knows no method
    and no model family (its name is historical: any backbone with an adapter can be wrapped).

    Parameters
    ----------
    model : nn.Module
        The backbone (timm ``VisionTransformer``, or any family with an adapter in
        :mod:`fastprompt.backbones`); it is frozen and kept in eval mode, its head stays
        trainable.
    source : PromptSource
        Where the prompts come from; its parameters are registered on the wrapper.
    readout : str
        What the head reads (the adapter's readouts; a ViT: ``"cls"``, ``"patches"`` or
        ``"patches+prompts"``).
    impl : {"fused", "naive"}
        Computation; both give the same numbers.
    backend : str, optional
        Backend of :func:`fastprompt.ops.prompt_attention` (one of
        :data:`fastprompt.backends.NAMES`); None picks the best.
    method : str
        Name of the method that built the model (recorded in checkpoints).
    share_with : PromptedViT, optional
        A live wrapper of the same model: the new wrapper shares its backbone (Prompt
        Condensation's condensed model). Both are unwrapped together.
    """

    def __init__(
        self,
        model: nn.Module,
        source: PromptSource,
        readout: str = "cls",
        impl: str = "fused",
        backend: str | None = None,
        method: str = "custom",
        share_with: PromptedViT | None = None,
    ) -> None:
        super().__init__()
        who = f"fastprompt.{method}"
        if isinstance(model, PromptedViT):
            raise TypeError(f"{who}: this model is already prompted; call .unwrap() first")
        backbone = adapter_for(model, who)
        if impl not in IMPLS:
            raise ValueError(f"{who}: impl must be one of {IMPLS}, got {impl!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{who}: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend is not None and impl == "fused":
            entry = get_backend(backend)
            lacking = sorted(backbone.op_features - entry.features)
            if lacking:
                raise ValueError(
                    f"{who}: backend {backend!r} cannot run a {backbone.description}'s blocks: "
                    + "; ".join(f"no {f} ({entry.lacks[f]})" for f in lacking)
                )
        if not isinstance(source, PromptSource) or source.position not in POSITIONS:
            raise TypeError(f"{who}: source must be a PromptSource, got {type(source).__name__}")
        if source.position not in backbone.positions:
            raise ValueError(
                f"{who}: a {backbone.description} takes prompts at {backbone.positions}, not "
                f"{source.position!r}"
            )
        backbone.check_readout(readout, who)
        object.__setattr__(self, "_backbone", backbone)
        object.__setattr__(self, "_source", source)
        self.readout = readout
        self.impl = impl
        self._attention: AttentionFn | None = None
        self._token_fn: TokenFn | None = None
        # Asked again only when the blocks change (_check_model).
        object.__setattr__(self, "_fused_reasons", backbone.fused_unsupported_reasons())
        object.__setattr__(self, "_recompute", backbone.recompute_policies())
        self._memory = "none"
        self._refuse_unfused(who)
        object.__setattr__(self, "_adopted", [])
        object.__setattr__(self, "_hooks_said", set())  # (module, its hooks) already said
        self._wrapping = self._claim(model, share_with, who)
        object.__setattr__(self, "_model", model)
        self._adopt(model)
        self._adopt(source)
        self.backend = backend
        self.method = method
        # Owned by the method that built the model (e.g. Prompt Condensation's kept mask).
        self.method_state: dict[str, Any] = {}
        self._frozen: dict[int, PromptKV] | None = None
        for param in model.parameters():
            param.requires_grad_(False)
        backbone.classifier().requires_grad_(True)
        self.train(model.training)

    # -- modes and bookkeeping ------------------------------------------------------------------

    # Whether the model's classifier trains (a mixed-task model has heads of its own).
    _classifier_trains = True

    def _taken_from_owner(self, owner: nn.Module, value: Any) -> None:
        """What the model replaced itself (timm's ``reset_classifier``, ``set_input_size``) joins
        the frozen backbone, in eval mode; a new classifier trains, as the one wrapped did."""
        if owner is not self._model or value is None:
            return
        value.requires_grad_(False)
        if isinstance(value, nn.Module):
            value.eval()
            classifier = self._backbone.classifier()
            if self._classifier_trains and any(m is classifier for m in value.modules()):
                classifier.requires_grad_(True)

    def train(self, mode: bool = True) -> PromptedViT:
        """Set the prompt source's mode; the frozen backbone always stays in eval mode."""
        self.training = mode
        self._model.eval()
        self._source.train(mode)
        return self

    @property
    def model(self) -> nn.Module:
        """The wrapped model (shares every parameter with this wrapper)."""
        self._sync()
        return self._model

    @property
    def source(self) -> PromptSource:
        """The prompt source (its parameters are this wrapper's)."""
        self._sync()
        return self._source

    @property
    def backbone(self) -> Backbone:
        """The model's backbone adapter."""
        return self._backbone

    @property
    def depth(self) -> int:
        """Number of blocks of the backbone."""
        return self._backbone.depth

    @property
    def config(self) -> Any:
        """The configuration of the method that built the model (held by the prompt source)."""
        return self._source.config()

    def prompt_count(self, block: int) -> int:
        """Prompt tokens in ``block``'s input in the official computation: the set it receives,
        or the outputs of the last set received before it flowing on (0 before any)."""
        held = 0
        for i in range(block + 1):
            if self._source.receives(i):
                held = self._source.count(i)
        return held

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that train: the prompt source's and the head (anything not frozen)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def prompt_state(self) -> dict[str, Tensor]:
        """What a prompt checkpoint holds: every trainable parameter and the prompt source's
        buffers (a generator's BatchNorm statistics), under their state-dict names."""
        state: dict[str, Tensor] = dict(self.trainable_parameters())
        state.update(self.source.named_buffers())
        return state

    def print_trainable_parameters(self) -> None:
        """Print trainable / total parameter counts, as PEFT does."""
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        total = sum(p.numel() for p in self.parameters())
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
        )

    def save_prompts(self, path: str) -> None:
        """Save what trains (prompt source, head) and the method's config to a folder."""
        from fastprompt.checkpoint import save_prompts

        save_prompts(self, path)

    def extra_repr(self) -> str:
        memory = "" if self.memory_policy() == "none" else f", memory={self.memory_policy()!r}"
        return (
            f"method={self.method!r}, backbone={self._backbone.family!r}, "
            f"source={self._source.extra_repr()}, readout={self.readout!r}, impl={self.impl!r}"
            + memory
        )

    def _refuse_unfused(self, who: str) -> None:
        if self.impl == "fused" and self._fused_reasons and any(self.keys_values_only()):
            raise TypeError(
                f"{who}: {'; '.join(self._fused_reasons)}. Use impl='naive' for other blocks."
            )

    def _check_model(self) -> None:
        """Before a forward: the model's blocks as they were checked (a block replaced since is
        checked again), and no hooks where the forward would skip them."""
        bb = self._backbone
        changed = "fastprompt: the wrapped model changed since wrapping"
        if bb.check_unchanged(changed):
            object.__setattr__(self, "_fused_reasons", bb.fused_unsupported_reasons())
            object.__setattr__(self, "_recompute", bb.recompute_policies())
        if self._memory not in self.memory_policies():  # at every forward, as the next check
            raise ValueError(
                f"{changed}: memory={self._memory!r} no longer applies to its blocks "
                f"({'; '.join(bb.recompute_reasons())}); set memory to one of "
                f"{self.memory_policies()}"
            )
        self._refuse_unfused("fastprompt")
        self._warn_hooks(None, self._fused_path())

    # -- plug-in points ---------------------------------------------------------------------------

    def fused_unsupported_reasons(self) -> list[str]:
        """Why the fused path cannot run this model (empty when it can)."""
        fused = self._plan(fused=True)
        reasons = (
            []
            if any(not s.as_tokens for s in fused)
            else [
                "prompts are not deep (they are real tokens in every block, so there are no "
                "per-block prompt keys/values to attend to)"
            ]
        )
        return reasons + self._backbone.fused_unsupported_reasons()

    @contextlib.contextmanager
    def attention_override(self, fn: AttentionFn) -> Iterator[PromptedViT]:
        """Run every block's prompt attention through ``fn`` inside the block (fused path).

        ``fn`` receives a :class:`~fastprompt.backbones.AttentionCall` and returns the attention
        output (B, H, N, d); it may compute anything on the side (Prompt Condensation's scores).
        The model runs the fused path inside, whatever its ``impl``, which is exact; a model the
        fused path cannot reproduce is refused here with the reasons. Blocks whose prompts are
        tokens (their outputs are read later) run as in the official computation and are not
        seen, unless the source hands them keys/values of its own.
        """
        if not callable(fn):
            raise TypeError(f"attention_override: fn must be callable, got {type(fn).__name__}")
        reasons = self.fused_unsupported_reasons()
        if reasons:
            raise TypeError(
                "attention_override needs the fused path, which cannot run this model: "
                + "; ".join(reasons)
            )
        previous, self._attention = self._attention, fn
        try:
            yield self
        finally:
            self._attention = previous

    @contextlib.contextmanager
    def token_override(self, fn: TokenFn) -> Iterator[PromptedViT]:
        """Hand the prompt tokens entering every block that holds them as tokens through ``fn``.

        ``fn(block, prompts)`` receives the tokens (T, P, W) a block receives and returns the
        tokens it gets instead (a per-image copy to take per-sample gradients of, a set without
        one prompt); blocks on keys/values are not seen (:meth:`attention_override` sees them).
        """
        if not callable(fn):
            raise TypeError(f"token_override: fn must be callable, got {type(fn).__name__}")
        previous, self._token_fn = self._token_fn, fn
        try:
            yield self
        finally:
            self._token_fn = previous

    @contextlib.contextmanager
    def frozen_prompts(self) -> Iterator[PromptedViT]:
        """Inference with each block's prompt keys/values computed once, on entry.

        Every eval-mode forward inside the block reuses them, so a batch costs the image rows
        only. The cached keys/values are constants inside: an update made there is not seen
        through them until the next ``frozen_prompts()``, and no gradient reaches the prompts
        through them. Prompts that stay tokens (VPT-shallow's, VPT-Swin's last block under the
        official readout) are not cached: those read the current parameters, so do not update
        prompts inside the block. Training-mode forwards (dropout) inside compute them afresh.
        Outside the block nothing is cached: every forward sees the current parameters, however
        they were updated (fused optimisers, ``.data`` writes, EMA).
        """
        self._check_live()
        self._sync()
        self._check_model()
        frozen: dict[int, PromptKV] = {}
        with torch.no_grad():
            for i, step in enumerate(self._plan()):
                shared = None if step.as_tokens else self._source.shared(i)
                if shared is not None:
                    frozen[i] = PromptKV(*self._backbone.prompt_kv(i, shared))
        previous, self._frozen = self._frozen, frozen
        try:
            yield self
        finally:
            self._frozen = previous

    # -- forward --------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, **inputs: Any) -> Any:
        """Final normalised tokens.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
        **inputs
            Other forward inputs for the prompt source (none for the built-in sources).

        Returns
        -------
        Tensor
            The adapter's final tokens (a ViT: (B, N_tokens, D)): the image tokens, with the
            last block's prompt tokens where the source puts them when the readout reads them
            (``"patches+prompts"``); the same under every impl.
        """
        return self._features(x, inputs, "forward_features")

    def _features(self, x: Tensor, inputs: dict[str, Any], who: str) -> Any:
        return self._final_features(self._run_blocks(x, inputs, who=who))

    def forward_head(self, x: Any, pre_logits: bool = False) -> Tensor:
        """Readout and head, as timm's ``forward_head`` with prompts in mind."""
        bb = self._backbone
        pooled = bb.pool(x, self.readout, self._prompts_in_output(), self._source.position)
        return bb.head(pooled, pre_logits)

    def forward(self, x: Tensor, **inputs: Any) -> Tensor:
        """Logits.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
        **inputs
            Other forward inputs for the prompt source (none for the built-in sources).

        Returns
        -------
        Tensor, shape (B, num_classes)
        """
        return self.forward_head(self._features(x, inputs, "forward"))
