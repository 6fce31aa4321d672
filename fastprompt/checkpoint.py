"""Prompt checkpoints: ours (safetensors + json, bit-exact) and the official VPT code's.

A folder written by :func:`save_prompts` holds ``prompts.safetensors`` (prompts, projection, head)
and ``config.json`` (the VPT config and the model it was trained on). :func:`load_prompts` puts it
back onto a fresh timm model, and also reads a state dict or ``.pth`` file of the official VPT code
(keys ending in ``prompt_embeddings``, ``deep_prompt_embeddings``, ``prompt_proj.*``,
``head.last_layer.*``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import fields

import torch
from torch import Tensor, nn

from fastprompt.vpt import PromptedViT, VPTConfig, _model_signature, config_dict

__all__ = ["load_prompts", "save_prompts"]

_TENSORS = "prompts.safetensors"
_CONFIG = "config.json"
_FORMAT = "fastprompt.prompts/1"


def save_prompts(prompted: PromptedViT, path: str | os.PathLike) -> None:
    """Save the trainable state of a prompted model to a folder.

    Parameters
    ----------
    prompted : PromptedViT
    path : str or PathLike
        Folder, created if missing. Receives ``prompts.safetensors`` and ``config.json``.
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in prompted.trainable_parameters().items()}
    save_file(tensors, os.path.join(path, _TENSORS), metadata={"format": _FORMAT})
    meta = {"format": _FORMAT, **config_dict(prompted), "impl": prompted.impl}
    if prompted.condensed_from is not None:
        meta["kept"] = [row.nonzero().flatten().tolist() for row in prompted.condensed_from]
    with open(os.path.join(path, _CONFIG), "w") as f:
        json.dump(meta, f, indent=2)


def load_prompts(
    model: nn.Module,
    path: str | os.PathLike | Mapping[str, Tensor],
    **overrides: object,
) -> PromptedViT:
    """Wrap a fresh timm model with saved prompts (and head).

    Parameters
    ----------
    model : timm VisionTransformer
        Same architecture and class count as the model the prompts were trained on.
    path : str, PathLike or mapping
        A folder from :func:`save_prompts`, or an official VPT checkpoint (``.pth`` file or state
        dict); for the latter the VPT config is read off the tensor shapes.
    **overrides
        Keyword arguments for :func:`fastprompt.vpt` that the checkpoint does not fix
        (``impl``, ``backend``, ``dropout``, ``readout``).

    Returns
    -------
    PromptedViT

    Raises
    ------
    ValueError
        If the checkpoint was made for another model shape (names what differs).
    """
    from fastprompt.vpt import vpt

    if isinstance(path, Mapping) or os.path.isfile(path):
        state = _official_state(path)
        prompted = vpt(
            model, head_init="keep", **{**_config_from_shapes(state, model), **overrides}
        )
    else:
        state, saved = _read_folder(path)
        _check_signature(saved["model"], model, path)
        cfg = {f.name: saved["vpt"].get(f.name) for f in fields(VPTConfig)}
        if cfg["layer_counts"] is not None:
            cfg["layer_counts"] = tuple(cfg["layer_counts"])
        run = {"impl": saved.get("impl", "fused"), "backend": None}
        for key, value in overrides.items():
            if key in run:
                run[key] = value
            elif key in ("dropout", "readout"):
                cfg[key] = value
            else:
                raise TypeError(f"load_prompts: {key!r} cannot be overridden")
        prompted = PromptedViT(model, VPTConfig(**cfg), head_init="keep", **run)
        if "kept" in saved:
            kept = torch.zeros(len(saved["kept"]), cfg["num_prompts"], dtype=torch.bool)
            for layer, rows in enumerate(saved["kept"]):
                kept[layer, rows] = True
            prompted.condensed_from = kept
    _copy_into(prompted, state, path)
    return prompted


def _read_folder(path) -> tuple[dict[str, Tensor], dict]:
    from safetensors.torch import load_file

    cfg = os.path.join(path, _CONFIG)
    if not os.path.isfile(cfg):
        raise FileNotFoundError(
            f"load_prompts: {path} holds no {_CONFIG}; is it a save_prompts folder?"
        )
    with open(cfg) as f:
        saved = json.load(f)
    if saved.get("format") != _FORMAT:
        raise ValueError(
            f"load_prompts: {cfg} has format {saved.get('format')!r}, need {_FORMAT!r}"
        )
    return load_file(os.path.join(path, _TENSORS)), saved


def _check_signature(saved: dict, model: nn.Module, path) -> None:
    if not hasattr(model, "blocks") or not hasattr(model, "embed_dim"):
        raise TypeError(
            f"load_prompts: model must be a timm VisionTransformer, got {type(model).__name__}"
        )
    have = _model_signature(model)
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, model {have[k]!r}"
        for k in have
        if k != "class" and saved.get(k) != have[k]
    ]
    if diff:
        raise ValueError(
            f"load_prompts: {path} was saved from another model shape ({'; '.join(diff)})"
        )


_OFFICIAL_SUFFIXES = {
    "deep_prompt_embeddings": "deep_prompt_embeddings",
    "prompt_embeddings": "prompt_embeddings",
    "prompt_proj.weight": "prompt_proj.weight",
    "prompt_proj.bias": "prompt_proj.bias",
    "head.last_layer.weight": "head.weight",
    "head.last_layer.bias": "head.bias",
}


def _official_state(path) -> dict[str, Tensor]:
    """Our names for the tensors of an official VPT checkpoint (or of our own state dict)."""
    if isinstance(path, Mapping):
        raw = dict(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
            raw = raw["model"]
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        for suffix, ours in _OFFICIAL_SUFFIXES.items():
            if key == suffix or key.endswith("." + suffix):
                state[ours] = value
                break
        else:
            if key in ("head.weight", "head.bias"):
                state[key] = value
    if "prompt_embeddings" not in state:
        raise ValueError("load_prompts: the checkpoint holds no 'prompt_embeddings' tensor")
    return state


def _config_from_shapes(state: dict[str, Tensor], model: nn.Module) -> dict[str, object]:
    shallow = state["prompt_embeddings"]
    if shallow.dim() != 3 or shallow.shape[0] != 1:
        raise ValueError(
            f"load_prompts: prompt_embeddings must be (1, P, D), got {tuple(shallow.shape)}"
        )
    proj = state.get("prompt_proj.weight")
    return {
        "num_prompts": int(shallow.shape[1]),
        "deep": "deep_prompt_embeddings" in state,
        "project": -1 if proj is None else int(proj.shape[1]),
    }


def _copy_into(prompted: PromptedViT, state: dict[str, Tensor], path) -> None:
    own = prompted.trainable_parameters()
    missing = [n for n in own if n not in state]
    if missing:
        raise ValueError(f"load_prompts: {path} lacks {missing}")
    for name, tensor in state.items():
        if name not in own:
            raise ValueError(
                f"load_prompts: {path} holds {name!r}, which this model does not train"
            )
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"load_prompts: {name} has shape {tuple(tensor.shape)} in {path}, but this model "
                f"needs {tuple(own[name].shape)} (a checkpoint of another model?)"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
