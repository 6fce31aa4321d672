"""Prompt Condensation (Kim et al.): score prompts, keep the top k %, fine-tune what is kept.

Algorithm 1 of the paper, with its Taylor score computed exactly and with scores that measure what
removing a prompt really does (DESIGN.md, "the two facts"):

- ``taylor``: mean over samples of ``|p_i · ∂L_b/∂p_i|`` (the paper's Eq. 13-16). For a pre-LN
  block this is ``|δ_{b,i} · W_kv J_LN(p_i) p_i|`` with ``J_LN(p) p = γ ⊙ x̂ · ε / (var + ε)``, tiny
  at VPT's init because LayerNorm is scale-invariant;
- ``taylor_normed``: mean of ``|∂L_b/∂h_i · (h_i − β)|`` with ``h = LN1(p)``;
- ``gate``: mean of ``|Σ_{heads, queries} dS[:, i]|``, the first-order effect of removing the prompt
  from attention;
- ``cls_sim``: the paper's [CLS]-Sim baseline, the CLS query's attention to each prompt;
- ``random``; and ``leave_one_out``: the exact mean loss change when the prompt is removed (one
  forward per prompt: slow, the ground truth for judging the other scores on small models).

Gradient scores take one backward per batch: the prompt-attention backward hands its per-sample
prompt K/V gradients to :func:`fastprompt.ops.prompt_scores`, so no per-sample gradient of a prompt
is materialised and there is no loop over samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.ops.gather_prompts import gather_prompts
from fastprompt.ops.prompt_attention import prompt_attention
from fastprompt.ops.prompt_scores import scored_prompt_attention
from fastprompt.vpt import PromptedViT, kv_from_normed

__all__ = [
    "SCORES",
    "condense",
    "prompt_condensation",
    "score_prompts",
    "select_prompts",
]

SCORES = ("taylor", "taylor_normed", "gate", "cls_sim", "random", "leave_one_out")
_GRADIENT = ("taylor", "taylor_normed", "gate")


def _check_scorable(prompted: PromptedViT) -> None:
    if not isinstance(prompted, PromptedViT):
        raise TypeError(
            f"fastprompt: expected a model from fastprompt.vpt(), got {type(prompted).__name__}"
        )
    c = prompted.config
    if not c.deep or c.layer_counts is not None:
        raise ValueError(
            "fastprompt: Prompt Condensation scores a VPT-deep model with the same number of "
            f"prompts per block (deep={c.deep}, layer_counts={c.layer_counts})"
        )
    if c.readout == "patches+prompts":
        raise ValueError(
            "fastprompt: readout='patches+prompts' reads prompt outputs, so a prompt's effect is "
            "not only through attention; score with readout 'cls' or 'patches'"
        )


@contextlib.contextmanager
def _scoring_mode(prompted: PromptedViT, hook: Callable[..., Tensor]) -> Iterator[None]:
    """Eval mode (dropout off), the fused path, and ``hook`` on every block's attention."""
    training, impl = prompted.training, prompted.impl
    prompted.eval()
    prompted.impl = "fused"
    prompted.attention_hook = hook
    try:
        yield
    finally:
        prompted.attention_hook = None
        prompted.impl = impl
        prompted.train(training)


def _raw_prompts(prompted: PromptedViT, block: int) -> Tensor:
    return (
        prompted.prompt_embeddings[0] if block == 0 else prompted.deep_prompt_embeddings[block - 1]
    )


def _prompt_tokens(prompted: PromptedViT, block: int, raw: Tensor) -> Tensor:
    """What block ``block`` receives from raw prompt parameters (P, Dp): (1, P, D)."""
    tokens = prompted.prompt_proj(raw).unsqueeze(0)
    return prompted.model.norm_pre(tokens) if block == 0 else tokens


def _score_vectors(prompted: PromptedViT) -> list[tuple[Tensor, Tensor]]:
    """Per block, (u_k, u_v) of shape (2, 1, H, P, d): [taylor, taylor_normed] directions.

    ``u = J_kv(p) p`` (the paper's Taylor term as a dot with the K/V gradients) and
    ``u = J_kv(h) (h − β)``, both by forward-mode AD, so qk-norm and projections are exact.
    """
    vectors = []
    for i, blk in enumerate(prompted.model.blocks):
        raw = _raw_prompts(prompted, i).detach()

        def kv_of_raw(r, i=i, blk=blk):
            return kv_from_normed(blk, blk.norm1(_prompt_tokens(prompted, i, r)))

        with torch.no_grad():
            _, (tk, tv) = torch.func.jvp(kv_of_raw, (raw,), (raw,))
            h = blk.norm1(_prompt_tokens(prompted, i, raw))
            beta = getattr(blk.norm1, "bias", None)
            direction = h - beta if beta is not None else h
            _, (nk, nv) = torch.func.jvp(
                lambda x, blk=blk: kv_from_normed(blk, x), (h,), (direction,)
            )
        acc = torch.promote_types(tk.dtype, torch.float32)
        vectors.append((torch.stack([tk, nk]).to(acc), torch.stack([tv, nv]).to(acc)))
    return vectors


def _batches(loader: Iterable, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        x, y = batch[0], batch[1]
        yield x.to(device), y.to(device)


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
) -> Tensor:
    """Score every prompt of every block of a VPT-deep model over a dataset.

    Parameters
    ----------
    prompted : PromptedViT
        VPT-deep, the same number of prompts per block; scored in eval mode (dropout off).
    loader : iterable of (images, labels)
        Images (B, C, H, W), labels (B,); e.g. a DataLoader.
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

    Returns
    -------
    Tensor, shape (L, P), float32
        Higher means more important. Means over samples (``leave_one_out``: the mean loss
        increase when the prompt is removed, signed).
    """
    _check_scorable(prompted)
    if method not in SCORES:
        raise ValueError(f"score_prompts: method must be one of {SCORES}, got {method!r}")
    depth, p = len(prompted.model.blocks), prompted.num_prompts
    if method == "random":
        return torch.rand(depth, p, generator=torch.Generator().manual_seed(seed))
    if method == "cls_sim" and prompted.model.cls_token is None:
        raise ValueError("score_prompts: 'cls_sim' needs a model with a class token")
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.float(), y, reduction="sum"))
    device = prompted.prompt_embeddings.device
    batches = _progress(_batches(loader, device), progress, f"scoring ({method})")
    if method == "leave_one_out":
        return _leave_one_out(prompted, batches, loss_fn)
    if method == "cls_sim":
        return _cls_sim(prompted, batches)
    return _gradient_scores(prompted, batches, loss_fn, method)


def _gradient_scores(prompted, batches, loss_fn, method) -> Tensor:
    depth, p = len(prompted.model.blocks), prompted.num_prompts
    sums = torch.zeros(depth, p, dtype=torch.float64)
    vectors = _score_vectors(prompted)
    which = _GRADIENT.index(method)

    def hook(i, q, k, v, pk, pv, index, scale, backend):
        def sink(terms: Tensor, gate: Tensor) -> None:
            chosen = gate if method == "gate" else terms[which]
            sums[i] += chosen.abs().sum(0).double().cpu()

        uk, uv = vectors[i]
        out, _ = scored_prompt_attention(
            q, k, v, pk, pv, uk.to(q.device), uv.to(q.device), sink, index, scale, backend
        )
        return out

    params = [prompted.prompt_embeddings, prompted.deep_prompt_embeddings]
    count = 0
    with _scoring_mode(prompted, hook):
        for x, y in batches:
            loss = loss_fn(prompted(x), y)
            torch.autograd.grad(loss, params)
            count += x.shape[0]
    return (sums / max(count, 1)).float()


def _cls_sim(prompted, batches) -> Tensor:
    depth, p = len(prompted.model.blocks), prompted.num_prompts
    sums = torch.zeros(depth, p, dtype=torch.float64)

    def hook(i, q, k, v, pk, pv, index, scale, backend):
        out, lse = prompt_attention(q, k, v, pk, pv, index, scale=scale, backend=backend)
        cls_q = q[:, :, :1].float()
        probs = torch.exp(cls_q @ pk.float().transpose(-1, -2) * scale - lse[:, :, :1, None])
        sums[i] += probs[:, :, 0].mean(1).sum(0).double().cpu()
        return out

    count = 0
    with _scoring_mode(prompted, hook), torch.no_grad():
        for x, _ in batches:
            prompted(x)
            count += x.shape[0]
    return (sums / max(count, 1)).float()


def _leave_one_out(prompted, batches, loss_fn) -> Tensor:
    depth, p = len(prompted.model.blocks), prompted.num_prompts
    sums = torch.zeros(depth, p, dtype=torch.float64)
    removed: list[tuple[int, int]] = []

    def hook(i, q, k, v, pk, pv, index, scale, backend):
        if removed and removed[0][0] == i:
            keep = [j for j in range(pk.shape[2]) if j != removed[0][1]]
            pk, pv = pk[:, :, keep], pv[:, :, keep]
        return prompt_attention(q, k, v, pk, pv, index, scale=scale, backend=backend)[0]

    count = 0
    with _scoring_mode(prompted, hook), torch.no_grad():
        for x, y in batches:
            base = float(loss_fn(prompted(x), y))
            for layer in range(depth):
                for j in range(p):
                    removed[:] = [(layer, j)]
                    sums[layer, j] += float(loss_fn(prompted(x), y)) - base
                    removed.clear()
            count += x.shape[0]
    return (sums / max(count, 1)).float()


def select_prompts(scores: Tensor, keep: float | int, scope: str = "global") -> Tensor:
    """Which prompts to keep: top ``keep`` across all blocks (global) or within each (local).

    Parameters
    ----------
    scores : Tensor, shape (L, P)
        Higher is more important.
    keep : float or int
        A ratio in [0, 1] of the prompts (rounded to the nearest count), or a count: of all
        L·P prompts for ``"global"``, per block for ``"local"``.
    scope : {"global", "local"}

    Returns
    -------
    Tensor of bool, shape (L, P)
        Ties break towards the earlier block, then the lower index (deterministic). A block may
        keep no prompt under ``"global"``.
    """
    if scores.dim() != 2:
        raise ValueError(f"select_prompts: scores must be (L, P), got {tuple(scores.shape)}")
    if scope not in ("global", "local"):
        raise ValueError(f"select_prompts: scope must be 'global' or 'local', got {scope!r}")
    depth, p = scores.shape
    pool = depth * p if scope == "global" else p
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"select_prompts: keep must be a ratio or a count, got {type(keep).__name__}"
        )
    if isinstance(keep, float):
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"select_prompts: a keep ratio must be in [0, 1], got {keep}")
        count = round(keep * pool)
    else:
        if not 0 <= keep <= pool:
            raise ValueError(f"select_prompts: keep count must be in [0, {pool}], got {keep}")
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
        Shares the timm backbone and head with ``prompted`` (fine-tuning updates that shared
        head); its prompts are new parameters holding the kept rows, so gradients reach only
        them. It runs the same fused path as a model built with these counts from scratch.
    """
    _check_scorable(prompted)
    depth, p = len(prompted.model.blocks), prompted.num_prompts
    if keep.dtype != torch.bool or tuple(keep.shape) != (depth, p):
        raise ValueError(
            f"condense: keep must be a bool tensor of shape ({depth}, {p}), got "
            f"{keep.dtype} {tuple(keep.shape)}"
        )
    keep = keep.to(prompted.prompt_embeddings.device)
    counts = tuple(int(n) for n in keep.sum(1).tolist())
    config = replace(prompted.config, dropout=0.0, layer_counts=counts)
    condensed = PromptedViT(
        prompted.model, config, impl=prompted.impl, backend=prompted.backend, head_init="keep"
    )
    condensed._saved_flags, condensed._saved_modes = prompted._saved_flags, prompted._saved_modes
    with torch.no_grad():
        table = torch.cat([prompted.prompt_embeddings, prompted.deep_prompt_embeddings], 0)
        packed, _ = gather_prompts(table, keep)
        condensed.prompt_embeddings.copy_(packed[: counts[0]].unsqueeze(0))
        condensed.deep_prompt_embeddings.copy_(packed[counts[0] :])
        condensed.prompt_proj.load_state_dict(prompted.prompt_proj.state_dict())
    condensed.condensed_from = keep.cpu()
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
) -> PromptedViT:
    """Algorithm 1: score, keep the top ``keep``, fine-tune only the kept prompts and the head.

    Parameters
    ----------
    prompted : PromptedViT
        A trained VPT-deep model.
    train_loader : iterable of (images, labels)
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

    Returns
    -------
    PromptedViT
        The condensed, fine-tuned model.
    """
    from fastprompt.train import finetune

    scores = score_prompts(prompted, train_loader, method=score, progress=progress)
    mask = select_prompts(scores, keep, scope)
    if verbose:
        print(f"Prompt Condensation ({score}, {scope}):\n{layer_summary(mask)}")
    condensed = condense(prompted, mask)
    kwargs = dict(finetune_kwargs or {})
    if lr is not None:
        kwargs["lr"] = lr
    if epochs > 0:
        finetune(condensed, train_loader, epochs=epochs, progress=progress, **kwargs)
    return condensed
