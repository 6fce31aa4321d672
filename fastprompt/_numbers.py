"""Numbers a person hands over, as the Python values fastprompt keeps."""

from __future__ import annotations

import operator

import torch

__all__ = ["as_int"]


def as_int(value: object) -> int | None:
    """``value`` as a Python int where it is an int or another integer type (numpy's, a 0-d
    integer tensor: what a sweep over ``np.arange`` hands over), else None (a bool, a float, a
    tensor of another shape or dtype). Configs keep the Python int: it goes into JSON and
    checkpoints as it is."""
    # A tensor's __index__ takes a bool one and any one-element shape: only 0-d integers here.
    tensor = isinstance(value, torch.Tensor)
    if isinstance(value, bool) or (tensor and (value.dtype == torch.bool or value.dim())):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except (TypeError, RuntimeError):  # RuntimeError: a meta tensor has no value
        return None
