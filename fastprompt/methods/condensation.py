"""Prompt Condensation (Kim et al.): score prompts, keep the top k %, fine-tune what is kept.

Algorithm 1 of the paper, with its Taylor score computed exactly and with scores that measure what
removing a prompt really does (``docs/design.md`` §3):

- ``taylor``: mean over samples of ``|p_i · ∂L_b/∂p_i|`` (the paper's Eq. 13-16). For a pre-LN
  block this is ``|δ_{b,i} · W_kv J_LN(p_i) p_i|`` with ``J_LN(p) p = γ ⊙ x̂ · ε / (var + ε)``, tiny
  at VPT's init because LayerNorm is scale-invariant;
- ``taylor_normed``: mean of ``|∂L_b/∂h_i · (h_i − β)|`` with ``h = LN1(p)``;
- ``gate``: mean of ``|Σ_{heads, queries} dS[:, i]|``, the first-order effect of removing the prompt
  from attention;
- ``cls_sim``: the paper's [CLS]-Sim baseline, the CLS query's attention to each prompt;
- ``random``; and ``leave_one_out``: the exact mean loss change when the prompt is removed (one
  forward per prompt: slow, the ground truth for judging the other scores on small models).

Gradient scores take one backward per batch: every block's prompt attention runs through
:meth:`PromptedViT.attention_override` as :func:`fastprompt.ops.scored_prompt_attention`, whose
backward hands the per-sample prompt K/V gradients' score terms to a sink, so no per-sample
gradient of a prompt is materialised and there is no loop over samples.

A condensed model is a VPT model with per-block prompt counts; which prompts it kept is
condensation's own state (:func:`kept_prompts`), saved with it as method
``"prompt_condensation"``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt import methods
from fastprompt.batches import BatchFn, batches, check_reiterable, head_classes
from fastprompt.methods import vpt as vpt_method
from fastprompt.models import vit
from fastprompt.models.vit import AttentionCall
from fastprompt.ops.gather import gather_prompts
from fastprompt.ops.scores import scored_prompt_attention
from fastprompt.prompted import PromptedViT, run_attention

__all__ = [
    "SCORES",
    "condense",
    "kept_prompts",
    "layer_summary",
    "prompt_condensation",
    "score_prompts",
    "select_prompts",
]

SCORES = ("taylor", "taylor_normed", "gate", "cls_sim", "random", "leave_one_out")
_GRADIENT = ("taylor", "taylor_normed", "gate")
METHOD = "prompt_condensation"


def _check_scorable(prompted: PromptedViT, who: str) -> None:
    if not isinstance(prompted, PromptedViT) or prompted.method not in ("vpt", METHOD):
        raise TypeError(
            f"{who}: expected a VPT model from fastprompt.vpt(), got "
            f"{getattr(prompted, 'method', type(prompted).__name__)!r}"
        )
    c = prompted.config
    if not c.deep or c.layer_counts is not None:
        raise ValueError(
            f"{who}: Prompt Condensation scores a VPT-deep model with the same number of "
            f"prompts per block (deep={c.deep}, layer_counts={c.layer_counts})"
        )
    if c.readout == "patches+prompts":
        raise ValueError(
            f"{who}: readout='patches+prompts' reads prompt outputs, so a prompt's effect is "
            "not only through attention; score with readout 'cls' or 'patches'"
        )


def _prompt_params(prompted: PromptedViT) -> list[Tensor]:
    src = prompted.source
    return [src.prompt_embeddings, src.deep_prompt_embeddings]


@contextlib.contextmanager
def _scoring(
    prompted: PromptedViT, attend: Callable[[AttentionCall], Tensor], needs_grad: bool
) -> Iterator[None]:
    """Eval mode (dropout off), ``attend`` on every block, prompts differentiable if needed."""
    training = prompted.training
    params = _prompt_params(prompted)
    flags = [p.requires_grad for p in params]
    prompted.eval()
    try:
        with prompted.attention_override(attend):
            if needs_grad:
                for p in params:
                    p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        prompted.train(training)


def _score_vectors(prompted: PromptedViT) -> list[tuple[Tensor, Tensor]]:
    """Per block, (u_k, u_v) of shape (2, 1, H, P, d): [taylor, taylor_normed] directions.

    ``u = J_kv(p) p`` (the paper's Taylor term as a dot with the K/V gradients) and
    ``u = J_kv(h) (h − β)``, by forward-mode AD, so qk-norm and projections are exact. They are
    computed in float64: ``J_LN(p) p`` is a difference of two terms that agree to a relative
    ε/(var + ε) (down to 1e-6 for trained prompts), which fp32 cannot resolve.
    """
    m, src = prompted.model, prompted.source
    proj = copy.deepcopy(src.prompt_proj).double()
    norm_pre = copy.deepcopy(m.norm_pre).double()
    vectors = []
    for i in range(len(m.blocks)):
        blk = copy.deepcopy(m.blocks[i]).double()
        raw = src.raw(i).detach().double()

        def kv_of_raw(r, i=i, blk=blk):
            tokens = vit.entering(norm_pre, i, proj(r).unsqueeze(0))
            return vit.kv_from_normed(blk, blk.norm1(tokens))

        with torch.no_grad():
            _, (tk, tv) = torch.func.jvp(kv_of_raw, (raw,), (raw,))
            h = blk.norm1(vit.entering(norm_pre, i, proj(raw).unsqueeze(0)))
            beta = getattr(blk.norm1, "bias", None)
            direction = h - beta if beta is not None else h
            _, (nk, nv) = torch.func.jvp(
                lambda x, blk=blk: vit.kv_from_normed(blk, x), (h,), (direction,)
            )
        acc = torch.promote_types(src.prompt_embeddings.dtype, torch.float32)
        vectors.append((torch.stack([tk, nk]).to(acc), torch.stack([tv, nv]).to(acc)))
    return vectors


def _progress(iterable: Iterable, show: bool, desc: str) -> Iterable:
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def score_prompts(
    prompted: PromptedViT,
    loader: Iterable,
    method: str = "taylor",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
    seed: int = 0,
    batch_fn: BatchFn | None = None,
) -> Tensor:
    """Score every prompt of every block of a VPT-deep model over a dataset.

    Parameters
    ----------
    prompted : PromptedViT
        VPT-deep, the same number of prompts per block, a model the fused path can run (the
        scores come from each block's prompt attention); scored in eval mode (dropout off),
        whether or not its prompts require gradients.
    loader : iterable of batches
        ``(images (B, C, H, W), labels (B,), ...)`` or dicts (:mod:`fastprompt.batches`).
    method : str
        One of ``SCORES``: ``"taylor"``, ``"taylor_normed"``, ``"gate"``, ``"cls_sim"``,
        ``"random"``, ``"leave_one_out"``.
    loss_fn : callable, optional
        Per-batch loss summed over samples, ``loss_fn(logits, labels)``; default cross-entropy
        with ``reduction="sum"`` (a sum, so each sample's gradient is its own).
    progress : bool
        Show a progress bar.
    seed : int
        For ``"random"``.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.

    Returns
    -------
    Tensor, shape (L, P), float32
        Higher means more important. Means over samples (``leave_one_out``: the mean loss
        increase when the prompt is removed, signed).

    Raises
    ------
    ValueError
        For an empty loader, or when a score is NaN (an overflowing loss or gradient).
    """
    who = "score_prompts"
    _check_scorable(prompted, who)
    if method not in SCORES:
        raise ValueError(f"{who}: method must be one of {SCORES}, got {method!r}")
    reasons = prompted.fused_unsupported_reasons()
    if reasons:
        raise TypeError(f"{who}: the scores need the fused path, which cannot run: {reasons}")
    depth, p = len(prompted.model.blocks), prompted.config.num_prompts
    if method == "random":
        return torch.rand(depth, p, generator=torch.Generator().manual_seed(seed))
    if method == "cls_sim" and prompted.model.cls_token is None:
        raise ValueError(f"{who}: 'cls_sim' needs a model with a class token")
    # The default loss takes class indices: check them as fit/evaluate do (a custom loss_fn
    # decides what its labels are).
    check = who if loss_fn is None else None
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.float(), y, reduction="sum"))
    device = prompted.source.prompt_embeddings.device
    labelled = batches(loader, device, batch_fn, head_classes(prompted), check)
    data = _progress(labelled, progress, f"scoring ({method})")
    if method == "leave_one_out":
        sums, count = _leave_one_out(prompted, data, loss_fn)
    elif method == "cls_sim":
        sums, count = _cls_sim(prompted, data)
    else:
        sums, count = _gradient_scores(prompted, data, loss_fn, method)
    if count == 0:
        raise ValueError(f"{who}: the loader yielded no samples; nothing to score")
    scores = (sums / count).float()
    bad = torch.isnan(scores)
    if bad.any():
        blocks = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"{who}: {int(bad.sum())} {method} scores are NaN (blocks {blocks}); the loss or its "
            "gradients overflowed. Check the model's outputs on this data."
        )
    if method in _GRADIENT and not scores.any():
        raise ValueError(
            f"{who}: every {method} score is zero (a loss that ignores every label, or prompts "
            "that are all zero); selecting from them would only follow the prompts' order"
        )
    return scores


def _gradient_scores(prompted, data, loss_fn, method) -> tuple[Tensor, int]:
    depth, p = len(prompted.model.blocks), prompted.config.num_prompts
    sums = torch.zeros(depth, p, dtype=torch.float64)
    vectors = _score_vectors(prompted)
    which = _GRADIENT.index(method)

    def attend(call: AttentionCall) -> Tensor:
        def sink(terms: Tensor, gate: Tensor) -> None:
            chosen = gate if method == "gate" else terms[which]
            sums[call.block] += chosen.abs().sum(0).double().cpu()

        uk, uv = (u.to(call.q.device) for u in vectors[call.block])
        out, _ = scored_prompt_attention(
            call.q,
            call.k,
            call.v,
            call.prompt_k,
            call.prompt_v,
            uk,
            uv,
            sink,
            call.prompt_index,
            call.scale,
            call.backend,
        )
        return out

    count = 0
    params = _prompt_params(prompted)
    with _scoring(prompted, attend, needs_grad=True):
        for x, y in data:
            loss = loss_fn(prompted(x), y)
            torch.autograd.grad(loss, params)
            count += x.shape[0]
    return sums, count


def _cls_sim(prompted, data) -> tuple[Tensor, int]:
    depth, p = len(prompted.model.blocks), prompted.config.num_prompts
    sums = torch.zeros(depth, p, dtype=torch.float64)

    def attend(call: AttentionCall) -> Tensor:
        out, lse = run_attention(call)
        cls_q = call.q[:, :, :1].float()
        scores = cls_q @ call.prompt_k.float().transpose(-1, -2) * call.scale
        probs = torch.exp(scores - lse[:, :, :1, None])
        sums[call.block] += probs[:, :, 0].mean(1).sum(0).double().cpu()
        return out

    count = 0
    with _scoring(prompted, attend, needs_grad=False), torch.no_grad():
        for x, _ in data:
            prompted(x)
            count += x.shape[0]
    return sums, count


def _leave_one_out(prompted, data, loss_fn) -> tuple[Tensor, int]:
    depth, p = len(prompted.model.blocks), prompted.config.num_prompts
    sums = torch.zeros(depth, p, dtype=torch.float64)
    removed: list[tuple[int, int]] = []

    def attend(call: AttentionCall) -> Tensor:
        if removed and removed[0][0] == call.block:
            keep = [j for j in range(call.prompt_k.shape[2]) if j != removed[0][1]]
            call = replace(
                call, prompt_k=call.prompt_k[:, :, keep], prompt_v=call.prompt_v[:, :, keep]
            )
        return run_attention(call)[0]

    count = 0
    with _scoring(prompted, attend, needs_grad=False), torch.no_grad():
        for x, y in data:
            base = float(loss_fn(prompted(x), y))
            for layer in range(depth):
                for j in range(p):
                    removed[:] = [(layer, j)]
                    sums[layer, j] += float(loss_fn(prompted(x), y)) - base
                    removed.clear()
            count += x.shape[0]
    return sums, count


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
            warnings.warn(
                "select_prompts: keep=1 is a count (one prompt); pass keep=1.0 to keep them all",
                UserWarning,
                stacklevel=2,
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


def condense(prompted: PromptedViT, keep: Tensor) -> PromptedViT:
    """A VPT model with only the kept prompts, packed per block (no padding).

    Parameters
    ----------
    prompted : PromptedViT
        VPT-deep with P prompts per block.
    keep : Tensor of bool, shape (L, P)
        From :func:`select_prompts`.

    Returns
    -------
    PromptedViT
        Method ``"prompt_condensation"``, prompt dropout off. It shares the timm backbone and
        head with ``prompted`` (fine-tuning updates that shared head; unwrapping either unwraps
        both); its prompts are new parameters holding the kept rows, so gradients reach only
        them. It runs the same fused path as a model built with these counts from scratch.
    """
    _check_scorable(prompted, "condense")
    depth, p = len(prompted.model.blocks), prompted.config.num_prompts
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (depth, p):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep)
        raise ValueError(f"condense: keep must be a bool tensor of shape ({depth}, {p}), got {got}")
    counts = tuple(int(n) for n in keep.sum(1).tolist())
    config = replace(prompted.config, dropout=0.0, layer_counts=counts)
    condensed = _build(
        prompted.model,
        config,
        keep.cpu(),
        share_with=prompted,
        impl=prompted.impl,
        backend=prompted.backend,
    )
    src, dst = prompted.source, condensed.source
    with torch.no_grad():
        table = torch.cat([src.prompt_embeddings, src.deep_prompt_embeddings], 0)
        packed, _ = gather_prompts(table, keep.to(table.device))
        dst.prompt_embeddings.copy_(packed[: counts[0]].unsqueeze(0))
        dst.deep_prompt_embeddings.copy_(packed[counts[0] :])
        dst.prompt_proj.load_state_dict(src.prompt_proj.state_dict())
    return condensed


def _build(model, config, kept: Tensor, **kw) -> PromptedViT:
    condensed = vpt_method.build(model, config, head_init="keep", method=METHOD, **kw)
    condensed.method_state["kept"] = kept
    return condensed


def layer_summary(keep: Tensor) -> str:
    """One line per block: prompts kept of how many."""
    p = keep.shape[1]
    lines = [f"block {i:2d}: {int(n):4d} / {p} kept" for i, n in enumerate(keep.sum(1).tolist())]
    total = int(keep.sum())
    lines.append(
        f"total   : {total:4d} / {keep.numel()} ({100.0 * total / max(keep.numel(), 1):.1f} %)"
    )
    return "\n".join(lines)


def prompt_condensation(
    prompted: PromptedViT,
    train_loader: Iterable,
    keep: float | int = 0.3,
    score: str = "taylor",
    scope: str = "global",
    epochs: int = 20,
    lr: float | None = None,
    finetune_kwargs: dict | None = None,
    progress: bool = True,
    verbose: bool = True,
    batch_fn: BatchFn | None = None,
) -> PromptedViT:
    """Algorithm 1: score, keep the top ``keep``, fine-tune only the kept prompts and the head.

    Parameters
    ----------
    prompted : PromptedViT
        A trained VPT-deep model.
    train_loader : iterable of batches
    keep : float or int
        Ratio or count, as :func:`select_prompts`.
    score : str
        One of ``SCORES``; ``"taylor"`` is the paper's.
    scope : {"global", "local"}
        The paper's method is global.
    epochs : int
        Fine-tuning epochs (the paper: 20), prompt dropout off.
    lr : float, optional
        Fine-tuning learning rate; default that of :func:`fastprompt.train.finetune`.
    finetune_kwargs : dict, optional
        More arguments for :func:`fastprompt.train.finetune`.
    progress, verbose : bool
        Progress bars; print the per-block summary of kept prompts.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (images, labels)`` for other batch formats.

    Returns
    -------
    PromptedViT
        The condensed, fine-tuned model.
    """
    from fastprompt.train import finetune

    # Scoring is one pass, fine-tuning `epochs` more: a generator would be empty by then.
    check_reiterable(train_loader, 1 + epochs, "prompt_condensation")
    scores = score_prompts(
        prompted, train_loader, method=score, progress=progress, batch_fn=batch_fn
    )
    mask = select_prompts(scores, keep, scope)
    if verbose:
        print(f"Prompt Condensation ({score}, {scope}):\n{layer_summary(mask)}")
    condensed = condense(prompted, mask)
    kwargs = dict(finetune_kwargs or {})
    if lr is not None:
        kwargs["lr"] = lr
    if epochs > 0:
        finetune(
            condensed, train_loader, epochs=epochs, progress=progress, batch_fn=batch_fn, **kwargs
        )
    return condensed


# -- checkpoints ------------------------------------------------------------------------------


def _describe(prompted: PromptedViT) -> dict[str, Any]:
    kept = prompted.method_state["kept"]
    return {
        "vpt": asdict(prompted.config),
        "kept": [row.nonzero().flatten().tolist() for row in kept],
        "num_prompts_before": int(kept.shape[1]),
    }


def _rebuild(model, saved: Mapping[str, Any], overrides: Mapping[str, Any]) -> PromptedViT:
    config, run = vpt_method.split_overrides(vpt_method.config_from_json(saved["vpt"]), overrides)
    rows = saved["kept"]
    width = int(saved.get("num_prompts_before", config.num_prompts))
    _check_kept(rows, width, config.layer_counts)
    kept = torch.zeros(len(rows), width, dtype=torch.bool)
    for layer, idx in enumerate(rows):
        kept[layer, idx] = True
    return _build(model, config, kept, **run)


def _check_kept(rows: Any, width: int, counts: tuple[int, ...] | None) -> None:
    """A saved kept list must agree with the per-block counts the prompts are built with."""
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
    if counts is None or tuple(counts) != have:
        raise ValueError(
            f"the kept list keeps {list(have)} prompts per block, but the config's layer_counts "
            f"are {None if counts is None else list(counts)}; the checkpoint is inconsistent"
        )


methods.register(methods.Method(name=METHOD, describe=_describe, rebuild=_rebuild))
