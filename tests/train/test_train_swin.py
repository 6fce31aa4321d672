"""``fastprompt train / condense / evaluate`` on a shrunk timm Swin: a run of two steps, its
official-named checkpoint, the recipe's weight-decay exemption of the head bias, condensation."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from train_helpers import write_images

import fastprompt
from fastprompt.cli import main
from fastprompt.train.loop import classifier_name
from fastprompt.train.recipes import get_recipe, param_groups

SHRUNK = dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2])
SHRUNK["num_heads"] = [2, 2]
MODEL = ["--model", "swin_tiny_patch4_window7_224", "--no-pretrained", "--model-args"]
MODEL += [f"{k}={json.dumps(v)}" for k, v in SHRUNK.items()]
FAST = ["--workers", "0", "--no-progress", "--quiet"]


def test_train_condense_and_evaluate_a_swin(tmp_path):
    rows = write_images(tmp_path / "img", 12, 3)
    data = tmp_path / "data.csv"
    data.write_text("".join(f"{p},{y}\n" for p, y in rows))
    run = tmp_path / "run"
    args = ["train", *MODEL, "--data", str(data), "--val", str(data), "--prompts", "2"]
    args += ["--batch-size", "6", "--lr", "8", "--epochs", "1", *FAST, "--out", str(run)]
    assert main(args) == 0
    saved = json.loads((run / "run.json").read_text())
    assert saved["data"]["train_samples"] == 12 and saved["config"]["recipe"]["name"] == "vpt"
    # The official VPT code exempts only the classifier's bias from weight decay; a Swin's
    # classifier is head.fc.
    groups = torch.load(run / "last" / "trainer.pt", weights_only=True)["trainer"]["optimizer"]
    assert [(g["weight_decay"], len(g["params"])) for g in groups["param_groups"]] == [
        (1e-4, 4),
        (0.0, 1),
    ]
    backbone = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, **SHRUNK)
    # Another random init than the run's (--no-pretrained): loaded only when asked.
    last = fastprompt.load_prompts(backbone, run / "last", check_weights=False)
    assert last.method == "vpt" and last.readout == "patches+prompts"
    assert {"prompt_embeddings", "deep_prompt_embeddings_0", "deep_prompt_embeddings_1"} <= set(
        last.trainable_parameters()
    )
    args = ["condense", str(run), "--keep", "0.5", "--score", "taylor", "--finetune-epochs", "1"]
    assert main([*args, "--batch-size", "6", *FAST]) == 0
    condensed = fastprompt.train.load_run_model(str(tmp_path / "run-pc50-taylor"), "last")
    assert condensed.method == "prompt_condensation"
    assert sum(condensed.config.layer_counts) == 4  # half of 2 prompts in each of 4 blocks
    assert main(["evaluate", str(tmp_path / "run-pc50-taylor"), "--no-progress"]) == 0


def test_the_head_bias_is_exempt_wherever_the_classifier_lives():
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(**SHRUNK, num_classes=3)
    named = {n: p for n, p in swin.named_parameters() if n.startswith("head.")}
    assert classifier_name(swin) == "head.fc"
    decay, exempt = param_groups(named, get_recipe("vpt"), classifier_name(swin))
    assert exempt == {"params": [named["head.fc.bias"]], "weight_decay": 0.0}
    assert decay["params"] == [named["head.fc.weight"]]


def test_the_official_window_mixing_from_the_command_line(tmp_path, capsys):
    """``--window-mixing`` reaches the model and its checkpoints (official VPT-Swin runs can be
    reproduced from the CLI); a ViT refuses it, and condense refuses such a run up front."""
    rows = write_images(tmp_path / "img", 6, 3)
    data = tmp_path / "data.csv"
    data.write_text("".join(f"{p},{y}\n" for p, y in rows))
    run = tmp_path / "run"
    args = ["train", *MODEL, "--data", str(data), "--val", str(data), "--prompts", "2"]
    args += ["--batch-size", "6", "--epochs", "1", *FAST, "--window-mixing", "--out", str(run)]
    assert main(args) == 0
    saved = json.loads((run / "run.json").read_text())["config"]
    assert saved["method_args"]["window_mixing"] is True
    model = fastprompt.train.load_run_model(str(run), "last")
    assert model.config.window_mixing and model.backbone.window_mixing
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["condense", str(run), "--keep", "0.5", *FAST])
    err = capsys.readouterr().err
    assert "was trained with --window-mixing" in err and "per-sample scores" in err, err
    assert not (tmp_path / "run-pc50-taylor").exists()
    vit = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-args", "img_size=16"]
    vit += ["--data", str(data), "--val", str(data), "--prompts", "2", "--window-mixing", *FAST]
    with pytest.raises(SystemExit):
        main(["train", *vit, "--out", str(tmp_path / "vit")])
    assert "has no windows" in capsys.readouterr().err


def test_evaluate_refuses_a_backend_the_swin_blocks_need_before_building(
    tmp_path, monkeypatch, capsys
):
    """evaluate --backend triton on a Swin run failed only once the model was built, naming
    "backend 'triton'" but not the option."""
    import fastprompt.train.run as run_module

    rows = write_images(tmp_path / "img", 6, 3)
    data = tmp_path / "data.csv"
    data.write_text("".join(f"{p},{y}\n" for p, y in rows))
    run = tmp_path / "run"
    args = ["train", *MODEL, "--data", str(data), "--val", str(data), "--prompts", "2"]
    assert main([*args, "--batch-size", "6", "--epochs", "1", *FAST, "--out", str(run)]) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the Triton backend runs
    built = []
    real = run_module.load_run_model
    monkeypatch.setattr(
        run_module, "load_run_model", lambda *a, **k: built.append(1) or real(*a, **k)
    )
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run), "--backend", "triton", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--backend triton cannot run {run}'s model, a timm SwinTransformer" in err
    assert "no key_bias" in err and err.endswith(
        "evaluate it with --backend auto or cpp or cascade or torch"
    )
    assert not built
    assert main(["evaluate", str(run), "--backend", "torch", "--no-progress"]) == 0
