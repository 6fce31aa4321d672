"""The one rule for a measuring tool's ``--out`` folder (``fastprompt bench`` and every script under
``benchmarks/``): the tool replaces its own earlier files there and never a person's.

A tool's files are recognised by what they hold: its JSON report (written whole at the end) with
the top-level keys it writes, or, for a run cut short before that report, its JSON-lines rows
alone, each row holding the keys the tool's rows hold. Everything is checked before anything is
measured, and a problem is one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

__all__ = ["Outputs", "cpu_folder", "device_folder", "prepare_out", "refusal"]


@dataclass(frozen=True)
class Outputs:
    """The files one tool writes into its ``--out`` folder, and how to tell they are its own.

    Parameters
    ----------
    tool : str
        The tool's name as messages give it (``"benchmarks/bench_op.py"``).
    report : str or None
        Its JSON report, written whole once measuring is done; None if it writes none.
    keys : frozenset of str
        The top-level keys its report always holds.
    more : frozenset of str or None
        The other top-level keys its report may hold; None: any. A report with a key outside
        ``keys | more`` is another tool's (``fastprompt bench``'s report.json holds ``config``,
        which ``bench_op.py``'s does not).
    rows : str or None
        Its JSON-lines file, written row by row as rows are measured; None if it writes none.
    row_keys : frozenset of str
        The keys each of its rows holds.
    others : tuple of str
        Its other files (a Markdown table, figures).
    """

    tool: str
    report: str | None = None
    keys: frozenset[str] = frozenset()
    more: frozenset[str] | None = frozenset()
    rows: str | None = None
    row_keys: frozenset[str] = frozenset()
    others: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """Every file the tool writes, its report first."""
        return [n for n in (self.report, self.rows) if n] + list(self.others)

    def is_report(self, saved: object) -> bool:
        """Whether ``saved`` (a loaded JSON) is this tool's report."""
        if not isinstance(saved, dict) or not self.keys <= saved.keys():
            return False
        return self.more is None or saved.keys() <= self.keys | self.more

    def is_rows(self, rows: list[object]) -> bool:
        """Whether ``rows`` (loaded JSON lines) are this tool's rows."""
        return all(isinstance(r, dict) and self.row_keys <= r.keys() for r in rows)


def device_folder(env: dict, *names: str) -> str:
    """``benchmarks/results/<device>/<names...>``: a script's default ``--out``, one folder per
    device as :func:`fastprompt.bench.environment` names it (spaces made ``_``)."""
    return os.path.join("benchmarks", "results", env["device"].replace(" ", "_"), *names)


def cpu_folder(*names: str) -> str:
    """``benchmarks/results/cpu-<cores>core/<names...>``: a CPU script's default ``--out``, one
    folder per core count, so that a run elsewhere does not replace the committed 2-core figures."""
    return os.path.join("benchmarks", "results", f"cpu-{os.cpu_count()}core", *names)


def _report(path: str) -> object:
    with open(path) as f:
        return json.load(f)


def _rows(path: str) -> list[object]:
    """The rows of a JSON-lines file; a last line cut short (a run killed while writing it) is
    not a row."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise
    return rows


def _foreign(out: str, outputs: Outputs) -> str | None:
    """Why ``outputs.tool`` may not write into ``out``: some of its file names are there and the
    folder is not an earlier run's of the same tool, so a person's file would be replaced."""
    present = [n for n in outputs.names if os.path.lexists(os.path.join(out, n))]
    if not present:
        return None
    report = outputs.report and os.path.join(out, outputs.report)
    rows = outputs.rows and os.path.join(out, outputs.rows)
    ours = False
    try:
        if report and os.path.lexists(report):
            ours = outputs.is_report(_report(report))
    except (OSError, ValueError):
        # A report that does not parse may be one a killed run left half-written: its rows,
        # written line by line, then say whose folder this is.
        ours = None
    try:
        if not (report and os.path.lexists(report)) or ours is None:
            # No report: a run cut short, or a tool that writes only rows.
            ours = bool(rows and os.path.lexists(rows)) and outputs.is_rows(_rows(rows))
    except (OSError, ValueError):
        ours = False
    if ours:
        return None
    return (
        f"--out {out} holds {', '.join(present)}, which {outputs.tool} did not write; choose "
        "another --out (nothing was written)"
    )


def refusal(out: str, outputs: Outputs) -> str | None:
    """Why :func:`prepare_out` would refuse ``out``, removing nothing: for a tool that writes into
    several folders, each of them checked before any is prepared.

    Parameters
    ----------
    out : str
        The folder.
    outputs : Outputs
        What the tool writes there.

    Returns
    -------
    str or None
        The problem, one line naming ``--out``; None when the folder may be prepared.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} exists and is not a folder"
    return _foreign(out, outputs)


def prepare_out(out: str, outputs: Outputs) -> str | None:
    """Make the folder ``out`` ready for ``outputs`` before anything is measured, or say why it
    cannot be: a person's files of those names are there, it is a file, it cannot be written.

    An earlier run's files of those names are removed first: a run writes only what its options
    ask for, and a run cut short writes no report, so what an earlier run left would otherwise
    sit beside this run's files as if it were theirs. Files of other names are left alone.

    Parameters
    ----------
    out : str
        The folder, made if missing.
    outputs : Outputs
        What the tool writes there.

    Returns
    -------
    str or None
        The problem, one line naming ``--out``; None when the folder is ready.
    """
    problem = refusal(out, outputs)
    if problem:
        return problem
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        for name in outputs.names:
            if os.path.lexists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    except OSError as e:
        return f"--out {out} cannot be written ({e.strerror or e}; nothing was measured)"
    return None
