"""The CUDA kernels' launch decisions (``csrc/include/fastprompt/launch.h``), compiled and run on
the host: plain C++, so no GPU is needed.

They replace two defects of the old kernels: the batch on grid axis z (more than 65,535 sequences
failed to launch) and 16-byte vector words chosen from the row size alone (a row of 16 bytes at
an 8-byte-aligned address was read with misaligned 16-byte loads).
"""

from __future__ import annotations

import subprocess

import pytest

from fastprompt.kernels.cpp import _build

CXX = _build.find_cxx()
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

DRIVER = r"""
#include <cstdio>
#include "fastprompt/launch.h"
using namespace fastprompt::launch;

int width(int elem_bytes, long long row_len, uintptr_t address, long long s2, long long last) {
  const Rows rows[] = {{address, {row_len * 4 * 197, row_len * 4, s2}, last},
                       {0, {3, 5, 7}, 9}};  // an absent part: ignored
  return vector_elems(elem_bytes, row_len, rows, 2);
}

int main() {
  std::printf("blocks %u %u %u %u %u\n", blocks_for(0), blocks_for(256), blocks_for(257),
              blocks_for(70000LL * 197 * 8), blocks_for(1LL << 40));
  std::printf("warps %u\n", blocks_for(70000LL * 50, 8));
  std::printf("bf16 %d %d %d %d %d %d\n",
              width(2, 64, 0x10000, 64 * 4, 1),  // aligned: 16-byte words
              width(2, 8, 0x10008, 8 * 4, 1),    // 16-byte rows at an 8-byte-aligned address
              width(2, 64, 0x10000, 65, 1),      // an odd row stride
              width(2, 64, 0x10000, 64 * 4, 2),  // features not contiguous
              width(2, 6, 0x10000, 6 * 4, 1),    // 12-byte rows
              width(2, 64, 0x10002, 64 * 4, 1)); // a 2-byte-aligned view
  std::printf("fp32 %d %d\n", width(4, 64, 0x10000, 64 * 4, 1), width(4, 64, 0x10004, 64, 1));
  return 0;
}
"""


def test_launch_decisions(tmp_path):
    src = tmp_path / "driver.cpp"
    src.write_text(DRIVER)
    exe = tmp_path / "driver"
    include = _build.source_root() / "include"
    subprocess.run([CXX, "-std=c++17", f"-I{include}", str(src), "-o", str(exe)], check=True)
    lines = dict(
        line.split(" ", 1)
        for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()
    )
    blocks = [int(x) for x in lines["blocks"].split()]
    # Grid axis x only: a batch of 70,000 sequences is 431,000 blocks, above the 65,535 of y/z.
    assert blocks[:4] == [1, 1, 2, (70000 * 197 * 8 + 255) // 256]
    assert blocks[3] > 65535 and blocks[4] == 1 << 20 and blocks[4] < 2**31
    assert int(lines["warps"]) == (70000 * 50 + 7) // 8
    assert [int(x) for x in lines["bf16"].split()] == [8, 4, 1, 1, 2, 1]
    assert [int(x) for x in lines["fp32"].split()] == [4, 1]
