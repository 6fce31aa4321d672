"""``fastprompt`` command line: ``train``, ``condense``, ``evaluate``, ``recipes``, ``domains``
(multi-dataset PGN), ``bench`` (latency, FLOPs, memory report) and ``info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from fastprompt._warnings import command_line
from fastprompt.backends import NAMES
from fastprompt.cli.bench_checks import (
    BENCH_OUTPUTS,
    DEFAULT_MODEL,
    FITS_OUTPUTS,
    ROWS,
    check_bench_args,
)
from fastprompt.cli.condense import add_condense_parser, check_condense_args, run_condense
from fastprompt.cli.domains import add_domains_parser, check_domains_args, run_domains
from fastprompt.cli.evaluate import add_evaluate_parser, check_evaluate_args, run_evaluate
from fastprompt.cli.train import add_recipes_parser, add_train_parser, run_recipes, run_train
from fastprompt.cli.train_checks import check_train_args
from fastprompt.fits import FIT_MODELS
from fastprompt.outputs import prepare_out
from fastprompt.prompted import MEMORY_POLICIES

__all__ = ["main"]


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="latency, FLOPs and memory of VPT: prompt-free vs naive vs fastprompt"
    )
    p.add_argument(
        "--model", default=None, help=f"timm model name, random init (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--prompts",
        type=int,
        nargs="+",
        action="extend",
        default=None,
        help="prompt counts (default 50 100 200; the prompt-free model is always measured)",
    )
    p.add_argument("--shallow", action="store_true", help="VPT-shallow instead of deep")
    p.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 8 on a CPU")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--backend", default=None, choices=list(NAMES))
    p.add_argument(
        "--reps", type=int, default=None, help="timed repetitions (default 10 GPU, 5 CPU)"
    )
    p.add_argument("--img-size", type=int, default=None, help="image size override")
    p.add_argument("--quick", action="store_true", help="batch 2, 3 reps, prompts 50 200")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the memory measurements (saved for backward, peak)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument(
        "--memory",
        nargs="+",
        action="extend",
        choices=MEMORY_POLICIES,
        default=None,
        help="fastprompt's memory policies to measure (default all: "
        f"{' '.join(MEMORY_POLICIES)}); none is the plain fastprompt row",
    )
    p.add_argument(
        "--fits",
        type=float,
        nargs="+",
        action="extend",
        metavar="GIB",
        help="instead: the largest batch that fits in each budget (GiB) for --fits-models, "
        "full fine-tuning, naive VPT and fastprompt under each policy (an estimate on a CPU)",
    )
    p.add_argument(
        "--fits-models",
        nargs="+",
        action="extend",
        default=None,
        help=f"timm models for --fits (default {' '.join(FIT_MODELS)})",
    )
    p.add_argument("--out", default="fastprompt-report", help="report folder")
    p.add_argument("--compare", default=None, help="an earlier report.json to set beside this one")


def _bench(args: argparse.Namespace) -> int:
    import torch

    from fastprompt import bench
    from fastprompt.report import compare_table, markdown_table, plot, print_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    problem = prepare_out(args.out, BENCH_OUTPUTS if args.fits is None else FITS_OUTPUTS)
    if problem:
        print(f"fastprompt bench: {problem}", file=sys.stderr)
        return 2
    if args.fits is not None:
        return _fits(args, device)
    cfg = bench.BenchConfig(
        model=args.model or DEFAULT_MODEL,
        prompts=args.prompts or ([50, 200] if args.quick else [50, 100, 200]),
        deep=not args.shallow,
        batch=args.batch or (2 if args.quick else (64 if on_gpu else 8)),
        dtype=args.dtype,
        device=device,
        backend=args.backend,
        reps=args.reps or (3 if args.quick else (10 if on_gpu else 5)),
        train=not args.no_train,
        memory=not args.no_memory,
        count_flops=not args.no_flops,
        img_size=args.img_size,
        policies=args.memory or list(MEMORY_POLICIES),
    )
    # The prompt-free model is always measured; 0 in --prompts adds nothing.
    cfg.prompts = [p for p in cfg.prompts if p > 0]
    steps = 1 + len(cfg.prompts)
    try:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="fastprompt bench", file=sys.stderr)

        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None

        def progress(msg: str) -> None:
            print(msg, file=sys.stderr)

    # Each row as it is final, one JSON line: a run cut short keeps what it measured.
    with open(os.path.join(args.out, ROWS), "w") as rows:

        def on_row(row: dict) -> None:
            rows.write(json.dumps(row) + "\n")
            rows.flush()

        result = bench.run(cfg, progress, on_row)
    if bar is not None:
        bar.close()
    _write_json(os.path.join(args.out, "report.json"), result)
    md = markdown_table(result)
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        cmp = compare_table(old, result)
        md += "\n\n" + cmp
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md + "\n")
    print_table(result)
    if args.compare:
        print("\n" + cmp)
    for path in plot(result, args.out):
        print(f"wrote {path}")
    print(f"wrote {os.path.join(args.out, 'report.json')} and report.md")
    return 0


def _write_json(path: str, data: Any) -> None:
    """``path`` written whole: a temporary file renamed over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _fits(args: argparse.Namespace, device: str) -> int:
    """``fastprompt bench --fits GIB ...``: the largest batches, as a table and fits.json."""
    import torch

    from fastprompt import bench, fits

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr)

    prompts = args.prompts[0] if args.prompts else 200
    keep = args.memory or MEMORY_POLICIES  # the baselines are always measured
    kw = {} if args.img_size is None else {"img_size": args.img_size}
    models = list(args.fits_models or FIT_MODELS)
    found = fits.estimate_fits(
        models,
        args.fits,
        prompts=prompts,
        variants=[
            v for v, (_, impl, m) in fits.FIT_VARIANTS.items() if impl != "fused" or m in keep
        ],
        device=device,
        model_kwargs=kw,
        progress=progress,
    )
    table = fits.fits_table(found, device, prompts)
    config = {"models": models, "budgets_gib": args.fits, "prompts": prompts}
    _write_json(
        os.path.join(args.out, "fits.json"),
        {
            "config": config | {"img_size": args.img_size, "device": device},
            "env": bench.environment(torch.device(device)),
            "fits": fits.fits_json(found),
        },
    )
    with open(os.path.join(args.out, "fits.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {os.path.join(args.out, 'fits.json')} and fits.md")
    return 0


def _info(_args: argparse.Namespace) -> int:
    import platform

    import torch

    import fastprompt
    from fastprompt.backends import info

    rows: list[tuple[str, Any]] = [
        ("fastprompt", fastprompt.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda (torch built with)", torch.version.cuda),
        ("cuda device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
    ]
    for name in ("timm", "triton", "fvcore", "safetensors"):
        try:
            rows.append((name, __import__(name).__version__))
        except Exception as e:
            rows.append((name, f"missing ({type(e).__name__})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print()
    print("\n".join(info.lines()))
    _print_extension_info()
    return 0


def _print_extension_info() -> None:
    """Build status of the C++/CUDA extension; describes, never compiles."""
    try:
        from fastprompt.kernels import cpp

        info = cpp.build_info()
    except Exception as e:  # info must print whatever is broken
        print(f"\nC++/CUDA extension: cannot describe it ({type(e).__name__}: {e})")
        return
    print("\nC++/CUDA extension (csrc/, backend 'cpp'):")
    keys = (
        "compiler",
        "ninja",
        "cuda_toolkit",
        "cuda_kernels",
        "archs",
        "cpu_isa",
        "cache",
        "cache_state",
        "build_seconds",
        "aot",
        "library",
        "how",
        "repaired",
        "build",
        "cuda_build_error",
        "last_error",
    )
    for key in keys:
        if key in info:
            value = info[key] if info[key] is not None else "not found"
            print(f"  {key:<13} {value}")
    if not info.get("loaded"):
        print("  (not loaded in this process; it builds on first use, or see setup.py)")


def _check_environment(command: str) -> str | None:
    """A bad ``FASTPROMPT_*`` variable, said before any work (``bench`` reads no images)."""
    from fastprompt import _config, backends

    try:
        settings = _config.get()
        if settings.backend is not None:
            backends.get(settings.backend, "FASTPROMPT_BACKEND")
        if command != "bench":
            _config.max_image_pixels()
    except ValueError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastprompt`` command."""
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_condense_parser(sub)
    add_evaluate_parser(sub)
    add_recipes_parser(sub)
    add_domains_parser(sub)
    _bench_parser(sub)
    sub.add_parser("info", help="versions, device and which backends can run here")
    args = parser.parse_args(argv)
    with command_line(f"fastprompt {args.command}"):
        return _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The command ``args`` asks for: its checks, then the command."""
    checks = {
        "bench": check_bench_args,
        "train": check_train_args,
        "condense": check_condense_args,
        "evaluate": check_evaluate_args,
        "domains": check_domains_args,
    }
    if args.command in checks:
        problem = _check_environment(args.command) or checks[args.command](args)
        if problem is not None:
            parser.error(f"{args.command}: {problem}")
    if args.command in ("train", "condense", "evaluate", "domains"):
        run = {
            "train": run_train,
            "condense": run_condense,
            "evaluate": run_evaluate,
            "domains": run_domains,
        }
        return run[args.command](args, parser)
    return {"bench": _bench, "info": _info, "recipes": run_recipes}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
