"""Repeatable options apply every time they are given; condense runs where it is told."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import FAST, TINY_MODEL, cli_error

from fastprompt.cli import main


def test_every_set_applies_and_a_field_set_twice_is_refused(capsys):
    """`--set a=1 --set b=2` kept only b=2 (argparse's nargs="+" replaces, silently)."""
    assert main(["train", "--set", "epochs=7", "--set", "batch_size=16", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "epochs           7" in out and "batch_size       16" in out
    assert main(["train", "--set", "epochs=7", "--set", "epochs=7", "--print-recipe"]) == 0
    err = cli_error(capsys, ["train", "--set", "epochs=7", "--set", "epochs=8", "--print-recipe"])
    assert "argument --set: epochs is given twice, as epochs=7 and epochs=8; give it once" in err
    # A field with an option of its own, given again by --set: the last one won, silently.
    err = cli_error(capsys, ["train", "--epochs", "7", "--set", "epochs=8", "--print-recipe"])
    assert "--epochs 7 and --set epochs=8 set the recipe field epochs twice" in err


def test_every_model_args_applies(capsys, tmp_path):
    base = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", "digits"]
    base += ["--out", str(tmp_path / "r"), "--model-args", "img_size=16", "patch_size=4"]
    # 33 is no multiple of 2 heads; the first --model-args was dropped (silently).
    err = cli_error(capsys, [*base, "--model-args", "embed_dim=33", "num_heads=2"])
    assert "--model-args img_size=16 patch_size=4 embed_dim=33 num_heads=2: timm's" in err
    err = cli_error(capsys, [*base, "--model-args", "patch_size=8"])
    assert "patch_size is given twice, as patch_size=4 and patch_size=8" in err
    assert not (tmp_path / "r").exists()


def test_every_bench_list_applies(capsys):
    # --fits-models nope was dropped: the error named the missing --fits instead.
    err = cli_error(
        capsys, ["bench", "--fits-models", "nope", "--fits-models", "vit_tiny_patch16_224"]
    )
    assert "--fits-models 'nope' is not a timm model name" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a run trained on CUDA, seen without it")
def test_condense_takes_a_device(tiny_csv, tmp_path, capsys):
    """A run trained on CUDA could not be condensed on a machine without one: condense had no
    --device (train and evaluate have), and refused the run's."""
    run = tmp_path / "run"
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), *FAST]
    assert main([*args, "--prompts", "2", "--epochs", "1", "--out", str(run)]) == 0
    saved = json.loads((run / "run.json").read_text())
    saved["config"]["device"] = "cuda"
    (run / "run.json").write_text(json.dumps(saved))
    condense = ["condense", str(run), "--keep", "0.5", "--finetune-epochs", "1", "--quiet"]
    condense += ["--no-progress", "--out", str(tmp_path / "pc")]
    err = cli_error(capsys, condense)
    assert "was trained with --device cuda" in err and "--device cpu" in err
    err = cli_error(capsys, [*condense, "--device", "cuda"])
    assert err.endswith("--device cuda was asked for, but torch sees no CUDA device")
    assert main([*condense, "--device", "cpu"]) == 0
    # The condensed run stays where it was made: its resume needs no --device.
    assert json.loads((tmp_path / "pc" / "run.json").read_text())["config"]["device"] == "cpu"


def test_a_generator_too_small_for_the_model_s_images_names_pgn_resolution(
    tiny_csv, tmp_path, capsys
):
    """A 16-pixel model gave PGN's generator 16-pixel images, refused as "resolution=16", a
    keyword the command line never showed: the error names --pgn-resolution, its default."""
    args = ["train", *TINY_MODEL, *FAST, "--method", "pgn", "--prompts", "2", "--epochs", "1"]
    args += ["--library-size", "4", "--data", str(tiny_csv), "--val", str(tiny_csv)]
    err = cli_error(capsys, [*args, "--out", str(tmp_path / "r")])
    assert "resolution=16 is smaller than the resnet10 generator" in err
    assert "the default of --pgn-resolution" in err
    assert main([*args, "--pgn-resolution", "32", "--out", str(tmp_path / "ok")]) == 0
