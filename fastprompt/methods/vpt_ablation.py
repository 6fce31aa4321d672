"""The official VPT ablations of prompt depth: :func:`vpt_ablation` and its registry entry.

The official code (KMnP/vpt, ``src/models/vit_prompt/vit_ablations.py``) has three options of
its config (``MODEL.PROMPT``); its model code applies them so:

- ``NUM_DEEP_LAYERS = k`` (``num_deep_layers``): deep prompts in the first k blocks only.
  ``prompt_embeddings`` (1, P, Dp) enters block 0 and ``deep_prompt_embeddings`` (k − 1, P, Dp)
  replace the prompt outputs before blocks 1 … k − 1; blocks k … L − 1 receive no set of their
  own: the prompt outputs of block k − 1 flow on through them as tokens (the official forward
  only skips the replacement; the tokens stay in the sequence).
- ``REVERSE_DEEP`` with ``NUM_DEEP_LAYERS = k`` (``reverse_deep``): deep prompts in the last k
  blocks only. There is no ``prompt_embeddings``; blocks 0 … L − k − 1 run without prompts and
  ``deep_prompt_embeddings`` (k, P, Dp) enter before blocks L − k … L − 1, each replacing the
  outputs of the one before. At the first of them the official code cuts the sequence as if
  prompts were already there, so the P patch tokens after the class token are overwritten (and
  lost for the rest of the forward); fastprompt inserts the set in front of the patches instead,
  as the paper describes, and drops no patch.
- ``DEEP_SHARED`` (``deep_shared``): every block receives ``prompt_embeddings`` again (projected,
  with a fresh dropout mask per block), up to block k − 1 when ``NUM_DEEP_LAYERS`` is set too.
  The official code also creates ``deep_prompt_embeddings`` and never reads it; fastprompt
  creates no such unused parameter. The official reverse path ignores ``DEEP_SHARED``, so the
  combination is refused here.

Everything else is VPT's (init, projection, dropout, head init, readouts). The released code's
model builder imports ``vit_prompt/vit.py``, which asserts these options are off; the ablations
live in ``vit_ablations.py``. Blocks whose prompt outputs are overwritten run on the prompts'
keys and values only (``docs/design.md`` §4); the others compute the prompt tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from fastprompt.backbones import Backbone
from fastprompt.methods.common import (
    LEARNED_HEAD_INITS,
    Schedule,
    add_learned_prompt_options,
    as_int,
    build_learned,
    check_learned_prompts,
    config_from_json,
    default_readout,
    learned_prompt_kwargs,
    split_overrides,
)
from fastprompt.methods.vpt_official import read_ablation
from fastprompt.prompted import PromptedViT
from fastprompt.registry import CliOptions, register_peft_method

__all__ = ["METHOD", "VPTAblationConfig", "build", "vpt_ablation"]

METHOD = "vpt_ablation"


@dataclass(frozen=True)
class VPTAblationConfig:
    """An official VPT ablation of prompt depth; saved with its checkpoints.

    Attributes
    ----------
    num_prompts : int
        Prompt tokens per set.
    num_deep_layers : int, optional
        ``NUM_DEEP_LAYERS``: the blocks that receive a set, the first k (or the last k with
        ``reverse_deep``); None means every block (VPT-deep).
    reverse_deep : bool
        ``REVERSE_DEEP``: the last ``num_deep_layers`` blocks rather than the first.
    deep_shared : bool
        ``DEEP_SHARED``: every receiving block gets the one set ``prompt_embeddings``.
    dropout : float
        Prompt dropout, a mask per image and per block.
    project : int
        Prompt width before a Linear projection; -1 for none.
    readout : str
        What the head reads (as :class:`fastprompt.VPTConfig`).
    """

    num_prompts: int
    num_deep_layers: int | None = None
    reverse_deep: bool = False
    deep_shared: bool = False
    dropout: float = 0.0
    project: int = -1
    readout: str = "cls"

    def __post_init__(self) -> None:
        who = f"fastprompt.{METHOD}"
        check_learned_prompts(self, who)
        k = self.num_deep_layers
        if k is not None:
            k = as_int(k)
            if k is None or k < 1:
                raise ValueError(
                    f"{who}: num_deep_layers must be None or an int >= 1, got "
                    f"{self.num_deep_layers!r}"
                )
            object.__setattr__(self, "num_deep_layers", k)
        for name in ("reverse_deep", "deep_shared"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{who}: {name} must be a bool, got {getattr(self, name)!r}")
        if self.reverse_deep and k is None:
            raise ValueError(f"{who}: reverse_deep needs num_deep_layers (the last k blocks)")
        if self.reverse_deep and self.deep_shared:
            raise ValueError(
                f"{who}: the official code ignores deep_shared with reverse_deep; pass one of them"
            )
        if not isinstance(self.readout, str):
            raise TypeError(f"{who}: readout must be a str, got {type(self.readout).__name__}")


def _sets(config: VPTAblationConfig) -> Callable[[Backbone], Schedule]:
    def sets(backbone: Backbone) -> Schedule:
        depth, p = backbone.depth, config.num_prompts
        k = depth if config.num_deep_layers is None else config.num_deep_layers
        if k > depth:
            raise ValueError(
                f"fastprompt.{METHOD}: num_deep_layers={k} exceeds the model's {depth} blocks"
            )
        rest = (None,) * (depth - k)
        if config.reverse_deep:
            return rest + tuple(range(1, k + 1)), None, (p,) * k, False
        if config.deep_shared:
            return (0,) * k + rest, p, None, False
        return tuple(range(k)) + rest, p, (p,) * (k - 1), False

    return sets


def build(
    model: nn.Module,
    config: VPTAblationConfig,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
) -> PromptedViT:
    """An ablation model from a full :class:`VPTAblationConfig` (what :func:`vpt_ablation` and
    checkpoints call)."""
    return build_learned(model, config, _sets(config), METHOD, impl, backend, head_init)


def vpt_ablation(
    model: nn.Module,
    num_prompts: int,
    num_deep_layers: int | None = None,
    reverse_deep: bool = False,
    deep_shared: bool = False,
    dropout: float = 0.0,
    project: int = -1,
    readout: str | None = None,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
) -> PromptedViT:
    """Wrap a model with one of the official VPT ablations of prompt depth.

    Parameters
    ----------
    model : timm VisionTransformer
        As :func:`fastprompt.vpt` takes it.
    num_prompts : int
        Prompts per set, ≥ 0.
    num_deep_layers : int, optional
        Deep prompts in this many blocks only (``NUM_DEEP_LAYERS``): the first ones, or the last
        ones with ``reverse_deep``. None: every block.
    reverse_deep : bool
        The last ``num_deep_layers`` blocks (``REVERSE_DEEP``); the blocks before run without
        prompts.
    deep_shared : bool
        One prompt set for every block (``DEEP_SHARED``).
    dropout, project, readout, impl, backend, head_init
        As :func:`fastprompt.vpt`.

    Returns
    -------
    PromptedViT
        ``prompted.method == "vpt_ablation"``; trainable: ``prompt_embeddings`` (absent with
        ``reverse_deep``), ``deep_prompt_embeddings`` (absent with ``deep_shared``),
        ``prompt_proj`` and the head.
    """
    if readout is None:
        readout = default_readout(model, f"fastprompt.{METHOD}")
    config = VPTAblationConfig(
        num_prompts, num_deep_layers, reverse_deep, deep_shared, dropout, project, readout
    )
    return build(model, config, impl=impl, backend=backend, head_init=head_init)


# -- checkpoints and command line ---------------------------------------------------------------


def _rebuild(model: nn.Module, saved: Mapping[str, Any], overrides: Mapping[str, Any]):
    config = config_from_json(VPTAblationConfig, saved, METHOD)
    config, run = split_overrides(config, overrides, ("dropout", "readout"))
    return build(model, config, head_init="keep", **run)


def _add_options(group: argparse._ArgumentGroup) -> None:
    add_learned_prompt_options(group, LEARNED_HEAD_INITS)
    group.add_argument(
        "--deep-layers", type=int, metavar="K", help="deep prompts in K blocks only (first K)"
    )
    group.add_argument("--reverse-deep", action="store_true", help="the last K blocks instead")
    group.add_argument("--deep-shared", action="store_true", help="one set for every block")


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = learned_prompt_kwargs(args, METHOD)
    if kw["num_prompts"] is None:
        raise ValueError(f"--prompts is required for {METHOD}")
    if args.deep_layers is not None and args.deep_layers < 1:
        raise ValueError(f"--deep-layers must be >= 1, got {args.deep_layers}")
    if args.reverse_deep and args.deep_layers is None:
        raise ValueError("--reverse-deep needs --deep-layers K (the last K blocks)")
    if args.reverse_deep and args.deep_shared:
        raise ValueError("--reverse-deep and --deep-shared: the official code ignores the second")
    kw.update(
        num_deep_layers=args.deep_layers,
        reverse_deep=bool(args.reverse_deep),
        deep_shared=bool(args.deep_shared),
    )
    return kw


register_peft_method(
    name=METHOD,
    config_cls=VPTAblationConfig,
    build=vpt_ablation,
    recipe="vpt",
    cli=CliOptions(add=_add_options, kwargs=_kwargs),
    describe=lambda prompted: asdict(prompted.config),
    rebuild=_rebuild,
    read_official=read_ablation,
)
