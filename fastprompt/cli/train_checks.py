"""The checks of ``fastprompt train``'s arguments: every one runs before any work starts, and a
problem is one line (``parser.error``). A resumed run may change only how it runs
(:data:`fastprompt.cli.train.RUNTIME`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from fastprompt.cli.train import (
    DEFAULT_METHOD,
    RUNTIME,
    add_method_options,
    explicit_args,
    is_given,
    method_args,
    recipe_values,
    resolve_recipe,
)
from fastprompt.train.multi import spec_paths

__all__ = [
    "backend_option",
    "check_backend",
    "check_counts",
    "check_device",
    "check_run_backend",
    "check_run_device",
    "check_train_args",
]


def check_counts(args: argparse.Namespace, names: tuple[str, ...], least: int = 1) -> str | None:
    """What is wrong with a count given on the command line (below ``least``), or None.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments; an option left at None is not checked.
    names : tuple of str
        The options' attribute names (``"image_size"`` for ``--image-size``); an option of
        ``nargs`` gives a list, every value of which is checked.
    least : int
        The smallest count allowed.

    Returns
    -------
    str or None
        ``"--image-size must be >= 1, got 0"``, or None.
    """
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        if any(v is not None and v < least for v in values):
            return f"--{name.replace('_', '-')} must be >= {least}, got {value}"
    return None


def check_device(device: str | None) -> str | None:
    """What is wrong with a ``--device`` (not a device; CUDA asked for, none seen), or None."""
    import torch

    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        return f"--device {device!r} is not a device ({e})"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device} was asked for, but torch sees no CUDA device"
    return None


def check_run_device(run: str, recorded: str | None, device: str | None, way: str) -> str | None:
    """What is wrong with ``--device``, or without one with the device ``run`` recorded (a run
    trained on a GPU, read where torch sees none: ``way`` says what to do), or None."""
    if device is not None:
        return check_device(device)
    if check_device(recorded):
        return f"{run} was trained with --device {recorded}, which torch does not see here; {way}"
    return None


def check_backend(name: str | None, device: str | None) -> str | None:
    """Why ``--backend name`` cannot run on ``device`` (default CUDA when available), or None.
    Without ``name`` (or with ``auto``), ``FASTPROMPT_BACKEND``, which forces every call as
    strictly. A backend whose check would build its kernels (the C++ extension) is left to the
    first forward, which names every reason too."""
    import torch

    from fastprompt import _config, backends

    label = f"--backend {name}"
    if name is None or name == "auto":
        try:
            name = _config.get().backend
        except ValueError as e:  # another malformed variable: said as it is
            return str(e)
        label = f"FASTPROMPT_BACKEND={name}"
    if name is None:
        return None
    kind = torch.device(device).type if device else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend = backends.get(name, "FASTPROMPT_BACKEND" if label.startswith("F") else "backend")
    except ValueError as e:
        return str(e)
    if kind not in backend.devices:
        return f"{label} does not run on {kind} (it runs on {', '.join(backend.devices)})"
    why = None if "status" in backend.hooks else backend.availability(kind)
    return None if why is None else f"{label} cannot run on {kind} here: {why}"


def backend_option(name: str | None) -> dict[str, Any]:
    """The ``run_options`` of :func:`fastprompt.train.run.load_run_model` that ``--backend name``
    asks for: none when not given (the run's own), ``auto`` the automatic choice."""
    if name is None:
        return {}
    return {"backend": None if name == "auto" else name}


def check_run_backend(
    run: str, config: Any, device: str | None, way: str, given: str | None = None
) -> str | None:
    """Why the ``--backend`` the run ``config`` was trained with, or the one ``given`` for it
    (``--backend`` of evaluate, condense, resume), cannot run on ``device`` (else the run's
    device) here, ``way`` saying what to do, or None: it failed at the first forward."""
    if given is not None:
        return check_backend(given, device or config.device)
    name = config.method_args.get("backend")
    problem = check_backend(name, device or config.device)
    if problem is None or name is None:  # FASTPROMPT_BACKEND's problem says itself
        return problem
    why = problem.removeprefix(f"--backend {name} ")
    return f"{run} runs with --backend {name}, as it was trained, which {why}; {way}"


def check_train_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None (nothing heavy runs here)."""

    from fastprompt.train import owner
    from fastprompt.train.distributed import env_rank, launched_by_torchrun

    for name in ("epochs", "batch_size", "stop_after"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.num_classes is not None and args.num_classes < 2:
        return f"--num-classes must be >= 2 (a classifier's classes), got {args.num_classes}"
    for name in ("warmup_epochs", "workers", "seed"):
        value = getattr(args, name)
        if value is not None and value < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {value}"
    for name in ("lr", "weight_decay", "momentum"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {value}"
    backend = getattr(args, "backend", None)
    problem = check_device(args.device) or check_backend(backend, args.device)
    if problem:
        return problem
    if args.resume is not None:
        return _check_resume(args)
    # Before --print-recipe returns: a recipe printed for options training refuses would mislead.
    method = args.method or DEFAULT_METHOD
    owners = add_method_options(argparse.ArgumentParser().add_argument_group())
    wrong = [d for d, ms in owners.items() if method not in ms and is_given(getattr(args, d))]
    if wrong:
        return f"--{wrong[0].replace('_', '-')} does not apply to --method {method}"
    if args.print_recipe:
        try:
            resolve_recipe(args)
        except ValueError as e:
            return str(e)
        return None
    if not args.model:
        return "--model is required (a timm model name)"
    if not args.data:
        return "--data is required (a folder, a .csv/.txt list, or digits)"
    if not args.out:
        return "--out is required (the run folder to create)"
    import timm

    if not timm.is_model(args.model):
        return f"--model {args.model!r} is not a timm model name (see timm.list_models())"
    problem = _check_model_args(args.model, dict(args.model_args or []))
    if problem:
        return problem
    if args.weights is not None and not os.path.isfile(args.weights):
        return f"--weights {args.weights} does not exist"
    if args.weights is not None and args.no_pretrained:
        return "--weights and --no-pretrained contradict each other"
    try:
        method_args(args)
    except ValueError as e:
        return str(e)
    if args.val is not None and args.val_split is not None:
        return "pass either --val or --val-split, not both"
    problem = _check_mixture(args)
    if problem:
        return problem
    for flag, value in (("--data", args.data), ("--val", args.val)):
        for spec in spec_paths(value):
            if not (spec == "digits" or spec.startswith("digits:")) and not os.path.exists(spec):
                return f"{flag} {spec} does not exist (a folder, a .csv/.txt list, or digits)"
    # Under torchrun rank 0 creates the folder; another rank may look after it did.
    if env_rank() == 0:
        try:
            keep = [*spec_paths(args.data), *spec_paths(args.val), args.weights]
            owner.check_out(args.out, args.overwrite, "--out", keep)
        except owner.OwnerError as e:
            return str(e)
    try:
        recipe, _ = resolve_recipe(args)
    except ValueError as e:
        return str(e)
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if recipe.batch_size % world:
            return f"--batch-size {recipe.batch_size} does not split over {world} processes"
    return None


def _check_mixture(args: argparse.Namespace) -> str | None:
    from fastprompt.train.multi import DataError, check_distinct, parse_specs

    if not isinstance(args.data, list):
        if isinstance(args.val, list):
            return f"--val is given {len(args.val)} times for one --data"
        return None
    if args.num_classes is not None:
        return (
            f"--num-classes {args.num_classes} applies to one --data; a mixture's classes are "
            "its datasets' classes, joined"
        )
    try:
        pairs = parse_specs(args.data)
    except DataError as e:
        return str(e)
    if args.val is not None and len(spec_paths(args.val)) != len(args.data):
        return (
            f"--val: {len(args.data)} datasets need one --val each (in --data's order), got "
            f"{len(spec_paths(args.val))}; or --val-split, or none for datasets with their own"
        )
    vals = spec_paths(args.val) if args.val is not None else None
    try:
        check_distinct(pairs, vals)
    except DataError as e:
        return str(e)
    return None


def _check_model_args(name: str, kwargs: dict[str, Any]) -> str | None:
    """What timm says about ``--model-args``, found by building the model on the meta device
    (no memory, no weights, no download: a fraction of a second even for a ViT-L)."""
    import timm
    import torch

    def build(kw: dict[str, Any]) -> None:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **kw)

    try:
        build(kwargs)
        return None
    except Exception as e:
        whole = e
    for key, value in kwargs.items():
        try:
            build({key: value})
        except Exception as e:
            # A value that is not JSON stays a string: "(2,2,2)" or "2,2,2" is not a tuple.
            read = (
                f"; it was read as the string {value!r}: values are JSON, a list as [2, 2, 2]"
                if isinstance(value, str) and (value.startswith(("(", "[", "{")) or "," in value)
                else ""
            )
            return (
                f"--model-args {key}={value!r}: timm's {name} does not take it "
                f"({type(e).__name__}: {e}{read})"
            )
    return (
        f"--model-args {' '.join(f'{k}={v!r}' for k, v in kwargs.items())}: timm's {name} does "
        f"not take them together ({type(whole).__name__}: {whole})"
    )


def _check_resume(args: argparse.Namespace) -> str | None:
    from fastprompt.train.run import RunError, read_run

    try:
        config, saved = read_run(args.resume)
    except RunError as e:
        return str(e)
    problem = check_run_device(
        args.resume,
        config.device,
        args.device,
        "continue it elsewhere with --device (e.g. --device cpu)",
    ) or check_run_backend(
        args.resume,
        config,
        args.device,
        "continue it with --backend auto (or another backend), or where that one runs",
        args.backend,
    )
    if problem:
        return problem
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        return f"--out {args.out} differs from --resume {args.resume}; a run continues in place"
    before = saved.get("command", {}).get("explicit", {})
    for key, value in explicit_args(args).items():
        if key in RUNTIME or key == "out":
            continue
        flag = f"--{key.replace('_', '-')}"
        if key not in before:
            # Its value then came from a default or the recipe, which this check cannot see.
            return (
                f"{flag} was not given when the run began (it runs with the default or its "
                f"recipe's value); a resumed run keeps its settings: drop {flag}"
            )
        old = before[key]
        if isinstance(value, list):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        if key == "set":  # as the recipe takes them: an older fastprompt kept lr=.1 as text
            same = recipe_values(old) == recipe_values(value)
        else:
            same = old == value
        if not same:
            return (
                f"{flag} {value!r} differs from the run's ({old!r}); a resumed run keeps its "
                "settings"
            )
    return None
