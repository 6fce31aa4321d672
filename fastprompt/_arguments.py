"""Keyword arguments a person passed that a call does not take, refused as Python would."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["refuse_unknown"]


def refuse_unknown(who: str, given: Iterable[str], accepted: Sequence[str], takes: str) -> None:
    """Raise for the first of ``given`` not in ``accepted``, naming it, the closest accepted
    name, and what the call takes.

    Parameters
    ----------
    who : str
        The call, as ``who()`` in the message (Python's own wording).
    given : iterable of str
        The keywords passed.
    accepted : sequence of str
        The keywords the call takes.
    takes : str
        What the call takes, in words, ending the message.

    Raises
    ------
    TypeError
        A keyword is not accepted.
    """
    for name in given:
        if name in accepted:
            continue
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{who}() got an unexpected keyword argument {name!r}{hint}; {takes}")
