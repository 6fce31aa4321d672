"""torchrun on CPU (gloo): 2 processes train the same prompts and head as 1 process with the same
global batch, metrics are reduced across processes, and only rank 0 writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, torchrun

from fastprompt.cli import main


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_processes_equal_one_with_the_same_global_batch(tiny_csv, tmp_path):
    args = [*TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), "--prompts", "3"]
    args += ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--lr", "16"]
    args += ["--workers", "0", "--device", "cpu", "--no-progress", "--quiet"]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    torchrun(["train", *args], tmp_path / "two")
    one = load_file(tmp_path / "one" / "last" / "prompts.safetensors")
    two = load_file(tmp_path / "two" / "last" / "prompts.safetensors")
    for name in one:  # 3 SGD steps: equal up to fp32 reduction order
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert m2["train_samples"] == m1["train_samples"] == 24  # summed over both processes
    assert m2["val_samples"] == 24 and m2["val_acc"] == m1["val_acc"]
    for key in ("train_loss", "val_loss", "train_acc"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    state = torch.load(tmp_path / "two" / "last" / "trainer.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every process's random state, for resume
    log = (tmp_path / "two" / "log.txt").read_text()
    assert log.count("epoch 1/1") == 1  # rank 0 alone logs
    # evaluate under torchrun: the processes check they read one save; the result is one model's.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd = [*launcher, "2", "-m", "fastprompt", "evaluate", str(tmp_path / "two"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["evaluate", str(tmp_path / "two"), "--no-progress"]) == 0
    both, alone = (json.loads(line) for line in (tmp_path / "two" / "evaluations.jsonl").open())
    assert both["samples"] == alone["samples"] == 24 and both["top1"] == alone["top1"]
