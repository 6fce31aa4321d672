"""The prompted core's block loop: how each block runs, and the loop over them.

:class:`BlockLoop` is a part of :class:`fastprompt.PromptedViT` (``docs/design.md`` §4, "The
prompted core"): the plan of every block (whether a new set enters, whether the prompts are tokens
of the block or only their keys/values are computed), one step of the loop under the memory
policy, the hooks that a step skips, and :meth:`BlockLoop._run_blocks`, the loop itself, which
``forward_features`` and ``forward_intermediates`` share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt._arguments import refuse_unknown
from fastprompt._compat import tracing
from fastprompt._warnings import warn_at_caller
from fastprompt.backbones import AttentionCall, AttentionFn, Backbone, PromptKV
from fastprompt.backbones.base import module_hooks
from fastprompt.memory import step_under
from fastprompt.ops.attention import prompt_attention
from fastprompt.sources import PromptSource

__all__ = ["BlockLoop", "run_attention"]

# (block, token state after it, prompt tokens in it) -> None: what the loop hands an observer.
BlockTap = Callable[[int, Any, int], None]


def run_attention(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """What a block computes by default: :func:`fastprompt.ops.prompt_attention` on the call,
    ``(out (B, H, N, d), lse (B, H, N))``. Overrides that only look on can return its ``out``."""
    return prompt_attention(
        call.q,
        call.k,
        call.v,
        call.prompt_k,
        call.prompt_v,
        call.prompt_index,
        call.prompt_lengths,
        scale=call.scale,
        backend=call.backend,
        key_bias=call.key_bias,
    )


def _default_attention(call: AttentionCall) -> Tensor:
    return run_attention(call)[0]


def _skipped_hooks(own: list[tuple[str, nn.Module]]) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, hook handles)`` of the modules among ``own`` with hooks (which the prompted
    forward never runs): the handles tell a hook registered later from one already said."""
    hooked = []
    for name, m in own:
        ids = module_hooks(m, everywhere=False)  # a profiler's hooks on every module are not said
        if ids:
            hooked.append((name, ids))
    return hooked


@dataclass(frozen=True)
class _Step:
    """How one block runs: whether a new prompt set enters before it, whether the prompts are
    tokens of the block (False: only their keys/values), and how many prompt tokens the block's
    input holds."""

    receive: bool
    as_tokens: bool
    held: int


class BlockLoop:
    """The block loop of :class:`fastprompt.PromptedViT` (its adapter, source, modes, overrides
    and caches are the wrapper's)."""

    _backbone: Backbone
    _source: PromptSource
    readout: str
    impl: str
    backend: str | None
    training: bool
    _attention: AttentionFn | None
    _token_fn: Callable[[int, Tensor], Tensor] | None
    _fused_reasons: list[str]
    _recompute: tuple[str, ...]
    _frozen: dict[int, PromptKV] | None
    _hooks_said: set[tuple[str, tuple[int, ...]]]
    _check_live: Callable[[], None]
    _sync: Callable[[], None]
    _check_model: Callable[[], None]
    method: str
    memory_policy: Callable[[], str]

    def _warn_hooks(self, block: int | None, fused: bool, memory: str = "none") -> None:
        """Say once per module and hooks that they do not run: this forward computes it its own way
        (observers such as FLOP counters register hooks on every module, so it is not refused;
        a hook that changes an output is then ignored, which the warning says). Not while
        tracing: a warning would break the graph, and the eager forward says it."""
        if tracing():
            return
        hooked = _skipped_hooks(self._backbone.own_forwards(block, fused, memory))
        new = [h for h in hooked if h not in self._hooks_said]
        if not new:
            return
        self._hooks_said.update(new)
        names = [name for name, _ in new]
        warn_at_caller(
            f"fastprompt: hooks on {', '.join(names)} do not run: the prompted forward computes "
            f"{'them' if len(names) > 1 else 'it'} its own way, with the prompts"
        )

    def _plan(self, fused: bool | None = None) -> list[_Step]:
        """How each block runs (``docs/design.md`` §4, "The prompted core").

        Block i's prompt outputs are needed when block i + 1 receives no new set (they flow on)
        or when i is the last block and the readout reads them. On the fused path a block that
        receives a set whose outputs are not needed runs on its keys/values only.
        """
        if fused is None:
            fused = self._fused_path()
        src, depth = self._source, self._backbone.depth
        reads = self._backbone.reads_prompts(self.readout)
        steps, held = [], 0
        for i in range(depth):
            receive = src.receives(i)
            needed = reads if i == depth - 1 else not src.receives(i + 1)
            if receive and fused and not needed:
                steps.append(_Step(True, False, 0))
                held = 0
                continue
            if receive:
                held = src.count(i)
            steps.append(_Step(receive, True, held))
        return steps

    def _fused_path(self) -> bool:
        return self.impl == "fused" or self._attention is not None

    def keys_values_only(self) -> list[bool]:
        """Per block, whether the fused path computes only the keys/values of the prompts it
        receives (their outputs are read by nobody); the other blocks hold prompt tokens."""
        return [not s.as_tokens for s in self._plan(fused=True)]

    def _held_at_end(self) -> int:
        """Prompt tokens in the token state after the last block (0 where the fused path
        computed only their keys/values)."""
        plan = self._plan()
        return plan[-1].held if plan and plan[-1].as_tokens else 0

    def _prompts_in_output(self) -> int:
        """How many prompt tokens ``forward_features`` returns (where the source puts them): the
        last block's, when the readout reads them; none otherwise, under every impl."""
        return self._held_at_end() if self._backbone.reads_prompts(self.readout) else 0

    def _final_features(self, tokens: Any) -> Tensor:
        """``forward_features``' output from the token state after the last block: the prompt
        tokens dropped unless the readout reads them, so that every impl returns the same (the
        naive path computes them, the fused path may not) and a readout that ignores prompts
        gets timm's own layout."""
        bb = self._backbone
        held = self._held_at_end()
        if held and not bb.reads_prompts(self.readout):
            return bb.features_without_prompts(tokens, held, self._source.position)
        return bb.features(tokens)

    def _selected(self, block: int, table: Tensor, batch: int, state: Any, per_image: Tensor):
        """``(prompt_index, prompt_lengths)`` of the ``table`` (T, ...) of sets of ``block``."""
        index, lengths = self._source.selection(block, batch, state)
        t = table.shape[0]
        if index is None and t not in (1, batch):
            raise ValueError(
                f"fastprompt: block {block} got {t} prompt sets for {batch} images; a table of "
                "sets needs the source's selection (prompt_index)"
            )
        if index is None and t != 1:
            index = per_image
        return index, lengths

    def _keys_values(self, block: int, batch: int, state: Any, per_image: Tensor) -> PromptKV:
        """The block's prompt keys/values: its set's (cached inside ``frozen_prompts``), joined
        with the source's own keys/values."""
        frozen = None if self.training else self._frozen
        if frozen is not None and block in frozen:
            kv = frozen[block]
        else:
            prompts = self._source.tokens(block, batch, state)
            index, lengths = self._selected(block, prompts, batch, state, per_image)
            kv = PromptKV(*self._backbone.prompt_kv(block, prompts), index, lengths)
        return self._join_direct(block, kv, batch, state, per_image)

    def _join_direct(
        self, block: int, kv: PromptKV | None, batch: int, state: Any, per_image: Tensor
    ) -> PromptKV | None:
        """``kv`` with the source's direct keys/values for ``block`` in front of it (they are
        valid in full, so per-set lengths of ``kv`` stay a valid prefix once shifted)."""
        direct = self._source.kv(block, batch, state)
        if direct is None:
            return kv
        dk, dv = direct
        if kv is None:
            return PromptKV(dk, dv, *self._selected(block, dk, batch, state, per_image))
        t = max(dk.shape[0], kv.k.shape[0])
        if t != 1 and dk.shape[0] not in (1, t):
            raise ValueError(
                f"fastprompt: block {block}'s key-value prompts have {dk.shape[0]} sets and its "
                f"prompt tokens {kv.k.shape[0]}"
            )
        k = torch.cat([dk.expand(t, -1, -1, -1), kv.k.expand(t, -1, -1, -1)], dim=2)
        v = torch.cat([dv.expand(t, -1, -1, -1), kv.v.expand(t, -1, -1, -1)], dim=2)
        index = kv.index if kv.index is not None or t == 1 else per_image
        lengths = None if kv.lengths is None else kv.lengths + dk.shape[2]
        return PromptKV(k, v, index, lengths)

    def _step(
        self,
        i: int,
        step: _Step,
        tokens: Any,
        held: int,
        state: Any,
        batch: int,
        attend: AttentionFn,
        per_image: Tensor,
        memory: str,
    ) -> Any:
        """:meth:`_block` under the memory policy (:func:`fastprompt.memory.step_under`)."""

        entry = dict(state) if memory == "block" and isinstance(state, dict) else None

        def run(tokens: Any, policy: str) -> Any:
            if entry is None:
                return self._block(i, step, tokens, held, state, batch, attend, per_image, policy)
            # A per-forward cache that the step fills (a Swin stage's dropped-out prompts) must
            # look to the recomputation as it looked to the forward; later steps keep the
            # forward's entries.
            local = dict(entry)
            out = self._block(i, step, tokens, held, local, batch, attend, per_image, policy)
            for key, value in local.items():
                state.setdefault(key, value)
            return out

        return step_under(memory, run, tokens, step.receive, self._backbone, i, self._recompute)

    def _block(
        self,
        i: int,
        step: _Step,
        tokens: Any,
        held: int,
        state: Any,
        batch: int,
        attend: AttentionFn,
        per_image: Tensor,
        memory: str = "none",
    ) -> Any:
        """Block ``i`` on the token state holding ``held`` prompt tokens (one step of the loop,
        so that each block can be wrapped on its own); ``memory`` goes to the adapter's block
        when it is one of the adapter's own policies."""
        bb, position = self._backbone, self._source.position
        kw = {"memory": memory} if memory != "none" else {}
        tokens = bb.enter(i, tokens, held)
        if not step.as_tokens:
            if held:
                tokens = bb.remove(tokens, held, position)
            kv = self._keys_values(i, batch, state, per_image)
            self._warn_hooks(i, True, memory)
            return bb.fused_block(i, tokens, 0, kv, attend, self.backend, **kw)
        if step.receive:
            prompts = self._source.tokens(i, batch, state)
            index, lengths = self._selected(i, prompts, batch, state, per_image)
            if lengths is not None:
                raise ValueError(
                    f"fastprompt: block {i}'s prompt sets differ in length; sets of different "
                    "lengths can only enter blocks whose prompt outputs are not read (as keys "
                    "and values)"
                )
            if index is not None:
                prompts = prompts[index]
            if self._token_fn is not None:
                prompts = self._token_fn(i, prompts)
            if held:
                tokens = bb.remove(tokens, held, position)
            tokens = bb.insert(tokens, i, prompts, position)
        direct = self._join_direct(i, None, batch, state, per_image)
        # An adapter whose fused block is also the faster way to run prompt tokens (Swin: once per
        # image, not per window) takes every block of the fused path.
        fast = bb.fused_tokens and self._fused_path() and not self._fused_reasons
        if direct is None and not fast:
            self._warn_hooks(i, False, memory)
            return bb.block(i, tokens, step.held, **kw)
        if self._fused_reasons:  # the source's own keys/values need the fused block anyway
            raise TypeError(f"fastprompt: {'; '.join(self._fused_reasons)}")
        self._warn_hooks(i, True, memory)
        return bb.fused_block(i, tokens, step.held, direct, attend, self.backend, **kw)

    def _run_blocks(
        self,
        x: Tensor,
        inputs: dict[str, Any],
        last: int | None = None,
        tap: BlockTap | None = None,
        who: str = "forward",
    ) -> Any:
        """The token state after block ``last`` (None: the last block), the blocks after it
        never run; ``tap(block, tokens, held)`` sees the state after every block run, with the
        number of prompt tokens it holds.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
        inputs : dict
            Other forward inputs for the prompt source's ``prepare``.
        last : int, optional
            The last block to run.
        tap : callable, optional
            Called after each block; it must not change the token state.
        who : str
            The call, for the error a keyword the prompt source does not take raises.
        """
        accepted = self._source.forward_inputs()
        if accepted is not None:
            takes = "the images" + (f" and {', '.join(accepted)}" if accepted else ", nothing else")
            refuse_unknown(who, inputs, accepted, f"a {self.method} model's {who} takes {takes}")
        self._check_live()
        self._sync()
        self._check_model()
        bb = self._backbone
        tokens = bb.embed(x)
        state = self._source.prepare(x, **inputs)
        batch = x.shape[0]
        attend = self._attention or _default_attention
        # The set of each image (T = B); an ordinary tensor even under inference_mode, so that
        # adapters can key caches on it and the op's check of a CUDA index is kept per version.
        with torch.inference_mode(False):
            per_image = torch.arange(batch, device=x.device)
        held, memory = 0, self.memory_policy()
        for i, step in enumerate(self._plan()):
            tokens = self._step(i, step, tokens, held, state, batch, attend, per_image, memory)
            held = step.held if step.as_tokens else 0
            if tap is not None:
                tap(i, tokens, held)
            if i == last:
                break
        return tokens
