"""The model of a run: the timm backbone (pretrained, random or ``--weights``) and the method
built on it from the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastprompt import registry
from fastprompt.tensorfiles import FileDamaged, read_tensors
from fastprompt.train.folder import ModelSpec, RunError

__all__ = ["build_prompted", "create_backbone"]


def create_backbone(spec: ModelSpec, num_classes: int, seed: int = 0) -> nn.Module:
    """The timm backbone with a ``num_classes`` head (random-init parts seeded by ``seed``).

    Raises
    ------
    RunError
        ``--model-args`` timm refuses, ``--weights`` that is not a state dict of this model,
        pretrained weights timm cannot get (no connection and not cached).
    """
    import timm

    torch.manual_seed(seed)
    kw = dict(spec.args)
    pretrained = spec.pretrained and spec.weights is None
    try:
        model = timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, **kw)
    except (TypeError, ValueError) as e:
        raise RunError(f"timm.create_model({spec.name!r}, {_kwargs(kw)}) failed: {e}") from None
    except OSError as e:  # huggingface_hub's and urllib's download errors are OSErrors
        if not pretrained:
            raise
        reason = (str(e).strip().splitlines() or [""])[0]
        raise RunError(
            f"timm could not get the pretrained weights of {spec.name} ({type(e).__name__}: "
            f"{reason}); download them once where the internet is reachable (timm caches them, "
            "see HF_HOME; HF_HUB_OFFLINE=1 then reads the cache), give them with --weights FILE, "
            "or train a random-init backbone with --no-pretrained"
        ) from None
    if spec.weights is not None:
        _load_weights(model, spec)
    return model


def _kwargs(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


def _load_weights(model: nn.Module, spec: ModelSpec) -> None:
    """``--weights`` into ``model``; the head is kept when its shape differs (another class
    count), anything else that does not fit is an error naming it."""
    try:
        state = read_tensors(spec.weights, "--weights ")
    except FileDamaged as e:
        raise RunError(str(e)) from None
    own = model.state_dict()
    head = {n for n in own if n.startswith(model.default_cfg.get("classifier", "head") + ".")}
    for n in [n for n in head if n in state and state[n].shape != own[n].shape]:
        del state[n]
    shapes = [
        f"{n}: file {tuple(state[n].shape)}, model {tuple(own[n].shape)}"
        for n in state
        if n in own and state[n].shape != own[n].shape
    ]
    missing = [n for n in own if n not in state and n not in head]
    unexpected = [n for n in state if n not in own]
    if shapes or missing or unexpected:
        what = f"{spec.name}" + (f" ({_kwargs(spec.args)})" if spec.args else "")
        parts = [f"{len(shapes)} shapes differ ({'; '.join(shapes[:3])})"] if shapes else []
        parts += [f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}"] if missing else []
        more = "..." if len(unexpected) > 4 else ""
        parts += [f"unexpected {unexpected[:4]}{more}"] if unexpected else []
        raise RunError(
            f"--weights {spec.weights} is not a state dict of {what}: {', '.join(parts)}; pass "
            "the weights of this model (or the --model and --model-args they were saved from)"
        )
    model.load_state_dict(state, strict=False)


def build_prompted(backbone: nn.Module, method: str, args: dict[str, Any]) -> nn.Module:
    """Wrap ``backbone`` with ``method``'s registered build function (``fastprompt.vpt``, ...)."""
    build = registry.get(method).build if method in registry.trainable() else None
    if build is None:
        raise RunError(
            f"method {method!r} is not available in this fastprompt (known: "
            f"{list(registry.trainable())})"
        )
    try:
        return build(backbone, **args)
    except (TypeError, ValueError) as e:
        raise RunError(str(e)) from None
