"""``fastprompt train`` reads the method registry: the VPT ablations train from the command line
with nothing but their own file, and each option applies to the methods that declare it."""

from __future__ import annotations

import json

import pytest
from train_helpers import FAST, TINY_MODEL, cli_error

import fastprompt
from fastprompt import registry
from fastprompt.cli import main


def test_the_ablations_train_from_the_command_line(tiny_csv, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), *FAST]
    args += ["--method", "vpt_ablation", "--prompts", "2", "--deep-layers", "1", "--reverse-deep"]
    assert main([*args, "--epochs", "1", "--out", str(run)]) == 0
    saved = json.loads((run / "run.json").read_text())["config"]
    assert saved["method"] == "vpt_ablation" and saved["recipe"]["name"] == "vpt"
    model = fastprompt.train.load_run_model(str(run), "last")
    assert model.method == "vpt_ablation"
    assert model.config.num_deep_layers == 1 and model.config.reverse_deep
    assert "prompt_embeddings" not in model.trainable_parameters()
    err = cli_error(capsys, ["condense", str(run)])
    assert "is a 'vpt_ablation' run; Prompt Condensation condenses runs of ['vpt']" in err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--deep-layers", "2"], "--deep-layers does not apply to --method vpt"),
        (["--method", "pgn", "--shallow"], "--shallow does not apply to --method pgn"),
        (["--method", "vpt_ablation", "--reverse-deep"], "--reverse-deep needs --deep-layers"),
        (["--method", "vpt_ablation", "--deep-layers", "0"], "--deep-layers must be >= 1"),
        (["--method", "pgn", "--library-size", "0"], "--library-size must be >= 1, got 0"),
        (["--head-init", "linear"], "--head-init linear does not apply to --method vpt"),
    ],
)
def test_options_apply_to_the_methods_that_declare_them(tiny_csv, tmp_path, capsys, extra, match):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--prompts", "2"]
    err = cli_error(capsys, [*args, *extra, "--out", str(tmp_path / "r")])
    assert match in err, err
    assert not (tmp_path / "r").exists()


def test_help_lists_every_trainable_method_and_who_takes_each_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in registry.trainable():
        assert name in out
    assert {"vpt", "pgn", "vpt_ablation"} <= set(registry.trainable())
    assert "pgn: prompts per image L (default 16); vpt, vpt_ablation: prompts per set" in out
