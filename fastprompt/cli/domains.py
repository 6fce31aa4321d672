"""``fastprompt domains RUN``: the domain-discovery report of a PGN run over several datasets
(:mod:`fastprompt.train.domains`)."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_domains_parser", "check_domains_args", "run_domains"]


def add_domains_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "domains",
        help="how well a multi-dataset PGN run's mixture weights separate its datasets (PNG)",
        description="Embed the generator's mixture weights of a PGN run over several datasets "
        "(fastprompt train --method pgn --data a/ --data b/ ...) in 2-D, coloured by dataset, "
        "and measure the held-out nearest-centroid accuracy of the dataset label from them, on "
        "the run's validation images. Needs pip install 'fastprompt[domains]'.",
    )
    p.add_argument("run", help="the run folder")
    p.add_argument("--checkpoint", choices=["best", "last", "init"], default="best")
    p.add_argument("--embedding", choices=["pca", "tsne"], default="pca")
    p.add_argument("--out", help="the PNG to write (default RUN/domains.png; figures beside it)")
    p.add_argument("--device", default="cpu", help="default cpu")


def check_domains_args(args: argparse.Namespace) -> str | None:
    from fastprompt.train.domains import extra_missing

    reason = extra_missing()
    if reason:
        return reason
    if not os.path.isdir(args.run):
        return f"{args.run} is not a folder (a fastprompt run folder)"
    if args.out is not None:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            return f"--out {args.out}: its folder {folder} does not exist"
        if not args.out.lower().endswith(".png"):
            return f"--out {args.out}: the report is a PNG; name it NAME.png"
    return None


def run_domains(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastprompt.train.datasets import DataError
    from fastprompt.train.domains import run_report
    from fastprompt.train.folder import RunError

    try:
        r = run_report(args.run, args.checkpoint, args.out, args.embedding, args.device)
    except (RunError, DataError) as e:
        parser.error(f"domains: {e}")
    print(
        f"{args.run} ({args.checkpoint}): the datasets separate by their mixture weights with "
        f"held-out nearest-centroid accuracy {100 * r.separation:.1f}% (untrained "
        f"{'-' if r.separation_baseline is None else f'{100 * r.separation_baseline:.1f}%'}, "
        f"chance {100 * r.chance:.1f}%, {r.held_out} images); {r.png}, {r.json}"
    )
    return 0
