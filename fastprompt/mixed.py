"""Batches that mix tasks: one frozen backbone, each task's prompts and head, one pass per batch.

:class:`MultiTaskViT` takes trained prompted models of one backbone (VPT-deep, condensed VPT-deep,
E²VPT; any prompt counts) and serves them together: ``model(images, task)`` runs every block once
for the whole batch, each image attending to its own task's prompt keys and values (a table read
through the prompt-attention op's ``prompt_index`` and ``prompt_lengths``), then reads out with
its task's readout and head. Its logits equal each task's own model's.

A task can share the blocks only if its prompts reach the images through keys and values alone.
Refused, with the reason: models of another backbone (architecture or weights), prompts that are
tokens of a block (VPT-shallow, the IIP baseline, a readout of prompt outputs, ablations whose
prompts flow on), and prompts that depend on the image (PGN).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt.backbones import adapter_for
from fastprompt.prompted import PromptedViT
from fastprompt.sources.tasks import TaskSets

__all__ = ["MultiTaskViT", "TaskInput", "shareable"]

# A task: its prompted model, or a function that loads it (called once, so that only one task's
# backbone besides the shared one is alive at a time).
TaskInput = PromptedViT | Callable[[], PromptedViT]

_WHO = "fastprompt.multitask"


def shareable(task: PromptedViT) -> list[str]:
    """Why ``task``'s prompts cannot share a mixed batch's blocks ([] when they can)."""
    if not isinstance(task, PromptedViT):
        return [f"it is a {type(task).__name__}, not a prompted model"]
    src, reasons = task.source, []
    receiving = [i for i in range(task.depth) if src.receives(i)]
    if any(src.shared(i) is None for i in receiving):
        reasons.append("its prompts depend on the image (generated per image, as PGN's)")
    tokens = [i for i, s in enumerate(task._plan(fused=True)) if s.as_tokens and s.held]
    if tokens and not reasons:
        hint = (
            f"; its readout {task.readout!r} reads prompt outputs: build it with "
            "readout='patches' to share the blocks"
            if task.backbone.reads_prompts(task.readout)
            else ""
        )
        reasons.append(
            f"its prompts are tokens of block(s) {tokens} (VPT-shallow, IIP, a readout of prompt "
            f"outputs, or prompts that flow on), so they would need the blocks to themselves{hint}"
        )
    return reasons + task.backbone.fused_unsupported_reasons()


def _head_name(task: PromptedViT) -> str:
    head = task.backbone.classifier()
    return next(n for n, m in task.model.named_modules() if m is head)


def _frozen_state(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The backbone's state without its head (what tasks must share)."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if not (prefix and (k == prefix or k.startswith(prefix + ".")))
    }


def _same_backbone(name: str, task: PromptedViT, first: str, ref: dict[str, Tensor], sig) -> None:
    theirs = {k: v for k, v in task.backbone.signature().items() if k != "num_classes"}
    if theirs != sig:
        diff = [f"{k}: {theirs.get(k)!r} vs {sig.get(k)!r}" for k in sig if theirs.get(k) != sig[k]]
        raise ValueError(
            f"{_WHO}: task {name!r} has another backbone than task {first!r} ({'; '.join(diff)}); "
            "tasks share one frozen backbone"
        )
    state = _frozen_state(task.model, _head_name(task))
    if state.keys() != ref.keys():
        raise ValueError(f"{_WHO}: task {name!r}'s backbone has other tensors than {first!r}'s")
    for key, value in state.items():
        other = ref[key]
        if value.shape != other.shape or not torch.equal(value.to(other.device), other):
            raise ValueError(
                f"{_WHO}: task {name!r}'s backbone weights differ from task {first!r}'s "
                f"({key}); tasks share one frozen backbone"
            )


class MultiTaskViT(PromptedViT):
    """Several tasks' prompts and heads over one frozen backbone; a task per image.

    Parameters
    ----------
    tasks : mapping of str to PromptedViT (or a function returning one)
        Task name → its trained model (VPT-deep, condensed, E²VPT; prompt counts may differ). The
        prompts and heads are copied: later changes to the task models are not seen. The
        backbone is a copy of the first task's; every other task's must have the same weights
        (its head aside).
    backend : str, optional
        Prompt-attention backend (one of :data:`fastprompt.backends.NAMES`).

    Attributes
    ----------
    task_names : tuple of str
    num_classes : tuple of int
        Classes of each task's head.

    Notes
    -----
    The prompts run as at inference (no prompt dropout) in either mode; gradients reach every
    task's prompts and heads. Inside :meth:`frozen_prompts` every block's table is computed once.
    """

    def __init__(self, tasks: Mapping[str, TaskInput], backend: str | None = None) -> None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError(f"{_WHO}: tasks must be a non-empty mapping of name to model")
        names = list(tasks)
        if any(not isinstance(n, str) for n in names):
            raise TypeError(f"{_WHO}: task names must be str, got {names}")
        sources, heads, readouts = [], [], []
        model = ref = sig = None
        for name in names:
            task = tasks[name]
            task = task() if callable(task) and not isinstance(task, nn.Module) else task
            reasons = shareable(task)
            if reasons:
                raise ValueError(
                    f"{_WHO}: task {name!r} cannot share a batch: {'; '.join(reasons)}"
                )
            task._check_live()
            if model is None:
                model = copy.deepcopy(task.model)
                ref = _frozen_state(model, _head_name(task))
                sig = {k: v for k, v in task.backbone.signature().items() if k != "num_classes"}
            else:
                _same_backbone(name, task, names[0], ref, sig)
            weight = next(model.parameters())
            source = copy.deepcopy(task.source).to(weight.device)
            sources.append(source.eval())
            heads.append(copy.deepcopy(task.backbone.classifier()).to(weight.device))
            readouts.append(task.readout)
            del task
        bb = adapter_for(model, _WHO)
        shapes = [(bb.block_shape(i).heads, bb.block_shape(i).head_dim) for i in range(bb.depth)]
        table = TaskSets(sources, bb.depth, shapes)
        super().__init__(model, table, readout=readouts[0], backend=backend, method="multitask")
        table.bind(self._backbone)
        self._backbone.classifier().requires_grad_(False)  # the backbone's own head is unused
        self.heads = nn.ModuleList(heads)
        self.task_names = tuple(names)
        self.task_readouts = tuple(readouts)
        self._task_classes = tuple(int(h.out_features) for h in heads)

    # -- tasks ------------------------------------------------------------------------------------

    def task_index(self, task: Any, batch: int, device: torch.device) -> Tensor:
        """The task of each image as (B,) int64 indices.

        Parameters
        ----------
        task : str, int, sequence of str/int, or Tensor or numpy array of int
            One task for the whole batch, or one per image (names or indices; numpy integers
            count as indices, bools do not).
        batch : int
        device : torch.device
        """
        count = len(self.task_names)
        if isinstance(task, (str, numbers.Integral)) and not isinstance(task, (bool, np.bool_)):
            task = [task] * batch
        if isinstance(task, np.ndarray):
            task = torch.from_numpy(task)
        if isinstance(task, Tensor):
            if task.dtype.is_floating_point or task.dtype == torch.bool or task.dim() != 1:
                raise ValueError(
                    f"{_WHO}: task must be a 1-d integer tensor, got {task.dtype} "
                    f"{tuple(task.shape)}"
                )
            index = task.to(device=device, dtype=torch.long)
        elif isinstance(task, Sequence):
            values = [self._one_task(t) for t in task]
            if any(not 0 <= v < count for v in values):
                raise ValueError(f"{_WHO}: task indices must be in [0, {count}), got {values}")
            index = torch.tensor(values, dtype=torch.long, device=device)
            task = None  # checked above
        else:
            raise TypeError(f"{_WHO}: task must name tasks or index them, got {type(task)}")
        if index.shape != (batch,):
            raise ValueError(f"{_WHO}: {index.numel()} tasks given for {batch} images")
        if not batch or task is None:
            return index
        # Read back only from host memory: on a device, and inside a compiled graph, reading the
        # indices would synchronise (or break the graph), so the check runs there instead.
        if task.device.type == "cpu" and not torch.compiler.is_compiling():
            if int(task.min()) < 0 or int(task.max()) >= count:
                raise ValueError(
                    f"{_WHO}: task indices must be in [0, {count}), got {task.tolist()}"
                )
        else:
            torch._assert_async(
                ((index >= 0) & (index < count)).all(),
                f"{_WHO}: task indices must be in [0, {count})",
            )
        return index

    def _one_task(self, task: Any) -> int:
        """A task's index from its name or index (a Python or numpy integer; a bool is neither)."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"{_WHO}: unknown task {task!r} (tasks: {list(self.task_names)})")
            return self.task_names.index(task)
        if isinstance(task, numbers.Integral) and not isinstance(task, (bool, np.bool_)):
            return int(task)
        raise TypeError(
            f"{_WHO}: each task must be a name or an integer index, got {task!r} "
            f"({type(task).__name__})"
        )

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: Tensor, task: Any) -> Tensor:
        """Logits of every image under its task's head.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
        task : str, int, sequence or Tensor
            Each image's task (:meth:`task_index`).

        Returns
        -------
        Tensor, shape (B, max(num_classes))
            Row b holds image b's logits in its first ``num_classes[task_b]`` columns and −inf
            after them (so softmax, argmax and cross-entropy read only its task's classes).
        """
        index = self.task_index(task, x.shape[0], x.device)
        features = self.forward_features(x, task=index)
        return self.task_logits(features, index)

    def forward_intermediates(self, x: Tensor, *args: Any, task: Any, **kwargs: Any) -> Any:
        """:meth:`PromptedViT.forward_intermediates` with each image under its ``task``'s
        prompts (:meth:`task_index`); ``get_intermediate_layers`` takes ``task`` too."""
        index = self.task_index(task, x.shape[0], x.device)
        return super().forward_intermediates(x, *args, task=index, **kwargs)

    def task_logits(self, features: Tensor, index: Tensor) -> Tensor:
        """Each task's readout and head on the final tokens (B, N, D) of its images."""
        bb = self._backbone
        pooled = None
        for readout in dict.fromkeys(self.task_readouts):
            rows = [r == readout for r in self.task_readouts]
            p = bb.pool(features, readout, 0, "prefix")
            mask = torch.tensor(rows, device=index.device)[index].unsqueeze(1)
            pooled = p if pooled is None else torch.where(mask, p, pooled)
        pre = bb.head(pooled, pre_logits=True)
        width = max(self.num_classes)
        logits = pre.new_full((pre.shape[0], width), float("-inf"))
        # Every head runs on every image and each row keeps its own task's: a head costs
        # nothing beside the blocks, and a loop over the tasks present would read the indices
        # back to the host (a graph break under torch.compile).
        for t, head in enumerate(self.heads):
            own = F.pad(head(pre), (0, width - self.num_classes[t]), value=float("-inf"))
            logits = torch.where((index == t).unsqueeze(1), own, logits)
        return logits

    @contextlib.contextmanager
    def frozen_prompts(self) -> Iterator[MultiTaskViT]:
        """Inference with every block's table of task keys/values computed once, on entry."""
        with super().frozen_prompts(), self._source.cached():
            yield self

    _classifier_trains = False

    @property
    def num_classes(self) -> tuple[int, ...]:  # type: ignore[override]
        """Classes of each task's head, in task order."""
        return self._task_classes

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError(
            f"{_WHO}: each task has its own head (heads[t]); the backbone's is not used"
        )

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{_WHO}: each task has its own head (heads[t]); the backbone's is not used"
        )

    def save_prompts(self, path: str) -> None:
        raise NotImplementedError(
            f"{_WHO}: save each task's model (save_prompts) and rebuild the mixed model from them"
        )

    def extra_repr(self) -> str:
        tasks = ", ".join(f"{n}: {c} classes" for n, c in zip(self.task_names, self.num_classes))
        return f"tasks=[{tasks}], backbone={self._backbone.family!r}"
