"""``fastprompt condense RUN``: Prompt Condensation of a VPT-deep run into a new run folder."""

from __future__ import annotations

import argparse
import sys

from fastprompt.backends import NAMES as BACKENDS

__all__ = ["add_condense_parser", "check_condense_args", "run_condense"]


def _keep(text: str) -> float | int:
    """A ratio ("0.3") stays a float, a count ("120") an int, as select_prompts reads them."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio or a count, got {text!r}") from None


def add_condense_parser(sub: argparse._SubParsersAction) -> None:
    from fastprompt.methods.condensation import SCORES

    p = sub.add_parser(
        "condense",
        help="Prompt Condensation of a VPT-deep run: score, keep the top k, fine-tune",
        description="Score every prompt of RUN's model over its training set, keep the top "
        "--keep, and fine-tune only the kept prompts and the head (recipe pc-finetune) in a new "
        "run folder.",
    )
    p.add_argument("run", metavar="RUN", help="a VPT-deep run folder")
    p.add_argument(
        "--keep", type=_keep, default=0.3, help="ratio (0.3) or count (120) kept (default 0.3)"
    )
    p.add_argument("--score", choices=SCORES, default="taylor", help="default taylor (paper's)")
    p.add_argument("--scope", choices=["global", "local"], default="global")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument(
        "--lr",
        type=float,
        help="fine-tuning base lr, scaled by batch/256 as the run's was (default the run's / 10)",
    )
    p.add_argument("--weight-decay", type=float, help="of the fine-tuning (default the run's)")
    p.add_argument("--momentum", type=float, help="of the fine-tuning (default the run's)")
    p.add_argument("--batch-size", type=int, help="default the run's")
    p.add_argument("--workers", type=int, help="default the run's")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default the run's")
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:N (default the run's); the condensed run keeps it when resumed",
    )
    p.add_argument(
        "--backend",
        choices=["auto", *BACKENDS],
        help="prompt-attention backend to condense and fine-tune with (the same results; auto: "
        "the automatic choice); default the run's. The condensed run records it",
    )
    p.add_argument("--out", help="the new run folder (default RUN-pc<keep>-<score>); new or empty")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds something: move it aside to OUT.old-DATE-TIME first (nothing deleted)",
    )
    p.add_argument("--stop-after", type=int, metavar="EPOCHS")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")


def check_condense_args(args: argparse.Namespace) -> str | None:
    from fastprompt.cli.train_checks import check_run_backend, check_run_device
    from fastprompt.train import owner
    from fastprompt.train.condense import default_out, not_condensable
    from fastprompt.train.distributed import env_rank
    from fastprompt.train.folder import checkpoint_dir, no_checkpoint
    from fastprompt.train.run import RunError, read_run

    try:
        config, _ = read_run(args.run)
    except RunError as e:
        return str(e)
    problem = check_run_device(
        args.run, config.device, args.device, "condense it with --device (e.g. --device cpu)"
    ) or check_run_backend(
        args.run,
        config,
        args.device,
        "condense it with --backend auto (or another backend)",
        args.backend,
    )
    if problem:
        return problem
    reason = not_condensable(config)
    if reason is not None:
        return f"{args.run} {reason}"
    if isinstance(args.keep, float) and not 0.0 <= args.keep <= 1.0:
        return f"--keep ratio must be in [0, 1], got {args.keep}"
    if isinstance(args.keep, int) and args.keep < 0:
        return f"--keep count must be >= 0, got {args.keep}"
    for name in ("finetune_epochs", "batch_size", "stop_after"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.workers is not None and args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    for name in ("lr", "weight_decay", "momentum"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {value}"
    # As a resume would find it: where an interrupted save left it, too.
    if checkpoint_dir(args.run, args.checkpoint) is None:
        return no_checkpoint(args.run, args.checkpoint)
    out = args.out or default_out(args.run, args.keep, args.score)
    if env_rank() == 0:
        try:
            owner.check_out(out, args.overwrite, "--out", [args.run])
        except owner.OwnerError as e:
            return str(e).replace("--resume", "fastprompt train --resume")
    return None


def run_condense(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastprompt.cli.train_checks import backend_option
    from fastprompt.train.condense import condense_run
    from fastprompt.train.data import DataError
    from fastprompt.train.distributed import setup, teardown
    from fastprompt.train.run import RunError, read_run

    config, _ = read_run(args.run)
    env = setup(args.device or config.device)
    try:
        condense_run(
            args.run,
            keep=args.keep,
            score=args.score,
            scope=args.scope,
            checkpoint=args.checkpoint,
            out=args.out,
            epochs=args.finetune_epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
            env=env,
            progress=not args.no_progress,
            quiet=args.quiet,
            stop_after=args.stop_after,
            extra={"command": {"argv": sys.argv}},
            overwrite=args.overwrite,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            device=args.device,
            run_options=backend_option(args.backend),
        )
    except (DataError, RunError, ValueError) as e:
        teardown(env)
        parser.error(f"condense: {e}")
    teardown(env)
    return 0
