"""Prompt sets of several tasks in one table, each image reading its own task's (mixed batches).

:class:`TaskSets` serves the prompts of several tasks that share one frozen backbone. In every
task it takes, only the prompts' keys and values reach the image tokens (VPT-deep, condensed
VPT-deep, E²VPT: a prompt set's outputs are overwritten before the next block), so a batch of
images of different tasks can run every block once: block i's queries of an image of task t attend
to ``[kv_t(i); K/V of t's visual set entering i]`` — the task's key-value prompts (E²VPT) and then
the keys and values of its visual prompts — before their own keys. The table is
(T, H, L_max, d) with the per-task lengths L_t(i) (sets differ in length: condensed models,
different prompt counts); the prompt-attention op reads each image's set through
``prompt_index`` and ignores the slots past its length.

The source hands the core these keys and values as its own (:meth:`kv`); the visual prompts'
keys and values come from the ``prompt_kv(block, tokens)`` of an object the caller binds (the
backbone adapter, :meth:`fastprompt.backbones.Backbone.prompt_kv`): the source imports no
backbone. Nothing is cached unless asked: inside :meth:`cached` the table of every block is
computed once and eval-mode forwards reuse it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt.sources import PromptSource

__all__ = ["TaskSets"]


class PromptKVMaker(Protocol):
    """What maps a visual set entering a block to its keys and values (a backbone adapter)."""

    def prompt_kv(self, block: int, prompts: Tensor) -> tuple[Tensor, Tensor]: ...


class TaskSets(PromptSource):
    """The prompt sets of several tasks, per block, as one table of keys and values.

    Parameters
    ----------
    sources : sequence of PromptSource
        One per task (registered as ``tasks.0``, ``tasks.1``, ...). Each must give, for every
        block, the image-independent set it receives (:meth:`PromptSource.shared`) and its own
        keys/values (:meth:`PromptSource.shared_kv`), and no prompt may be a token of a block (the
        caller checks the tasks' plans).
    depth : int
        Blocks of the backbone.
    shapes : sequence of (int, int)
        (heads, head dim) of every block.
    """

    def __init__(
        self, sources: Sequence[PromptSource], depth: int, shapes: Sequence[tuple[int, int]]
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("TaskSets: no task")
        self.tasks = nn.ModuleList(sources)
        self._depth, self._shapes = depth, tuple(shapes)
        # The object, not its bound method: torch 2.6's Dynamo cannot trace a bound method of a
        # plain object kept on a module (it loses where the object came from, and with it the
        # model the adapter holds: "Unexpected type in sourceless builder").
        self._kv_maker: PromptKVMaker | None = None
        self._cache: dict[int, tuple[Tensor, Tensor] | None] | None = None
        # Kept on the host too: the table's width needs no device sync.
        self._lengths = [[self._length(src, i) for src in sources] for i in range(depth)]
        ref = next(p for src in sources for p in src.parameters())
        self.register_buffer(
            "task_lengths", torch.tensor(self._lengths, dtype=torch.long, device=ref.device)
        )

    @staticmethod
    def _length(src: PromptSource, block: int) -> int:
        direct = src.shared_kv(block)
        return (0 if direct is None else direct[0].shape[2]) + (
            src.count(block) if src.receives(block) else 0
        )

    def bind(self, maker: PromptKVMaker) -> None:
        """Set what maps a visual set (1, P, W) entering a block to its keys and values
        (1, H, P, d): ``maker.prompt_kv(block, prompts)``."""
        self._kv_maker = maker

    def config(self) -> Any:
        return None

    # -- the schedule: no prompt is ever a token --------------------------------------------------

    def receives(self, block: int) -> bool:
        return False

    def count(self, block: int) -> int:
        return 0

    def prepare(self, images: Tensor, task: Tensor | None = None) -> Tensor:
        """The task index of every image, (B,) int64 (checked by the caller)."""
        if not isinstance(task, Tensor) or task.shape != (images.shape[0],):
            raise ValueError(
                f"TaskSets: a forward needs task=<(B,) tensor of task indices> for its "
                f"{images.shape[0]} images"
            )
        return task

    def selection(self, block: int, batch: int, state: Any) -> tuple[Tensor, Tensor]:
        return state, self.task_lengths[block]

    # -- the table --------------------------------------------------------------------------------

    def _table(self, block: int) -> tuple[Tensor, Tensor] | None:
        """(T, H, L_max, d) keys and values of every task at ``block``, padded after each task's
        ``task_lengths[block]`` valid slots; None when no task has any."""
        width = max(self._lengths[block])
        if width == 0:
            return None
        if self._kv_maker is None:
            raise RuntimeError("TaskSets: bind() was not called")
        parts = [self._task_kv(src, block) for src in self.tasks]
        ref = next(kv[0] for kv in parts if kv is not None)
        heads, dim = self._shapes[block]
        empty = ref.new_zeros(1, heads, 0, dim)
        out = []
        for j in (0, 1):
            sets = [empty if kv is None else kv[j] for kv in parts]
            out.append(torch.cat([F.pad(t, (0, 0, 0, width - t.shape[2])) for t in sets]))
        return out[0], out[1]

    def _task_kv(self, src: PromptSource, block: int) -> tuple[Tensor, Tensor] | None:
        """One task's keys and values at ``block`` (1, H, L, d): its own, then its visual set's."""
        ks, vs = [], []
        direct = src.shared_kv(block)
        if direct is not None:
            ks.append(direct[0])
            vs.append(direct[1])
        if src.receives(block) and src.count(block):
            k, v = self._kv_maker.prompt_kv(block, src.shared(block))
            ks.append(k)
            vs.append(v)
        return (torch.cat(ks, 2), torch.cat(vs, 2)) if ks else None

    def kv(self, block: int, batch: int, state: Any) -> tuple[Tensor, Tensor] | None:
        if self._cache is not None and not self.training:
            return self._cache[block]
        return self._table(block)

    def shared_kv(self, block: int) -> tuple[Tensor, Tensor] | None:
        return self._table(block)

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Compute every block's table once (no gradient); eval-mode forwards inside reuse it."""
        with torch.no_grad():
            cache = {i: self._table(i) for i in range(self._depth)}
        previous, self._cache = self._cache, cache
        try:
            yield
        finally:
            self._cache = previous

    def extra_repr(self) -> str:
        return f"tasks={len(self.tasks)}, keys per block={self.task_lengths.amax(1).tolist()}"
