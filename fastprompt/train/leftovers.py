"""What interrupted saves leave in a run folder, and settling it.

A checkpoint save (:mod:`fastprompt.train.folder`) writes into a temporary folder
(``.last-XXXXXXXX``) or file (``.tmp-XXXXXXXX``) and swaps it in, moving the previous copy aside to
a hidden name of fastprompt's own (:func:`swap_dir`, marked with :data:`SWAP_MARK`). A save cut
short leaves these behind; :func:`clean_stale` removes them (and finishes an interrupted swap)
once the run's lock is held (:mod:`fastprompt.train.owner`), so they are ours and no other
process is writing them. A folder holding anything else is left.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

from fastprompt.train.owner import MARKER

__all__ = [
    "OWN_FILES",
    "SWAP_MARK",
    "clean_stale",
    "leftover_swaps",
    "only_ours",
    "ours_swap",
    "retire",
    "settle_swap",
    "swap_dir",
]

# What interrupted saves of fastprompt leave (tempfile.mkdtemp / mkstemp names).
_STALE_DIR = re.compile(r"^\.(init|last|best)-[A-Za-z0-9_]{8}$")
_STALE_FILE = re.compile(r"^\.tmp-[A-Za-z0-9_]{8}$")
_CHECKPOINTS = ("init", "last", "best")
# What fastprompt writes into a checkpoint folder; anything else there is a person's.
OWN_FILES = ("prompts.safetensors", "config.json", "trainer.pt", "trainer.pt.sha256", "best.json")
# Written into a checkpoint just before a save moves it aside: the previous copy is ours.
SWAP_MARK = ".fastprompt-swap"


def clean_stale(path: str, log: Callable[[str], None] | None = None) -> list[str]:
    """Settle what interrupted saves left in the run folder ``path`` (hold its lock first).

    Temporary checkpoint folders and files go, when they hold only what fastprompt writes; a
    checkpoint's previous copy (:func:`swap_dir`) left by a swap interrupted mid-way becomes the
    checkpoint again, or hands a person's files to the new one and goes. Nothing a person may
    have named (``best.old``, a folder holding their files) is removed.

    Returns
    -------
    list of str
        What was removed, restored or left (relative names).
    """
    done: list[str] = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if _STALE_DIR.match(entry) and os.path.isdir(full) and not os.path.islink(full):
            if only_ours(full):
                shutil.rmtree(full)
                done.append(entry)
            else:
                done.append(f"{entry} left (it holds files fastprompt does not write)")
    for name in _CHECKPOINTS:
        final = os.path.join(path, name)
        settled = settle_swap(path, name)
        if settled is not None:
            done.append(settled)
        # An older fastprompt's interrupted swap: NAME.old with nothing but its files. Renamed
        # back (a rename loses nothing, were it a person's copy); never removed.
        legacy = os.path.join(path, name + ".old")
        if not os.path.lexists(final) and os.path.isdir(legacy) and not os.path.islink(legacy):
            if only_ours(legacy) and os.path.isfile(os.path.join(legacy, "prompts.safetensors")):
                os.rename(legacy, final)
                done.append(f"{name}.old -> {name}")
        if os.path.isdir(final):
            for entry in os.listdir(final):
                if _STALE_FILE.match(entry) or entry == SWAP_MARK:
                    os.remove(os.path.join(final, entry))
                    done.append(f"{name}/{entry}")
    for entry in ("metrics.jsonl.tmp", MARKER + ".tmp"):
        if os.path.isfile(os.path.join(path, entry)):
            os.remove(os.path.join(path, entry))
            done.append(entry)
    if done and log is not None:
        log(f"note: settled what interrupted saves left: {', '.join(done)}")
    return done


def swap_dir(run: str, name: str) -> str:
    """Where a checkpoint's previous copy waits while a save swaps the new one in: a hidden name
    of fastprompt's own (``NAME.old`` was one a person may give a backup)."""
    return os.path.join(run, f".{name}.swap")


def only_ours(folder: str) -> bool:
    """Whether ``folder`` holds nothing but files fastprompt writes into a checkpoint."""
    return all(
        (e in OWN_FILES or e == SWAP_MARK or _STALE_FILE.match(e))
        and os.path.isfile(os.path.join(folder, e))
        and not os.path.islink(os.path.join(folder, e))
        for e in os.listdir(folder)
    )


def ours_swap(swap: str) -> bool:
    """Whether ``swap`` is a previous copy a save of fastprompt moved aside (it bears the mark)."""
    return (
        os.path.isdir(swap)
        and not os.path.islink(swap)
        and os.path.isfile(os.path.join(swap, SWAP_MARK))
    )


def settle_swap(run: str, name: str) -> str | None:
    """Finish a save of ``name`` interrupted mid-swap: the marked previous copy becomes the
    checkpoint again (none was swapped in), or hands a person's files to the new one and goes;
    an empty one goes.
    Returns what was done; None when there was nothing of ours to settle (a clash, or a folder
    fastprompt did not make, stays: :func:`leftover_swaps`)."""
    final, swap = os.path.join(run, name), swap_dir(run, name)
    if os.path.isdir(swap) and not os.path.islink(swap) and not os.listdir(swap):
        os.rmdir(swap)  # a removal cut short after its last file (retire): nothing to keep
        return os.path.basename(swap)
    if not ours_swap(swap):
        return None
    if not os.path.isdir(final):
        os.rename(swap, final)
        os.remove(os.path.join(final, SWAP_MARK))
        return f"{os.path.basename(swap)} -> {name}"
    return os.path.basename(swap) if retire(swap, final) else None


def leftover_swaps(run: str) -> list[str]:
    """Previous copies :func:`clean_stale` could not settle (a person's file clashes, or a folder
    of that name fastprompt did not make): a save would have to refuse."""
    return [swap_dir(run, n) for n in _CHECKPOINTS if os.path.lexists(swap_dir(run, n))]


def retire(previous: str, final: str) -> bool:
    """Hand what the new checkpoint ``final`` did not write over from its previous copy (a
    person's files, whatever their names: ``best.json`` is fastprompt's only in ``best/``), then
    remove the copy if only fastprompt's files, replaced by the new ones, are left in it.
    Returns whether it was removed."""
    for entry in os.listdir(previous):
        target = os.path.join(final, entry)
        ours = _STALE_FILE.match(entry) or entry == SWAP_MARK
        if not ours and not os.path.lexists(target):
            os.rename(os.path.join(previous, entry), target)
    if not only_ours(previous):
        return False
    # Its mark goes last, so a save killed meanwhile leaves a marked copy or an empty folder,
    # both settle_swap's (an unmarked one with files would be refused as a person's).
    for entry in os.listdir(previous):
        if entry != SWAP_MARK:
            os.remove(os.path.join(previous, entry))
    if os.path.lexists(os.path.join(previous, SWAP_MARK)):
        os.remove(os.path.join(previous, SWAP_MARK))
    os.rmdir(previous)
    return True
