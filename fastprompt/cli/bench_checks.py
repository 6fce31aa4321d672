"""The checks of ``fastprompt bench``'s arguments and of its ``--out`` folder: every one runs
before any measuring starts, and a problem is one line."""

from __future__ import annotations

import argparse
import json
import os

from fastprompt.cli.train_checks import check_backend, check_device
from fastprompt.outputs import Outputs
from fastprompt.report import FIGURES

__all__ = ["BENCH_OUTPUTS", "DEFAULT_MODEL", "FITS_OUTPUTS", "ROWS", "check_bench_args"]

# ``fastprompt bench``'s rows, one JSON line each as it is measured (beside report.json).
ROWS = "rows.jsonl"
DEFAULT_MODEL = "vit_base_patch16_224"

# What bench writes into --out (its report's other keys vary with its options and version).
BENCH_OUTPUTS = Outputs(
    tool="fastprompt bench",
    report="report.json",
    keys=frozenset({"config", "env", "rows"}),
    more=None,
    rows=ROWS,
    row_keys=frozenset({"prompts", "variant"}),
    others=("report.md", *FIGURES),
)
FITS_OUTPUTS = Outputs(
    tool="fastprompt bench",
    report="fits.json",
    keys=frozenset({"env", "fits"}),
    more=None,
    others=("fits.md",),
)

# What ``--fits`` decides itself (fp32, VPT-deep, the batches it measures and scales): the
# options that set these for the report would be ignored, so they are refused beside it.
_NOT_WITH_FITS = (
    ("--model", lambda a: a.model is not None, "name the models with --fits-models"),
    ("--shallow", lambda a: a.shallow, "it measures VPT-deep"),
    ("--dtype", lambda a: a.dtype != "float32", "it measures fp32"),
    ("--batch", lambda a: a.batch is not None, "it finds the batch"),
    ("--reps", lambda a: a.reps is not None, "it times nothing"),
    ("--quick", lambda a: a.quick, "it times nothing"),
    ("--backend", lambda a: a.backend is not None, "it runs the default backend"),
    ("--no-memory", lambda a: a.no_memory, "it measures memory"),
    ("--compare", lambda a: a.compare is not None, "it writes no report.json"),
    ("--no-train", lambda a: a.no_train, "it times no step"),
    ("--no-flops", lambda a: a.no_flops, "it counts no FLOPs"),
)


def _check_model(flag: str, name: str, img_size: int | None) -> str | None:
    """Why bench cannot measure ``name`` (at ``--img-size img_size``): timm refuses the size,
    fastprompt cannot prompt the model, or the size is not a multiple of the patch size, where
    timm's patch embedding would drop the remainder; or None. The model is built on the meta
    device: nothing is allocated."""
    import timm
    import torch

    from fastprompt.backbones import adapter_for

    kw = {} if img_size is None else {"img_size": img_size}
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=100, **kw)
    except Exception as e:
        return f"--img-size {img_size} does not fit {flag} {name} ({type(e).__name__}: {e})"
    try:
        adapter_for(model, flag)
    except (TypeError, ValueError) as e:
        return str(e)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and patch is not None and any(img_size % p for p in patch):
        return (
            f"--img-size {img_size} is not a multiple of {name}'s patch size "
            f"{'x'.join(map(str, patch))} (the patch embedding would drop the remainder)"
        )
    return None


def _check_fits_args(args: argparse.Namespace) -> str | None:
    from fastprompt.fits import FIT_MODELS, model_shape

    if args.prompts is not None and (len(args.prompts) != 1 or args.prompts[0] < 1):
        return f"--fits takes one prompt count >= 1 (--prompts N), got {args.prompts}"
    for flag, given, why in _NOT_WITH_FITS:
        if given(args):
            return f"--fits does not take {flag} ({why}); drop it, or run bench without --fits"
    kw = {} if args.img_size is None else {"img_size": args.img_size}
    for name in args.fits_models or FIT_MODELS:
        if args.img_size is not None:
            problem = _check_model("--fits-models", name, args.img_size)
            if problem:
                return problem
        try:
            model_shape(name, kw)
        except ValueError as e:
            return f"--fits-models {name!r}: {e}"
    return None


def check_bench_args(args: argparse.Namespace) -> str | None:
    """Everything that can be checked before minutes of benchmarking; the first problem found."""
    import timm

    for name in ("batch", "reps", "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.prompts is not None and any(p < 0 for p in args.prompts):
        return f"--prompts must be >= 0, got {args.prompts}"
    names = [] if args.model is None else [("--model", args.model)]
    names += [("--fits-models", m) for m in args.fits_models or []]
    for flag, name in names:
        if not timm.is_model(name):
            return f"{flag} {name!r} is not a timm model name (see timm.list_models())"
    if args.fits is not None and not all(g > 0 for g in args.fits):
        return f"--fits takes budgets in GiB > 0, got {args.fits}"
    if args.fits_models is not None and args.fits is None:
        return "--fits-models goes with --fits GIB ..."
    problem = check_device(args.device) or check_backend(args.backend, args.device)
    if problem:
        return problem
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out} exists and is not a folder"
    if args.fits is not None:
        return _check_fits_args(args)
    if args.prompts is not None and not any(p > 0 for p in args.prompts):
        return (
            f"--prompts needs a count >= 1 to set beside the prompt-free model (which is "
            f"always measured), got {args.prompts}"
        )
    problem = _check_model("--model", args.model or DEFAULT_MODEL, args.img_size)
    if problem:
        return problem
    if args.compare is not None:
        try:
            with open(args.compare) as f:
                old = json.load(f)
            old["rows"], old["env"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"--compare {args.compare} is not a readable report.json ({e})"
    if not args.no_flops:
        try:
            import fvcore  # noqa: F401
        except ImportError:
            return "counting FLOPs needs fvcore (pip install fvcore), or pass --no-flops"
    return None
