"""VPT (Jia et al., ECCV 2022; official code KMnP/vpt): :func:`vpt` and its checkpoint entry.

The model is the prompted core (:class:`fastprompt.prompted.PromptedViT`) with VPT's learned
prompt sets (:class:`fastprompt.sources.learned.LearnedPrompts`): prompts after the class (and
register) tokens, shallow or deep, the official init, projection and per-image dropout, the
official head init. ``impl="naive"`` is the official computation; ``impl="fused"`` (default) gives
the same logits and gradients while computing only what VPT-deep needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from typing import Any

from torch import nn

from fastprompt import methods
from fastprompt.models import vit
from fastprompt.prompted import PromptedViT
from fastprompt.sources.learned import READOUTS, LearnedPrompts, VPTConfig

__all__ = ["READOUTS", "VPTConfig", "build", "vpt"]

HEAD_INITS = ("vpt", "keep")


def build(
    model: nn.Module,
    config: VPTConfig,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
    method: str = "vpt",
    share_with: PromptedViT | None = None,
) -> PromptedViT:
    """A VPT model from a full :class:`VPTConfig` (what :func:`vpt` and checkpoints call)."""
    if head_init not in HEAD_INITS:
        raise ValueError(
            f"fastprompt.vpt: head_init must be one of {HEAD_INITS}, got {head_init!r}"
        )
    if isinstance(model, PromptedViT):
        raise TypeError("fastprompt.vpt: this model is already prompted; call .unwrap() first")
    vit.check_wrappable(model, "fastprompt.vpt")
    ref = next(model.parameters())
    source = LearnedPrompts(
        config,
        model.embed_dim,
        len(model.blocks),
        vit.patch_size(model),
        device=ref.device,
        dtype=ref.dtype,
    )
    prompted = PromptedViT(
        model,
        source,
        readout=config.readout,
        impl=impl,
        backend=backend,
        method=method,
        share_with=share_with,
    )
    if head_init == "vpt":
        vit.init_head_vpt(model)
    return prompted


def vpt(
    model: nn.Module,
    num_prompts: int,
    deep: bool = True,
    dropout: float = 0.0,
    project: int = -1,
    readout: str | None = None,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
) -> PromptedViT:
    """Wrap a timm VisionTransformer with VPT prompts (official VPT semantics).

    Parameters
    ----------
    model : timm VisionTransformer
        Any ViT/DeiT-family model (class token or not, register tokens, ``no_embed_class``, token
        or avg pooling, ``fc_norm``, layer scale, qk-norm). Frozen and kept in eval mode. A model
        that another live wrapper holds is refused.
    num_prompts : int
        Prompts per set, ≥ 0.
    deep : bool
        One prompt set per block (VPT-deep) rather than one before block 0 (shallow).
    dropout : float
        Prompt dropout in [0, 1), per image (the official deep demo uses 0.1).
    project : int
        -1 for no prompt projection, else the prompt width projected to the model width.
    readout : {"cls", "patches", "patches+prompts"}, optional
        Default: ``"cls"`` for ``global_pool="token"``, ``"patches+prompts"`` (the official
        avg-pool path) for ``"avg"``.
    impl : {"fused", "naive"}
        ``"naive"`` is the official computation, for comparison; same logits.
    backend : str, optional
        Prompt-attention backend (one of :data:`fastprompt.backends.NAMES`); default the best
        that fits.
    head_init : {"vpt", "keep"}
        Re-initialise the head as the official VPT code (kaiming-normal fan-out weight, bias
        −log(99) ≈ −4.595), or keep it.

    Returns
    -------
    PromptedViT
        Shares the model's parameters and state-dict names; ``prompted.method == "vpt"``.
    """
    if readout is None:
        readout = vit.default_readout(model)
    return build(
        model,
        VPTConfig(num_prompts, deep, dropout, project, readout),
        impl=impl,
        backend=backend,
        head_init=head_init,
    )


# -- checkpoints ------------------------------------------------------------------------------

# What a user may change when loading a VPT checkpoint: how it runs, not what was trained.
RUN_OPTIONS = ("impl", "backend")
CONFIG_OVERRIDES = ("dropout", "readout")


def config_from_json(saved: Mapping[str, Any]) -> VPTConfig:
    """A :class:`VPTConfig` from its JSON form (lists back to tuples)."""
    known = {f.name for f in fields(VPTConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"load_prompts: unknown VPT config fields {unknown}")
    cfg = dict(saved)
    if cfg.get("layer_counts") is not None:
        cfg["layer_counts"] = tuple(cfg["layer_counts"])
    return VPTConfig(**cfg)


def split_overrides(
    config: VPTConfig, overrides: Mapping[str, Any]
) -> tuple[VPTConfig, dict[str, Any]]:
    """Apply config overrides; return the config and the run options (impl, backend)."""
    run: dict[str, Any] = {}
    changes = {}
    for key, value in overrides.items():
        if key in RUN_OPTIONS:
            run[key] = value
        elif key in CONFIG_OVERRIDES:
            changes[key] = value
        else:
            raise TypeError(
                f"load_prompts: {key!r} cannot be overridden (allowed: "
                f"{RUN_OPTIONS + CONFIG_OVERRIDES})"
            )
    return replace(config, **changes), run


def _rebuild(model: nn.Module, saved: Mapping[str, Any], overrides: Mapping[str, Any]):
    config, run = split_overrides(config_from_json(saved), overrides)
    return build(model, config, head_init="keep", **run)


methods.register(
    methods.Method(
        name="vpt",
        describe=lambda prompted: asdict(prompted.config),
        rebuild=_rebuild,
    )
)
