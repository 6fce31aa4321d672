"""Cascade attention over PyTorch's fused kernels (FlashInfer's cascade, Hydragen's decomposition).

A query's keys split into the prompt part and the image part, each ordinary attention on PyTorch's
fused kernels (:mod:`fastprompt.kernels.torch._sdpa`), merged by log-sum-exp (``docs/design.md``
section 6):

- the *image part*: each sequence's queries against its own keys (plus Swin's ``key_bias``);
- the *prompt part*: for a shared set (no ``prompt_index``), every query of the batch as one long
  sequence (1, H, B·N, d) against the set's keys (1, H, P, d): the keys are read once and the
  kernel runs long GEMMs; with a ``prompt_index``, each sequence against its own set, gathered.
  Per-set lengths mask slots with a bias (zeroed keys, ``-inf`` scores), so nothing synchronises
  with the host.

Backward runs each part's fused backward with the *merged* ``out`` and ``lse``, which gives each
part's exact share (the kernels form ``exp(s - lse)`` and ``rowsum(dout · out)`` from what they
are handed): ``dq`` is the sum of the two, the image part gives ``dk``/``dv``, and a shared set's
long-sequence call gives its prompt gradients already summed over the batch. On a GPU that call
is split into ``chunks`` sequences of whole images so that the kernel's grid (one block per key
tile and sequence) fills the device; the partial sums (chunks, H, P, d) are added in fp32 in a
fixed order. Indexed sets give per-sequence prompt gradients, summed per set by a deterministic
segment reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprompt.kernels.cascade._merge import merge
from fastprompt.kernels.torch._common import (
    backward_lse,
    broadcastable_bias,
    empty_out,
    finish_scored,
    gate_column,
    pad_like_gate,
    prompt_keys,
    reduce_over_sets,
)
from fastprompt.kernels.torch._sdpa import attend, attend_backward, kernel_for

__all__ = [
    "long_chunks",
    "prompt_attention_bwd",
    "prompt_attention_bwd_scored",
    "prompt_attention_fwd",
]


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _grouped(t: Tensor, chunks: int) -> Tensor:
    """(B, H, N, d) → (chunks, H, (B / chunks)·N, d): whole images per chunk, in batch order (a
    view when ``t`` is stored (B, N, H, d), as the op's outputs and timm's q/k/v are)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(chunks, (b // chunks) * n, h, d).transpose(1, 2)


def _ungrouped(t: Tensor, b: int, n: int) -> Tensor:
    """Inverse of :func:`_grouped`: (chunks, H, (B / chunks)·N, d) → (B, H, N, d)."""
    _, h, _, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h, d).transpose(1, 2)


def _grouped_lse(lse: Tensor, chunks: int) -> Tensor:
    b, h, n = lse.shape
    return lse.transpose(1, 2).reshape(chunks, (b // chunks) * n, h).transpose(1, 2)


def _ungrouped_lse(lse: Tensor, b: int, n: int) -> Tensor:
    return lse.transpose(1, 2).reshape(b, n, lse.shape[1]).transpose(1, 2)


# The most elements (rows·H·d, rounded as FlashAttention-2 rounds them) one sequence of the long
# backward call may hold: that kernel's 32-bit offsets.
LONG_ROWS_LIMIT = 2**31 - 1


def long_chunks(q: Tensor, num_prompts: int) -> int:
    """How many sequences the shared set's long backward call is split into.

    1 off the GPU. On a GPU, the fewest whole-image chunks (a divisor of B) that give the fused
    backward, which runs one thread block per (key tile of 128, sequence, head), about two blocks
    per multiprocessor, and that keep each chunk within :data:`LONG_ROWS_LIMIT`.
    """
    b, h, n, d = q.shape
    if q.device.type != "cuda" or b <= 1:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    tiles = max(1, -(-num_prompts // 128)) * max(1, h)
    want = -(-2 * sms // tiles)
    # FlashAttention-2's backward (PyTorch's flash kernel) offsets a sequence's rows in its fp32
    # dQ accumulator, (rows rounded up to 128)·H·(d rounded up to 32, or 256), with 32-bit
    # products: past 2^31 elements in one sequence it writes the wrong memory.
    d_rounded = 256 if d > 192 else -(-d // 32) * 32

    def fits(c: int) -> bool:
        return -(-(b // c) * n // 128) * 128 * h * d_rounded <= LONG_ROWS_LIMIT

    return next((c for c in range(want, b + 1) if b % c == 0 and fits(c)), b)


def _image_part(q, k, v, key_bias, scale):
    if k.shape[2] == 0:
        return None
    o, lse = attend(kernel_for(q, key_bias is not None), q, k, v, key_bias, scale)
    if key_bias is not None:
        # A row whose image keys the bias masks entirely (-inf, in the dtype the reference adds it
        # in) has no image key; kernels differ on what they return for it (the CPU flash kernel:
        # lse 0), which would poison the merge. Found on the bias's own rows, then repeated.
        acc = torch.promote_types(q.dtype, torch.float32)
        rows = torch.isneginf(key_bias.to(acc)).all(-1, keepdim=True)
        masked = broadcastable_bias(rows, q.shape[0]).squeeze(-1)
        lse = lse.masked_fill(masked, float("-inf"))
        o = o.masked_fill(masked[..., None], 0.0)
    return o, lse


def _prompt_part(q, prompt_k, prompt_v, prompt_index, prompt_lengths, scale):
    b, _, n, _ = q.shape
    if prompt_k.shape[2] == 0:
        return None
    keys = prompt_keys(prompt_k, prompt_v, prompt_index, prompt_lengths, b, per_sequence=False)
    shared = keys.sets is None
    qp = _grouped(q, 1) if shared else q
    o, lse = attend(kernel_for(qp, keys.bias is not None), qp, keys.k, keys.v, keys.bias, scale)
    if shared:
        o, lse = _ungrouped(o, b, n), _ungrouped_lse(lse, b, n)
    if keys.has_keys is not None:
        # An empty set: its rows have no prompt key at all, whatever a kernel returns for rows
        # whose scores are all -inf (0 on the CPU; NaN would poison the merge).
        empty = ~keys.has_keys if shared else ~keys.has_keys[:, None, None]
        lse = lse.masked_fill(empty, float("-inf"))
        o = o.masked_fill(empty[..., None], 0.0)
    return o, lse


def prompt_attention_fwd(
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, key_bias=None
):
    """Forward: ``(out, lse)`` (``docs/design.md`` section 6)."""
    b, h, n, _ = q.shape
    out = empty_out(q)
    parts = []
    if b * h * n > 0:
        parts = [
            part
            for part in (
                _prompt_part(q, prompt_k, prompt_v, prompt_index, prompt_lengths, scale),
                _image_part(q, k, v, key_bias, scale),
            )
            if part is not None
        ]
    if not parts:
        out.zero_()
        return out, torch.full((b, h, n), float("-inf"), dtype=_lse_dtype(q), device=q.device)
    if len(parts) == 1:
        o, lse = parts[0]
        out.copy_(o.masked_fill(torch.isneginf(lse)[..., None], 0.0))
        return out, lse
    (o_p, lse_p), (o_i, lse_i) = parts
    return out, merge(o_p, lse_p, o_i, lse_i, out)


def _prompt_backward(
    dout, q, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, chunks, with_gate
):
    """dq of the prompt part, its prompt gradients (per set when shared and not ``with_gate``,
    else per sequence) and, ``with_gate``, the gate (B, P)."""
    b, _, n, d = q.shape
    per_sequence = with_gate or prompt_index is not None
    keys = prompt_keys(prompt_k, prompt_v, prompt_index, prompt_lengths, b, per_sequence)
    if not per_sequence:
        c = chunks if chunks is not None else long_chunks(q, prompt_k.shape[2])
        expand = (c, *keys.k.shape[1:])
        bias = None if keys.bias is None else keys.bias.expand(c, -1, -1, -1)
        dq, dpk, dpv = attend_backward(
            kernel_for(q, bias is not None),
            _grouped(dout, c),
            _grouped(q, c),
            # Materialised (chunks·P·d per head, small): no kernel is handed a batch stride of 0.
            keys.k.expand(expand).contiguous(),
            keys.v.expand(expand).contiguous(),
            bias,
            _grouped(out, c),
            _grouped_lse(lse, c),
            scale,
        )
        acc = _lse_dtype(q)
        dpk, dpv = dpk.to(acc).sum(0, keepdim=True), dpv.to(acc).sum(0, keepdim=True)
        return _ungrouped(dq, b, n), dpk, dpv, None
    if not with_gate:
        dq, dpk, dpv = attend_backward(
            kernel_for(q, keys.bias is not None),
            dout,
            q,
            keys.k,
            keys.v,
            keys.bias,
            out,
            lse,
            scale,
        )
        return dq, dpk, dpv, None
    qa, ka, va = gate_column(q, keys.k, keys.v)
    dq, dpk, dpv = attend_backward(
        kernel_for(qa, keys.bias is not None),
        pad_like_gate(dout),
        qa,
        ka,
        va,
        keys.bias,
        pad_like_gate(out),
        lse,
        scale,
    )
    gate = dpk[..., d].to(_lse_dtype(q)).sum(1) / scale
    return dq[..., :d], dpk[..., :d], dpv[..., :d], gate


def _backward(
    dout,
    q,
    k,
    v,
    prompt_k,
    prompt_v,
    prompt_index,
    prompt_lengths,
    out,
    lse,
    scale,
    key_bias,
    chunks,
    with_gate,
    image_grads=True,
):
    b, h, n, _ = q.shape
    p = prompt_k.shape[2]
    acc = _lse_dtype(q)
    dq = dk = dv = dpk = dpv = gate = None
    if b * h * n > 0:
        lse_b = backward_lse(lse)
        # The prompt part's gradients need only the merged out and lse: without image
        # gradients the image part's backward is skipped.
        if k.shape[2] > 0 and image_grads:
            dq, dk, dv = attend_backward(
                kernel_for(q, key_bias is not None), dout, q, k, v, key_bias, out, lse_b, scale
            )
        if p > 0:
            dq_p, dpk, dpv, gate = _prompt_backward(
                dout,
                q,
                prompt_k,
                prompt_v,
                prompt_index,
                prompt_lengths,
                out,
                lse_b,
                scale,
                chunks,
                with_gate,
            )
            dq = dq_p if dq is None else dq + dq_p
    # Gradients not asked for are dropped by the op: left unwritten rather than zero-filled.
    fill = torch.zeros_like if image_grads else torch.empty_like
    if dq is None:
        dq = fill(q)
    if dk is None:
        dk, dv = fill(k), fill(v)
    per_sequence = with_gate or prompt_index is not None
    rows = b if per_sequence else 1
    if dpk is None:
        dpk = dpv = prompt_k.new_zeros((rows, *prompt_k.shape[1:]), dtype=acc)
    if gate is None and with_gate:
        gate = q.new_zeros((b, p), dtype=acc)
    return dq, dk, dv, dpk, dpv, gate


def prompt_attention_bwd(
    dout,
    q,
    k,
    v,
    prompt_k,
    prompt_v,
    prompt_index,
    prompt_lengths,
    out,
    lse,
    scale,
    key_bias=None,
    chunks=None,
    image_grads=True,
):
    """Backward: ``(dq, dk, dv, dprompt_k, dprompt_v)``, prompt gradients per set in fp32.

    ``image_grads=False`` (only the prompt gradients are needed) skips the image part's backward:
    dq, dk and dv come back unspecified (the op drops them). ``chunks`` (tests)
    overrides :func:`long_chunks`; it must divide B.
    """
    dq, dk, dv, dpk, dpv, _ = _backward(
        dout,
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        out,
        lse,
        scale,
        key_bias,
        chunks,
        with_gate=False,
        image_grads=image_grads,
    )
    t = prompt_k.shape[0]
    if prompt_index is None:  # summed over the batch already, set 0 only
        acc = _lse_dtype(q)
        return dq, dk, dv, _first_set(dpk.to(acc), t), _first_set(dpv.to(acc), t)
    return (
        dq,
        dk,
        dv,
        reduce_over_sets(dpk, prompt_index, t),
        reduce_over_sets(dpv, prompt_index, t),
    )


def _first_set(summed: Tensor, num_sets: int) -> Tensor:
    if num_sets == 1:
        return summed
    out = summed.new_zeros((num_sets, *summed.shape[1:]))
    out[:1] = summed
    return out


def prompt_attention_bwd_scored(
    dout,
    q,
    k,
    v,
    prompt_k,
    prompt_v,
    prompt_index,
    prompt_lengths,
    out,
    lse,
    scale,
    u_k,
    u_v,
    key_bias=None,
    image_grads=True,
):
    """Backward plus Prompt Condensation's ``terms`` (S, B, P) and ``gate`` (B, P): the prompt part
    runs per sequence, with :func:`~fastprompt.kernels.torch._common.gate_column` for the gate;
    ``image_grads`` as in :func:`prompt_attention_bwd`."""
    grads = _backward(
        dout,
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        out,
        lse,
        scale,
        key_bias,
        None,
        with_gate=True,
        image_grads=image_grads,
    )
    return finish_scored(*grads, prompt_index, prompt_k.shape[0], u_k, u_v)
