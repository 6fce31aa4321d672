"""E²VPT (Han et al., ICCV 2023; official code ChengHan111/E2VPT): :func:`e2vpt` and its entry.

Visual prompts (VPT-deep, after the class and register tokens, with prompt dropout 0.1 before a
token mask and an interleaved segment mask) and key-value prompts (one (H, N, d) tensor per block,
shared as key and value prompt, joined in front of each head's keys and values after the qkv
projection). Pruning (token-wise and segment-wise, then rewinding) is in :mod:`.pruning`; the
model and the official checkpoints in :mod:`.model`. The entry registers the config, the
``e2vpt`` recipe, the command-line options (with the VTAB-1k per-task counts) and checkpoints
(ours and the official code's). Prompt Condensation does not condense E²VPT models: the
key-value prompts join every block's prompt keys, so its per-prompt scores do not apply.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from torch import nn

from fastprompt.methods.common import (
    LEARNED_HEAD_INITS,
    add_learned_prompt_options,
    config_from_json,
    learned_prompt_kwargs,
    split_overrides,
)
from fastprompt.methods.e2vpt import pruning
from fastprompt.methods.e2vpt.model import (
    METHOD,
    VTAB1K_PROMPTS,
    E2VPTConfig,
    build,
    e2vpt,
    read_official,
)
from fastprompt.methods.e2vpt.pruning import (
    MIN_SEGMENTS,
    MIN_TOKENS,
    PERCENTS,
    mask_scores,
    pack,
    prune_counts,
    rewind,
    select_masks,
)
from fastprompt.registry import CliOptions, register_peft_method
from fastprompt.sources.key_value import KV_INITS

__all__ = [
    "METHOD",
    "MIN_SEGMENTS",
    "MIN_TOKENS",
    "PERCENTS",
    "PRESETS",
    "VTAB1K_PROMPTS",
    "E2VPTConfig",
    "build",
    "e2vpt",
    "mask_scores",
    "pack",
    "prune_counts",
    "pruning",
    "read_official",
    "rewind",
    "select_masks",
]

PRESETS = {f"vtab1k-{task}": counts for task, counts in VTAB1K_PROMPTS.items()}

# What a user may change when loading an E2VPT checkpoint besides how it runs.
CONFIG_OVERRIDES = ("dropout", "readout")


def _rebuild(model: nn.Module, saved: Mapping[str, Any], overrides: Mapping[str, Any]):
    config = config_from_json(E2VPTConfig, saved, METHOD)
    config, run = split_overrides(config, overrides, CONFIG_OVERRIDES)
    return build(model, config, head_init="keep", **run)


# -- command line -----------------------------------------------------------------------------


def _add_options(group: argparse._ArgumentGroup) -> None:
    add_learned_prompt_options(
        group,
        LEARNED_HEAD_INITS,
        prompts_help="visual prompts per block (default 10, or the --preset's)",
        dropout_help="visual prompt dropout (default 0.1)",
    )
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        metavar="vtab1k-TASK",
        help="a VTAB-1k task's official E2VPT setup: its visual and key-value prompt counts, a "
        "square resize without augmentation, ImageNet mean/std. Not the lr or weight decay: the "
        "official scripts tune them per task and publish no table; the recipe's apply unless "
        "--lr, --weight-decay",
    )
    group.add_argument("--shallow", action="store_true", help="visual prompts before block 0 only")
    group.add_argument("--kv-prompts", type=int, help="key-value prompts per block (default 5)")
    group.add_argument(
        "--unshared-kv", action="store_true", help="separate key and value prompts (default one)"
    )
    group.add_argument(
        "--no-masks",
        action="store_true",
        help="no token and segment masks (the official runs without pruning)",
    )
    group.add_argument("--kv-init", choices=KV_INITS, help="key-value prompt init (kaiming)")


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = learned_prompt_kwargs(args, METHOD)
    preset = PRESETS.get(args.preset or "")
    if args.kv_prompts is not None and args.kv_prompts < 0:
        raise ValueError(f"--kv-prompts must be >= 0, got {args.kv_prompts}")
    if kw["num_prompts"] is None:
        kw["num_prompts"] = preset[0] if preset else 10
    kw.update(
        num_kv=args.kv_prompts if args.kv_prompts is not None else preset[1] if preset else 5,
        dropout=0.1 if args.prompt_dropout is None else args.prompt_dropout,
        shared_kv=not args.unshared_kv,
        masks=not args.no_masks,
        deep=not args.shallow,
        kv_init=args.kv_init or "kaiming",
    )
    return kw


def _preset_recipe(args: argparse.Namespace) -> dict[str, Any]:
    # The official VTAB-1k pipeline: a square resize, ImageNet statistics (batch 64: the recipe).
    if not args.preset:
        return {}
    return {"train_transform": "resize", "test_transform": "resize", "normalize": "imagenet"}


register_peft_method(
    name=METHOD,
    config_cls=E2VPTConfig,
    build=e2vpt,
    recipe="e2vpt",
    cli=CliOptions(add=_add_options, kwargs=_kwargs, recipe=_preset_recipe),
    describe=lambda prompted: asdict(prompted.config),
    rebuild=_rebuild,
    read_official=read_official,
)
