"""A few values of a backbone's frozen weights, recorded with its prompts (``docs/design.md`` §4,
"Files are checked before they are trusted"): prompts trained on one set of weights are
meaningless on another, and a model created without ``pretrained=True`` (or with another
pretrained tag) has the same shapes.

Sixteen evenly spaced values of three weight tensors (the first, the middle and the last of the
backbone's parameters with at least 256 values, the classifier left out: it is saved with the
prompts) identify the weights cheaply. They are looked up by name and compared with a relative
tolerance of 2 %, so the same weights in bfloat16 or float16 still match; a tensor whose shape
changed (a position embedding resampled for another input size) is not compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["mismatch", "probe", "record"]

_VALUES = 16
_MIN_SIZE = 256
_RTOL, _ATOL = 2e-2, 1e-6


def probe(model: nn.Module, classifier: nn.Module | None) -> dict[str, dict[str, list]]:
    """``{parameter name: {"shape": ..., "values": 16 values}}`` of three of ``model``'s weights
    ({} when it has none or they live on the meta device)."""
    skip = set() if classifier is None else {id(p) for p in classifier.parameters()}
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if id(p) not in skip and p.numel() >= _MIN_SIZE and p.device.type != "meta"
    ]
    if not named:
        return {}
    picks = sorted({0, len(named) // 2, len(named) - 1})
    return record({named[i][0]: named[i][1] for i in picks})


def record(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, list]]:
    """The probe entries of the given tensors, by the model's parameter names (an official
    checkpoint's copy of a backbone weight is recorded under the name the timm model gives it)."""
    return {name: {"shape": list(t.shape), "values": _values(t)} for name, t in tensors.items()}


def _values(p: torch.Tensor) -> list[float]:
    with torch.no_grad():
        flat = p.detach().reshape(-1)
        where = torch.linspace(0, flat.numel() - 1, _VALUES, device=flat.device).long()
        return [float(x) for x in flat[where].float().cpu()]


def mismatch(saved: Mapping[str, Any], model: nn.Module) -> str | None:
    """What differs between a recorded probe and ``model``'s weights of the same names (None:
    the same weights, or nothing to compare). A tensor of another shape is not compared: a
    position embedding resampled for another input size is still the same weights."""
    params = dict(model.named_parameters())
    for name, entry in saved.items():
        p = params.get(name)
        if p is None or not isinstance(entry, Mapping) or p.device.type == "meta":
            continue  # another parameter layout: the shape check speaks for it
        if list(p.shape) != entry.get("shape"):
            continue
        want = entry.get("values", [])
        for i, (a, b) in enumerate(zip(want, _values(p))):
            if not math.isclose(a, b, rel_tol=_RTOL, abs_tol=_ATOL):
                return f"{name} value {i}: {a:.6g} when the prompts were saved, {b:.6g} now"
    return None
