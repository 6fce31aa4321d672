"""Who may write into a run folder: ownership marker, process lock, moving old content aside.

A run writes only into a folder it owns: one it created, or one that was empty when the run
claimed it. Claiming writes the marker file :data:`MARKER` (JSON: format, when, by what command),
so a later run, ``--resume`` and the dataset scanner can tell a run folder from a user's folder.
A folder written by fastprompt before markers existed (a ``run.json`` of format
``fastprompt.run/1``, no marker) is a run folder too, and is marked when it is resumed.

Anything else is refused with the path and what to do: ``--resume`` for a run, another ``--out``,
or ``--overwrite``, which renames the old folder to ``<out>.old-<date>-<time>`` beside it (never
deletes it) and starts a new one.

While a process trains, condenses into or prepares a run folder it holds an exclusive lock on
:data:`LOCK` inside it (``flock``, released by the kernel when the process ends, however it ends;
the file holds the holder's pid and host for the error message). A second process on the same
folder is refused instead of interleaving its checkpoints with the first one's.

What interrupted saves leave in a run folder is settled by :mod:`fastprompt.train.leftovers`
once the lock is held.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator

__all__ = [
    "LOCK",
    "MARKER",
    "OwnerError",
    "check_out",
    "claim",
    "enclosing_run",
    "hold",
    "is_run_folder",
    "reading",
    "release",
]

MARKER = ".fastprompt-run"
LOCK = ".fastprompt-lock"
RUN_FILE = "run.json"
MARKER_FORMAT = "fastprompt.run-folder/1"


class OwnerError(ValueError):
    """A folder a run may not write into, or one another process is using."""


def is_run_folder(path: str) -> bool:
    """Whether ``path`` is a fastprompt run folder (marked, or an older run with ``run.json``)."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return True
    return _legacy_run(path)


def _legacy_run(path: str) -> bool:
    file = os.path.join(path, RUN_FILE)
    if not os.path.isfile(file) or not os.path.isdir(os.path.join(path, "init")):
        return False
    try:
        with open(file) as f:
            return str(json.load(f).get("format", "")).startswith("fastprompt.run/")
    except (OSError, ValueError, AttributeError):
        return False


def _listing(path: str, limit: int = 4) -> str:
    names = sorted(os.listdir(path))
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_out(
    path: str, overwrite: bool = False, flag: str = "--out", keep: Iterable[str | None] = ()
) -> None:
    """Refuse ``path`` as a new run folder unless the run may write there (nothing is written).

    Allowed: a missing folder, an empty one, one fastprompt marked but never finished preparing
    (no ``run.json``), and with ``overwrite`` any folder (its content is moved aside by
    :func:`claim`) that holds none of the paths in ``keep`` (the run's data and weights); never
    one inside another run folder (``condense --out`` inside its source run).

    Raises
    ------
    OwnerError
        With the path and what to do.
    """
    outer = enclosing_run(path)
    if outer is not None:
        raise OwnerError(
            f"{flag} {path} is inside the run folder {outer}; a run folder holds its own run only "
            f"(its --overwrite would move this one along, its saves would carry it): choose an "
            f"{flag} outside it"
        )
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OwnerError(f"{flag} {path} exists and is not a folder; choose another {flag}")
    if overwrite:
        _check_movable(path, flag, keep)
        return
    # A lock file alone is what a claim that died before marking leaves: ours.
    entries = [e for e in os.listdir(path) if e not in (LOCK, MARKER + ".tmp")]
    if not entries:
        return
    if is_run_folder(path):
        if os.path.exists(os.path.join(path, RUN_FILE)):
            raise OwnerError(
                f"{flag} {path} already holds a run; continue it with --resume {path}, choose "
                f"another {flag}, or pass --overwrite to move it aside (to {path}.old-...)"
            )
        return  # marked by a run that stopped before writing run.json: ours to reuse
    raise OwnerError(
        f"{flag} {path} is not empty and is not a fastprompt run folder (it holds "
        f"{_listing(path)}); a run writes only into a new or empty folder: choose another {flag}, "
        f"or pass --overwrite to move its content aside (to {path}.old-...), nothing is deleted"
    )


def enclosing_run(path: str) -> str | None:
    """The run folder that ``path`` lies inside (nearest first), or None."""
    here = os.path.realpath(path)
    parent = os.path.dirname(here)
    while parent != here:
        if is_run_folder(parent):
            return parent
        here, parent = parent, os.path.dirname(parent)
    return None


def _check_movable(path: str, flag: str, keep: Iterable[str | None]) -> None:
    real = os.path.realpath(path)
    resolved: dict[str, str] = {}
    given = [(p, p) for p in keep if p and os.path.lexists(p)]
    for what, inside in [("the current folder", os.getcwd()), *given]:
        if _leads_through(inside, real, resolved):
            full = os.path.realpath(inside)
            where = "is" if full == real else "holds"
            if full != real and not full.startswith(real.rstrip(os.sep) + os.sep):
                where = "holds a link on the way to"
            raise OwnerError(
                f"{flag} {path} {where} {what}; --overwrite would move it aside with the rest: "
                f"choose another {flag}"
            )
    holder = _holder_if_locked(path)
    if holder is not None:
        raise OwnerError(
            f"{flag} {path} is in use by another fastprompt process ({holder}, or a condense "
            "reading it); --overwrite does not move a folder a run is writing or reading"
        )


def _leads_through(target: str, real: str, resolved: dict[str, str]) -> bool:
    """Whether any step of the path ``target``, as written, resolves to the real folder ``real``
    or below it, so moving it moves what ``target`` names or a link on the way (``run/data ->
    /data/imgs`` reached as ``run/data``; ``imgs -> run/imgs``). ``resolved``: a cache."""
    # Not normalised: ``link/..`` is resolved after the link, as the system resolves it.
    steps = os.path.join(os.getcwd(), target).split(os.sep)
    for i in range(1, len(steps) + 1):
        prefix = os.sep.join(steps[:i]) or os.sep
        if prefix not in resolved:
            parent = os.sep.join(steps[: i - 1]) or os.sep
            if i > 1 and steps[i - 1] not in ("", ".", "..") and not os.path.islink(prefix):
                # One lstat per step, not a realpath of the whole path (a list's images).
                resolved[prefix] = os.path.join(resolved[parent], steps[i - 1])
            else:
                resolved[prefix] = os.path.realpath(prefix)
        full = resolved[prefix]
        if full == real or full.startswith(real.rstrip(os.sep) + os.sep):
            return True
    return False


def _aside_name(path: str) -> str:
    base = os.path.normpath(path) + ".old-" + time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while os.path.lexists(name):
        n += 1
        name = f"{base}-{n}"
    return name


def claim(
    path: str, overwrite: bool = False, flag: str = "--out", keep: Iterable[str | None] = ()
) -> str | None:
    """Make ``path`` this process's run folder: create or adopt it, mark it, lock it.

    With ``overwrite`` a non-empty folder is first renamed to ``<path>.old-<date>-<time>``.
    The lock is held until :func:`release` (or the process ends).

    Returns
    -------
    str or None
        Where the old content went, when it was moved aside.

    Raises
    ------
    OwnerError
        As :func:`check_out`, or when another process holds the folder.
    """
    check_out(path, overwrite, flag, keep)
    moved = None
    try:
        if overwrite and os.path.isdir(path) and os.listdir(path):
            moved = _aside_name(path)
            os.rename(path, moved)
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OwnerError(f"{flag} {path} cannot be created or moved aside ({e})") from None
    hold_lock(path, flag)
    try:
        # Another process may have written there between the check and the lock.
        others = [e for e in os.listdir(path) if e != LOCK]
        if os.path.exists(os.path.join(path, RUN_FILE)) or (others and not is_run_folder(path)):
            check_out(path, False, flag)
        mark(path)
    except BaseException:
        release(path)
        raise
    return moved


def mark(path: str) -> None:
    """Write the ownership marker (idempotent)."""
    file = os.path.join(path, MARKER)
    if os.path.isfile(file):
        return
    record = {
        "format": MARKER_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "by": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        "note": "this folder is a fastprompt run; fastprompt writes here and nowhere else",
    }
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, file)


# -- the lock ------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # realpath -> [fd, count]: reentrant within a process


def _lock_fd(fd: int, shared: bool = False) -> bool:
    """Take an exclusive (``shared``: a shared) non-blocking lock on ``fd``; False when another
    process holds it (a shared lock: exclusively)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no shared locks, readers exclude too
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _read_holder(file: str) -> str:
    try:
        with open(file) as f:
            info = json.load(f)
        return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "unknown pid"


def _holder_if_locked(path: str) -> str | None:
    file = os.path.join(path, LOCK)
    if not os.path.isfile(file) or os.path.realpath(path) in _HELD:
        return None
    fd = os.open(file, os.O_RDONLY)
    try:
        if _lock_fd(fd):
            return None
        return _read_holder(file)
    finally:
        os.close(fd)  # closing the descriptor releases a lock taken through it


def hold_lock(path: str, flag: str = "run folder") -> None:
    """Lock the run folder ``path`` for this process (reentrant); see the module docstring.

    Raises
    ------
    OwnerError
        When another process holds it.
    """
    real = os.path.realpath(path)
    if real in _HELD:
        _HELD[real][1] += 1
        return
    file = os.path.join(path, LOCK)
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OwnerError(
            f"{flag} {path} cannot be locked for writing ({e.strerror}); a run writes into its "
            "folder, so it must be writable"
        ) from None
    if not _lock_fd(fd):
        os.close(fd)
        raise OwnerError(
            f"{flag} {path} is in use by another fastprompt process ({_read_holder(file)}, or "
            "a condense reading it); wait for it to finish, or choose another folder"
        )
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    _HELD[real] = [fd, 1]


@contextlib.contextmanager
def reading(path: str, flag: str = "run folder") -> Iterator[None]:
    """``with reading(run):`` a shared lock on the run folder ``path`` while the block reads it.

    Readers share it (two condenses of one run); a writer (``train --resume``, ``--overwrite``)
    is refused while it is held, and the block while a writer holds the folder, so nothing it
    reads changes or moves under it. A process holding the folder's lock takes nothing more.

    Raises
    ------
    OwnerError
        When another process writes the folder.
    """
    if os.path.realpath(path) in _HELD:
        yield
        return
    file = os.path.join(path, LOCK)
    try:
        # A run older than the lock has no lock file: made, so a writer meets this reader.
        fd = os.open(file, os.O_RDONLY if os.path.isfile(file) else os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OwnerError(
            f"{flag} {path} cannot be locked for reading ({e.strerror}: {file}); a writer of "
            "the folder could change what is read"
        ) from None
    try:
        if not _lock_fd(fd, shared=True):
            raise OwnerError(
                f"{flag} {path} is in use by another fastprompt process ({_read_holder(file)}), "
                "which may change or move aside what would be read: wait for it to finish"
            )
        yield
    finally:
        os.close(fd)  # releases the lock


def release(path: str) -> None:
    """Drop one hold of the lock on ``path`` (the last one unlocks it)."""
    real = os.path.realpath(path)
    held = _HELD.get(real)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[real]
        os.close(held[0])


@contextlib.contextmanager
def hold(path: str, flag: str = "run folder") -> Iterator[None]:
    """``with hold(run):`` the lock of an existing run folder, for the block (reentrant)."""
    hold_lock(path, flag)
    try:
        yield
    finally:
        release(path)
