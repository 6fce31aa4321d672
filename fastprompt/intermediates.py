"""timm's feature-extraction API on a prompted model (``docs/design.md`` §4, "Intermediates").

:class:`Intermediates` gives :class:`fastprompt.PromptedViT` timm's ``forward_intermediates``
(with the wrapped model's signature and return conventions), ViT's ``get_intermediate_layers``,
and a ``prune_intermediate_layers`` that refuses, with the reason. The intermediates come from the
prompted forward itself: the block loop that ``forward_features`` runs (any impl, backend, memory
policy, ``frozen_prompts``, ``attention_override``) hands the token state after each block to the
family's taps (:mod:`fastprompt.backbones.taps`), which remove the prompt tokens and apply timm's
norm and layout.

Prompt tokens are not returned. On the fused path a block whose prompt outputs are overwritten
computes only the prompts' keys and values (``docs/design.md`` §3), so its prompt outputs do not
exist; returning them would mean running every prompt row, the cost the fused path removes, and
a key-value prompt (E²VPT) or a task's table has no tokens at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fastprompt._arguments import refuse_unknown
from fastprompt._numbers import as_int
from fastprompt.backbones.taps import Taps, taps_for

if TYPE_CHECKING:
    from fastprompt.backbones import Backbone
    from fastprompt.sources import PromptSource

__all__ = ["Intermediates", "take_indices"]

_FI = "forward_intermediates"


def take_indices(count: int, indices: int | Sequence[int] | None, who: str) -> list[int]:
    """timm's ``feature_take_indices``: the intermediates to take, ascending and once each.

    Parameters
    ----------
    count : int
        Intermediates the model has (a ViT's blocks, a Swin's stages).
    indices : int, sequence of int, or None
        None: all; an int n: the last n; a sequence: those (negative ones from the end).
    who : str
        The call, for errors.

    Returns
    -------
    list of int
        Absolute indices in block order, as timm returns the intermediates (a repeated index
        once).
    """
    if indices is None:
        indices = count
    number = as_int(indices)
    if number is not None:
        if not 0 < number <= count:
            raise ValueError(
                f"{who}: indices={number} asks for the last {number} of {count} intermediates; "
                f"it must be in [1, {count}]"
            )
        return list(range(count - number, count))
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(
            f"{who}: indices must be None, an int or a sequence of ints, got "
            f"{type(indices).__name__}"
        )
    taken = set()
    for i in indices:
        index = as_int(i)
        if index is None:
            raise TypeError(f"{who}: indices must hold ints, got {i!r}")
        if not -count <= index < count:
            raise ValueError(
                f"{who}: index {index} is out of range for {count} intermediates "
                f"(0 to {count - 1}, or -{count} to -1 from the end)"
            )
        taken.add(index % count)
    if not taken:
        raise ValueError(f"{who}: indices is empty; give at least one")
    return sorted(taken)


# timm's arguments of forward_intermediates after ``indices`` (a ViT's, in its order; a family
# takes those its taps name) and their defaults.
_DEFAULTS: dict[str, Any] = {
    "return_prefix_tokens": False,
    "norm": False,
    "stop_early": False,
    "output_fmt": "NCHW",
    "intermediates_only": False,
    "output_dict": False,
    "attn_mask": None,
    "is_causal": False,
}


def _bind(
    taps: Taps,
    source_inputs: Sequence[str] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(timm's arguments, the prompt source's inputs)`` of a call: positional ones in the
    family's order, keywords by name; what neither the family's timm method nor the source
    takes is refused, as timm refuses it (``source_inputs`` None: the source takes any keyword
    and checks them itself)."""
    names = taps.arguments
    family = taps.backbone.description
    takes = f"the {_FI} of a {family} takes x, indices, {', '.join(names)}"
    if len(args) > len(names):
        raise TypeError(f"{_FI}() takes {len(names) + 2} positional arguments; {takes}")
    opts = dict(zip(names, args))
    inputs: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in opts:
            raise TypeError(f"{_FI}() got multiple values for argument {name!r}")
        if name in names:
            opts[name] = value
        elif source_inputs is None or name in source_inputs:
            inputs[name] = value
        else:
            extra = f" and {', '.join(source_inputs)}" if source_inputs else ""
            refuse_unknown(_FI, [name], [*names, *source_inputs], takes + extra)
    return {**_DEFAULTS, **opts}, inputs


class Intermediates:
    """timm's feature-extraction API on :class:`fastprompt.PromptedViT` (``_backbone``,
    ``_source`` and ``_run_blocks``: the wrapper's adapter, prompt source and block loop)."""

    _backbone: Backbone
    _source: PromptSource
    _run_blocks: Callable[..., Any]
    _final_features: Callable[[Any], Tensor]

    def _taps(self, who: str) -> Taps:
        return taps_for(self._backbone, who)

    def forward_intermediates(
        self, x: Tensor, indices: int | Sequence[int] | None = None, *args: Any, **kwargs: Any
    ) -> list[Any] | tuple[Tensor, list[Any]] | dict[str, Any]:
        """timm's ``forward_intermediates`` of the prompted computation.

        The wrapped model's own signature and conventions (timm 1.0), positional arguments
        included: a ViT's ``(x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
        intermediates_only, output_dict, attn_mask, is_causal)``, a Swin's ``(x, indices, norm,
        stop_early, output_fmt, intermediates_only)``; a keyword the family's timm method does
        not take is refused, as timm refuses it. The intermediates are the outputs of the blocks
        a ViT's ``indices`` name, or of the stages a Swin's name, in block order, computed with
        the prompts; the prompt tokens are removed from them (they are not returned: on the
        fused path most prompt outputs are never computed). Every impl, backend and memory
        policy gives the same intermediates and final output, and gradients reach the prompts
        through them.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
        indices : int, sequence of int, or None
            None: every block (a Swin: stage); an int n: the last n; a sequence: those
            (negative from the end).
        return_prefix_tokens : bool
            ViT: each intermediate as ``(spatial, prefix)`` with the class and register tokens
            (B, n_prefix, D) apart (a model without them returns the spatial ones alone).
        norm : bool
            Apply the model's final norm (a Swin: to the last stage only, as timm).
        stop_early : bool
            Run no block after the last intermediate asked for.
        output_fmt : str
            ViT: ``"NCHW"`` (B, D, h, w) or ``"NLC"`` (B, h·w, D). Swin: ``"NCHW"``
            (B, C_s, H_s, W_s), or ``"NHWC"`` (the stage's own layout; timm offers NCHW only).
        intermediates_only : bool
            Return the intermediates alone.
        output_dict : bool
            ViT: a dict with ``"image_intermediates"``, ``"image_intermediates_prefix"`` (with
            ``return_prefix_tokens``) and ``"image_features"`` (unless ``intermediates_only``).
        attn_mask, is_causal
            ViT; refused unless None and False: timm's mask covers the image tokens only and
            says nothing of the prompt keys.
        **inputs
            Other forward inputs for the prompt source (a mixed-task model's ``task``).

        Returns
        -------
        list, tuple or dict
            The intermediates (``intermediates_only``), else ``(final, intermediates)``. After
            the last block ``final`` is what :meth:`forward_features` returns (what
            ``forward_head`` reads; prompt tokens in it only under a readout that reads them).
            Under ``stop_early`` before the last block it is the image tokens after the last
            block run, as timm's (a ViT: normed, (B, n_prefix + h·w, D); a Swin: (B, H_s·W_s,
            C_s), not normed, as timm), never prompt tokens.
        """
        taps = self._taps(_FI)
        opts, inputs = _bind(taps, self._source.forward_inputs(), args, kwargs)
        if opts["attn_mask"] is not None or opts["is_causal"]:
            raise ValueError(
                f"{_FI}: attn_mask and is_causal are not supported: the prompted attention also "
                "attends to prompt keys, which a mask over the image tokens does not cover"
            )
        output_fmt, norm = opts["output_fmt"], opts["norm"]
        if output_fmt not in taps.formats:
            raise ValueError(
                f"{_FI}: output_fmt must be one of {taps.formats} for a "
                f"{self._backbone.description}, got {output_fmt!r}"
            )
        blocks = taps.blocks()
        take = take_indices(len(blocks), indices, _FI)
        wanted = {blocks[k]: k for k in take}
        taken: list[Tensor] = []
        position = self._source.position
        held_now = [0]

        def tap(block: int, tokens: Any, held: int) -> None:
            held_now[0] = held
            if block in wanted:
                taken.append(taps.take(tokens, held, position, wanted[block], norm))

        last = blocks[take[-1]] if opts["stop_early"] else None
        tokens = self._run_blocks(x, inputs, last=last, tap=tap, who=_FI)
        spatial, prefix = taps.output(taken, output_fmt, (int(x.shape[-2]), int(x.shape[-1])))
        complete = last is None or last == self._backbone.depth - 1
        if opts["intermediates_only"]:
            final = None
        elif complete:
            final = self._final_features(tokens)
        else:  # timm's layout: the model's own tokens, whatever the impl computed of the prompts
            if held_now[0]:
                tokens = self._backbone.remove(tokens, held_now[0], position)
            final = taps.stopped(tokens)
        if opts["output_dict"]:
            out: dict[str, Any] = {"image_intermediates": spatial}
            if prefix is not None and opts["return_prefix_tokens"]:
                out["image_intermediates_prefix"] = prefix
            if final is not None:
                out["image_features"] = final
            return out
        result: list[Any] = spatial
        if opts["return_prefix_tokens"] and prefix is not None:
            result = list(zip(spatial, prefix))
        return result if final is None else (final, result)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        attn_mask: Tensor | None = None,
        **inputs: Any,
    ) -> list[Any]:
        """timm ViT's ``get_intermediate_layers`` (DINO's interface): ``forward_intermediates``
        with ``intermediates_only=True``.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
        n : int or sequence of int
            The last n blocks, or those blocks.
        reshape : bool
            (B, D, h, w) maps instead of (B, h·w, D) tokens.
        return_prefix_tokens, norm, attn_mask, **inputs
            As in :meth:`forward_intermediates`.

        Returns
        -------
        list of Tensor, or of (Tensor, Tensor) with ``return_prefix_tokens``
        """
        who = "get_intermediate_layers"
        if not self._taps(who).layers_api:
            raise TypeError(
                f"{who} is timm's VisionTransformer API, which a "
                f"{self._backbone.description} does not have; use forward_intermediates"
            )
        # Named here: forward_intermediates would name itself and its own arguments.
        accepted = self._source.forward_inputs()
        if accepted is not None:
            own = ("n", "reshape", "return_prefix_tokens", "norm", "attn_mask")
            takes = f"it takes x, {', '.join(own)}" + "".join(f", {a}" for a in accepted)
            refuse_unknown(who, inputs, [*own, *accepted], takes)
        return self.forward_intermediates(
            x,
            n,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
            attn_mask=attn_mask,
            **inputs,
        )

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Refused: timm's pruning truncates the wrapped model's blocks, norm and head.

        The prompts are per block of the whole model and so are the checkpoints
        (``save_prompts``/``load_prompts``); a truncated model would need truncated prompts
        and no longer load or save them. ``forward_intermediates(..., stop_early=True)`` runs no
        block after the last index asked for; timm's ``FeatureGetterNet`` takes the prompted
        model with ``prune=False``.

        Raises
        ------
        NotImplementedError
            Always.
        """
        raise NotImplementedError(
            "prune_intermediate_layers is not supported on a prompted model: it would truncate "
            "the wrapped model's blocks, while the prompts and their checkpoints are per block "
            "of the whole model. forward_intermediates(..., stop_early=True) runs no block after "
            "the last index asked for (timm's FeatureGetterNet: pass prune=False)"
        )
