"""The dispatch cache file: measured choices and probe results, kept per versions.

One JSON file (``FASTPROMPT_DISPATCH_CACHE``, default ``~/.cache/fastprompt/dispatch.json``)
holding, under a key naming the versions of fastprompt, torch, Triton and CUDA (as Triton's
autotuner keys its cache), a section per kind of record. Entries made under other versions are
never read. Writes replace the file atomically after merging what another process wrote meanwhile;
a file that cannot be read or written is ignored, with one warning (dispatch then keeps its
decisions in memory).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from typing import Any

import torch

from fastprompt import _config
from fastprompt._warnings import warn_at_caller

__all__ = ["device_name", "entries", "path", "record", "versions", "versions_key"]

_MEMORY: dict[str, dict[str, Any]] = {}
_WARNED: list[str] = []


def device_name(device: torch.device) -> str:
    """A stable name of the hardware behind ``device`` (the GPU's name; the CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu:{platform.processor() or platform.machine()}"
    return device.type


_SOURCES: list[str] = []


def _kernels_hash() -> str:
    """A hash of the kernels' Python sources: a decision made for other kernels is not reused."""
    if not _SOURCES:
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
        digest = hashlib.sha256()
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as f:
                        digest.update(name.encode() + f.read())
        _SOURCES.append(digest.hexdigest()[:12])
    return _SOURCES[0]


def versions() -> dict[str, str]:
    """What a cached decision depends on besides the hardware."""
    try:
        version = importlib.metadata.version("fastprompt")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    out = {"fastprompt": f"{version}+{_kernels_hash()}", "torch": torch.__version__}
    out["cuda"] = str(torch.version.cuda)
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # no Triton: decisions cannot involve it
        out["triton"] = "none"
    return out


def versions_key() -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(versions().items()))


def path() -> str | None:
    """The cache file, or None when kept in memory (``FASTPROMPT_DISPATCH_CACHE=off``)."""
    return _config.get().dispatch_cache


def _read(file: str) -> dict[str, Any]:
    try:
        with open(file) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn(f"cannot read {file} ({type(e).__name__}: {e}); it is ignored")
        return {}


def _warn(message: str) -> None:
    if message not in _WARNED:
        _WARNED.append(message)
        warn_at_caller(f"fastprompt: dispatch cache: {message}", RuntimeWarning)


def entries(section: str) -> dict[str, Any]:
    """Records of ``section`` made under the current versions (memory first, then the file)."""
    found: dict[str, Any] = {}
    file = path()
    if file is not None:
        found.update(_read(file).get(versions_key(), {}).get(section, {}))
    found.update(_MEMORY.get(section, {}))
    return found


def record(section: str, key: str, value: Any) -> None:
    """Keep ``value`` under ``key`` in ``section``, in memory and in the file."""
    _MEMORY.setdefault(section, {})[key] = value
    file = path()
    if file is None:
        return
    try:
        data = _read(file)
        data.setdefault(versions_key(), {}).setdefault(section, {})[key] = value
        folder = os.path.dirname(os.path.abspath(file))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dispatch-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, file)
    except OSError as e:
        _warn(f"cannot write {file} ({type(e).__name__}: {e}); decisions stay in memory")


def forget() -> None:
    """Drop what this process holds in memory (tests)."""
    _MEMORY.clear()
