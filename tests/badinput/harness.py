"""The bad-input harness: each case runs in its own process, and is judged on three things.

1. **A clear error**: a CLI case must end with ``parser.error``'s one line (exit 2, no
   traceback) matching ``error``, an API case must raise ``exc`` with a message matching
   ``error``; the strings in ``names`` (a file, an argument) must appear in it. A case with
   ``error=None`` must succeed. A crash (a signal, a hang, an unexpected exception) fails.
2. **Nothing written outside what the run owns**: every file of the case's folder and of the
   shared fixtures is hashed before the action and after; a change must match one of the
   case's ``writes`` patterns (``fnmatch`` on paths relative to the case folder).
3. **Nothing silently wrong**: ``check(ws, outcome)`` runs after the action, in the case's
   process, and raises ``AssertionError`` when a result is wrong.

Cases are tables (``cases_*.py`` beside this file, each a ``CASES`` list); a new feature adds
rows there. :func:`run_cases` forks one process per case from a parent that has imported
fastprompt once (a fresh interpreter costs seconds of imports per case), two at a time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_TIMEOUT_S = 180


@dataclass
class Workspace:
    """Where a case runs. ``fx``: the shared fixtures (read-only by contract); ``case``: the
    case's own empty folder."""

    fx: str
    case: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.case, *parts)

    def copy(self, name: str, to: str | None = None) -> str:
        """A copy of the fixture ``name`` (a file or folder) in the case folder."""
        src, dst = os.path.join(self.fx, name), self.path(to or os.path.basename(name))
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    def format(self, text: str) -> str:
        return text.format(fx=self.fx, case=self.case)


@dataclass
class Case:
    """One bad input and what must happen.

    Attributes
    ----------
    name : str
        Unique; the pytest id.
    argv : list of str, optional
        ``fastprompt`` arguments (``{fx}`` and ``{case}`` are filled in).
    call : callable, optional
        ``call(ws)`` for an API case (instead of ``argv``); its return value is the outcome.
    setup : callable, optional
        ``setup(ws)`` prepares the case folder (its writes are not judged).
    error : str or None
        A regular expression the error must match (``re.search``); None: must succeed.
    exc : str
        API cases: the exception class (or a base class) expected.
    names : list of str
        Strings (formatted) that must appear in the error: the file or argument at fault.
    writes : list of str
        Patterns of paths (relative to the case folder) the action may change.
    check : callable, optional
        ``check(ws, outcome)``: more assertions (the outcome is the return value, or the exit
        code of a CLI case).
    """

    name: str
    argv: Sequence[str] | None = None
    call: Callable[[Workspace], Any] | None = None
    setup: Callable[[Workspace], Any] | None = None
    error: str | None = None
    exc: str = "Exception"
    names: Sequence[str] = ()
    writes: Sequence[str] = ()
    check: Callable[[Workspace, Any], Any] | None = None
    issue: str = ""


@dataclass
class Outcome:
    ok: bool
    why: str = ""
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def equals(want: Any) -> Callable[[Workspace, Any], None]:
    """A ``check`` that the outcome is ``want``."""

    def check(ws: Workspace, got: Any) -> None:
        assert got == want, f"got {got!r}, expected {want!r}"

    return check


def load_cases() -> list[Case]:
    """Every ``CASES`` row of the ``cases_*.py`` modules beside this file."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    cases: list[Case] = []
    for file in sorted(os.listdir(HERE)):
        if file.startswith("cases_") and file.endswith(".py"):
            cases += importlib.import_module(file[:-3]).CASES
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"bad-input cases with the same name: {dup}")
    return cases


# -- judging -------------------------------------------------------------------------------------


def snapshot(*roots: str) -> dict[str, str]:
    """``{path: sha256 of its bytes or 'dir'}`` of everything under ``roots``."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in files:
                full = os.path.join(dirpath, f)
                if os.path.islink(full):
                    out[full] = "link:" + os.readlink(full)
                    continue
                h = hashlib.sha256()
                with open(full, "rb") as fh:
                    h.update(fh.read())
                out[full] = h.hexdigest()
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k))


def _allowed(path: str, ws: Workspace, writes: Sequence[str], before: dict[str, str]) -> bool:
    # A run folder's lock file records who holds it: any process that asks for the lock of a
    # run folder (marked before the action) writes there, even when it is then refused.
    folder, name = os.path.split(path)
    if name == ".fastprompt-lock" and os.path.join(folder, ".fastprompt-run") in before:
        return True
    if not path.startswith(ws.case + os.sep):
        return False
    rel = os.path.relpath(path, ws.case)
    return any(fnmatch.fnmatch(rel, ws.format(p)) for p in writes)


def _run_action(case: Case, ws: Workspace) -> tuple[Any, str | None, str | None]:
    """(outcome, error text, exception class names) of the action."""
    if case.argv is not None:
        from fastprompt.cli import main

        argv = [ws.format(a) for a in case.argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except Exception:
                return None, traceback.format_exc(), "traceback"
        text = err.getvalue()
        if "Traceback" in text:
            return code, text, "traceback"
        if code in (0, None):
            return 0, None, None
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return code, lines[-1] if lines else f"exit {code}", "SystemExit"
    assert case.call is not None
    try:
        return case.call(ws), None, None
    except Exception as e:
        kinds = " ".join(k.__name__ for k in type(e).__mro__)
        return None, f"{type(e).__name__}: {e}", kinds


def judge(case: Case, ws: Workspace) -> Outcome:
    """Run one case in this process and judge it (the caller has forked)."""
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws.fx, ws.case)
    outcome, error, kinds = _run_action(case, ws)
    after = snapshot(ws.fx, ws.case)
    details = {"error": error}
    if kinds == "traceback":
        return Outcome(False, "a traceback instead of a one-line error", error or "", details)
    if case.error is None:
        if error is not None:
            return Outcome(False, f"expected success, got an error: {error}", error, details)
    else:
        if error is None:
            return Outcome(False, f"expected an error matching {case.error!r}; none came", "")
        if case.argv is not None and outcome != 2:
            return Outcome(False, f"exit code {outcome}, expected 2 (parser.error)", error)
        if case.argv is not None and not error.startswith("fastprompt: error: "):
            return Outcome(False, "the last line is not parser.error's", error)
        if case.argv is None and case.exc not in (kinds or "").split():
            return Outcome(False, f"expected {case.exc}, got {kinds.split()[0]}", error)
        if not re.search(case.error, error):
            return Outcome(False, f"the error does not match {case.error!r}", error)
        missing = [ws.format(n) for n in case.names if ws.format(n) not in error]
        if missing:
            return Outcome(False, f"the error does not name {missing}", error)
    bad = [p for p in changes(before, after) if not _allowed(p, ws, case.writes, before)]
    if bad:
        shown = [os.path.relpath(p, os.path.dirname(ws.case)) for p in bad[:6]]
        return Outcome(False, f"changed what it does not own: {shown}", error or "")
    if case.check is not None:
        try:
            case.check(ws, outcome)
        except AssertionError as e:
            return Outcome(False, f"check failed: {e}", error or "")
    return Outcome(True, "", error or "", {"outcome": repr(outcome)[:500]})


# -- running, one process per case ---------------------------------------------------------------


def _child(case: Case, ws: Workspace, result: str, log: str) -> None:
    """In the forked process: stdout/stderr to ``log``, the outcome to ``result``."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        import torch

        torch.set_num_threads(1)
        os.makedirs(ws.case, exist_ok=True)
        os.chdir(ws.case)
        try:
            out = judge(case, ws)
        except BaseException:
            why = "the harness or the case's setup/check raised"
            out = Outcome(False, why, traceback.format_exc()[-2000:])
        with open(result, "w") as f:
            json.dump(out.__dict__, f)
        code = 0
    finally:
        os._exit(code)


def run_cases(
    cases: Sequence[Case], fx: str, work: str, parallel: int = 2
) -> dict[str, dict[str, Any]]:
    """Fork one process per case (``parallel`` at a time); a crash or a hang is a failure."""
    os.makedirs(work, exist_ok=True)
    pending = list(cases)
    running: dict[int, tuple[Case, float, str, str]] = {}
    results: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            case = pending.pop(0)
            ws = Workspace(fx, os.path.join(work, case.name))
            result, log = ws.case + ".result.json", ws.case + ".log"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case, ws, result, log)
            running[pid] = (case, time.monotonic(), result, log)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            for p, (_, t0, _, _) in list(running.items()):
                if time.monotonic() - t0 > CASE_TIMEOUT_S:
                    os.kill(p, signal.SIGKILL)
            continue
        case, t0, result, log = running.pop(pid)
        seconds = round(time.monotonic() - t0, 2)
        if os.path.isfile(result):
            with open(result) as f:
                out = json.load(f)
        else:
            how = (
                f"crashed with signal {signal.Signals(os.WTERMSIG(status)).name}"
                if os.WIFSIGNALED(status)
                else f"exited with status {os.WEXITSTATUS(status)} before judging"
            )
            with open(log, errors="replace") as f:
                tail = f.read()[-3000:]
            out = Outcome(False, how, "", {"log": tail}).__dict__
        out["seconds"] = seconds
        results[case.name] = out
    return results
