"""Prompt checkpoints: ours (safetensors + json, bit-exact, any method) and the official VPT code's.

A folder written by :func:`save_prompts` holds ``prompts.safetensors`` (what trains: the prompt
source's parameters and buffers, and the head) and ``config.json`` (the method, its config and the
model it was trained on). The same description is stored inside the safetensors file's metadata,
so the file alone is a complete checkpoint and replacing it (atomically) replaces the checkpoint
as a whole; ``config.json`` is the copy a person reads. :func:`load_prompts` rebuilds the model
through the method registry (:mod:`fastprompt.registry`), and also reads a state dict or ``.pth``
file of a method's official code when the method's entry can (VPT's: keys ending in
``prompt_embeddings``, ``deep_prompt_embeddings``, ``prompt_proj.*``, ``head.last_layer.*``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt import registry
from fastprompt.backbones import adapter_for

__all__ = ["load_prompts", "save_prompts"]

_TENSORS = "prompts.safetensors"
_CONFIG = "config.json"
_FORMAT = "fastprompt.prompts/2"
_FORMAT_V1 = "fastprompt.prompts/1"


def describe(prompted: nn.Module) -> dict[str, Any]:
    """The JSON description of a prompted model: format, method, its config, model, impl."""
    return {
        "format": _FORMAT,
        "method": prompted.method,
        "config": registry.get(prompted.method).describe(prompted),
        "model": prompted.backbone.signature(),
        "impl": prompted.impl,
    }


def save_prompts(prompted: nn.Module, path: str | os.PathLike) -> None:
    """Save the trainable state and the method's config of a prompted model to a folder.

    Parameters
    ----------
    prompted : PromptedViT
    path : str or PathLike
        Folder, created if missing. Receives ``prompts.safetensors`` (written to a temporary file
        and renamed over the old one, so an interrupted save leaves the previous checkpoint whole)
        and ``config.json``.
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    meta = describe(prompted)
    tensors = {n: t.detach().contiguous().cpu() for n, t in prompted.prompt_state().items()}
    text = json.dumps(meta, indent=2)

    def write_tensors(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": _FORMAT, "config": text})

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    _replace_atomically(os.path.join(path, _TENSORS), write_tensors)
    _replace_atomically(os.path.join(path, _CONFIG), write_json)


def _replace_atomically(target: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_prompts(
    model: nn.Module,
    path: str | os.PathLike | Mapping[str, Tensor],
    method: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Wrap a fresh timm model with saved prompts (and head).

    Parameters
    ----------
    model : timm VisionTransformer
        Same architecture and class count as the model the prompts were trained on.
    path : str, PathLike or mapping
        A folder from :func:`save_prompts` or its ``prompts.safetensors`` file, or a checkpoint
        of a method's official code (``.pth`` file or state dict; VPT's config is read off the
        tensor shapes).
    method : str, optional
        The method the checkpoint must hold (``"vpt"``, ``"pgn"``, ...); a checkpoint of another
        method is refused. Default: whatever it holds.
    **overrides
        How to run the model (``impl``, ``backend``) and what the method lets a loader change
        (VPT: ``dropout``, ``readout``).

    Returns
    -------
    PromptedViT

    Raises
    ------
    ValueError
        If the checkpoint was made for another model shape or method (the message names what
        differs), or the path holds no checkpoint.
    """
    where = "the given state dict" if isinstance(path, Mapping) else os.fspath(path)
    if isinstance(path, Mapping) or (os.path.isfile(path) and not _is_safetensors(path)):
        state, saved = _read_official(path, model, method, where)
    else:
        state, saved = _read_ours(path)
        _check_signature(saved["model"], model, where)
        if method is not None and saved["method"] != method:
            raise ValueError(
                f"load_prompts: {where} holds a {saved['method']!r} model, not {method!r}"
            )
    entry = registry.get(saved["method"])
    run = {"impl": saved.get("impl", "fused"), **overrides}
    prompted = entry.rebuild(model, saved["config"], run)
    _copy_into(prompted, state, where)
    return prompted


def _is_safetensors(path) -> bool:
    return os.fspath(path).endswith(".safetensors")


def _read_ours(path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        tensors = os.path.join(path, _TENSORS)
        if not os.path.isfile(tensors):
            raise FileNotFoundError(
                f"load_prompts: {path} holds no {_TENSORS}; is it a save_prompts folder?"
            )
    elif os.path.isfile(path):
        tensors = path
    else:
        raise FileNotFoundError(f"load_prompts: {path} does not exist")
    with safe_open(tensors, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" in meta:
        saved = json.loads(meta["config"])
    else:
        # Format 1 kept the description in config.json only.
        cfg = os.path.join(os.path.dirname(tensors), _CONFIG)
        if not os.path.isfile(cfg):
            raise ValueError(
                f"load_prompts: {tensors} carries no config and has no {_CONFIG} beside it; "
                "pass the folder written by save_prompts"
            )
        with open(cfg) as f:
            saved = json.load(f)
    return load_file(tensors), _upgrade(saved, tensors)


def _upgrade(saved: dict[str, Any], where: str) -> dict[str, Any]:
    """Format 1 (the method's config at the top level) as format 2 (``{"method", "config"}``):
    the method whose registry entry recognises the description takes it."""
    fmt = saved.get("format")
    if fmt == _FORMAT:
        return saved
    if fmt != _FORMAT_V1:
        raise ValueError(
            f"load_prompts: {where} has format {fmt!r}; this fastprompt reads {_FORMAT!r} and "
            f"{_FORMAT_V1!r}"
        )
    for name in registry.names():
        legacy = registry.get(name).legacy
        config = legacy(saved) if legacy is not None else None
        if config is not None:
            return {**saved, "format": _FORMAT, "method": name, "config": config}
    raise ValueError(f"load_prompts: {where} is a format-1 checkpoint no method recognises")


def _check_signature(saved: dict, model: nn.Module, where: str) -> None:
    have = adapter_for(model, "load_prompts").signature()
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, model {have[k]!r}"
        for k in have
        if k != "class" and saved.get(k) != have[k]
    ]
    if diff:
        raise ValueError(
            f"load_prompts: {where} was saved from another model shape ({'; '.join(diff)})"
        )


def _read_official(
    path, model: nn.Module, method: str | None, where: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and description of a checkpoint of a method's official code: the methods whose
    registry entry reads official checkpoints (``method`` only, when given) try in turn."""
    readers = [n for n in registry.names() if registry.get(n).read_official is not None]
    if method is not None:
        if method not in readers:
            raise ValueError(
                f"load_prompts: {where} is a state dict of an official code base, which "
                f"{method!r} does not read (methods that do: {readers})"
            )
        readers = [method]
    raw = _state_dict(path)
    backbone = adapter_for(model, "load_prompts")
    errors = []
    for name in readers:
        try:
            state, config = registry.get(name).read_official(raw, backbone)
        except ValueError as e:
            errors.append(str(e))
            continue
        return state, {"method": name, "config": config, "impl": "fused"}
    raise ValueError("; ".join(errors) or f"load_prompts: no method reads {where}")


def _state_dict(path) -> Mapping[str, Tensor]:
    """The state dict in ``path`` (a ``.pth`` file, possibly under a ``"model"`` key)."""
    if isinstance(path, Mapping):
        return dict(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping):
        raise ValueError(f"load_prompts: {path} holds a {type(raw).__name__}, not a state dict")
    return raw


def _copy_into(prompted: nn.Module, state: dict[str, Tensor], where: str) -> None:
    own = prompted.prompt_state()
    missing = [n for n in own if n not in state]
    if missing:
        raise ValueError(f"load_prompts: {where} lacks {missing}")
    for name, tensor in state.items():
        if name not in own:
            raise ValueError(
                f"load_prompts: {where} holds {name!r}, which this model does not train"
            )
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"load_prompts: {name} has shape {tuple(tensor.shape)} in {where}, but this model "
                f"needs {tuple(own[name].shape)} (a checkpoint of another model?)"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
