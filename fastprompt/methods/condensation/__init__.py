"""Prompt Condensation (Kim et al.): score prompts, keep the top k %, fine-tune what is kept.

Algorithm 1 of the paper, with its Taylor score computed exactly and with scores that measure what
removing a prompt really does (``docs/design.md`` §3; :mod:`.scores`):

- ``taylor``: mean over samples of ``|p_i · ∂L_b/∂p_i|`` (the paper's Eq. 13-16). For a pre-LN
  block this is ``|δ_{b,i} · W_kv J_LN(p_i) p_i|`` with ``J_LN(p) p = γ ⊙ x̂ · ε / (var + ε)``, tiny
  at VPT's init because LayerNorm is scale-invariant;
- ``taylor_normed``: mean of ``|∂L_b/∂h_i · (h_i − β)|`` with ``h = LN1(p)``;
- ``gate``: mean of ``|Σ_{heads, queries} dS[:, i]|``, the first-order effect of removing the prompt
  from attention;
- ``cls_sim``: the paper's [CLS]-Sim baseline, the CLS query's attention to each prompt;
- ``random``; and ``leave_one_out``: the exact mean loss change when the prompt is removed (one
  forward per prompt: slow, the ground truth for judging the other scores on small models).

A condensed model is a model of its base method (VPT) with per-block prompt counts, built by the
base method's registry entry (:class:`fastprompt.registry.Condensation`); which prompts it kept
is condensation's own state (:func:`kept_prompts`), saved with it as method
``"prompt_condensation"``. The driver that scores, condenses and fine-tunes,
:func:`fastprompt.train.prompt_condensation`, is in the training layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastprompt._warnings import warn_at_caller
from fastprompt.methods.condensation.scores import SCORES, check_scorable, score_prompts
from fastprompt.ops.gather import gather_prompts
from fastprompt.prompted import PromptedViT
from fastprompt.registry import get, names, register_peft_method

__all__ = [
    "METHOD",
    "SCORES",
    "condense",
    "kept_prompts",
    "layer_summary",
    "score_prompts",
    "select_prompts",
]

METHOD = "prompt_condensation"


def select_prompts(scores: Tensor, keep: float | int, scope: str = "global") -> Tensor:
    """Which prompts to keep: top ``keep`` across all blocks (global) or within each (local).

    Parameters
    ----------
    scores : Tensor, shape (L, P)
        Higher is more important; NaN is refused.
    keep : float or int
        A float is a ratio in [0, 1] of the prompts (rounded to the nearest count); an int is a
        count: of all L·P prompts for ``"global"``, per block for ``"local"``. ``keep=1`` (an int)
        keeps one prompt; pass ``1.0`` to keep them all.
    scope : {"global", "local"}

    Returns
    -------
    Tensor of bool, shape (L, P)
        Ties break towards the earlier block, then the lower index (deterministic). A block may
        keep no prompt under ``"global"``.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"select_prompts: scores must be an (L, P) tensor, got {got}")
    if torch.isnan(scores).any():
        raise ValueError(
            f"select_prompts: {int(torch.isnan(scores).sum())} scores are NaN; a NaN score "
            "cannot be ranked"
        )
    if scope not in ("global", "local"):
        raise ValueError(f"select_prompts: scope must be 'global' or 'local', got {scope!r}")
    depth, p = scores.shape
    pool = depth * p if scope == "global" else p
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"select_prompts: keep must be a ratio (float) or a count (int), got "
            f"{type(keep).__name__}"
        )
    if isinstance(keep, float):
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"select_prompts: a keep ratio must be in [0, 1], got {keep}")
        count = round(keep * pool)
    else:
        if not 0 <= keep <= pool:
            raise ValueError(f"select_prompts: keep count must be in [0, {pool}], got {keep}")
        if keep == 1 and pool > 1:
            warn_at_caller(
                "select_prompts: keep=1 is a count (one prompt); pass keep=1.0 to keep them all"
            )
        count = keep
    s = scores.detach().float().cpu()
    mask = torch.zeros(depth, p, dtype=torch.bool)
    if scope == "global":
        order = torch.sort(-s.flatten(), stable=True).indices[:count]
        mask.view(-1)[order] = True
    else:
        order = torch.sort(-s, dim=1, stable=True).indices[:, :count]
        mask.scatter_(1, order, True)
    return mask


def kept_prompts(prompted: PromptedViT) -> Tensor | None:
    """(L, P) bool mask of the prompts a condensed model kept from its source model, or None."""
    return prompted.method_state.get("kept") if prompted.method == METHOD else None


def _condensable() -> tuple[str, ...]:
    return tuple(n for n in names() if get(n).condensation is not None)


def condense(prompted: PromptedViT, keep: Tensor) -> PromptedViT:
    """A model with only the kept prompts, packed per block (no padding).

    Parameters
    ----------
    prompted : PromptedViT
        VPT-deep with P prompts per block (a method whose registry entry says how to pack it).
    keep : Tensor of bool, shape (L, P)
        From :func:`select_prompts`.

    Returns
    -------
    PromptedViT
        Method ``"prompt_condensation"``, prompt dropout off. It shares the backbone and head
        with ``prompted`` (fine-tuning updates that shared head; unwrapping either unwraps both);
        its prompts are new parameters holding the kept rows, so gradients reach only them. It
        runs the same fused path as a model built with these counts from scratch.
    """
    check_scorable(prompted, "condense", per_sample=False)  # a given mask needs no scores
    support = get(prompted.method).condensation
    if support is None:
        raise TypeError(
            f"condense: {prompted.method!r} models cannot be condensed (methods that can: "
            f"{_condensable()})"
        )
    src = prompted.source
    depth, p = prompted.depth, src.count(0)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (depth, p):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep)
        raise ValueError(f"condense: keep must be a bool tensor of shape ({depth}, {p}), got {got}")
    counts = tuple(int(n) for n in keep.sum(1).tolist())
    condensed = support.pack(prompted, counts)
    _mark(condensed, prompted.method, keep.cpu())
    dst = condensed.source
    # Blocks of one width are gathered together (all of them on a ViT; a stage's on Swin).
    widths: dict[int, list[int]] = {}
    for i in range(depth):
        widths.setdefault(src.raw(i).shape[-1], []).append(i)
    with torch.no_grad():
        for blocks in widths.values():
            table = torch.stack([src.raw(i) for i in blocks])
            packed, _ = gather_prompts(table, keep[blocks].to(table.device))
            for i, rows in zip(blocks, packed.split([counts[i] for i in blocks])):
                dst.raw(i).copy_(rows)
        dst.projection().load_state_dict(src.projection().state_dict())
    return condensed


def _mark(condensed: PromptedViT, base: str, kept: Tensor) -> None:
    condensed.method = METHOD
    condensed.method_state.update(base=base, kept=kept)


def layer_summary(keep: Tensor) -> str:
    """One line per block: prompts kept of how many."""
    p = keep.shape[1]
    lines = [f"block {i:2d}: {int(n):4d} / {p} kept" for i, n in enumerate(keep.sum(1).tolist())]
    total = int(keep.sum())
    lines.append(
        f"total   : {total:4d} / {keep.numel()} ({100.0 * total / max(keep.numel(), 1):.1f} %)"
    )
    return "\n".join(lines)


# -- checkpoints and the registry entry -------------------------------------------------------


def _describe(prompted: PromptedViT) -> dict[str, Any]:
    kept, base = prompted.method_state["kept"], prompted.method_state["base"]
    return {
        "base": base,
        "config": get(base).describe(prompted),
        "kept": [row.nonzero().flatten().tolist() for row in kept],
        "num_prompts_before": int(kept.shape[1]),
    }


def _rebuild(model, saved: Mapping[str, Any], overrides: Mapping[str, Any]) -> PromptedViT:
    if "base" in saved:
        base, config = saved["base"], saved["config"]
        width = int(saved["num_prompts_before"])
    else:  # before the registry named the base method, condensation condensed VPT only
        base, config = "vpt", saved["vpt"]
        width = int(saved.get("num_prompts_before", config["num_prompts"]))
    prompted = get(base).rebuild(model, config, overrides)
    rows = saved["kept"]
    _check_kept(rows, width, _block_counts(prompted))
    kept = torch.zeros(len(rows), width, dtype=torch.bool)
    for layer, idx in enumerate(rows):
        kept[layer, idx] = True
    _mark(prompted, base, kept)
    return prompted


def _block_counts(prompted: PromptedViT) -> tuple[int, ...]:
    return tuple(int(prompted.source.count(i)) for i in range(prompted.depth))


def _check_kept(rows: Any, width: int, counts: tuple[int, ...]) -> None:
    """A saved kept list must agree with the per-block counts the prompts were rebuilt with."""
    ok_rows = isinstance(rows, list) and all(
        isinstance(r, list)
        and all(isinstance(i, int) and 0 <= i < width for i in r)
        and len(set(r)) == len(r)
        for r in rows
    )
    if not ok_rows:
        raise ValueError(
            f"the kept list must hold, per block, distinct prompt indices in [0, {width}); got "
            f"{str(rows)[:80]}"
        )
    have = tuple(len(r) for r in rows)
    if have != counts:
        raise ValueError(
            f"the kept list keeps {list(have)} prompts per block, but the config builds "
            f"{list(counts)}; the checkpoint is inconsistent"
        )


def _legacy(saved: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Format 1 kept a condensed model's VPT config under ``"vpt"`` beside ``"kept"``."""
    return {"vpt": saved["vpt"], "kept": saved["kept"]} if "kept" in saved else None


# Not built from a fresh backbone (it condenses a trained model: fastprompt.condense, fastprompt
# condense RUN); its models carry their base method's config.
register_peft_method(
    name=METHOD,
    config_cls=None,
    build=None,
    describe=_describe,
    rebuild=_rebuild,
    legacy=_legacy,
)
