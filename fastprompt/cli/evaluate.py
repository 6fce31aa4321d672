"""``fastprompt evaluate RUN``: top-1 and loss of a run's checkpoint on its or other data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fastprompt.backends import NAMES as BACKENDS
from fastprompt.train.multi import spec_paths

__all__ = ["add_evaluate_parser", "check_evaluate_args", "run_evaluate"]


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="top-1 and loss of a run's checkpoint",
        description="Evaluate a run folder's checkpoint on its validation data or on --data "
        "(the test/ part of a split folder, else its val/; the test part of digits). Appends the "
        "result to RUN/evaluations.jsonl.",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--data",
        help="default: the run's validation data (a run over several datasets: NAME=PATH for "
        "one of them, per-dataset top-1 with its own); images the run trained on are refused",
    )
    p.add_argument(
        "--checkpoint",
        choices=["best", "last", "init"],
        default="best",
        help="best (default): the epoch with the highest top-1 on the run's --val data, so "
        "selected on that data (never report it as a test result when --val was the test "
        "split); last: the last epoch, what the official VPT/E2VPT protocol reports; init: "
        "before training",
    )
    p.add_argument("--batch-size", type=int, help="default the run's")
    p.add_argument("--workers", type=int, help="default the run's")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default the run's")
    p.add_argument("--device", help="default the run's")
    p.add_argument(
        "--backend",
        choices=["auto", *BACKENDS],
        help="prompt-attention backend to run the checkpoint with (the same results; auto: "
        "the automatic choice); default the run's",
    )
    p.add_argument("--no-progress", action="store_true")


def check_evaluate_args(args: argparse.Namespace) -> str | None:
    from fastprompt.cli.train_checks import check_backend, check_run_backend, check_run_device
    from fastprompt.train.folder import checkpoint_dir, no_checkpoint
    from fastprompt.train.run import RunError, read_run

    try:
        config, _ = read_run(args.run)
    except RunError as e:
        return str(e)
    problem = check_run_device(
        args.run, config.device, args.device, "evaluate it with --device cpu"
    )
    if problem:
        return problem
    # As a resume would find it: where an interrupted save left it, too.
    folder = checkpoint_dir(args.run, args.checkpoint)
    if args.backend is None:
        way = "evaluate it with --backend auto (or another backend)"
        problem = check_run_backend(args.run, config, args.device, way)
    elif args.backend != "auto":
        problem = _check_backend_fits(args, config, folder) or check_backend(
            args.backend, args.device or config.device
        )
    if problem:
        return problem
    if folder is None:
        return no_checkpoint(args.run, args.checkpoint)
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.workers is not None and args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    for spec in spec_paths(args.data):  # NAME=PATH names one dataset of a mixture run
        if not (spec == "digits" or spec.startswith("digits:")) and not os.path.exists(spec):
            return f"--data {spec} does not exist"
    return None


def _run_impl(config, folder: str | None) -> str | None:
    """How the run's checkpoint runs (``fused`` or ``naive``): as the run was built, else as it
    was saved; None where its description cannot be read (loading it says why)."""
    from fastprompt.checkpoint import CheckpointError, checkpoint_info

    impl = config.method_args.get("impl")
    if impl is not None or folder is None:
        return impl
    try:
        return checkpoint_info(folder).get("impl", "fused")
    except (CheckpointError, OSError):
        return None


def _check_backend_fits(args: argparse.Namespace, config, folder: str | None) -> str | None:
    """Why ``--backend`` cannot run the blocks of the run's model (a Swin's relative-position bias
    on a backend that adds none), or None; the model is built on the meta device: nothing is
    allocated, no weights are read."""
    import timm
    import torch

    from fastprompt import backends
    from fastprompt.backbones import adapter_for

    if _run_impl(config, folder) != "fused":
        return None  # the naive computation runs the model's own attention
    try:
        with torch.device("meta"):
            model = timm.create_model(
                config.model.name, pretrained=False, num_classes=2, **dict(config.model.args)
            )
        adapter = adapter_for(model, "evaluate")
    except Exception:
        return None  # building it for real says what is wrong
    entry = backends.get(args.backend)
    lacking = sorted(adapter.op_features - entry.features)
    if not lacking:
        return None
    able = [n for n in BACKENDS if not adapter.op_features - backends.get(n).features]
    return (
        f"--backend {args.backend} cannot run {args.run}'s model, a {adapter.description}: "
        + "; ".join(f"no {f} ({entry.lacks[f]})" for f in lacking)
        + f"; evaluate it with --backend auto or {' or '.join(able)}"
    )


def _backend_note(args: argparse.Namespace, model) -> str | None:
    """The note that ``--backend`` has no effect on the model: its naive computation runs the
    model's own attention, and its prompts bring no keys/values of their own (which the
    backend would join)."""
    from fastprompt.sources import PromptSource

    source = getattr(model, "source", None)
    if args.backend is None or getattr(model, "impl", None) != "naive" or source is None:
        return None
    if type(source).kv is not PromptSource.kv:
        return None
    return (
        f"note: {args.run} runs with --impl naive, as it was trained, which uses no "
        f"prompt-attention backend: --backend {args.backend} has no effect"
    )


def run_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastprompt.cli.train_checks import backend_option
    from fastprompt.train import data as D
    from fastprompt.train import multi as M
    from fastprompt.train.distributed import setup, teardown
    from fastprompt.train.folder import check_one_save
    from fastprompt.train.heldout import check_held_out
    from fastprompt.train.loop import LabelError, evaluate_model
    from fastprompt.train.run import RunError, load_run_model, read_run, transforms_for
    from fastprompt.train.splits import run_data

    config, saved = read_run(args.run)
    env = setup(args.device or config.device)
    try:
        options = backend_option(args.backend)
        model = load_run_model(args.run, args.checkpoint, env.device, config, saved, options)
        check_one_save(env, model, args.run, args.checkpoint)
        note = _backend_note(args, model)
        if note and env.main:
            print(note, file=sys.stderr)
        if args.data is None:
            dataset = run_data(args.run, config, saved).val
            name = "validation"
            notes = (
                [
                    "note: best/ was chosen on these validation images (the epoch with the highest "
                    "top-1 on them): this is not a held-out test result"
                ]
                if args.checkpoint == "best"
                else []
            )
        else:
            # Read through the run's class map: digits:6-9 on a digits:5-9 run is labelled
            # as the run's classes 6-9, digits:0-4 is refused.
            opened = (
                M.open_member(args.data, "test", exclude=[args.run])
                if M.is_mixture(config.data.train)
                else D.open_dataset(args.data, "test", exclude=[args.run])
            )
            try:
                dataset = D.map_classes(opened, saved["classes"], f"--data {args.data}")
            except D.DataError as e:
                if not M.is_mixture(config.data.train):
                    raise
                named = ", ".join(f"{n}={s}" for n, s in M.parse_specs(config.data.train))
                raise D.DataError(
                    f"{e}; a dataset of this run is read by the name it trained under, "
                    f"--data NAME=PATH (the run's: {named})"
                ) from None
            # Before any image is read: training images are no test (an old digits:5-9 run's
            # split is not today's; the training folder passed by mistake).
            notes = check_held_out(
                args.run, config, saved, opened, f"--data {args.data}", args.checkpoint
            )
            # A split folder is evaluated on its test/ part (else val/, validation/): say which.
            split = isinstance(opened, D.ImageFolderData) and os.path.normpath(
                opened.root
            ) != os.path.normpath(args.data)
            name = opened.root if split else args.data
        _, test_tf, _ = transforms_for(model.model, config.recipe)
        batch = args.batch_size or config.recipe.batch_size
        workers = config.data.workers if args.workers is None else args.workers
        spec = D.LoaderSpec(
            max(1, batch // env.world),
            workers,
            rank=env.rank,
            world=env.world,
            pin_memory=env.device.type == "cuda",
        )
        loader = D.make_loader(D.Transformed(dataset, test_tf), spec)
        mixture = M.is_mixture(config.data.train)
        names, domains = M.class_domains(saved["classes"]) if mixture else ([], None)
        result = evaluate_model(
            model,
            loader,
            device=env.device,
            precision=args.precision or config.precision,
            env=env,
            progress=not args.no_progress,
            domains=domains,
        )
    except (D.DataError, RunError, LabelError) as e:
        teardown(env)
        parser.error(f"evaluate: {e}")
    if env.main:
        for note in notes:
            print(note, file=sys.stderr)
        record = {
            "checkpoint": args.checkpoint,
            "data": name,
            "top1": result["acc"],
            "loss": result["loss"],
            "samples": result["samples"],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if domains is not None:
            record["datasets"] = M.per_dataset(result["domain_sums"], names)
        _record(args.run, record)
        print(
            f"{args.run} ({args.checkpoint}) on {name}: top-1 {100 * result['acc']:.2f}%  "
            f"loss {result['loss']:.4f}  ({result['samples']} images)"
        )
        if domains is not None:
            print(f"  top-1 per dataset: {M.describe(record['datasets'])}")
    teardown(env)
    return 0


def _record(run: str, record: dict) -> None:
    """Append ``record`` to ``run/evaluations.jsonl`` under the run's shared lock: a `train
    --resume` or `--overwrite` of the run (which lock it whole) cannot start or move the folder
    aside mid-append, and while a `train` of the run runs (the run still training too) the result
    is printed but not recorded."""
    from fastprompt.train import owner

    path = os.path.join(run, "evaluations.jsonl")
    try:
        with owner.reading(run, "evaluate RUN"), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except owner.OwnerError as e:
        print(f"note: not recorded in {path} ({e})", file=sys.stderr)
    except OSError as e:  # a read-only copy of a run still evaluates
        print(f"note: not recorded in {path} ({e.strerror})", file=sys.stderr)
