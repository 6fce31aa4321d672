"""E²VPT trains from the command line through its registry entry, and run folders of different
methods serve one mixed batch (``fastprompt.multitask``)."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import FAST, TINY_MODEL

import fastprompt
from fastprompt.cli import main


def _train(tiny_csv, out, *method):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), *FAST]
    assert main([*args, *method, "--epochs", "1", "--out", str(out)]) == 0
    return json.loads((out / "run.json").read_text())["config"]


def test_e2vpt_trains_and_its_runs_mix_with_vpt_runs(tiny_csv, tmp_path):
    # The preset's 102 classes would draw another random-init backbone than the VPT run's 3
    # (timm's init draws after the head), which one mixed batch refuses: --num-classes keeps 3.
    e2 = ["--method", "e2vpt", "--preset", "vtab1k-caltech101", "--num-classes", "3"]
    saved = _train(tiny_csv, tmp_path / "e2", *e2)
    assert saved["method"] == "e2vpt" and saved["recipe"]["name"] == "e2vpt"
    args = saved["method_args"]
    assert (args["num_prompts"], args["num_kv"], args["dropout"]) == (32, 5, 0.1)
    assert saved["recipe"]["normalize"] == "imagenet"
    _train(tiny_csv, tmp_path / "vpt", "--prompts", "3")
    mixed = fastprompt.multitask({"e2": tmp_path / "e2", "vpt": str(tmp_path / "vpt")}).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    task = ["vpt", "e2", "e2", "vpt"]
    with torch.no_grad():
        out = mixed(x, task)
        for name in ("e2", "vpt"):
            own = fastprompt.train.load_run_model(str(tmp_path / name)).eval()
            rows = [i for i, t in enumerate(task) if t == name]
            assert torch.allclose(out[rows], own(x[rows]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--kv-prompts", "-1"], "--kv-prompts must be >= 0, got -1"),
        (["--method", "vpt", "--kv-prompts", "2"], "--kv-prompts does not apply to --method vpt"),
    ],
)
def test_e2vpt_options_are_checked(tiny_csv, tmp_path, capsys, extra, match):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--method", "e2vpt", *extra]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "r")])
    assert match in capsys.readouterr().err


def test_a_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="task 'a': no folder"):
        fastprompt.multitask({"a": tmp_path / "nothing"})


def test_pruning_and_rewinding_keep_the_best_on_validation():
    from helpers import tiny_vit

    prompted = fastprompt.e2vpt(tiny_vit(), 3, 2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))]
    best, table = fastprompt.e2vpt_pruning(
        prompted, data, data, epochs=1, lr=0.1, tokens=[0, 1], segments=[2]
    )
    assert [(r["tokens"], r["segments"]) for r in table] == [(0, 2), (1, 2)]
    top = max(r["val_acc"] for r in table)
    chosen = max((r for r in table if r["val_acc"] == top), key=lambda r: r["tokens"])
    token_mask, segment_mask = best.source.masks()
    assert int((token_mask == 0).sum()) == chosen["tokens"]
    assert (segment_mask == 0).sum(1).tolist() == [2, 2, 2]
    assert not best.config.train_masks and prompted.config.train_masks
