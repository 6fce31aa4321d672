"""``fastprompt train --memory``: the recipe field, the same training under every policy, and
under torchrun (gloo, CPU) with per-block checkpointing."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, torchrun

from fastprompt.cli import main

ARGS = ["--prompts", "3", "--epochs", "1", "--warmup-epochs", "0"]
ARGS += ["--batch-size", "8", "--lr", "16", "--workers", "0", "--device", "cpu"]
ARGS += ["--no-progress", "--quiet"]


def _prompts(run):
    return load_file(run / "last" / "prompts.safetensors")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_every_policy_trains_the_same_prompts_in_one_process_and_under_torchrun(tiny_csv, tmp_path):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), *ARGS]
    assert main([*args, "--out", str(tmp_path / "none")]) == 0
    assert main([*args, "--memory", "mlp", "--out", str(tmp_path / "mlp")]) == 0
    recipe = json.loads((tmp_path / "mlp" / "run.json").read_text())["config"]["recipe"]
    assert recipe["memory"] == "mlp"
    none, mlp = _prompts(tmp_path / "none"), _prompts(tmp_path / "mlp")
    assert all(torch.equal(mlp[name], none[name]) for name in none)

    torchrun([*args, "--set", "memory=block"], tmp_path / "two")
    two = _prompts(tmp_path / "two")
    for name in none:  # 3 SGD steps over 2 processes: equal up to fp32 reduction order
        torch.testing.assert_close(two[name], none[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--memory", "full"], "argument --memory: invalid choice: 'full'"),
        (["--set", "memory=full"], r"memory must be one of \('none', 'mlp', 'block'\)"),
    ],
)
def test_bad_policies_are_refused_before_training(tiny_csv, tmp_path, capsys, extra, match):
    argv = ["train", *TINY_MODEL, "--data", str(tiny_csv), *ARGS, *extra]
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "run")])
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
