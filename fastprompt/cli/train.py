"""``fastprompt train`` and ``fastprompt recipes``.

Every argument is checked before any work starts (:mod:`fastprompt.cli.train_checks`); a problem
is one line from ``parser.error``. The recipe is the named one with the options applied by
:func:`fastprompt.train.recipes.apply_changes`, as :func:`fastprompt.fit` applies its own.
A resumed run (``--resume RUN``) takes its settings from ``RUN/run.json``; repeating the original
arguments is allowed, changing them is refused (except how it runs: workers, progress, stop).
``--out`` must be new or empty (or a run folder that never finished preparing); ``--overwrite``
moves what it holds aside instead (:mod:`fastprompt.train.owner`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from fastprompt import registry
from fastprompt.train.data import VTAB1K_CLASSES
from fastprompt.train.recipes import (
    MEMORY_POLICIES,
    NORMALIZATIONS,
    RECIPES,
    TRANSFORMS,
    VTAB1K_PROMPTS,
    Recipe,
    apply_changes,
    coerce_field,
)

__all__ = ["add_recipes_parser", "add_train_parser", "resolve_recipe", "run_recipes", "run_train"]

PRESETS = {f"vtab1k-{task}": n for task, n in VTAB1K_PROMPTS.items()}
# Arguments that say how a run executes, not what it trains: a resumed run may change them.
# (--overwrite applies to a new run only: a resumed run moves nothing, so the original command
# with --resume appended may carry it.)
RUNTIME = {
    "resume",
    "stop_after",
    "workers",
    "no_progress",
    "quiet",
    "device",
    "backend",
    "command",
    "overwrite",
}
DEFAULT_METHOD = "vpt"


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


# A number in Python's spelling that JSON does not read (.1, 1., +2, -.5): a number all the same.
# ASCII digits only, and no int with leading zeros (007: Python refuses it, JSON too): text.
_INT = re.compile(r"[+-]?(0+|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?(([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)")


def _model_arg(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        pass
    number = value.strip()
    if _INT.fullmatch(number):
        return key, int(number)
    if _FLOAT.fullmatch(number):
        return key, float(number)
    return key, value


class _Pairs(argparse.Action):
    """``KEY=VALUE ...`` that may repeat (``--set a=1 --set b=2``): every occurrence applies.
    A key given twice with different values is refused naming both (argparse kept only the last
    occurrence, silently); the same value twice counts once: the same as what receives it, its
    type and value (:meth:`received`), so ``0.1`` and ``.1`` are one value."""

    def received(self, key: str, value: Any) -> Any:
        return value  # timm.create_model receives the parsed value as it is

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = list(getattr(namespace, self.dest, None) or [])
        seen = dict(pairs)
        for key, value in values:
            if key not in seen:
                seen[key] = value
                pairs.append((key, value))
            elif json.dumps(self.received(key, seen[key])) != json.dumps(self.received(key, value)):
                raise argparse.ArgumentError(
                    self,
                    f"{key} is given twice, as {key}={json.dumps(seen[key])} and "
                    f"{key}={json.dumps(value)}; give it once",
                )
        setattr(namespace, self.dest, pairs)


def _as_field(key: str, value: Any) -> Any:
    """``value`` as the recipe field ``key`` takes it; a value it refuses (or an unknown field)
    as given, for the recipe's own checks to refuse."""
    try:
        return coerce_field(key, value)
    except ValueError:
        return value


class _RecipePairs(_Pairs):
    """``--set FIELD=VALUE``: values compared as the recipe field takes them (``epochs=10`` and
    ``epochs=10.0`` are one value, ``none`` and ``null`` too)."""

    def received(self, key: str, value: Any) -> Any:
        return _as_field(key, value)


def recipe_values(pairs: list) -> dict[str, str]:
    """``--set`` pairs as the recipe fields take them (JSON text, comparable)."""
    return {k: json.dumps(_as_field(k, v)) for k, v in pairs}


class _Repeatable(argparse.Action):
    """A flag that may repeat: once, a string; several times, a list (a mixture of datasets)."""

    def __call__(self, parser, namespace, values, option_string=None):
        old = getattr(namespace, self.dest, None)
        new = values if old is None else [*old, values] if isinstance(old, list) else [old, values]
        setattr(namespace, self.dest, new)


class _SharedGroup:
    """An argparse group that every method adds its options to (:class:`fastprompt.registry.
    CliOptions`): an option several methods declare is added once, its choices and help merged,
    and which methods declare which option is recorded."""

    def __init__(self, group: argparse._ArgumentGroup) -> None:
        self.group = group
        self.method = ""
        self.owners: dict[str, list[str]] = {}
        self._actions: dict[str, argparse.Action] = {}
        self._helps: dict[str, dict[str, list[str]]] = {}

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        self.owners.setdefault(dest, []).append(self.method)
        help_text = kwargs.pop("help", None)
        action = self._actions.get(dest)
        if action is None:
            action = self._actions[dest] = self.group.add_argument(*flags, **kwargs)
        elif tuple(flags) != tuple(action.option_strings):
            raise ValueError(f"method {self.method!r} declares {dest} as {flags}, not {action}")
        elif action.choices is not None and kwargs.get("choices") is not None:
            action.choices = list(dict.fromkeys([*action.choices, *kwargs["choices"]]))
        if help_text:
            self._helps.setdefault(dest, {}).setdefault(help_text, []).append(self.method)
            action.help = "; ".join(
                f"{', '.join(ms)}: {text}" for text, ms in self._helps[dest].items()
            )
        return action


def add_method_options(group: argparse._ArgumentGroup) -> dict[str, list[str]]:
    """Add every trainable method's options to ``group``; return each option's methods."""
    shared = _SharedGroup(group)
    for name in registry.trainable():
        shared.method = name
        registry.get(name).cli.add(shared)
    return shared.owners


def is_given(value: Any) -> bool:
    return value is not None and value is not False


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train prompts (VPT, PGN, ...) on a frozen timm ViT or Swin into a run folder",
        description="Train prompts (and the head) of a frozen timm ViT or Swin with a named "
        "recipe. Writes run.json, init/, last/, best/, metrics.jsonl, curves.png to --out. Under "
        "torchrun (torchrun --nproc-per-node N -m fastprompt train ...) the batch is split over "
        "the processes.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224.orig_in21k")
    m.add_argument(
        "--model-args",
        nargs="+",
        action=_Pairs,
        type=_model_arg,
        metavar="KEY=VALUE",
        help="more timm.create_model arguments (img_size=32 depth=4 ...)",
    )
    m.add_argument("--weights", help="a local backbone state dict (.safetensors / .pth)")
    m.add_argument(
        "--no-pretrained",
        action="store_true",
        help="random-init backbone (default: timm's pretrained weights, downloaded by timm)",
    )
    m.add_argument(
        "--method",
        choices=registry.trainable(),
        help=f"default {DEFAULT_METHOD} (options below; each says which methods take it)",
    )
    add_method_options(p.add_argument_group("method options"))
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        action=_Repeatable,
        help="ImageFolder folder, .csv/.txt list, or digits[:5-9]; repeat it to train one model "
        "on a mixture of datasets (joint label space; name one with NAME=PATH)",
    )
    d.add_argument("--val", action=_Repeatable, help="validation data (same forms; one per --data)")
    d.add_argument(
        "--val-split", help="hold out of --data: a fraction or a count (stratified), or vtab-1k"
    )
    d.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="the task's class count, the head's outputs: integer labels index classes 0 to N-1 "
        "even where --data lacks images of some (default the classes of --data; a --preset "
        "vtab1k-TASK sets the task's, as the official VTAB code, unless --num-classes is given)",
    )
    d.add_argument("--workers", type=int, help=f"loader processes (default {default_workers()})")
    r = p.add_argument_group("recipe (overrides)")
    r.add_argument("--recipe", choices=sorted(RECIPES), help="default: the method's")
    r.add_argument(
        "--epochs",
        type=int,
        help="default the recipe's (100); another count rescales the warmup to the same share "
        "(vpt, e2vpt: 10 of 100; pgn: 50 of 100), as a note at the start of the run says; "
        "--warmup-epochs keeps the official value",
    )
    r.add_argument("--batch-size", type=int, help="global batch (split over processes)")
    r.add_argument(
        "--lr",
        type=float,
        help="the base lr of the official tune scripts, unscaled: the vpt, e2vpt and "
        "pc-finetune recipes peak at lr x batch / 256 (pgn: lr as given). A SOLVER.BASE_LR "
        "passed to the official train.py is already that peak: give it with --set "
        "lr_scaling=none",
    )
    r.add_argument(
        "--warmup-epochs",
        type=int,
        help="default the recipe's, rescaled with --epochs; must be below the epochs",
    )
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--momentum", type=float)
    r.add_argument("--normalize", choices=NORMALIZATIONS)
    r.add_argument("--train-transform", choices=TRANSFORMS)
    r.add_argument("--test-transform", choices=TRANSFORMS)
    r.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun, PGN's generator BatchNorm uses the global batch (recipe "
        "batch_norm=sync; default per-process, as the official code)",
    )
    r.add_argument(
        "--memory",
        choices=MEMORY_POLICIES,
        help="what each block keeps for backward: none (default), mlp (the MLP hidden "
        "recomputed), block (per-block checkpointing); same gradients",
    )
    r.add_argument(
        "--set",
        nargs="+",
        action=_RecipePairs,
        type=_model_arg,
        metavar="FIELD=VALUE",
        help="any recipe field; repeatable (--set epochs=50 --set momentum=0.8)",
    )
    r.add_argument("--print-recipe", action="store_true", help="print the recipe and exit")
    x = p.add_argument_group("run")
    x.add_argument("--out", help="the run folder (new or empty)")
    x.add_argument(
        "--overwrite",
        action="store_true",
        help="a new run whose --out holds something: move that aside to OUT.old-DATE-TIME "
        "first (nothing is deleted)",
    )
    x.add_argument("--resume", metavar="RUN", help="continue the run in RUN")
    x.add_argument("--stop-after", type=int, metavar="EPOCHS", help="stop once EPOCHS are done")
    x.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast (default fp32)")
    x.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True)")
    x.add_argument("--seed", type=int)
    x.add_argument("--device", help="cpu, cuda, cuda:N (default cuda if available)")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    x.add_argument("--quiet", action="store_true", help="print nothing (log.txt is written)")


def add_recipes_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="print the training recipes and the VTAB-1k presets")
    p.add_argument("name", nargs="?", choices=sorted(RECIPES))


def run_recipes(args: argparse.Namespace) -> int:
    for name in [args.name] if args.name else sorted(RECIPES):
        print(RECIPES[name].describe())
        print()
    if not args.name:
        from fastprompt.methods.e2vpt import VTAB1K_PROMPTS as E2VPT_PROMPTS

        print(
            "presets (--preset, VTAB-1k): the task's class count, the official prompt counts,\n"
            "prompt dropout 0.1 (VPT-deep), a square resize without augmentation, ImageNet\n"
            "mean/std; not the per-task batch size, lr and weight decay (the official tables\n"
            "are not published)"
        )
        print(f"  {'':<28} {'classes':>7}  {'vpt':>5}  e2vpt (visual/key-value)")
        for name, n in sorted(PRESETS.items()):
            task = name.removeprefix("vtab1k-")
            visual, kv = E2VPT_PROMPTS[task]
            print(f"  {name:<28} {VTAB1K_CLASSES[task]:>7}  {n:>5}  {visual}/{kv}")
    return 0


def explicit_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if v is not None and v is not False}


def resolve_recipe(args: argparse.Namespace) -> tuple[Recipe, list[str]]:
    """The recipe the arguments ask for (named recipe + preset + overrides, applied by
    :func:`fastprompt.train.recipes.apply_changes`, as :func:`fastprompt.fit` applies its own)
    and the notes of what that changed unasked (a rescaled warmup)."""
    entry = registry.get(args.method or DEFAULT_METHOD)
    recipe = RECIPES[args.recipe or entry.recipe]
    # Recipe fields the method's options imply (VPT's VTAB-1k presets).
    changes: dict[str, Any] = dict(entry.cli.recipe(args)) if entry.cli.recipe else {}
    flags: dict[str, str] = {}  # recipe field -> the option that set it
    for name in (
        "epochs",
        "batch_size",
        "lr",
        "warmup_epochs",
        "weight_decay",
        "momentum",
        "normalize",
        "train_transform",
        "test_transform",
        "memory",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
            flags[name] = f"--{name.replace('_', '-')} {value}"
    if getattr(args, "sync_bn", False):
        changes["batch_norm"] = "sync"
        flags["batch_norm"] = "--sync-bn"
    for key, value in args.set or []:
        try:
            coerced = coerce_field(key, value, f"--set {key}={value}")
        except ValueError as e:
            raise ValueError(str(e).replace("recipe: ", f"--set {key}={value}: ")) from None
        # The last of two settings won silently; a preset's implied field is overridable.
        if key in flags and coerced != changes[key]:
            raise ValueError(
                f"{flags[key]} and --set {key}={value} set the recipe field {key} twice, to "
                "different values; give it once"
            )
        changes[key] = coerced
    return apply_changes(recipe, changes)


def method_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The method and the keyword arguments of its build function (its registry entry maps the
    options); raises ``ValueError`` for a bad option value."""
    method = args.method or DEFAULT_METHOD
    return method, registry.get(method).cli.kwargs(args)


def build_config(args: argparse.Namespace):
    from fastprompt.train.run import DataConfig, ModelSpec, RunConfig

    method, margs = method_args(args)
    recipe, _ = resolve_recipe(args)
    num_classes = args.num_classes
    preset = getattr(args, "preset", None)
    if num_classes is None and preset and isinstance(args.data, str):
        num_classes = VTAB1K_CLASSES[preset.removeprefix("vtab1k-")]
    return RunConfig(
        model=ModelSpec(
            name=args.model,
            args=dict(args.model_args or []),
            weights=args.weights,
            pretrained=not args.no_pretrained,
        ),
        method=method,
        method_args=margs,
        data=DataConfig(
            train=args.data,
            val=args.val,
            val_split=args.val_split,
            workers=default_workers() if args.workers is None else args.workers,
            num_classes=num_classes,
        ),
        recipe=recipe,
        precision=args.precision or "fp32",
        compile=bool(args.compile),
        seed=args.seed or 0,
        device=args.device,
    )


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastprompt.cli.train_checks import backend_option
    from fastprompt.train.data import DataError
    from fastprompt.train.distributed import setup, teardown
    from fastprompt.train.loop import LabelError
    from fastprompt.train.owner import release
    from fastprompt.train.run import RunError, continue_run, prepare_run, read_run

    if args.print_recipe and args.resume is None:
        recipe, notes = resolve_recipe(args)
        print("\n".join([recipe.describe(), *notes]))
        return 0
    run = args.resume or args.out
    # A resumed run stays on the run's device (cuda:1, or cpu on a GPU machine) unless told.
    env = setup(args.device or (read_run(run)[0].device if args.resume else None))
    try:
        if args.resume is None:
            config = build_config(args)
            explicit = explicit_args(args)
            explicit.pop("command", None)
            explicit = {
                k: [list(v) for v in x] if k in ("model_args", "set") else x
                for k, x in explicit.items()
            }
            prepare_run(
                config,
                args.out,
                env,
                extra={
                    "command": {"argv": sys.argv, "explicit": explicit},
                    # Said in the log at the start of the run (fastprompt.train.run).
                    "recipe_notes": resolve_recipe(args)[1],
                },
                overwrite=args.overwrite,
                keep_lock=True,
                quiet=args.quiet,
            )
        continue_run(
            run,
            env,
            stop_after=args.stop_after,
            workers=args.workers,
            progress=not args.no_progress,
            quiet=args.quiet,
            run_options=backend_option(args.backend) if args.resume else None,
        )
    except (DataError, RunError, LabelError) as e:
        teardown(env)
        parser.error(f"train: {e}")
    finally:
        if env.main:
            release(run)
    teardown(env)
    return 0
