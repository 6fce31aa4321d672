"""Backend declarations and the dispatcher shared by every op.

A backend says what it supports and, when it cannot take a call, why (in the spirit of xformers'
``not_supported_reasons``). Automatic choice takes the first backend in preference order that
fits and says once why a better one was skipped; an explicit choice is strict.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastprompt import _config

logger = logging.getLogger("fastprompt")

_warned: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Backend:
    """What one backend of one op can run.

    Attributes
    ----------
    name : str
        Backend name (``"torch"``, ``"triton"``).
    devices : tuple of str
        Device types it runs on when asked for explicitly.
    auto_devices : tuple of str
        Device types it is chosen for automatically (the Triton interpreter runs on CPU tensors,
        but far too slowly to be picked without being asked).
    dtypes : tuple of torch.dtype
        Input dtypes it accepts.
    head_dims : tuple of int or None
        Head dimensions it accepts; None means any.
    availability : callable
        Returns None when the backend can run in this process, else the reason it cannot
        (a missing package, no GPU).
    """

    name: str
    devices: tuple[str, ...]
    auto_devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None
    availability: Callable[[], str | None] = field(default=lambda: None)

    def not_supported_reasons(
        self, device: torch.device, dtype: torch.dtype, head_dim: int
    ) -> list[str]:
        """Every reason this backend cannot take a call with these properties (empty if it can)."""
        reasons = []
        why = self.availability()
        if why is not None:
            reasons.append(why)
        if device.type not in self.devices:
            reasons.append(f"device type {device.type!r} not in {self.devices}")
        if dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not in {tuple(str(d) for d in self.dtypes)}")
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head dim {head_dim} not in {self.head_dims}")
        return reasons


def choose(
    op: str,
    backends: Sequence[Backend],
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    requested: str | None = None,
) -> str:
    """Pick the backend for one call.

    Parameters
    ----------
    op : str
        Op name, for messages.
    backends : sequence of Backend
        In order of preference.
    device, dtype, head_dim
        Properties of the call.
    requested : str or None
        ``backend=`` from the caller; when None, ``FASTPROMPT_BACKEND`` applies. Either is strict.

    Returns
    -------
    str
        The chosen backend's name.

    Raises
    ------
    ValueError
        If the requested backend does not exist.
    NotImplementedError
        If the requested backend cannot take the call, or none can; the message lists every reason.
    """
    settings = _config.get()
    requested = requested or settings.backend
    by_name = {b.name: b for b in backends}
    if requested is not None:
        if requested not in by_name:
            raise ValueError(
                f"{op}: backend={requested!r} does not exist; choose one of {tuple(by_name)}"
            )
        reasons = by_name[requested].not_supported_reasons(device, dtype, head_dim)
        if reasons:
            raise NotImplementedError(
                f"{op}: backend {requested!r} was requested but cannot run this call: "
                + "; ".join(reasons)
            )
        return requested
    rejected: list[tuple[Backend, list[str]]] = []
    for b in backends:
        reasons = b.not_supported_reasons(device, dtype, head_dim)
        if not reasons and device.type not in b.auto_devices:
            reasons = [f"not chosen automatically on {device.type}"]
        if not reasons:
            _say_fallback(op, b.name, device, rejected, settings.verbose)
            return b.name
        rejected.append((b, reasons))
    raise NotImplementedError(
        f"{op}: no backend can run on {device.type} with dtype {dtype} and head dim {head_dim}: "
        + " | ".join(f"{b.name}: {'; '.join(r)}" for b, r in rejected)
    )


def _say_fallback(
    op: str,
    chosen: str,
    device: torch.device,
    rejected: list[tuple[Backend, list[str]]],
    verbose: bool,
) -> None:
    # Only a better backend that would have served this device counts as a fallback worth
    # telling the user about; Triton not running on a CPU is the normal case, not a fallback.
    for b, reasons in rejected:
        if device.type not in b.auto_devices:
            continue
        key = (op, b.name, "; ".join(reasons))
        if key in _warned and not verbose:
            continue
        _warned.add(key)
        warnings.warn(
            f"fastprompt: {op} on {device.type} uses backend {chosen!r} because {b.name!r} "
            f"cannot run: {'; '.join(reasons)}",
            RuntimeWarning,
            stacklevel=4,
        )
    if verbose:
        logger.info("%s: backend %r on %s", op, chosen, device.type)


def describe(backends: Sequence[Backend]) -> list[dict[str, object]]:
    """Rows for ``fastprompt info``: each backend, what it declares, and whether it can run here."""
    rows = []
    for b in backends:
        rows.append(
            {
                "backend": b.name,
                "devices": ",".join(b.devices),
                "dtypes": ",".join(str(d).replace("torch.", "") for d in b.dtypes),
                "head_dims": "any" if b.head_dims is None else ",".join(map(str, b.head_dims)),
                "available": b.availability() or "yes",
            }
        )
    return rows
