"""Element offsets past 2^31 and launch limits, without a GPU and without allocating gigabytes.

A GPU holds tensors of more than 2^31 elements (ViT-L at N = 577 and batch 4096: 2.4·10^9 per
q), and a kernel that forms an offset as a product of 32-bit integers then reads and writes the
wrong memory. Here such offsets are reached with tensors whose *strides* are huge: views of a
sparse file mapped copy-on-write, of which only the few pages the kernels touch take memory. The
kernels run in Triton's interpreter, whose integers wrap as a GPU's do (on a GPU, the same tests
run on 8 GiB of real memory). The launch decisions (chunks, compaction) are pure functions of
sizes, checked at sizes no test could allocate.
"""

from __future__ import annotations

import multiprocessing
import signal

import pytest
import torch
from helpers import assert_close

from fastprompt.kernels.cascade import _merge
from fastprompt.kernels.cascade import prompt_attention as cascade_impl
from fastprompt.kernels.torch import _common

BIG = 2**30  # a stride that fits int32 while twice it does not


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def big(tmp_path):
    """``big(numel, device)``: a 1-D fp32 tensor of ``numel`` elements. On the CPU, zeros over a
    sparse file mapped privately (pages are allocated only where written); on a GPU, plain memory
    (8 GiB per 2^31 elements, which an 80 GB GPU holds)."""
    made = []

    def make(numel: int, device: str) -> torch.Tensor:
        if device != "cpu":
            made.append(torch.empty(numel, device=device))
            return made[-1]
        path = tmp_path / f"storage{len(made)}"
        with open(path, "wb") as f:
            f.truncate(numel * 4)
        made.append(torch.from_file(str(path), shared=False, size=numel, dtype=torch.float32))
        return made[-1]

    return make


def _run(fn, device: str):
    """``fn()`` (a tuple of tensors) as CPU tensors. On the CPU in a forked child: a kernel that
    computes a wrong offset usually reads unmapped memory, and the child's crash is then this
    test's failure instead of the whole session's."""
    if device != "cpu":
        return tuple(t.cpu() for t in fn())
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run():
        child.send(tuple(t.detach().numpy() for t in fn()))  # tensors would go by shared memory
        child.close()

    proc = ctx.Process(target=run)
    proc.start()
    child.close()  # the child's end: a crash then reads as the end of the pipe
    try:
        got = parent.recv() if parent.poll(300) else None
    except EOFError:
        got = None
    proc.join(30)
    if proc.exitcode != 0:
        why = signal.Signals(-proc.exitcode).name if proc.exitcode < 0 else proc.exitcode
        pytest.fail(f"the kernel's process died ({why}): it accessed memory outside its tensors")
    return tuple(torch.from_numpy(a) for a in got)


def _triton(device: str):
    """The Triton kernels module, if they run on ``device`` here (the CPU: in the interpreter)."""
    pytest.importorskip("triton")
    from fastprompt import _config
    from fastprompt.kernels import triton as kernels

    if (device == "cpu") != _config.get().triton_interpret:
        pytest.skip(f"Triton kernels do not run on {device} tensors in this process")
    why = kernels.availability()
    if why is not None:
        pytest.skip(why)
    return kernels


@pytest.mark.parametrize("device", DEVICES)
def test_the_triton_merge_reads_rows_past_2_to_the_31(big, device):
    """The cascade's merge kernel formed ``b * stride`` in 32 bits: sequence 2 of a partial output
    whose sequences lie 2^30 elements apart read memory 2^31 elements before its tensor."""
    _triton(device)
    b, h, n, d = 3, 2, 3, 16
    g = torch.Generator().manual_seed(0)
    dense_p = torch.randn(b, h, n, d, generator=g)
    storage = big(2 * BIG + h * n * d, device)
    o_p = storage.as_strided(dense_p.shape, (BIG, *dense_p[0].stride()))
    for i in range(b):
        o_p[i] = dense_p[i]
    o_i = torch.randn(b, h, n, d, generator=g)
    lse_p, lse_i = torch.randn(b, h, n, generator=g), torch.randn(b, h, n, generator=g)
    out_t = _common.empty_out(o_i)
    lse_t = _merge.merge_torch(dense_p, lse_p, o_i, lse_i, out_t)
    o_i, lse_p, lse_i = (t.to(device) for t in (o_i, lse_p, lse_i))
    out_k = _common.empty_out(o_i)
    lse_k, out_k = _run(lambda: (_merge.merge_triton(o_p, lse_p, o_i, lse_i, out_k), out_k), device)
    assert_close(out_k, out_t, "out", atol=1e-6, rtol=1e-6)
    assert_close(lse_k, lse_t, "lse", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rows_more_than_2_to_the_31_elements_apart(big, device):
    """q, k, v and dout whose rows lie 2^30 elements apart (a sequence-first layout at a large
    batch puts B·H·d between rows): row 2's offset, 2·2^30, wrapped in the kernels' 32-bit row
    products. Each such operand is now copied compactly first, so the results equal those of the
    same kernels on dense copies."""
    kernels = _triton(device)
    b, h, n, d, p = 1, 1, 3, 16, 2
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(b, h, n, d, generator=g).to(device) for _ in range(4)]
    storage = big(2 * BIG + 4 * d, device)
    spread = []
    for i, t in enumerate(dense):
        view = storage.as_strided(t.shape, (n * BIG, n * BIG, BIG, 1), i * d)
        view.copy_(t)
        spread.append(view)
    pk, pv = (torch.randn(1, h, p, d, generator=g).to(device) for _ in "kv")

    def both(q, k, v, dout):
        out, lse = kernels.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.25)
        grads = kernels.prompt_attention_bwd(dout, q, k, v, pk, pv, None, None, out, lse, 0.25)
        return out, lse, *grads

    expected = [t.cpu() for t in both(*dense)]
    got = _run(lambda: both(*spread), device)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dpk", "dpv"), got, expected):
        assert torch.equal(a, e), name


def _on_cuda(monkeypatch, sms: int) -> None:
    """Meta tensors that say they are on a GPU with ``sms`` multiprocessors."""

    class Props:
        multi_processor_count = sms

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))


@pytest.mark.parametrize(
    "b, h, n, d, p, chunks",
    [
        (64, 12, 197, 64, 200, 16),  # ViT-B: filling the GPU decides, chunks of 4 images
        (16384, 16, 577, 64, 1024, 8),  # ViT-L at 384 px: 4 chunks would hold 2.4e9 elements
        (16383, 16, 577, 64, 1024, 43),  # 16383 = 3·43·127: the next divisor that fits
        (4, 1, 2**23, 256, 1024, 4),  # 2^31 elements per image: each alone, the least there is
    ],
)
def test_the_long_backward_calls_chunks_stay_within_32_bit_offsets(
    monkeypatch, b, h, n, d, p, chunks
):
    _on_cuda(monkeypatch, 132)
    q = torch.empty(b, h, n, d, device="meta")
    got = cascade_impl.long_chunks(q, p)
    assert got == chunks and b % got == 0
    rows = -(-(b // got) * n // 128) * 128
    d_rounded = 256 if d > 192 else -(-d // 32) * 32
    assert rows * h * d_rounded <= cascade_impl.LONG_ROWS_LIMIT or got == b


def test_triton_operands_are_compacted_or_refused_by_their_extent():
    """Decided from sizes and strides alone (meta tensors: nothing is allocated)."""
    pytest.importorskip("triton")
    from fastprompt.kernels.triton._common import INT32_MAX, fits_int32, sequence_extent

    b, n, h, d = 4096, 577, 16, 64  # ViT-L at 384 px, batch 4096: 2.4e9 elements
    timm = torch.empty(b, n, 3, h, d, device="meta").permute(2, 0, 3, 1, 4)[0]
    assert fits_int32(timm, "q") is timm  # one image spans 3·N·H·d: kept as it is
    seq_first = torch.empty(n, b, h, d, device="meta").permute(1, 2, 0, 3)
    assert sequence_extent(seq_first.shape, seq_first.stride()) > INT32_MAX
    compact = fits_int32(seq_first, "q")
    assert compact.shape == seq_first.shape and compact.transpose(1, 2).is_contiguous()
    heads_first = torch.empty(h, b, n, d, device="meta").transpose(0, 1)
    assert fits_int32(heads_first, "k").transpose(1, 2).is_contiguous()
    prompts = torch.empty(1000, 4096, h, d, device="meta").permute(1, 2, 0, 3)  # (T, H, P, d)
    assert fits_int32(prompts, "pk").transpose(1, 2).is_contiguous()
    huge = torch.empty(1, 2, 2**25, 64, device="meta")  # one sequence of 2^32 elements
    with pytest.raises(ValueError, match=r"q \(1, 2, 33554432, 64\) holds 4294967296 elements"):
        fits_int32(huge, "q")
    assert sequence_extent((0, 5, 5, 5), (0, 1, 1, 1)) == 0


def test_triton_score_vectors_past_32_bit_offsets_are_refused():
    pytest.importorskip("triton")
    from fastprompt.kernels.triton.prompt_attention_backward import _check_u

    q = torch.empty(4096, 16, 197, 64, device="meta")
    pk = torch.empty(4096, 16, 256, 64, device="meta")  # a set per image
    u = torch.empty(2, *pk.shape, device="meta")  # vector 1 starts 2^30 elements in: fits
    _check_u(u, u, q, pk)
    u = torch.empty(3, *pk.shape, device="meta")
    with pytest.raises(ValueError, match="more than 2\\^31 elements"):
        _check_u(u, u, q, pk)


def test_the_gpu_check_of_pytorchs_kernels_runs_here_on_tiny_shapes(capsys):
    """``benchmarks/check_int32_offsets.py`` (for a GPU) with its logic on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "check_int32_offsets.py"
    spec = importlib.util.spec_from_file_location("check_int32_offsets", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["ok", "ok"], lines
