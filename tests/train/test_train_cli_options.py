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


def test_a_value_given_twice_in_two_spellings_is_one_value(capsys, tmp_path):
    """`--set lr=0.1 --set lr=.1` was refused as "given twice with different values": the
    values were compared as parsed text (.1 is not JSON, so it stayed the string ".1");
    `--model-args drop_rate=.1` reached timm as that string."""
    for twice in (["lr=0.1", "lr=.1"], ["epochs=10", "epochs=10.0"], ["lr=1", "lr=+1."]):
        argv = ["train", "--set", twice[0], "--set", twice[1], "--print-recipe"]
        assert main(argv) == 0, twice
        assert "given twice" not in capsys.readouterr().err
    err = cli_error(capsys, ["train", "--set", "lr=0.1", "--set", "lr=.2", "--print-recipe"])
    assert "lr is given twice, as lr=0.1 and lr=0.2; give it once" in err
    base = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", "digits"]
    base += ["--out", str(tmp_path / "r"), "--model-args", "img_size=16", "drop_rate=0.1"]
    # Past the pairs to timm's check (33 is no multiple of 2 heads): what timm would receive.
    err = cli_error(capsys, [*base, "--model-args", "drop_rate=.1", "embed_dim=33", "num_heads=2"])
    assert "--model-args img_size=16 drop_rate=0.1 embed_dim=33 num_heads=2: timm's" in err
    err = cli_error(capsys, [*base, "--model-args", "drop_rate=.2"])
    assert "drop_rate is given twice, as drop_rate=0.1 and drop_rate=0.2" in err


def test_only_pythons_own_number_spellings_become_numbers():
    """`.1`, `1.`, `+2` are read as Python reads them, but text that Python (and JSON) does not
    read as a number stayed a number too: `007` became 7 and the Arabic-Indic digit `٣` became 3
    (a regular expression's \\d and int() take any Unicode digit), where timm receives text."""
    from fastprompt.cli.train import _model_arg

    numbers = {".1": 0.1, "1.": 1.0, "+2": 2, "-.5": -0.5, "+1e5": 1e5, "007.5": 7.5, "00": 0}
    for text, number in numbers.items():
        value = _model_arg(f"k={text}")[1]
        assert value == number and type(value) is type(number), (text, value)
    for text in ("007", "-01", "\u0663", "\u0663.5", "1_000", "+ 2", "1e"):
        assert _model_arg(f"k={text}") == ("k", text)


def test_a_run_begun_with_set_in_another_spelling_resumes(tmp_path, capsys):
    """A run begun with --set lr=.1 recorded the text ".1" (an older fastprompt's parse), now
    read as 0.1: resuming with the same command must not call it a change."""
    run = tmp_path / "run"
    argv = ["train", *TINY_MODEL, "--data", "digits:0-1", "--prompts", "1", "--epochs", "1"]
    argv += ["--workers", "0", "--no-progress", "--quiet", "--batch-size", "64"]
    assert main([*argv, "--set", "lr=.1", "--out", str(run), "--stop-after", "1"]) == 0
    saved = json.loads((run / "run.json").read_text())
    assert saved["command"]["explicit"]["set"] == [["lr", 0.1]]
    saved["command"]["explicit"]["set"] = [["lr", ".1"]]
    (run / "run.json").write_text(json.dumps(saved))
    assert main([*argv, "--set", "lr=.1", "--resume", str(run)]) == 0
    err = cli_error(capsys, [*argv, "--set", "lr=.2", "--resume", str(run)])
    assert "differs from the run's" in err


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


def test_pretrained_weights_that_cannot_be_fetched_are_said_with_the_ways_round(
    tmp_path, capsys, monkeypatch
):
    """Offline (a cluster's compute node), `train --model M` ended in huggingface_hub's
    traceback; the options that avoid the download were not named."""
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    create = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file")
        return create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    argv = ["train", "--model", "vit_tiny_patch16_224", "--data", "digits", "--prompts", "1"]
    err = cli_error(capsys, [*argv, *FAST, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "timm could not get the pretrained weights of vit_tiny_patch16_224" in err
    assert "LocalEntryNotFoundError" in err and "--no-pretrained" in err and "--weights" in err
    assert not (tmp_path / "run").exists()
