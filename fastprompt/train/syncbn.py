"""Synchronised BatchNorm for the trainable part of a model under torchrun (recipe field
``batch_norm="sync"``, ``fastprompt train --sync-bn``).

PGN's generator has BatchNorm layers. Under torchrun each process normalises its own share of the
batch (``batch_norm="per-process"``, the default, as the official code runs: PyTorch Lightning's
DDP without ``sync_batchnorm``), so N processes do not train what one process with the same
global batch trains. With ``"sync"`` every BatchNorm layer of the prompt source normalises with
the mean and variance of the global batch, and its gradient flows through those statistics on
every process: N processes then train what one process does, up to floating-point reduction
order.

PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors (it runs on CUDA and a few other
accelerators), so torchrun on CPU (gloo) could not use it; :class:`SyncBatchNorm2d` is the
plain computation written with two all-reduces per layer (the per-channel sums and count, then
the squared deviations), which works with any backend. It keeps ``nn.BatchNorm2d``'s parameters,
buffers and state-dict names, and outside a multi-process group (one process, eval mode) it is
``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["BATCH_NORMS", "SyncBatchNorm2d", "count_batchnorm", "sync_batchnorm"]

BATCH_NORMS = ("per-process", "sync")


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every process's loss
    depends on every process's statistics."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the batch over all processes.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``; the running variance is
    updated with the unbiased variance of the global batch, as one process would.
    """

    def processes(self) -> int:
        """How many processes' images the training statistics span now (1 outside a group)."""
        return dist.get_world_size() if _group_active() else 1

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _group_active()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        # Half precision (autocast) normalises in float32, as BatchNorm does; float64 stays.
        xf = x if x.dtype == torch.float64 else x.float()
        # Two passes (mean, then the mean squared deviation), as BatchNorm itself computes
        # them: E[x²] − E[x]² loses digits when the mean is large against the spread.
        count = xf.new_full((1,), float(x.numel() // c))
        total = _SumOverProcesses.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:c] / n
        centred = xf - mean[None, :, None, None]
        var = _SumOverProcesses.apply((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                m = (
                    1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)  # type: ignore[union-attr]
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def count_batchnorm(module: nn.Module) -> int:
    """How many BatchNorm layers ``module`` holds."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def sync_batchnorm(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by :class:`SyncBatchNorm2d`, in place.

    The new layers take over the old ones' parameter and buffer tensors (an optimiser built
    before still updates them; state dicts are unchanged).

    Parameters
    ----------
    module : nn.Module
        E.g. a PGN model's prompt source.

    Returns
    -------
    int
        Layers replaced (already synchronised ones are left as they are).

    Raises
    ------
    TypeError
        A BatchNorm layer of another kind (1-d, 3-d), which this cannot synchronise.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SyncBatchNorm2d):
                continue
            if type(child) is not nn.BatchNorm2d:
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    raise TypeError(
                        f"sync_batchnorm: {name} is a {type(child).__name__}; only BatchNorm2d "
                        "layers can be synchronised"
                    )
                continue
            new = SyncBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,  # type: ignore[arg-type]
                child.affine,
                child.track_running_stats,
            )
            for attr in ("weight", "bias"):
                setattr(new, attr, getattr(child, attr))
            for attr in ("running_mean", "running_var", "num_batches_tracked"):
                new.register_buffer(attr, getattr(child, attr))
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced
