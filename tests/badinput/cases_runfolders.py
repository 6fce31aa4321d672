"""Run folders: a run writes only where it owns, one process at a time (issue 23, data lost)."""

from __future__ import annotations

import json
import os
import signal
import time

from fixtures import TRAIN
from harness import Case, Workspace

DATA = ["--data", "{fx}/data.csv", "--val", "{fx}/data.csv", "--prompts", "2"]
USER_FILES = {
    "best/draft.tex": "\\section{mine}\n",
    "last/important.csv": "a,b\n1,2\n",
    "init/setup.sh": "echo mine\n",
    "curves.png": "not a plot\n",
}


def _user_folder(ws: Workspace, extra: dict[str, str] | None = None) -> None:
    for rel, text in {**USER_FILES, **(extra or {})}.items():
        path = ws.path("mine", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _moved_intact(ws: Workspace, _) -> None:
    aside = [e for e in os.listdir(ws.case) if e.startswith("mine.old-")]
    assert len(aside) == 1, os.listdir(ws.case)
    for rel, text in USER_FILES.items():
        with open(os.path.join(ws.case, aside[0], rel)) as f:
            assert f.read() == text, rel
    assert os.path.isfile(ws.path("mine", "run.json"))
    assert not os.path.exists(ws.path("mine", "best", "draft.tex"))


def _two_processes(ws: Workspace) -> dict[str, str]:
    """Process A trains; B resumes the same folder and C starts a run there: both refused."""
    import contextlib
    import io

    from fastprompt.cli import main

    run = ws.path("run")
    argv = [*TRAIN, *map(ws.format, DATA), "--epochs", "400", "--out", run]
    pid = os.fork()
    if pid == 0:  # process A
        code = 1
        try:
            code = main(argv)
        finally:
            os._exit(code or 0)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(run, "last")) and time.monotonic() < deadline:
            time.sleep(0.05)
        said = {}
        for who, args in (("resume", ["train", "--resume", run]), ("new", argv)):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
                main(args)
            said[who] = err.getvalue().strip().splitlines()[-1]
        said["a_alive"] = str(os.waitpid(pid, os.WNOHANG) == (0, 0))
        return said
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _refused_both(ws: Workspace, said: dict[str, str]) -> None:
    run = ws.path("run")
    assert said["a_alive"] == "True", "process A ended before B and C tried"
    assert f"{run} is in use by another fastprompt process (pid" in said["resume"], said
    assert f"--out {run} already holds a run" in said["new"] or "in use" in said["new"], said


def _train_stopped(ws: Workspace, name: str = "run", epochs: str = "3") -> str:
    from fastprompt.cli import main

    out = ws.path(name)
    data = [ws.format(a) for a in DATA]
    assert main([*TRAIN, *data, "--epochs", epochs, "--stop-after", "1", "--out", out]) == 0
    return out


def _stale_saves(ws: Workspace) -> None:
    run = _train_stopped(ws)
    os.makedirs(os.path.join(run, ".last-abcd1234"))
    with open(os.path.join(run, ".last-abcd1234", "prompts.safetensors"), "w") as f:
        f.write("half a save")
    os.makedirs(os.path.join(run, ".best-x_y12345"))
    with open(os.path.join(run, "last", ".tmp-zz99zz99"), "w") as f:
        f.write("half a tensor file")


def _stale_gone(ws: Workspace, _) -> None:
    run = ws.path("run")
    left = [e for e in os.listdir(run) if e.startswith((".last-", ".best-", ".init-"))]
    assert not left, left
    assert not [e for e in os.listdir(os.path.join(run, "last")) if e.startswith(".tmp-")]
    assert len(open(os.path.join(run, "metrics.jsonl")).read().splitlines()) == 3


def _notes_in_checkpoints(ws: Workspace) -> None:
    run = _train_stopped(ws)
    for folder in ("best", "last"):
        with open(os.path.join(run, folder, "notes.txt"), "w") as f:
            f.write(f"my notes on {folder}\n")


def _notes_kept(ws: Workspace, _) -> None:
    for folder in ("best", "last"):
        with open(ws.path("run", folder, "notes.txt")) as f:
            assert f.read() == f"my notes on {folder}\n"
    state = ws.path("run", "last", "trainer.pt")
    assert json.load(open(ws.path("run", "best", "best.json")))["epoch"] >= 0
    assert os.path.isfile(state) and os.path.isfile(state + ".sha256")


def _killed_and_resumed(ws: Workspace) -> list[str]:
    """A run SIGKILLed at three points after its first save, then resumed: each must end
    bit-identical to the run that was never interrupted (and leave no temporary folder)."""
    import torch
    from safetensors.torch import load_file

    from fastprompt.cli import main

    data = [ws.format(a) for a in DATA]
    args = [*TRAIN, *data, "--epochs", "4", "--warmup-epochs", "1", "--prompt-dropout", "0.2"]
    assert main([*args, "--out", ws.path("whole")]) == 0
    want = load_file(ws.path("whole", "last", "prompts.safetensors"))
    keys = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "best_epoch")
    rows = lambda run: [
        {k: json.loads(line)[k] for k in keys}
        for line in open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    ]
    report = []
    for i, delay in enumerate((0.0, 0.1, 0.35)):
        run = ws.path(f"killed{i}")
        pid = os.fork()
        if pid == 0:
            os._exit(main([*args, "--out", run]) or 0)
        while not os.path.isdir(os.path.join(run, "last")) and os.waitpid(pid, os.WNOHANG) == (
            0,
            0,
        ):
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        epochs = len(open(os.path.join(run, "metrics.jsonl")).read().splitlines())
        assert main(["train", "--resume", run, "--no-progress", "--quiet"]) == 0
        got = load_file(os.path.join(run, "last", "prompts.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), run
        assert rows(run) == rows(ws.path("whole")), run
        assert not [e for e in os.listdir(run) if e.startswith((".last-", ".best-"))], run
        report.append(f"killed after {epochs} epoch(s): bit-identical")
    return report


CASES = [
    Case(
        "out-user-folder-with-checkpoint-names",
        argv=[*TRAIN, *DATA, "--epochs", "1", "--out", "{case}/mine"],
        setup=_user_folder,
        error=r"is not empty and is not a fastprompt run folder .*--overwrite",
        names=["--out {case}/mine"],
    ),
    Case(
        "out-user-folder-with-metrics",
        argv=[*TRAIN, *DATA, "--epochs", "1", "--out", "{case}/mine"],
        setup=lambda ws: _user_folder(ws, {"metrics.jsonl": '{"loss": 1}\n'}),
        error=r"is not empty and is not a fastprompt run folder",
        names=["{case}/mine"],
    ),
    Case(
        "out-overwrite-moves-aside",
        argv=[*TRAIN, *DATA, "--epochs", "1", "--overwrite", "--out", "{case}/mine"],
        setup=_user_folder,
        writes=["mine", "mine/*", "mine/*/*", "mine.old-*", "mine.old-*/*", "mine.old-*/*/*"],
        check=_moved_intact,
    ),
    Case(
        "overwrite-would-move-the-data",
        argv=[
            *TRAIN,
            "--data",
            "{case}/mine/data.csv",
            "--val-split",
            "0.5",
            "--prompts",
            "2",
            "--overwrite",
            "--out",
            "{case}/mine",
        ],
        setup=lambda ws: (os.makedirs(ws.path("mine")), ws.copy("data.csv", "mine/data.csv")),
        error=r"holds .*data.csv; --overwrite would move it aside with the rest",
        names=["--out {case}/mine"],
    ),
    Case(
        "out-holds-a-run",
        argv=[*TRAIN, *DATA, "--epochs", "1", "--out", "{fx}/vpt"],
        error=r"already holds a run; continue it with --resume",
        names=["{fx}/vpt"],
    ),
    Case(
        "out-is-a-file",
        argv=[*TRAIN, *DATA, "--epochs", "1", "--out", "{fx}/data.csv"],
        error=r"exists and is not a folder",
        names=["{fx}/data.csv"],
    ),
    Case(
        "out-empty-folder-is-fine",
        argv=[*TRAIN, *DATA, "--epochs", "1", "--out", "{case}/empty"],
        setup=lambda ws: os.makedirs(ws.path("empty")),
        writes=["empty", "empty/*", "empty/*/*"],
    ),
    Case(
        "condense-out-is-the-run",
        argv=[
            "condense",
            "{case}/vpt",
            "--keep",
            "0.5",
            "--quiet",
            "--no-progress",
            "--overwrite",
            "--out",
            "{case}/vpt",
        ],
        setup=lambda ws: ws.copy("vpt"),
        error=r"--out .*vpt is .*vpt; --overwrite would move it aside with the rest",
        names=["--out {case}/vpt"],
    ),
    Case(
        "condense-out-user-folder",
        argv=[
            "condense",
            "{fx}/vpt",
            "--keep",
            "0.5",
            "--finetune-epochs",
            "1",
            "--quiet",
            "--no-progress",
            "--out",
            "{case}/mine",
        ],
        setup=_user_folder,
        error=r"is not empty and is not a fastprompt run folder",
        names=["{case}/mine"],
    ),
    Case(
        "two-processes-one-folder",
        call=_two_processes,
        writes=["run", "run/*", "run/*/*"],
        check=_refused_both,
    ),
    Case(
        "killed-anywhere-resumes-bit-identical",
        call=_killed_and_resumed,
        writes=["whole", "whole/*", "whole/*/*", "killed?", "killed?/*", "killed?/*/*"],
    ),
    Case(
        "resume-cleans-interrupted-saves",
        argv=["train", "--resume", "{case}/run", "--no-progress", "--quiet"],
        setup=_stale_saves,
        writes=["run/*", "run/*/*"],
        check=_stale_gone,
    ),
    Case(
        "checkpoints-keep-user-files",
        argv=["train", "--resume", "{case}/run", "--no-progress", "--quiet"],
        setup=_notes_in_checkpoints,
        writes=["run/*", "run/*/*"],
        check=_notes_kept,
    ),
]
