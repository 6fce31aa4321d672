"""Peak memory of a training step, and the largest batch that fits in a memory budget.

``fastprompt bench --fits 24 80`` (``docs/design.md`` §8): for each model, full fine-tuning,
naive VPT and fastprompt under each memory policy, the peak of one training step is measured on
small copies of the model (depths 2 and 3, batches 2 and 4) and scaled to the model's depth and
to a batch: ``peak(b) = weights + optimiser state + fixed + b · per_image``. The measurement is

- on a GPU, ``torch.cuda.max_memory_allocated`` above what was allocated before the step;
- elsewhere, the bytes of the tensors the step creates that are alive at once at their peak,
  counted op by op (a ``TorchDispatchMode``; each storage once). It leaves out the allocator's
  rounding and caching and the kernels' workspaces, so the batches it gives are an estimate.

Weights count every parameter of the full-depth model (fp32), the optimiser state is SGD's
momentum (one fp32 tensor per trained parameter, the VPT recipe). Gradients are freed as they
are accumulated while the step is measured, so the measurement is the activations' peak; the
gradients are added after (:meth:`Fit.total`: backward trades activations for gradients block by
block, so the peak is the larger of the two). Peak process memory on a CPU
(:func:`peak_process_bytes`) is reported by the benchmark beside it, but it depends on the
allocator and is not what the batches come from.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt

__all__ = [
    "FIT_MODELS",
    "FIT_VARIANTS",
    "SAVED_PER_TOKEN",
    "Fit",
    "all_trainable",
    "estimate_fits",
    "fits_table",
    "model_shape",
    "peak_process_bytes",
    "peak_step_bytes",
    "peak_tensor_bytes",
    "saved_bytes_per_image",
]

FIT_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
# variant -> (prompted?, impl, memory policy)
FIT_VARIANTS: dict[str, tuple[bool, str, str]] = {
    "full fine-tuning": (False, "", "none"),
    "naive VPT": (True, "naive", "none"),
    "fastprompt": (True, "fused", "none"),
    "fastprompt, mlp": (True, "fused", "mlp"),
    "fastprompt, block": (True, "fused", "block"),
}
_GIB = 2**30
# What autograd keeps for backward per token per block, in values (``docs/design.md`` §4,
# "Memory"): (times the width D, times the heads H, constant). Naive VPT keeps it for the prompt
# tokens too; fastprompt's prompt keys/values are kept once per batch, not per image.
SAVED_PER_TOKEN: dict[str, tuple[int, int, int]] = {
    "full fine-tuning": (16, 1, 4),
    "naive VPT": (10, 1, 4),
    "fastprompt": (10, 1, 4),
    "fastprompt, mlp": (6, 1, 2),
    "fastprompt, block": (1, 0, 0),
}


def saved_bytes_per_image(
    variant: str, tokens: int, prompts: int, width: int, heads: int, depth: int, itemsize: int = 4
) -> int:
    """Bytes autograd keeps for backward per image, from :data:`SAVED_PER_TOKEN`.

    Parameters
    ----------
    variant : a name among :data:`SAVED_PER_TOKEN`
    tokens : the model's own tokens N (class, registers, patches)
    prompts : VPT-deep prompts per block P (tokens of naive VPT's blocks)
    width, heads, depth : D, H and the number of blocks L
    itemsize : bytes per value (4: fp32)

    Returns
    -------
    int
        ``itemsize · L · N' · (a·D + b·H + c)`` with ``N' = N + P`` for naive VPT, else N. What is
        kept once per batch (fastprompt's prompt keys/values, the embedding and the head) is not
        in it.

    Raises
    ------
    ValueError
        If ``variant`` is not one of :data:`SAVED_PER_TOKEN`.
    """
    if variant not in SAVED_PER_TOKEN:
        raise ValueError(
            f"saved_bytes_per_image: variant must be one of {list(SAVED_PER_TOKEN)}, "
            f"got {variant!r}"
        )
    a, b, c = SAVED_PER_TOKEN[variant]
    n = tokens + prompts if variant == "naive VPT" else tokens
    return itemsize * depth * n * (a * width + b * heads + c)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create, alive at once: now and at the peak."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip = skip
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            self.live -= self.refs.pop(key)[1]
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.skip and key not in self.refs:
                    self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def peak_tensor_bytes(fn: Callable[[], object], exclude: Iterable[Tensor]) -> int:
    """The peak, while ``fn`` runs, of the bytes of tensors created by its ops and alive at once.

    Storages of ``exclude`` (weights, inputs) are not counted; views count their storage once.
    Backward's ops count too when ``fn`` runs it. Device-independent, deterministic.
    """
    counter = _LiveBytes({t.untyped_storage().data_ptr() for t in exclude})
    with counter:
        fn()
    return counter.peak


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_process_bytes(fn: Callable[[], object]) -> int | None:
    """How far the process's resident memory rises above its level before ``fn`` (Linux: the
    high-water mark reset through ``/proc/self/clear_refs``, free heap memory returned to the
    system first); None where that cannot be read."""
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        fn()
        return 1024 * (_status_kib("VmHWM") - before)
    except OSError:
        return None


def peak_step_bytes(fn: Callable[[], object], device: torch.device, exclude: list[Tensor]) -> int:
    """The peak memory of ``fn`` above what was allocated before it: CUDA's own count on a GPU,
    :func:`peak_tensor_bytes` elsewhere."""
    if device.type != "cuda":
        return peak_tensor_bytes(fn, exclude)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@contextlib.contextmanager
def all_trainable(model: nn.Module) -> Iterator[None]:
    """Every weight of ``model`` trainable inside the block (full fine-tuning's backward)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _dropping_grads(model: nn.Module) -> Iterator[None]:
    """Each gradient freed as soon as it is accumulated, so a step's peak is its activations'."""

    def drop(p: Tensor) -> None:
        p.grad = None

    handles = [
        p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _training_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with _dropping_grads(model):
            model(x).float().logsumexp(-1).mean().backward()

    return step


def _variant_model(backbone: nn.Module, variant: str, prompts: int) -> nn.Module:
    prompted, impl, policy = FIT_VARIANTS[variant]
    if not prompted:
        return backbone
    model = fastprompt.vpt(backbone, prompts, deep=True, impl=impl, readout="cls")
    model.memory = policy
    return model.train()


def _measure(name: str, depth: int, batch: int, prompts: int, variants: list[str], device, kw):
    """Peak step bytes of each variant on a ``depth``-block copy of the model."""
    import timm

    torch.manual_seed(0)
    kw = {**kw, "depth": depth}
    backbone = timm.create_model(name, pretrained=False, num_classes=100, **kw)
    backbone = backbone.to(device).eval()
    x = torch.randn(batch, 3, *backbone.patch_embed.img_size, device=device)
    out = {}
    for variant in variants:
        model = _variant_model(backbone, variant, prompts)
        ctx = all_trainable(backbone) if model is backbone else contextlib.nullcontext()
        with ctx:
            exclude = [*model.parameters(), x]
            out[variant] = peak_step_bytes(_training_step(model, x), device, exclude)
        if model is not backbone:
            model.unwrap()
    return out


def model_shape(name: str, model_kwargs: dict[str, Any] | None = None) -> tuple[int, ...]:
    """(parameters, depth, width, heads, tokens) of a ViT at full size, built on the meta device
    (nothing is allocated).

    Raises
    ------
    ValueError
        If ``name`` is not a ViT of one stack of ``blocks`` with one width (a Swin's stages, a
        hybrid's stem): the estimate scales such a stack by its depth.
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=100, **(model_kwargs or {}))
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if isinstance(blocks, nn.Sequential) else None
    if not (hasattr(attn, "num_heads") and hasattr(model, "embed_dim")):
        raise ValueError(
            f"{name} is a {type(model).__name__}, not a ViT with one stack of blocks; the "
            "estimate scales a timm VisionTransformer's blocks by depth"
        )
    params = sum(p.numel() for p in model.parameters())
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    return params, len(blocks), int(model.embed_dim), int(attn.num_heads), tokens


@dataclass
class Fit:
    """One (model, variant): memory of a training step at the model's full depth.

    Attributes
    ----------
    model, variant : str
    weights_bytes, state_bytes, grads_bytes : int
        fp32 weights (prompts included), SGD momentum and gradients of what trains.
    fixed_bytes, per_image_bytes : float
        The measured peak of a step's activations (gradients freed as they come) as
        ``fixed + batch · per_image``, scaled to full depth.
    saved_per_image : int
        What autograd keeps for backward per image, from the formula
        (:func:`saved_bytes_per_image`); the measured peak adds what backward holds at once.
    batches : dict
        Budget in GiB -> the largest batch that fits (0: not even one image).
    """

    model: str
    variant: str
    weights_bytes: int
    state_bytes: int
    grads_bytes: int
    fixed_bytes: float
    per_image_bytes: float
    saved_per_image: int
    batches: dict[float, int]

    def total(self, batch: int) -> float:
        """Estimated peak bytes of a training step at ``batch``.

        Backward frees activations block by block while gradients accumulate, so what is alive
        changes linearly between its start (all activations) and its end (all gradients): the
        peak is the larger of the two, on top of the weights and the optimiser state.
        """
        activations = self.fixed_bytes + batch * self.per_image_bytes
        return self.weights_bytes + self.state_bytes + max(activations, self.grads_bytes)

    def largest_batch(self, budget_bytes: float) -> int:
        """The largest batch whose :meth:`total` is within ``budget_bytes`` (0 if none)."""
        if self.total(1) > budget_bytes:
            return 0
        room = budget_bytes - self.weights_bytes - self.state_bytes - self.fixed_bytes
        return max(1, math.floor(room / self.per_image_bytes))


def estimate_fits(
    models: Iterable[str] = FIT_MODELS,
    budgets_gib: Iterable[float] = (24, 80),
    prompts: int = 200,
    variants: Iterable[str] = tuple(FIT_VARIANTS),
    device: str = "cpu",
    depths: tuple[int, int] = (2, 3),
    batches: tuple[int, int] = (2, 4),
    model_kwargs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Fit]:
    """The largest batch of each model and variant that fits in each budget (see the module).

    Parameters
    ----------
    models : timm model names (random init; nothing is downloaded)
    budgets_gib : memory budgets in GiB
    prompts : VPT-deep prompts per block
    variants : names among :data:`FIT_VARIANTS`
    device : where the small copies run
    depths, batches : the two depths and two batches measured
    model_kwargs : more ``timm.create_model`` arguments (tiny models in tests)

    Raises
    ------
    ValueError
        Unknown variants, bad depths or batches, ``prompts`` not an int >= 1, a budget not
        above 0, a model that is
        not a ViT (:func:`model_shape`); all before anything is measured.
    """
    variants = list(variants)
    unknown = [v for v in variants if v not in FIT_VARIANTS]
    if unknown:
        raise ValueError(f"estimate_fits: unknown variants {unknown}; known: {list(FIT_VARIANTS)}")
    (d1, d2), (b1, b2) = depths, batches
    if not (0 < d1 < d2 and 0 < b1 < b2):
        raise ValueError(f"estimate_fits: need 0 < d1 < d2 and 0 < b1 < b2, got {depths} {batches}")
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"estimate_fits: prompts must be an int >= 1, got {prompts!r}")
    budgets_gib = list(budgets_gib)
    if not all(b > 0 for b in budgets_gib):
        raise ValueError(f"estimate_fits: budgets_gib must be > 0, got {budgets_gib}")
    dev, kw, say = torch.device(device), dict(model_kwargs or {}), progress or (lambda _m: None)
    shapes = [(name, model_shape(name, kw)) for name in models]  # refused before any measuring
    fits = []
    for name, (params, depth, width, heads, tokens) in shapes:
        peaks = {}
        for d in (d1, d2):
            for b in (b1, b2):
                say(f"{name}: depth {d}, batch {b}")
                peaks[d, b] = _measure(name, d, b, prompts, variants, dev, kw)
        for variant in variants:

            def per_image(d: int, v: str = variant) -> float:
                return (peaks[d, b2][v] - peaks[d, b1][v]) / (b2 - b1)

            def fixed(d: int, v: str = variant) -> float:
                return peaks[d, b1][v] - b1 * per_image(d, v)

            def at_depth(f: Callable[[int], float]) -> float:
                return f(d1) + (depth - d1) * (f(d2) - f(d1)) / (d2 - d1)

            prompted = FIT_VARIANTS[variant][0]
            trained = prompts * width * depth + width * 100 + 100 if prompted else params
            weights = 4 * (params + (prompts * width * depth if prompted else 0))
            fit = Fit(
                name,
                variant,
                weights,
                4 * trained,
                4 * trained,
                at_depth(fixed),
                at_depth(per_image),
                saved_bytes_per_image(variant, tokens, prompts, width, heads, depth),
                {},
            )
            fit.batches = {budget: fit.largest_batch(budget * _GIB) for budget in budgets_gib}
            fits.append(fit)
    return fits


def fits_table(fits: list[Fit], device: str = "cpu", prompts: int | None = None) -> str:
    """The fits as a Markdown table, with a line saying how they were obtained (and, given
    ``prompts``, with how many prompts per block)."""
    budgets = list(fits[0].batches) if fits else []
    how = (
        "CUDA's max_memory_allocated"
        if device.startswith("cuda")
        else "tensors alive at the step's peak, counted on the CPU (an estimate: no allocator "
        "rounding or caching, no kernel workspace)"
    )
    lines = [
        "Largest batch of a training step (fp32, SGD with momentum, "
        f"{'' if prompts is None else f'{prompts} '}VPT-deep prompts per block where "
        f"prompted) from {how}, measured on copies two and three blocks deep at two small "
        "batches and scaled linearly to the model's depth and the batch.",
        "",
        "| model | variant | weights + momentum GiB | gradients GiB | saved MiB/image (formula) "
        "| peak MiB/image | " + " | ".join(f"batch in {b:g} GiB" for b in budgets) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(budgets),
    ]
    for f in fits:
        cells = [
            f.model,
            f.variant,
            f"{(f.weights_bytes + f.state_bytes) / _GIB:.2f}",
            f"{f.grads_bytes / _GIB:.2f}",
            f"{f.saved_per_image / 2**20:.1f}",
            f"{f.per_image_bytes / 2**20:.1f}",
            *(str(f.batches[b]) for b in budgets),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fits_json(fits: list[Fit]) -> list[dict[str, Any]]:
    """The fits as JSON-ready rows."""
    return [{**asdict(f), "batches": {f"{k:g}": v for k, v in f.batches.items()}} for f in fits]
