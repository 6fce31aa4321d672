"""What several methods share: VPT's head initialisation, checks of learned-prompt options,
command-line options of the VPT family, and checkpoint configs and overrides.

Methods do not import each other (an import-linter contract says so); what two of them need
lives here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, replace
from typing import Any

from torch import Tensor, nn

from fastprompt._numbers import as_int
from fastprompt.backbones import Backbone, adapter_for
from fastprompt.backends import NAMES as BACKENDS
from fastprompt.prompted import PromptedViT
from fastprompt.registry import RUN_OPTIONS
from fastprompt.sources.learned import LearnedPrompts
from fastprompt.sources.staged import StagedPrompts

__all__ = [
    "IMPLS",
    "LEARNED_HEAD_INITS",
    "Schedule",
    "add_learned_prompt_options",
    "as_int",
    "build_learned",
    "check_learned_prompts",
    "config_from_json",
    "default_readout",
    "init_head_vpt",
    "integer",
    "learned_prompt_kwargs",
    "split_overrides",
    "tied",
]

IMPLS = ("fused", "naive")
# The VPT family's head inits: VPT's own, or the head the model was created with.
LEARNED_HEAD_INITS = ("vpt", "keep")

# (schedule, shallow, deep, packed): the arguments of LearnedPrompts for one backbone.
Schedule = tuple[tuple[int | None, ...], int | None, tuple[int, ...] | None, bool]


def init_head_vpt(head: nn.Module) -> None:
    """The official VPT head init: kaiming-normal fan-out weight, bias −log(99) ≈ −4.595.

    Parameters
    ----------
    head : nn.Module
        The backbone adapter's classifier; anything but an ``nn.Linear`` is left as it is.
    """
    if isinstance(head, nn.Linear):
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
        if head.bias is not None:
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))


def integer(value: object, name: str, who: str) -> int:
    """``value`` as a Python int (:func:`as_int`), or a TypeError naming ``name``."""
    found = as_int(value)
    if found is None:
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__} ({value!r})")
    return found


def check_learned_prompts(config: Any, who: str) -> None:
    """Type and range checks of the options every learned-prompt method's (frozen) config
    takes; its ``num_prompts`` and ``project`` become Python ints."""
    num_prompts, dropout, project = config.num_prompts, config.dropout, config.project
    num_prompts = integer(num_prompts, "num_prompts", who)
    if num_prompts < 0:
        raise ValueError(f"{who}: num_prompts must be >= 0, got {num_prompts}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(
            f"{who}: dropout must be a float in [0, 1), got {type(dropout).__name__} ({dropout!r})"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{who}: dropout must be in [0, 1), got {dropout}")
    width = as_int(project)
    if width is None or (width < 1 and width != -1):
        raise ValueError(f"{who}: project must be -1 (none) or a width >= 1, got {project!r}")
    object.__setattr__(config, "num_prompts", num_prompts)
    object.__setattr__(config, "project", width)


def tied(backbone: Backbone, who: str) -> tuple[int, tuple[int, int]]:
    """The one width every block of ``backbone`` has, and its patch size (learned prompt sets of
    one width; per-stage widths need a source of their own)."""
    widths = {backbone.block_shape(i).width for i in range(backbone.depth)}
    if len(widths) > 1:
        raise ValueError(
            f"{who}: prompts of one width need blocks of one width, got {sorted(widths)} (a "
            f"{backbone.description} has one width per stage; fastprompt.vpt prompts it)"
        )
    width = widths.pop() if widths else backbone.block_shape(0).width
    return width, backbone.patch_size()


def default_readout(model: nn.Module, who: str) -> str:
    """The readout matching ``model``'s own pooling (its adapter says which)."""
    if isinstance(model, PromptedViT):
        raise TypeError(f"{who}: this model is already prompted; call .unwrap() first")
    return adapter_for(model, who).default_readout()


def build_learned(
    model: nn.Module,
    config: Any,
    sets: Callable[[Backbone], Schedule],
    method: str,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
    share_with: PromptedViT | None = None,
) -> PromptedViT:
    """Wrap ``model`` with learned prompt sets (the VPT family's build).

    Parameters
    ----------
    model : nn.Module
    config : dataclass
        The method's config, with ``project``, ``dropout`` and ``readout`` fields.
    sets : callable
        ``sets(backbone) -> (schedule, shallow, deep, packed)``: which set each block receives
        and the sets' sizes (:class:`fastprompt.sources.learned.LearnedPrompts`).
    method : str
        The method's registry name.
    impl, backend, share_with
        As :class:`fastprompt.prompted.PromptedViT` takes them.
    head_init : {"vpt", "keep"}
        VPT's head init, or the head as it is.
    """
    who = f"fastprompt.{method}"
    if head_init not in LEARNED_HEAD_INITS:
        raise ValueError(f"{who}: head_init must be one of {LEARNED_HEAD_INITS}, got {head_init!r}")
    if isinstance(model, PromptedViT):
        raise TypeError(f"{who}: this model is already prompted; call .unwrap() first")
    backbone = adapter_for(model, who)
    mixing = bool(getattr(config, "window_mixing", False))
    if mixing and backbone.stages() is None:
        raise ValueError(
            f"{who}: window_mixing reproduces the official VPT-Swin's cross-image window mixing; "
            f"a {backbone.description} has no windows"
        )
    source = _source(backbone, config, sets(backbone), who, next(model.parameters()))
    prompted = PromptedViT(
        model,
        source,
        readout=config.readout,
        impl=impl,
        backend=backend,
        method=method,
        share_with=share_with,
    )
    if mixing:
        prompted.backbone.window_mixing = True
    if head_init == "vpt":
        init_head_vpt(backbone.classifier())
    return prompted


def _source(backbone: Backbone, config: Any, sets: Schedule, who: str, ref: Tensor):
    """The learned prompt source for ``backbone``: one width (``LearnedPrompts``) or one width per
    stage (``StagedPrompts``, VPT-Swin's layout: shallow or deep only)."""
    schedule, shallow, deep, packed = sets
    kw = {"config": config, "device": ref.device, "dtype": ref.dtype}
    stages = backbone.stages()
    if stages is None:
        width, patch = tied(backbone, who)
        return LearnedPrompts(
            schedule,
            shallow,
            deep,
            width,
            patch,
            project=config.project,
            dropout=config.dropout,
            packed=packed,
            **kw,
        )
    if config.project != -1:
        raise ValueError(
            f"{who}: project={config.project} is not supported on a {backbone.description}: the "
            "official VPT-Swin builds prompt_proj but never applies it (prompts are learned at "
            "each stage's width), so a projection has no official meaning there"
        )
    depth = backbone.depth
    is_deep = deep is not None and schedule == tuple(range(depth))
    is_shallow = deep is None and schedule == (0,) + (None,) * (depth - 1)
    if shallow is None or not (is_deep or is_shallow):
        raise ValueError(
            f"{who}: a {backbone.description} takes VPT's shallow or deep prompts only (the "
            "official VPT-Swin has no other schedule)"
        )
    firsts = [sum(stages[:s]) for s in range(len(stages))]
    return StagedPrompts(
        stages,
        [backbone.block_shape(i).width for i in firsts],
        (shallow, *deep) if is_deep else (shallow,),
        is_deep,
        backbone.patch_size(),
        dropout=config.dropout,
        packed=packed,
        **kw,
    )


# -- command-line options -----------------------------------------------------------------------


def add_learned_prompt_options(
    group: argparse._ArgumentGroup,
    head_inits: Iterable[str],
    prompts_help: str = "prompts per set",
    dropout_help: str = "prompt dropout (default 0)",
) -> None:
    """The options of the VPT family: prompt count, dropout, projection, readout, computation,
    backend and head init (every default None: the method fills its own; its help texts say
    which)."""
    from fastprompt.backbones import readouts

    group.add_argument("--prompts", type=int, help=prompts_help)
    group.add_argument("--prompt-dropout", type=float, help=dropout_help)
    group.add_argument("--project", type=int, help="prompt width before a projection")
    group.add_argument("--readout", choices=readouts(), help="default the model's own pooling")
    group.add_argument("--impl", choices=IMPLS, help="computation (default fused)")
    group.add_argument(
        "--backend",
        choices=["auto", *BACKENDS],
        help="prompt-attention backend (default auto: the automatic choice; the same results); "
        "with --resume, the one the run continues with",
    )
    group.add_argument("--head-init", choices=list(head_inits), help="head initialisation")


def learned_prompt_kwargs(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Build keyword arguments from :func:`add_learned_prompt_options`'s options; raises
    ``ValueError`` naming the option for a bad value."""
    if args.prompts is not None and args.prompts < 0:
        raise ValueError(f"--prompts must be >= 0, got {args.prompts}")
    if args.prompt_dropout is not None and not 0 <= args.prompt_dropout < 1:
        raise ValueError(f"--prompt-dropout must be in [0, 1), got {args.prompt_dropout}")
    if args.head_init == "linear":
        raise ValueError(f"--head-init linear does not apply to --method {method} (vpt or keep)")
    return {
        "num_prompts": args.prompts,
        "dropout": args.prompt_dropout or 0.0,
        "project": -1 if args.project is None else args.project,
        "readout": args.readout,
        "impl": args.impl or "fused",
        "backend": None if args.backend == "auto" else args.backend,
        "head_init": args.head_init or "vpt",
    }


# -- checkpoints ----------------------------------------------------------------------------


def config_from_json(cls: type, saved: Mapping[str, Any], method: str) -> Any:
    """A config dataclass from its JSON form (lists back to tuples)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"load_prompts: unknown {method} config fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def split_overrides(
    config: Any, overrides: Mapping[str, Any], changeable: tuple[str, ...]
) -> tuple[Any, dict[str, Any]]:
    """Apply config overrides a loader may make (``changeable``: how it runs, never what was
    trained); return the config and the run options (impl, backend)."""
    run: dict[str, Any] = {}
    changes = {}
    for key, value in overrides.items():
        if key in RUN_OPTIONS:
            run[key] = value
        elif key in changeable:
            changes[key] = value
        else:
            raise TypeError(
                f"load_prompts: {key!r} cannot be overridden (allowed: {RUN_OPTIONS + changeable})"
            )
    return replace(config, **changes), run
