"""``fastprompt bench``: latency, activation memory and FLOPs of a timm model, naive VPT and
fastprompt under each memory policy, as report rows with their ratios.

Every figure is taken side by side in one process on the same weights and inputs: the prompt-free
timm model, naive VPT (``impl="naive"``) and fastprompt (``impl="fused"``). Ratios between them
are what a report should quote; absolute times depend on the machine. The measurement primitives
(timings and their statistics, activation bytes, FLOPs, the environment record) are
:mod:`fastprompt.measure`; they are re-exported here, where ``benchmarks/`` and the examples
import them.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fastprompt
from fastprompt.fits import all_trainable, peak_process_bytes, peak_step_bytes
from fastprompt.measure import (
    FLOP_HANDLES,
    activation_bytes,
    environment,
    flops,
    paired_ratios,
    summarize,
    time_fn,
    time_interleaved,
)
from fastprompt.prompted import MEMORY_POLICIES

__all__ = [
    "FLOP_HANDLES",
    "BenchConfig",
    "activation_bytes",
    "environment",
    "flops",
    "paired_ratios",
    "run",
    "summarize",
    "time_fn",
    "time_interleaved",
]


@dataclass
class BenchConfig:
    """What ``fastprompt bench`` measures.

    Attributes
    ----------
    model : str
        timm model name, random init (nothing is downloaded).
    prompts : list of int
        Prompt counts; 0 is reported once as the prompt-free model.
    deep : bool
        VPT-deep or shallow.
    batch : int
    dtype : str
        ``float32``, ``float16`` or ``bfloat16``.
    device : str
    backend : str or None
    reps : int
        Timed repetitions per figure (median and spread reported).
    train : bool
        Also time a training step (forward + backward to prompts and head).
    memory : bool
        Also count activation memory and a training step's peak memory.
    policies : list of str
        fastprompt's memory policies to measure (:data:`fastprompt.prompted.MEMORY_POLICIES`);
        ``"none"`` is the ``fused`` row, each other one a ``fused+<policy>`` row.
    count_flops : bool
        Also count FLOPs with fvcore.
    img_size : int or None
        Image size override (tiny models in tests).
    model_kwargs : dict
        More arguments for ``timm.create_model`` (a shrunk Swin in tests: depths, widths).
    """

    model: str = "vit_base_patch16_224"
    prompts: list[int] = field(default_factory=lambda: [50, 100, 200])
    deep: bool = True
    batch: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    backend: str | None = None
    reps: int = 5
    train: bool = True
    memory: bool = True
    count_flops: bool = True
    img_size: int | None = None
    policies: list[str] = field(default_factory=lambda: list(MEMORY_POLICIES))
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _variants(cfg: BenchConfig) -> dict[str, tuple[str, str]]:
    """Rows per prompt count: variant -> (impl, memory policy). ``fused`` is fastprompt with
    the default policy; ``fused+<policy>`` the others asked for."""
    rows = {"naive": ("naive", "none"), "fused": ("fused", "none")}
    if cfg.train or cfg.memory:  # a policy changes nothing else
        rows.update({f"fused+{m}": ("fused", m) for m in cfg.policies if m != "none"})
    return rows


def _peak(fn: Callable[[], object], exclude: list[torch.Tensor], device: torch.device) -> dict:
    """Peak memory of a training step above what was allocated before it.

    ``peak_bytes``: on a GPU, CUDA's ``max_memory_allocated``; elsewhere the tensors the step
    creates that are alive at once, counted op by op (:func:`fastprompt.fits.peak_tensor_bytes`:
    no allocator rounding or caching). On a CPU ``peak_rss_bytes`` is the rise of the process's
    resident memory beside it (allocator-dependent; None where Linux's counters are missing).
    """
    if device.type == "cuda":
        return {"peak_bytes": peak_step_bytes(fn, device, exclude), "peak_of": "cuda allocated"}
    return {
        "peak_bytes": peak_step_bytes(fn, device, exclude),
        "peak_of": "tensors alive",
        "peak_rss_bytes": peak_process_bytes(fn),
    }


def run(
    cfg: BenchConfig,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure the prompt-free model, naive VPT and fastprompt (under each memory policy) for
    each prompt count.

    ``on_row`` is handed each row as soon as it is final (a copy, ratios included): the rows of a
    prompt count when that count is done, the prompt-free row (whose times gather every count's)
    last. A run cut short has handed on what it finished.

    Returns
    -------
    dict
        ``{"config", "env", "rows"}`` (``config`` also holds ``image_size``, the (height,
        width) measured); each row holds one (prompts, variant) with latency for
        inference (naive and ``fused`` only: the policies change nothing there) and training,
        activation bytes saved for backward and a step's peak memory, and GFLOPs where asked.
        The prompt-free row's backward is full fine-tuning's (every weight trains). Training
        rows also hold ``train_vs_frozen``: against the prompt-free model's step with its weights
        as the prompted model trains them (the backbone frozen, the head trained) and the
        gradient taken to the images, timed with them. That is the floor
        of a prompt method's step: its backward needs the same input gradients through every
        block (less the first block's, which it may skip, and the patch embedding's).
    """
    import timm

    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    kw = dict(cfg.model_kwargs) | ({} if cfg.img_size is None else {"img_size": cfg.img_size})
    model = timm.create_model(cfg.model, pretrained=False, num_classes=100, **kw)
    model = model.to(device, dtype).eval()
    size = model.patch_embed.img_size
    x = torch.randn(cfg.batch, 3, *size, device=device, dtype=dtype)
    say = progress or (lambda _msg: None)
    rows = []

    def train_step(m: nn.Module) -> Callable[[], None]:
        def step() -> None:
            out = m(x)
            out.float().logsumexp(-1).mean().backward()
            for p in m.parameters():
                p.grad = None

        return step

    def free_step() -> None:
        with all_trainable(model):
            train_step(model)()

    images = x.detach().requires_grad_()

    def frozen_step() -> None:
        model(images).float().logsumexp(-1).mean().backward()
        images.grad = None

    say(f"{cfg.model}: prompt-free")
    free: dict[str, Any] = {"prompts": 0, "variant": "prompt-free"}
    if cfg.memory:
        with all_trainable(model):
            free["activation_bytes"] = activation_bytes(lambda: model(x), list(model.parameters()))
        free_step()  # the first step's allocations are not the step's
        free.update(_peak(free_step, [*model.parameters(), x], device))
    if cfg.count_flops:
        free["gflops"] = flops(model, x)
    rows.append(free)
    free_times: dict[str, list[float]] = {"infer": [], "train": []}
    variants = _variants(cfg)

    for p in cfg.prompts:
        say(f"{cfg.model}: {p} prompts")
        # The model's own readout (a ViT's class token; VPT-Swin's mean of every token).
        prompted = fastprompt.vpt(model, p, deep=cfg.deep, backend=cfg.backend)
        offered = prompted.memory_policies()
        skipped = sorted({m for _, m in variants.values() if m not in offered})
        if skipped:  # a Swin's blocks are checkpointed whole: no "mlp"
            say(f"{cfg.model}: memory {skipped} not offered by this model, not measured")
        group = {
            name: {"prompts": p, "variant": name, "memory": policy}
            for name, (_, policy) in variants.items()
            if policy in offered
        }

        def use(name: str) -> None:
            prompted.impl, prompted.memory = variants[name]

        def infer(name: str) -> Callable[[], object]:
            def call() -> object:
                use(name)
                return prompted(x)

            return call

        def step(name: str) -> Callable[[], None]:
            def call() -> None:
                use(name)
                train_step(prompted)()

            return call

        # Interleaved: each repetition times the variants back to back, so drift in the
        # machine's speed (other load, clocks) hits all of them alike.
        prompted.eval()
        # As deployed: fastprompt's prompt K/V once per model (frozen_prompts); naive VPT has
        # nothing to cache.
        with torch.inference_mode(), prompted.frozen_prompts():
            times = time_interleaved(
                {"free": lambda: model(x), "naive": infer("naive"), "fused": infer("fused")},
                device,
                cfg.reps,
            )
        _store(group, free_times, "infer", times)
        prompted.train()
        if cfg.train:
            fns = {"free": free_step, "frozen": frozen_step, **{n: step(n) for n in group}}
            times = time_interleaved(fns, device, cfg.reps)
            _store(group, free_times, "train", times)
            for row in group.values():
                row["train_frozen_median_s"] = statistics.median(times["frozen"])
        for name, row in group.items():
            use(name)
            if cfg.memory:
                prompted.train()
                row["activation_bytes"] = activation_bytes(
                    lambda: prompted(x), list(prompted.parameters())
                )
                train_step(prompted)()
                row.update(_peak(train_step(prompted), [*prompted.parameters(), x], device))
            if cfg.count_flops and name in ("naive", "fused"):
                prompted.eval()
                row["gflops"] = flops(prompted, x)
            rows.append(row)
        prompted.unwrap()
        for row in group.values():
            _add_ratios(row, free, group["naive"])
            if on_row is not None:
                on_row(copy.deepcopy(row))
    for kind, times in free_times.items():
        if times:
            free[kind] = summarize(times)
    if on_row is not None:
        on_row(copy.deepcopy(free))
    # The size measured, which --img-size may have set away from the one in the model's name.
    config = cfg.__dict__.copy() | {"image_size": list(size)}
    return {"config": config, "env": environment(device), "rows": rows}


def _store(group: dict, free_times: dict, kind: str, times: dict[str, list[float]]) -> None:
    """Put interleaved timings into rows; the prompt-free median of the same group is kept
    beside each row so ratios compare measurements taken together, and each row gets its ratios
    repetition by repetition (``<kind>_paired``: against free, naive and frozen where timed)."""
    free_times[kind] += times["free"]
    for name, row in group.items():
        if name in times:
            row[kind] = summarize(times[name])
            row[f"{kind}_free_median_s"] = statistics.median(times["free"])
            row[f"{kind}_paired"] = {
                ref: paired_ratios(times[name], times[ref])
                for ref in ("free", "naive", "frozen")
                if ref in times and ref != name
            }


def _add_ratios(r: dict[str, Any], free: dict[str, Any], naive: dict[str, Any]) -> None:
    """A prompted row's ratios against the prompt-free row and naive VPT of its prompt count
    (timings against the prompt-free medians of the same group, kept in the row)."""
    for kind in ("infer", "train"):
        if kind in r:
            r[f"{kind}_vs_free"] = r[kind]["median_s"] / r[f"{kind}_free_median_s"]
            r[f"{kind}_vs_naive"] = r[kind]["median_s"] / naive[kind]["median_s"]
    if "train_frozen_median_s" in r and "train" in r:
        r["train_vs_frozen"] = r["train"]["median_s"] / r["train_frozen_median_s"]
    if "activation_bytes" in r:
        r["memory_vs_free"] = r["activation_bytes"] / free["activation_bytes"]
        r["memory_vs_naive"] = r["activation_bytes"] / naive["activation_bytes"]
    if r.get("peak_bytes") and free.get("peak_bytes"):
        r["peak_vs_free"] = r["peak_bytes"] / free["peak_bytes"]
