"""VPT (Jia et al., ECCV 2022; official code KMnP/vpt): :func:`vpt` and its registry entry.

The model is the prompted core (:class:`fastprompt.prompted.PromptedViT`) with VPT's learned
prompt sets (:class:`fastprompt.sources.learned.LearnedPrompts`): prompts after the class (and
register) tokens, shallow or deep, the official init, projection and per-image dropout, the
official head init. ``impl="naive"`` is the official computation; ``impl="fused"`` (default) gives
the same logits and gradients while computing only what VPT-deep needs. The entry registers the
config, the ``vpt`` recipe, the command-line options (with the VTAB-1k presets), checkpoints
(ours, format 1 and the official code's) and what Prompt Condensation needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
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
from fastprompt.methods.vpt_official import read_vpt
from fastprompt.prompted import PromptedViT
from fastprompt.registry import CliOptions, Condensation, register_peft_method

__all__ = ["HEAD_INITS", "PRESETS", "VTAB1K_PROMPTS", "VPTConfig", "build", "vpt"]

HEAD_INITS = LEARNED_HEAD_INITS

# VPT-deep prompt counts per VTAB-1k task (the official per-task configurations).
VTAB1K_PROMPTS: dict[str, int] = {
    "cifar100": 10,
    "caltech101": 10,
    "dtd": 10,
    "oxford_flowers102": 1,
    "oxford_iiit_pet": 1,
    "svhn": 50,
    "sun397": 5,
    "patch_camelyon": 100,
    "eurosat": 100,
    "resisc45": 10,
    "diabetic_retinopathy": 1,
    "clevr_count": 100,
    "clevr_dist": 200,
    "dmlab": 100,
    "kitti": 100,
    "dsprites_loc": 100,
    "dsprites_ori": 100,
    "smallnorb_azi": 200,
    "smallnorb_ele": 200,
}
PRESETS = {f"vtab1k-{task}": n for task, n in VTAB1K_PROMPTS.items()}
# MODEL.PROMPT.DROPOUT of every VTAB-1k VPT-deep command in the official demo.ipynb (the configs'
# default is 0.0, and the official code uses none for VPT-shallow).
PRESET_DEEP_DROPOUT = 0.1


@dataclass(frozen=True)
class VPTConfig:
    """How a model is prompted; saved beside the prompts so a checkpoint rebuilds the wrapper.

    Attributes
    ----------
    num_prompts : int
        Prompt tokens per set (per block when deep).
    deep : bool
        A prompt set per block (VPT-deep) or one before block 0 (VPT-shallow).
    dropout : float
        Prompt dropout probability, applied per image after expanding over the batch.
    project : int
        Prompt dimension before a Linear projection to the model width; -1 means no projection.
    readout : str
        What the head reads; for a ViT ``"cls"``, ``"patches"`` or ``"patches+prompts"`` (the
        official avg-pool path). Checked against the backbone when the model is built.
    layer_counts : tuple of int, optional
        Prompts per block after condensation (deep only); None means ``num_prompts`` in every
        block. Deep prompts of blocks ≥ 1 are then packed in one (Σ counts, Dp) parameter (per
        stage on Swin).
    window_mixing : bool
        Swin only: reproduce the official VPT-Swin's cross-image window mixing (a defect of that
        code: with B > 1 and several windows an image receives and averages other images'
        prompts), for reproducing official runs (to float rounding). Default False: each image
        its own prompts.
    """

    num_prompts: int
    deep: bool = True
    dropout: float = 0.0
    project: int = -1
    readout: str = "cls"
    layer_counts: tuple[int, ...] | None = None
    window_mixing: bool = False

    def __post_init__(self) -> None:
        who = "fastprompt.vpt"
        check_learned_prompts(self, who)
        if not isinstance(self.deep, bool):
            raise TypeError(f"{who}: deep must be a bool, got {type(self.deep).__name__}")
        if not isinstance(self.readout, str):
            raise TypeError(f"{who}: readout must be a str, got {type(self.readout).__name__}")
        if not isinstance(self.window_mixing, bool):
            raise TypeError(
                f"{who}: window_mixing must be a bool, got {type(self.window_mixing).__name__}"
            )
        counts = self.layer_counts
        if counts is not None:
            if not self.deep:
                raise ValueError(f"{who}: layer_counts needs deep prompts")
            found = [as_int(n) for n in counts]
            if any(n is None or n < 0 for n in found):
                raise ValueError(f"{who}: layer_counts must hold ints >= 0, got {counts}")
            object.__setattr__(self, "layer_counts", tuple(found))


def _sets(config: VPTConfig) -> Callable[[Backbone], Schedule]:
    """VPT's sets: set 0 before block 0, deep set i before block i (packed when condensed)."""

    def sets(backbone: Backbone) -> Schedule:
        depth, p, counts = backbone.depth, config.num_prompts, config.layer_counts
        if counts is not None and len(counts) != depth:
            raise ValueError(
                f"fastprompt.vpt: layer_counts must hold {depth} ints (one per block), got "
                f"{len(counts)}: {counts}"
            )
        first = counts[0] if counts is not None else p
        if not config.deep:
            return (0,) + (None,) * (depth - 1), first, None, False
        deep = counts[1:] if counts is not None else (p,) * max(depth - 1, 0)
        return tuple(range(depth)), first, deep, counts is not None

    return sets


def build(
    model: nn.Module,
    config: VPTConfig,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
    share_with: PromptedViT | None = None,
) -> PromptedViT:
    """A VPT model from a full :class:`VPTConfig` (what :func:`vpt` and checkpoints call)."""
    return build_learned(
        model, config, _sets(config), "vpt", impl, backend, head_init, share_with=share_with
    )


def vpt(
    model: nn.Module,
    num_prompts: int,
    deep: bool = True,
    dropout: float = 0.0,
    project: int = -1,
    readout: str | None = None,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
    window_mixing: bool = False,
) -> PromptedViT:
    """Wrap a timm VisionTransformer or SwinTransformer with VPT prompts (official semantics).

    Parameters
    ----------
    model : timm VisionTransformer or SwinTransformer
        Any ViT/DeiT-family model (class token or not, register tokens, ``no_embed_class``, token
        or avg pooling, ``fc_norm``, layer scale, qk-norm), a Swin v1 (the official VPT-Swin:
        per-stage prompt widths, prompts in every window), or another backbone with an adapter
        (:mod:`fastprompt.backbones`). Frozen and kept in eval mode. A model that another live
        wrapper holds is refused.
    num_prompts : int
        Prompts per set, ≥ 0.
    deep : bool
        One prompt set per block (VPT-deep) rather than one before block 0 (shallow).
    dropout : float
        Prompt dropout in [0, 1), per image (the official deep demo uses 0.1).
    project : int
        -1 for no prompt projection, else the prompt width projected to the model width.
    readout : {"cls", "patches", "patches+prompts"}, optional
        Default: ``"cls"`` for ``global_pool="token"``, ``"patches+prompts"`` (the official
        avg-pool path, and the official VPT-Swin's) for ``"avg"``.
    impl : {"fused", "naive"}
        ``"naive"`` is the official computation, for comparison; same logits.
    backend : str, optional
        Prompt-attention backend (one of :data:`fastprompt.backends.NAMES`); default the best
        that fits.
    head_init : {"vpt", "keep"}
        Re-initialise the head as the official VPT code (kaiming-normal fan-out weight, bias
        −log(99) ≈ −4.595), or keep it.
    window_mixing : bool
        Swin only: the official code's cross-image window mixing (:class:`VPTConfig`).

    Returns
    -------
    PromptedViT
        Shares the model's parameters and state-dict names; ``prompted.method == "vpt"``.
    """
    if readout is None:
        readout = default_readout(model, "fastprompt.vpt")
    return build(
        model,
        VPTConfig(num_prompts, deep, dropout, project, readout, window_mixing=window_mixing),
        impl=impl,
        backend=backend,
        head_init=head_init,
    )


# -- checkpoints ------------------------------------------------------------------------------

# What a user may change when loading a VPT checkpoint besides how it runs.
CONFIG_OVERRIDES = ("dropout", "readout", "window_mixing")


def _describe(prompted: PromptedViT) -> dict[str, Any]:
    # window_mixing is recorded only when on, so other checkpoints read as they always have.
    config = asdict(prompted.config)
    if not config["window_mixing"]:
        del config["window_mixing"]
    return config


def _rebuild(model: nn.Module, saved: Mapping[str, Any], overrides: Mapping[str, Any]):
    config = config_from_json(VPTConfig, saved, "VPT")
    config, run = split_overrides(config, overrides, CONFIG_OVERRIDES)
    return build(model, config, head_init="keep", **run)


def _legacy(saved: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Format 1 kept a VPT config under ``"vpt"`` (a condensed one also held ``"kept"``)."""
    return saved["vpt"] if "vpt" in saved and "kept" not in saved else None


# -- command line -----------------------------------------------------------------------------


def _add_options(group: argparse._ArgumentGroup) -> None:
    add_learned_prompt_options(group, HEAD_INITS)
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        metavar="vtab1k-TASK",
        help="a VTAB-1k task's official VPT setup: its prompt count, prompt dropout 0.1 for "
        "VPT-deep (every official VTAB-1k VPT-deep command; --shallow: 0, as official), a square "
        "resize without augmentation, ImageNet mean/std (list: fastprompt recipes). Not the "
        "batch size, lr or weight decay: the official runs took them from per-task tables "
        "that are not published; the recipe's apply unless --batch-size, --lr, --weight-decay",
    )
    group.add_argument("--shallow", action="store_true", help="VPT-shallow (default deep)")
    group.add_argument(
        "--window-mixing",
        action="store_true",
        help="Swin: the official VPT-Swin's cross-image window mixing (an image's logits depend "
        "on its batch), to reproduce official runs; default each image its own prompts",
    )


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = learned_prompt_kwargs(args, "vpt")
    if kw["num_prompts"] is None:
        kw["num_prompts"] = PRESETS.get(args.preset or "")
    if kw["num_prompts"] is None:
        raise ValueError("--prompts is required for VPT (or --preset vtab1k-<task>)")
    kw["deep"] = not args.shallow
    if args.window_mixing:  # recorded only when on, as checkpoints record it
        kw["window_mixing"] = True
    if args.preset and kw["deep"] and args.prompt_dropout is None:
        kw["dropout"] = PRESET_DEEP_DROPOUT
    return kw


def _preset_recipe(args: argparse.Namespace) -> dict[str, Any]:
    # The official VTAB-1k pipeline: a square resize, ImageNet statistics.
    if not args.preset:
        return {}
    return {"train_transform": "resize", "test_transform": "resize", "normalize": "imagenet"}


# -- Prompt Condensation ------------------------------------------------------------------------


def _condensable(kwargs: Mapping[str, Any]) -> str | None:
    if not kwargs.get("deep", True):
        return "is VPT-shallow; Prompt Condensation condenses VPT-deep"
    if kwargs.get("window_mixing"):
        return (
            "was trained with --window-mixing (the official VPT-Swin's cross-image window "
            "mixing): an image's loss depends on its batch there, so Prompt Condensation's "
            "per-sample scores are undefined"
        )
    return None


def _pack(prompted: PromptedViT, counts: tuple[int, ...]) -> PromptedViT:
    config = replace(prompted.config, dropout=0.0, layer_counts=counts)
    return build(
        prompted.model,
        config,
        impl=prompted.impl,
        backend=prompted.backend,
        head_init="keep",
        share_with=prompted,
    )


register_peft_method(
    name="vpt",
    config_cls=VPTConfig,
    build=vpt,
    recipe="vpt",
    cli=CliOptions(add=_add_options, kwargs=_kwargs, recipe=_preset_recipe),
    describe=_describe,
    rebuild=_rebuild,
    read_official=read_vpt,
    legacy=_legacy,
    condensation=Condensation(check=_condensable, pack=_pack),
)
