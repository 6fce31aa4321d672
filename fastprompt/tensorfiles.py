"""Reading tensor files a user hands over, with one clear error per way they can be wrong.

Checkpoints, ``--weights`` and ``trainer.pt`` are read here: a ``.safetensors`` file is inspected
before it is parsed (empty, too short, not safetensors, a header that is not JSON, truncated tensor
data: each said so, with the file's name and sizes), a PyTorch file is loaded with
``weights_only=True`` and its errors are translated (a text file, a truncated archive, a pickle
holding objects other than tensors). :func:`tensor_digest` is the checksum fastprompt stores in the
checkpoints it writes and verifies when it reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["FileDamaged", "inspect_safetensors", "load_torch", "read_tensors", "tensor_digest"]

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the header


class FileDamaged(ValueError):
    """A file that is not what it should be: empty, truncated, another format, corrupted."""


def inspect_safetensors(path: str, who: str = "") -> dict[str, Any]:
    """The JSON header of the safetensors file ``path``, after checking the file holds it all.

    Raises
    ------
    FileDamaged
        Naming the file and what is wrong with it.
    """
    where = f"{who}{path}"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            text = f.read(min(max(n, 0), _HEADER_LIMIT))
    except OSError as e:
        raise FileDamaged(f"{where} cannot be read ({e.strerror})") from None
    if size == 0:
        raise FileDamaged(f"{where} is empty (0 bytes): a save that never finished, or a bad copy")
    if n < 0:
        raise FileDamaged(f"{where} is {size} bytes, too short to be a safetensors file")
    if n > _HEADER_LIMIT or not text[:1] == b"{":
        raise FileDamaged(
            f"{where} is not a safetensors file (its first bytes are not a safetensors header)"
        )
    if len(text) < n:
        raise FileDamaged(f"{where} is truncated: {size} bytes, but its header alone needs {8 + n}")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise FileDamaged(
            f"{where} is not a safetensors file (its header is not JSON: {e})"
        ) from None
    if not isinstance(header, dict):
        raise FileDamaged(f"{where} is not a safetensors file (its header is not a JSON object)")
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise FileDamaged(
            f"{where} is truncated: {size} bytes, but its tensors need {need} (a save that was cut "
            "short, or an incomplete copy)"
        )
    return header


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _cut_short(path: str) -> bool:
    """Whether a zip archive (what torch.save writes) lost its end: the end-of-central-directory
    record sits in its last 64 KiB + 22 bytes."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return False
        f.seek(max(0, os.path.getsize(path) - 65557))
        return b"PK\x05\x06" not in f.read()


def load_torch(path: str, who: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with its failures said plainly.

    Raises
    ------
    FileDamaged
    """
    where = f"{who}{path}"
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FileDamaged(f"{where} cannot be read ({e.strerror})") from None
    if size == 0:
        raise FileDamaged(f"{where} is empty (0 bytes): a save that never finished, or a bad copy")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        if "Weights only load failed" in message:
            with open(path, "rb") as f:
                start = f.read(2)
            if start[:1] not in (b"\x80", b"P"):  # neither a pickle nor a zip archive
                raise FileDamaged(
                    f"{where} is not a PyTorch checkpoint (it looks like text or another format)"
                ) from None
            raise FileDamaged(
                f"{where} holds Python objects other than tensors and plain containers; "
                "fastprompt reads only those (weights_only=True), and never runs code from a file"
            ) from None
        if _cut_short(path):
            raise FileDamaged(
                f"{where} is truncated ({size} bytes, its archive has no end): a save that was "
                "cut short, or an incomplete copy"
            ) from None
        if "zip" in message or isinstance(e, EOFError):
            raise FileDamaged(f"{where} is damaged ({_first_line(e)})") from None
        raise FileDamaged(
            f"{where} cannot be read as a PyTorch checkpoint ({_first_line(e)})"
        ) from None


def read_tensors(path: str, who: str = "") -> dict[str, Tensor]:
    """The tensors of a state-dict file (``.safetensors``, or a PyTorch ``.pth``/``.pt``/``.bin``
    holding a state dict, possibly under ``"state_dict"`` or ``"model"``).

    Raises
    ------
    FileDamaged
        Naming the file and what is wrong with it.
    """
    where = f"{who}{path}"
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        inspect_safetensors(path, who)
        try:
            return load_file(path)
        except Exception as e:
            raise FileDamaged(f"{where} cannot be read as safetensors ({_first_line(e)})") from None
    state = load_torch(path, who)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise FileDamaged(f"{where} holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise FileDamaged(
            f"{where} is not a state dict: {bad[:3]} {'are' if len(bad) > 1 else 'is'} not tensors"
        )
    return dict(state)


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
