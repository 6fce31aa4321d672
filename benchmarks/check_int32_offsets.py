"""Do PyTorch's fused attention backwards index more than 2^31 elements rightly, on this GPU?

Two shapes the backends hand PyTorch's kernels (``docs/design.md`` section 6):

- ``long``: one sequence of R rows with R·H·d just past 2^31 (the cascade's shared prompt set: a
  few keys, the whole batch's queries in one sequence). The cascade caps each chunk of it at
  2^31 elements because FlashAttention-2's backward offsets its fp32 dQ accumulator within a
  sequence, (rows rounded to 128)·H·(d rounded to 32), in 32 bits
  (``fastprompt.kernels.cascade.prompt_attention.LONG_ROWS_LIMIT``); this checks that premise.
- ``batch``: many short sequences whose total B·H·N·d passes 2^31 (an image part at a large
  batch: ViT-L at N 577, batch 3700). Nothing caps it: this checks that none is needed.

Each runs one call against the same work split in two halves, which each fit, in its own process
(an illegal address ends a CUDA context). Needs a GPU with about 40 GB free; prints one line per
(kernel, shape): ``ok``, ``WRONG`` (with the worst differences) or ``CRASHED``.

Usage: ``python benchmarks/check_int32_offsets.py [flash] [efficient]`` (``--tiny``: the logic on
the CPU at small sizes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

H, D = 16, 64
# (B, N, P): the prompt part's long sequence, and a batch of ViT-L/16-at-384 px images.
SHAPES = {"long": (1, 2**31 // (H * D) + 4096, 64), "batch": (3700, 577, 0)}


def _check(kernel: str, shape: str, device: str = "cuda", tiny: bool = False) -> str:
    import torch

    from fastprompt.kernels.torch._sdpa import attend, attend_backward

    b, n, p = (2, 40, 0) if tiny and shape == "batch" else SHAPES[shape]
    if tiny and shape == "long":
        n = 1000
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=torch.bfloat16)

    q, dout = randn(b, H, n, D), randn(b, H, n, D)
    k, v = (randn(b, H, p, D), randn(b, H, p, D)) if p else (q, q)  # self-attention: k = v = q
    scale = D**-0.5
    out, lse = attend(kernel, q, k, v, None, scale)
    whole = attend_backward(kernel, dout, q, k, v, None, out, lse, scale)
    del out, lse
    # Halves along the rows of one sequence (keys shared), or along the batch (keys their own),
    # compared half by half in the inputs' dtype (an fp32 copy of a batch's gradients would not
    # fit beside them).
    dim, size = (2, n) if shape == "long" else (0, b)
    shared = bool(p) and shape == "long"

    def part(t, s, keys=False):
        return t if keys and shared else t[(slice(None),) * dim + (s,)]

    worst = dict.fromkeys(("dq", "dk", "dv"), 0.0)
    key_sums = [0.0, 0.0]
    for s in (slice(0, size // 2), slice(size // 2, size)):
        qs, ks, vs = part(q, s), part(k, s, True), part(v, s, True)
        o, lse = attend(kernel, qs, ks, vs, None, scale)
        grads = attend_backward(kernel, part(dout, s), qs, ks, vs, None, o, lse, scale)
        del o, lse
        for i, name in enumerate(worst):
            if shared and i > 0:  # dk, dv of shared keys: the halves' sum, compared below
                key_sums[i - 1] = key_sums[i - 1] + grads[i].float()
                continue
            ref = part(whole[i], s)
            err = (ref - grads[i]).abs().max().item() / max(ref.abs().max().item(), 1.0)
            worst[name] = max(worst[name], err)
        del grads
    if shared:
        for i, name in ((1, "dk"), (2, "dv")):
            ref = key_sums[i - 1]
            err = (whole[i].float() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
            worst[name] = err
    bad = {name: f"{err:.3g}" for name, err in worst.items() if not err <= 2e-2}
    return f"WRONG {bad}" if bad else f"ok (worst {max(worst.values()):.2e})"


KERNELS = ("flash", "efficient")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        print(_check(argv[1], argv[2]), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernels", nargs="*", help=f"any of {', '.join(KERNELS)} (default: both)")
    parser.add_argument("--tiny", action="store_true", help="the logic on the CPU, small sizes")
    args = parser.parse_args(argv)
    unknown = [k for k in args.kernels if k not in KERNELS]
    if unknown:
        parser.error(f"kernels are {' and '.join(KERNELS)}, got {unknown}")
    if args.tiny:  # the script's own logic on the CPU (tests)
        for shape in SHAPES:
            print(f"cpu_flash {shape}: {_check('cpu_flash', shape, 'cpu', tiny=True)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        # Each child would fail to start CUDA and read as CRASHED, a kernel fault it is not.
        parser.error("torch sees no CUDA device; --tiny checks the logic on the CPU")
    for kernel in args.kernels or KERNELS:
        for shape, (b, n, p) in SHAPES.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--child", kernel, shape], capture_output=True, text=True
            )
            lines, err = proc.stdout.strip().splitlines(), proc.stderr.strip().splitlines()
            if proc.returncode == 0 and lines:
                result = lines[-1]
            else:
                result = "CRASHED: " + (err[-1] if err else f"exit status {proc.returncode}")
            what = f"B {b}, H {H}, N {n}, d {D}, {p or n} keys"
            print(f"{kernel} {shape} ({what}): {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
