"""Does a PyTorch fused attention backward index one sequence of more than 2^31 elements rightly?

The cascade's shared prompt set runs its backward as one long sequence per chunk of images
(``docs/design.md`` section 6), and caps each chunk at 2^31 elements because FlashAttention-2's
backward offsets its fp32 dQ accumulator within a sequence, (rows rounded to 128)·H·(d rounded to
32), in 32 bits (``fastprompt.kernels.cascade.prompt_attention.LONG_ROWS_LIMIT``). This checks
the premise on the installed torch and GPU: one call over R rows with R·H·d just past 2^31 (the
prompt part's shape: a few keys, a long run of queries) against the same call made in two halves,
which each fit. Each kernel runs in its own process (an illegal address ends a CUDA context).

Needs a GPU with about 40 GB free. Prints one line per kernel: ``ok``, ``WRONG`` (with the worst
difference) or ``CRASHED``.

Usage: ``python benchmarks/check_int32_offsets.py [flash] [efficient]`` (``--tiny``: its logic on
the CPU with 1000 rows).
"""

from __future__ import annotations

import subprocess
import sys

H, D, P = 16, 64, 64
ROWS = 2**31 // (H * D) + 4096  # past the limit by a few tiles


def _check(kernel: str, rows: int = ROWS, device: str = "cuda") -> str:
    import torch

    from fastprompt.kernels.torch._sdpa import attend, attend_backward

    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, dout = randn(1, H, rows, D), randn(1, H, rows, D)
    k, v = randn(1, H, P, D), randn(1, H, P, D)
    out, lse = attend(kernel, q, k, v, None, D**-0.5)
    whole = attend_backward(kernel, dout, q, k, v, None, out, lse, D**-0.5)
    half = rows // 2
    parts = [
        attend_backward(
            kernel, dout[:, :, s], q[:, :, s], k, v, None, out[:, :, s], lse[:, :, s], D**-0.5
        )
        for s in (slice(0, half), slice(half, rows))
    ]
    dq = torch.cat([parts[0][0], parts[1][0]], 2)
    dk = parts[0][1].float() + parts[1][1].float()
    dv = parts[0][2].float() + parts[1][2].float()
    worst = {
        "dq": (whole[0].float() - dq.float()).abs().max().item(),
        "dk": (whole[1].float() - dk).abs().max().item() / max(dk.abs().max().item(), 1.0),
        "dv": (whole[2].float() - dv).abs().max().item() / max(dv.abs().max().item(), 1.0),
    }
    bad = {name: err for name, err in worst.items() if not err <= 2e-2}
    if bad:
        return f"WRONG {bad}"
    return f"ok (worst {max(worst.values()):.2e})"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        print(_check(argv[1]), flush=True)
        return 0
    if argv and argv[0] == "--tiny":  # the script's own logic on the CPU, 1000 rows (tests)
        print(f"cpu_flash: {_check('cpu_flash', 1000, 'cpu')}")
        return 0
    for kernel in argv or ["flash", "efficient"]:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kernel], capture_output=True, text=True
        )
        lines, err = proc.stdout.strip().splitlines(), proc.stderr.strip().splitlines()
        if proc.returncode == 0 and lines:
            result = lines[-1]
        else:
            result = "CRASHED: " + (err[-1] if err else f"exit status {proc.returncode}")
        print(f"{kernel}: {ROWS} rows x {H} heads x d {D} in one sequence: {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
