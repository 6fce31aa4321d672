"""Prompt checkpoints: ours (safetensors + json, bit-exact, any method) and the official VPT code's.

A folder written by :func:`save_prompts` holds ``prompts.safetensors`` (what trains: the prompt
source's parameters and buffers, and the head) and ``config.json`` (the method, its config and the
model it was trained on). The same description is stored inside the safetensors file's metadata,
so the file alone is a complete checkpoint and replacing it (atomically) replaces the checkpoint
as a whole; ``config.json`` is the copy a person reads. :func:`load_prompts` rebuilds the model
through the method registry (:mod:`fastprompt.registry`), and also reads a state dict or ``.pth``
file of a method's official code when the method's entry can (VPT's: keys ending in
``prompt_embeddings``, ``deep_prompt_embeddings``, ``prompt_proj.*``, ``head.last_layer.*``).
A state dict records no method: where another method's would hold the same tensors (a fastprompt
VPT-shallow wrapper's and ``vpt_ablation(deep_shared=True)``'s; the official depth ablations'),
it loads only when ``method`` names what it is, and is refused otherwise with what it may be.

The safetensors metadata also holds ``tensors_sha256``, a checksum of the tensors
(:func:`fastprompt.tensorfiles.tensor_digest`) verified on load, and, when the saver knows them,
the class names of the head (``classes``). A damaged, truncated or mismatched file is refused with
one :class:`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt import registry
from fastprompt._warnings import warn_at_caller
from fastprompt.backbones import adapter_for
from fastprompt.tensorfiles import FileDamaged, inspect_safetensors, load_torch, tensor_digest
from fastprompt.weights_probe import mismatch, probe, record

__all__ = ["CheckpointError", "checkpoint_info", "load_prompts", "save_prompts"]

_TENSORS = "prompts.safetensors"
_CONFIG = "config.json"
_FORMAT = "fastprompt.prompts/2"
_FORMAT_V1 = "fastprompt.prompts/1"
_DIGEST = "tensors_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: damaged, truncated, not a checkpoint, another
    model's, or a config this fastprompt cannot rebuild (the message names the file)."""


class CheckpointConfigError(CheckpointError, TypeError):
    """A checkpoint config the method's builder refused with a TypeError (an unknown field)."""


def describe(prompted: nn.Module) -> dict[str, Any]:
    """The JSON description of a prompted model: format, method, its config, model, impl."""
    return {
        "format": _FORMAT,
        "method": prompted.method,
        "config": registry.get(prompted.method).describe(prompted),
        "model": prompted.backbone.signature(),
        "weights_probe": probe(prompted.model, prompted.backbone.classifier()),
        "impl": prompted.impl,
    }


def save_prompts(
    prompted: nn.Module, path: str | os.PathLike, classes: Sequence[str] | None = None
) -> None:
    """Save the trainable state and the method's config of a prompted model to a folder.

    Parameters
    ----------
    prompted : PromptedViT
    path : str or PathLike
        Folder, created if missing. Receives ``prompts.safetensors`` (written to a temporary file
        and renamed over the old one, so an interrupted save leaves the previous checkpoint whole)
        and ``config.json``.
    classes : sequence of str, optional
        The head's class names (index i is class ``classes[i]``), saved with the config.
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    meta = describe(prompted)
    if classes is not None:
        meta["classes"] = [str(c) for c in classes]
        head = prompted.backbone.classifier()
        if isinstance(head, nn.Linear) and head.out_features != len(classes):
            raise ValueError(
                f"save_prompts: {len(classes)} class names for a head of {head.out_features} "
                "classes"
            )
    tensors = {n: t.detach().contiguous().cpu() for n, t in prompted.prompt_state().items()}
    text = json.dumps(meta, indent=2)
    digest = tensor_digest(tensors)

    def write_tensors(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": _FORMAT, "config": text, _DIGEST: digest})

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
    *,
    check_weights: bool = True,
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
        method is refused. Default: whatever it holds; a state dict that another method's would
        hold too (it records no method) is refused with what it may be, and loads when this
        names it (a wrapper's VPT-shallow ``state_dict()`` needs ``"vpt"``, an official
        ``NUM_DEEP_LAYERS`` ablation ``"vpt_ablation"``).
    check_weights : bool
        Refuse a model whose frozen weights are not those the prompts were trained on (a few of
        their values are saved with the prompts, and an official checkpoint's backbone has its
        patch embedding compared; a model created without ``pretrained=True``, or with another
        pretrained tag, has the same shapes). False loads them anyway.
    **overrides
        How to run the model (``impl``, ``backend``) and what the method lets a loader change
        (VPT: ``dropout``, ``readout``).

    Returns
    -------
    PromptedViT

    Raises
    ------
    CheckpointError
        (a ValueError) If the checkpoint was made for another model shape, class count, method
        or backbone weights (the message names what differs), or the file is damaged, truncated
        or not a checkpoint.
    FileNotFoundError
        If the path holds no checkpoint.
    """
    where = "the given state dict" if isinstance(path, Mapping) else os.fspath(path)
    if isinstance(path, Mapping) or (os.path.isfile(path) and not _is_safetensors(path)):
        state, saved = _read_official(path, model, method, where)
    else:
        state, saved = _read_ours(path)
        where = saved.pop("_file", where)
        _check_classes(saved, model, where)
        _check_signature(saved["model"], model, where)
        if method is not None and saved["method"] != method:
            raise ValueError(
                f"load_prompts: {where} holds a {saved['method']!r} model, not {method!r}"
            )
    entry = _method(saved["method"], where)
    run = {"impl": saved.get("impl", "fused"), **overrides}
    try:
        prompted = entry.rebuild(model, saved["config"], run)
    except KeyError as e:
        raise CheckpointError(
            f"load_prompts: {where}: its {saved['method']!r} config lacks the key {e}; "
            "was it edited by hand?"
        ) from None
    except TypeError as e:
        raise CheckpointConfigError(f"load_prompts: {where}: {_bare(e)}") from None
    except ValueError as e:
        raise CheckpointError(f"load_prompts: {where}: {_bare(e)}") from None
    try:
        if check_weights:  # after the checks of the file and its config, which say more
            _check_weights(saved, model, where)
        _copy_into(prompted, state, where)
    except BaseException:
        prompted.unwrap()  # the user's model is theirs again, to retry with
        raise
    return prompted


def _bare(e: Exception) -> str:
    """A builder's message without its own ``load_prompts:`` prefix (the file goes first)."""
    return str(e).removeprefix("load_prompts: ")


def _method(name: Any, where: str):
    try:
        return registry.get(name)
    except ValueError as e:
        raise CheckpointError(f"load_prompts: {where}: {e}") from None


def _check_classes(saved: dict[str, Any], model: nn.Module, where: str) -> None:
    classes = saved.get("classes")
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classes is None or not isinstance(head, nn.Linear):
        return
    if len(classes) != head.out_features:
        shown = classes[:6] + (["..."] if len(classes) > 6 else [])
        raise CheckpointError(
            f"load_prompts: {where} was trained for {len(classes)} classes ({shown}), but the "
            f"model's head has {head.out_features}; build it with num_classes={len(classes)}"
        )


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The description saved with a :func:`save_prompts` checkpoint (method, config, model,
    ``classes`` when saved), read without building anything.

    Raises
    ------
    CheckpointError, FileNotFoundError
    """
    _, saved = _read_ours(path, tensors=False)
    saved.pop("_file", None)
    return saved


def _is_safetensors(path) -> bool:
    return os.fspath(path).endswith(".safetensors")


def _read_ours(path, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors (verified against their checksum) and the upgraded description; the
    description carries the file it came from under ``"_file"``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, _TENSORS)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"load_prompts: {path} holds no {_TENSORS}; is it a save_prompts folder?"
            )
    elif os.path.isfile(path):
        file = path
    else:
        raise FileNotFoundError(f"load_prompts: {path} does not exist")
    try:
        inspect_safetensors(file, "load_prompts: ")
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(file) if tensors else {}
    except FileDamaged as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # safetensors' own errors name no file
        raise CheckpointError(f"load_prompts: {file} cannot be read as safetensors ({e})") from None
    cfg = os.path.join(os.path.dirname(file), _CONFIG)
    if "config" in meta:
        try:
            saved = json.loads(meta["config"])
        except ValueError as e:
            raise CheckpointError(
                f"load_prompts: {file}: the config in its metadata is not JSON ({e})"
            ) from None
        _compare_copy(saved, cfg)
    else:
        # Format 1 kept the description in config.json only.
        if not os.path.isfile(cfg):
            raise CheckpointError(
                f"load_prompts: {file} carries no config and has no {_CONFIG} beside it; "
                "pass the folder written by save_prompts"
            )
        saved = _read_json(cfg)
    if tensors and _DIGEST in meta and tensor_digest(state) != meta[_DIGEST]:
        raise CheckpointError(
            f"load_prompts: {file} is damaged: its tensor data does not match the checksum "
            "stored when it was saved (a flipped bit on disk, or a bad copy)"
        )
    if not isinstance(saved, dict):
        raise CheckpointError(f"load_prompts: {file}: its config is not a JSON object")
    saved = _upgrade(saved, file)
    missing = [k for k in ("method", "config", "model") if k not in saved]
    if missing:
        raise CheckpointError(
            f"load_prompts: {file}: its config lacks {missing}; was it edited by hand?"
        )
    saved["_file"] = file
    return state, saved


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"load_prompts: {path} is not valid JSON ({e})") from None


def _compare_copy(saved: dict[str, Any], path: str) -> None:
    """``config.json`` is a copy for people; say so when it no longer matches what loads."""
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            copy = json.load(f)
    except (OSError, ValueError):
        copy = None
    if copy != saved:
        warn_at_caller(
            f"load_prompts: {path} does not match the config stored inside {_TENSORS}, which "
            f"is what loads; {_CONFIG} is only a readable copy (edits to it have no effect)",
            UserWarning,
        )


def _upgrade(saved: dict[str, Any], where: str) -> dict[str, Any]:
    """Format 1 (the method's config at the top level) as format 2 (``{"method", "config"}``):
    the method whose registry entry recognises the description takes it."""
    fmt = saved.get("format")
    if fmt == _FORMAT:
        return saved
    if fmt != _FORMAT_V1:
        raise CheckpointError(
            f"load_prompts: {where} has format {fmt!r}; this fastprompt reads {_FORMAT!r} and "
            f"{_FORMAT_V1!r}"
        )
    for name in registry.names():
        legacy = registry.get(name).legacy
        config = legacy(saved) if legacy is not None else None
        if config is not None:
            return {**saved, "format": _FORMAT, "method": name, "config": config}
    raise CheckpointError(
        f"load_prompts: {where}: its config lacks 'vpt' (format 1), and no method recognises it"
    )


def _check_signature(saved: dict, model: nn.Module, where: str) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"load_prompts: {where}: its 'model' entry is not a JSON object")
    have = adapter_for(model, "load_prompts").signature()
    # A key the checkpoint lacks was not recorded when it was saved (older fastprompt).
    diff = [
        f"{k}: checkpoint {saved[k]!r}, model {have[k]!r}"
        for k in have
        if k != "class" and k in saved and saved[k] != have[k]
    ]
    if diff:
        raise CheckpointError(
            f"load_prompts: {where} was saved from another model shape ({'; '.join(diff)})"
        )


def _check_weights(saved: dict[str, Any], model: nn.Module, where: str) -> None:
    recorded = saved.get("weights_probe")
    if not isinstance(recorded, dict):  # saved before probes were recorded
        return
    differs = mismatch(recorded, model)
    if differs:
        raise CheckpointError(
            f"load_prompts: {where} was trained on other backbone weights ({differs}): create "
            "the model as it was then (pretrained=True, the same pretrained tag or weights "
            "file), or pass check_weights=False to load the prompts anyway"
        )


def _read_official(
    path, model: nn.Module, method: str | None, where: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and description of a checkpoint of a method's official code: the methods whose
    registry entry reads official checkpoints (``method`` only, when given) try in turn."""
    readers = [n for n in registry.names() if registry.get(n).read_official is not None]
    if method is not None:
        if method not in readers:
            raise CheckpointError(
                f"load_prompts: {where} is a state dict of an official code base, which "
                f"{method!r} does not read (methods that do: {readers})"
            )
        readers = [method]
    raw = _state_dict(path)
    # The official VPT and E²VPT code's MODEL.MLP_NUM > 0 puts hidden layers (head.projection.*)
    # before head.last_layer: a timm classifier holds one linear layer, and loading the last
    # alone would drop the others.
    hidden = sorted(k for k in raw if k.startswith("head.projection.") or ".head.projection." in k)
    if hidden:
        raise CheckpointError(
            f"load_prompts: {where}: its head has hidden layers ({hidden[0]} and "
            f"{len(hidden) - 1} more tensors: the official MODEL.MLP_NUM > 0), which a timm "
            "classifier cannot hold; only checkpoints with a linear head (MLP_NUM = 0) load"
        )
    backbone = adapter_for(model, "load_prompts")
    errors, unnamed = [], []
    for name in readers:
        try:
            state, config = registry.get(name).read_official(raw, backbone)
        except registry.AmbiguousCheckpoint as e:
            # A reading another method's state dict shares: taken only when named.
            if method != name:
                unnamed.append(_bare(e))
                continue
            state, config = e.state, e.config
        except ValueError as e:
            errors.append(f"{name}: {_bare(e)}" if method is None else _bare(e))
            continue
        saved = {"method": name, "config": config, "impl": "fused"}
        return state, {**saved, "weights_probe": _official_backbone(raw, model)}
    if unnamed:
        raise CheckpointError(f"load_prompts: {where}: " + "; ".join(unnamed))
    what = "any method reads" if method is None else f"{method!r} reads"
    raise CheckpointError(
        f"load_prompts: {where} is not a checkpoint {what}: "
        + ("; ".join(errors) or "no method reads official checkpoints")
        + " (a fastprompt checkpoint is a folder or a .safetensors file)"
    )


# The official code saves its whole backbone with the prompts; its patch embedding (the first
# layer, under these names in the official ViT, Swin and MAE/MoCo backbones) is compared with the
# model's as a probe of ours is: prompts trained on other weights are meaningless here.
_PATCH_EMBEDDING = ("patch_embeddings.weight", "patch_embed.proj.weight")


def _official_backbone(raw: Mapping[str, Tensor], model: nn.Module) -> dict[str, Any]:
    """A weights probe of the official checkpoint's patch embedding, under the model's name for
    its own ({} where either has none of the same shape: nothing to compare)."""
    mine = [(n, p) for n, p in model.named_parameters() if n.endswith(_PATCH_EMBEDDING[1])]
    if len(mine) != 1:
        return {}
    name, weight = mine[0]
    for key, value in raw.items():
        if (
            key.endswith(_PATCH_EMBEDDING)
            and torch.is_tensor(value)
            and value.shape == weight.shape
        ):
            return record({name: value})
    return {}


def _state_dict(path) -> Mapping[str, Tensor]:
    """The state dict in ``path`` (a ``.pth`` file, possibly under a ``"model"`` key)."""
    if isinstance(path, Mapping):
        raw = path
    else:
        try:
            raw = load_torch(os.fspath(path), "load_prompts: ")
        except FileDamaged as e:
            raise CheckpointError(str(e)) from None
    if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"load_prompts: {path} holds a {type(raw).__name__}, not a state dict"
        )
    return raw


def _copy_into(prompted: nn.Module, state: dict[str, Tensor], where: str) -> None:
    own = prompted.prompt_state()
    missing = [n for n in own if n not in state]
    if missing:
        raise CheckpointError(f"load_prompts: {where} lacks {missing}")
    for name, tensor in state.items():
        if name not in own:
            raise CheckpointError(
                f"load_prompts: {where} holds {name!r}, which this model does not train"
            )
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"load_prompts: {name} has shape {tuple(tensor.shape)} in {where}, but this model "
                f"needs {tuple(own[name].shape)} (a checkpoint of another model?)"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
