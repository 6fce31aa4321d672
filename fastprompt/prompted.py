"""The prompted ViT core: a timm ``VisionTransformer`` plus a prompt source; no method in it.

:class:`PromptedViT` wraps a timm model without patching it. It registers the model's submodules
and parameters under their own names, and those of its prompt source (:mod:`fastprompt.sources`)
under theirs, so ``state_dict()`` keys are the model's plus the method's official ones.

Parameters are *adopted*: the wrapper is their one owner. The model and the source keep entries
that point at the wrapper's objects and are re-pointed whenever the wrapper's change (``.to()``
with parameter overwriting, ``to_empty()``, ``load_state_dict(assign=True)``, attribute
assignment, ``torch.func.functional_call``), so the forward never reads a stale copy.

Two computations share the parameters and give the same logits:

- naive (the official algorithm): prompts are real tokens in every block;
- fused (deep sources only): per block only the prompts' keys/values matter, so they are computed
  once (shared by the batch, or per image) and the image queries attend to ``[K_p; K_img]``
  through :func:`fastprompt.ops.prompt_attention`; prompt rows of Q, attention output,
  projection, LN2 and MLP are never computed (``docs/design.md`` §3).

Prompt keys/values can be computed once and reused at inference inside
:meth:`PromptedViT.frozen_prompts`; methods that need to see each block's prompt attention
(Prompt Condensation's scores) plug in through :meth:`PromptedViT.attention_override`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.models import vit
from fastprompt.models.vit import AttentionCall, AttentionFn
from fastprompt.ops.attention import prompt_attention
from fastprompt.sources import POSITIONS, PromptSource

__all__ = ["IMPLS", "AttentionCall", "PromptedViT", "run_attention"]

IMPLS = ("fused", "naive")


class _Wrapping:
    """One timm model's wrapping: its flags and modes before, and the wrappers that share it."""

    def __init__(self, model: nn.Module) -> None:
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.active = True
        self.refs: list[weakref.ref] = []

    def live(self) -> bool:
        return any(r() is not None for r in self.refs)


# model → its wrapping; weak, so a model that is gone leaves no entry.
_WRAPPINGS: weakref.WeakKeyDictionary[nn.Module, _Wrapping] = weakref.WeakKeyDictionary()


def run_attention(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """What a block computes by default: :func:`fastprompt.ops.prompt_attention` on the call,
    ``(out (B, H, N, d), lse (B, H, N))``. Overrides that only look on can return its ``out``."""
    return prompt_attention(
        call.q,
        call.k,
        call.v,
        call.prompt_k,
        call.prompt_v,
        call.prompt_index,
        scale=call.scale,
        backend=call.backend,
    )


def _default_attention(call: AttentionCall) -> Tensor:
    return run_attention(call)[0]


class PromptedViT(nn.Module):
    """A timm ``VisionTransformer`` with prompts from a :class:`~fastprompt.sources.PromptSource`.

    Build one with a method's entry point (:func:`fastprompt.vpt`); this class knows no method.

    Parameters
    ----------
    model : timm.models.vision_transformer.VisionTransformer
        The backbone; it is frozen and kept in eval mode, its head stays trainable.
    source : PromptSource
        Where the prompts come from; its parameters are registered on the wrapper.
    readout : {"cls", "patches", "patches+prompts"}
        The class token, the mean of the patch tokens, or the mean of all non-prefix tokens
        (prompt outputs included).
    impl : {"fused", "naive"}
        Computation; both give the same numbers. Non-deep sources always run the naive path.
    backend : str, optional
        Backend of :func:`fastprompt.ops.prompt_attention`; None picks the best.
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
        vit.check_wrappable(model, who)
        if impl not in IMPLS:
            raise ValueError(f"{who}: impl must be one of {IMPLS}, got {impl!r}")
        if not isinstance(source, PromptSource) or source.position not in POSITIONS:
            raise TypeError(f"{who}: source must be a PromptSource, got {type(source).__name__}")
        if readout == "cls" and model.cls_token is None:
            raise ValueError(f"{who}: readout='cls' needs a model with a class token")
        if impl == "fused" and source.deep:
            reasons = vit.fused_unsupported_reasons(model)
            if reasons:
                raise TypeError(f"{who}: {'; '.join(reasons)}. Use impl='naive' for other blocks.")
        object.__setattr__(self, "_adopted", [])
        self._wrapping = self._claim(model, share_with, who)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_source", source)
        self._adopt(model)
        self._adopt(source)
        self.readout = readout
        self.impl = impl
        self.backend = backend
        self.method = method
        # Owned by the method that built the model (e.g. Prompt Condensation's kept mask).
        self.method_state: dict[str, Any] = {}
        self._frozen: list[tuple[Tensor, Tensor]] | None = None
        self._attention: AttentionFn | None = None
        for param in model.parameters():
            param.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
        self.train(model.training)

    # -- ownership --------------------------------------------------------------------------------

    def _claim(self, model: nn.Module, share_with: PromptedViT | None, who: str) -> _Wrapping:
        record = _WRAPPINGS.get(model)
        if share_with is not None:
            if share_with._model is not model or record is not share_with._wrapping:
                raise ValueError(f"{who}: share_with must be a live wrapper of the same model")
            share_with._check_live()
        elif record is not None and record.active and record.live():
            raise TypeError(
                f"{who}: this timm model is already wrapped by a live PromptedViT (which froze "
                "its backbone and set up its head); call .unwrap() on that wrapper first, or "
                "wrap a copy.deepcopy(model)"
            )
        elif record is None or not record.active:
            record = _Wrapping(model)
            _WRAPPINGS[model] = record
        # else: earlier wrappers were dropped without unwrap(); the model is still frozen, and
        # the record keeps its state from before, so a later unwrap() restores that state.
        record.refs = [r for r in record.refs if r() is not None] + [weakref.ref(self)]
        return record

    def _check_live(self) -> None:
        if not self._wrapping.active:
            raise RuntimeError(
                "fastprompt: this prompted model was unwrapped (its backbone is no longer "
                "frozen); wrap the timm model again to use prompts"
            )

    def unwrap(self) -> nn.Module:
        """Return the timm model with its original ``requires_grad`` flags and modes restored.

        The model's weights (including the trained head) are the ones this wrapper used; the
        prompts stay in this wrapper, which (with any wrapper sharing the model) stops working.
        """
        self._check_live()
        self._sync()
        record = self._wrapping
        for name, param in self._model.named_parameters():
            param.requires_grad_(record.flags.get(name, param.requires_grad))
        for name, module in self._model.named_modules():
            module.training = record.modes.get(name, module.training)
        record.active = False
        if _WRAPPINGS.get(self._model) is record:
            del _WRAPPINGS[self._model]
        return self._model

    # -- adoption: the wrapper owns the parameters the model and the source also hold ---------

    def _adopt(self, owner: nn.Module) -> None:
        names = []
        for name, child in owner.named_children():
            self._check_free(name, owner)
            self.add_module(name, child)
            names.append(name)
        for name, param in owner._parameters.items():  # None entries too (VPT-shallow's deep set)
            self._check_free(name, owner)
            self.register_parameter(name, param)
            names.append(name)
        for name, buf in owner.named_buffers(recurse=False):
            self._check_free(name, owner)
            self.register_buffer(
                name, buf, persistent=name not in owner._non_persistent_buffers_set
            )
            names.append(name)
        self._adopted.append((owner, tuple(names)))

    def _check_free(self, name: str, owner: nn.Module) -> None:
        if name in self._modules or name in self._parameters or name in self._buffers:
            raise ValueError(
                f"fastprompt: {type(owner).__name__} has an attribute {name!r} that another part "
                "of the prompted model already uses"
            )

    def _sync(self) -> None:
        """Point the model's and the source's entries at the wrapper's current objects."""
        for owner, names in self._adopted:
            for name in names:
                for table in ("_parameters", "_buffers", "_modules"):
                    mine = getattr(self, table)
                    if name in mine:
                        theirs = getattr(owner, table)
                        if theirs.get(name) is not mine[name]:
                            theirs[name] = mine[name]
                        break

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if any(name in names for _, names in self.__dict__.get("_adopted", ())):
            self._sync()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._sync()
        return result

    # -- modes and bookkeeping ------------------------------------------------------------------

    def train(self, mode: bool = True) -> PromptedViT:
        """Set the prompt source's mode; the frozen backbone always stays in eval mode."""
        self.training = mode
        self._model.eval()
        self._source.train(mode)
        return self

    @property
    def model(self) -> nn.Module:
        """The wrapped timm model (shares every parameter with this wrapper)."""
        self._sync()
        return self._model

    @property
    def source(self) -> PromptSource:
        """The prompt source (its parameters are this wrapper's)."""
        self._sync()
        return self._source

    @property
    def config(self) -> Any:
        """The prompt source's configuration."""
        return self._source.config()

    def prompt_count(self, block: int) -> int:
        """Prompts that ``block`` receives (its own set when deep, block 0's otherwise)."""
        return self._source.count(block)

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
        return (
            f"method={self.method!r}, source={self._source.extra_repr()}, "
            f"readout={self.readout!r}, impl={self.impl!r}"
        )

    # -- plug-in points ---------------------------------------------------------------------------

    def fused_unsupported_reasons(self) -> list[str]:
        """Why the fused path cannot run this model (empty when it can)."""
        reasons = (
            []
            if self._source.deep
            else [
                "prompts are not deep (they are real tokens in every block, so there are no "
                "per-block prompt keys/values to attend to)"
            ]
        )
        return reasons + vit.fused_unsupported_reasons(self._model)

    @contextlib.contextmanager
    def attention_override(self, fn: AttentionFn) -> Iterator[PromptedViT]:
        """Run every block's prompt attention through ``fn`` inside the block (fused path).

        ``fn`` receives a :class:`~fastprompt.models.vit.AttentionCall` and returns the attention
        output (B, H, N, d); it may compute anything on the side (Prompt Condensation's scores).
        The model runs the fused path inside, whatever its ``impl``, which is exact; a model the
        fused path cannot reproduce is refused here with the reasons.
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
    def frozen_prompts(self) -> Iterator[PromptedViT]:
        """Inference with each block's prompt keys/values computed once, on entry.

        Every eval-mode forward inside the block reuses them, so a batch costs the image rows
        only. Prompts and weights are constants inside: an update made there is not seen until
        the next ``frozen_prompts()``, and no gradient reaches the prompts through the cached
        keys/values. Training-mode forwards (dropout) inside compute them afresh. Outside the
        block nothing is cached: every forward sees the current parameters, however they were
        updated (fused optimisers, ``.data`` writes, EMA).
        """
        self._check_live()
        self._sync()
        frozen = None
        if self._runs_fused():
            m = self._model
            with torch.no_grad():
                frozen = [vit.prompt_kv(m, i, self._source.shared(i)) for i in range(len(m.blocks))]
        previous, self._frozen = self._frozen, frozen
        try:
            yield self
        finally:
            self._frozen = previous

    # -- forward --------------------------------------------------------------------------------

    def _runs_fused(self) -> bool:
        if not self._source.deep:
            return False
        return self.impl == "fused" or self._attention is not None

    def _prompts_in_output(self) -> int:
        """How many prompt tokens ``forward_features`` returns (between prefix and patches for
        prefix sources, after the patches for suffix ones)."""
        last = self._source.count(len(self._model.blocks) - 1 if self._source.deep else 0)
        if not self._runs_fused() or self.readout == "patches+prompts":
            return last
        return 0

    def _insert(self, tokens: Tensor, prompts: Tensor) -> Tensor:
        b, npre = tokens.shape[0], self._model.num_prefix_tokens
        prompts = prompts.expand(b, -1, -1)
        if self._source.position == "prefix":
            return torch.cat([tokens[:, :npre], prompts, tokens[:, npre:]], dim=1)
        return torch.cat([tokens, prompts], dim=1)

    def _replace(self, tokens: Tensor, prompts: Tensor, previous: int) -> Tensor:
        """Overwrite the previous block's prompt outputs with a new set (VPT-deep)."""
        npre = self._model.num_prefix_tokens
        if self._source.position == "prefix":
            kept = torch.cat([tokens[:, :npre], tokens[:, npre + previous :]], dim=1)
        else:
            kept = tokens[:, : tokens.shape[1] - previous]
        return self._insert(kept, prompts)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normalised tokens.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)

        Returns
        -------
        Tensor, shape (B, N_tokens, D)
            The prefix and patch tokens, with the prompt tokens where the source puts them when
            the path computes them (the naive path always; the fused path only for a readout
            that reads them).
        """
        self._check_live()
        self._sync()
        m = self._model
        tokens = vit.embed(m, x)
        state = self._source.prepare(x)
        if self._runs_fused():
            return m.norm(self._fused_blocks(tokens, state))
        return m.norm(self._naive_blocks(tokens, state))

    def _naive_blocks(self, tokens: Tensor, state: Any) -> Tensor:
        m, src, b = self._model, self._source, tokens.shape[0]
        x = m.norm_pre(self._insert(tokens, src.tokens(0, b, state)))
        for i, blk in enumerate(m.blocks):
            if i > 0 and src.deep:
                x = self._replace(x, src.tokens(i, b, state), src.count(i - 1))
            x = blk(x)
        return x

    def _fused_blocks(self, tokens: Tensor, state: Any) -> Tensor:
        m, src, b = self._model, self._source, tokens.shape[0]
        x = m.norm_pre(tokens)
        last = len(m.blocks) - 1
        frozen = None if self.training else self._frozen
        attend = self._attention or _default_attention
        per_image = torch.arange(b, device=x.device)  # set of each image when prompts are per image
        for i, blk in enumerate(m.blocks):
            if i == last and self._prompts_in_output():
                # The readout reads prompt outputs: only this block computes prompt rows.
                return blk(self._insert(x, vit.entering(m.norm_pre, i, src.tokens(i, b, state))))
            if frozen is not None:
                pk, pv = frozen[i]
            else:
                pk, pv = vit.prompt_kv(m, i, src.tokens(i, b, state))
            x = vit.fused_block(blk, i, x, pk, pv, attend, self.backend, per_image)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Readout, ``fc_norm`` and head, as timm's ``forward_head`` with prompts in mind."""
        npre, n = self._model.num_prefix_tokens, x.shape[1]
        p = self._prompts_in_output()
        patches = slice(npre + p, n) if self._source.position == "prefix" else slice(npre, n - p)
        return vit.head(self._model, vit.pool(self._model, x, self.readout, patches), pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """Logits.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)

        Returns
        -------
        Tensor, shape (B, num_classes)
        """
        return self.forward_head(self.forward_features(x))
