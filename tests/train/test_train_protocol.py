"""The training layer against the official training protocols: transforms, lr scaling and warmup
shared by ``fastprompt train`` and ``fastprompt.fit``, presets, what a finished run reports, and
older runs that keep the recipe they began with."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from train_helpers import FAST, TINY_MODEL

import fastprompt
from fastprompt.cli import main
from fastprompt.train.recipes import RECIPES, get_recipe


def official_vpt_transform(split: str, size: int):
    """KMnP/vpt ``src/data/transforms.py``, written out: a table of resize sizes, then a random
    crop and a flip (train) or a centre crop (test); ImageNet statistics."""
    from torchvision import transforms as T

    resize = {224: 256, 384: 438, 448: 512}[size]
    crop = (
        [T.RandomCrop(size), T.RandomHorizontalFlip(0.5)]
        if split == "train"
        else [T.CenterCrop(size)]
    )
    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return T.Compose([T.Resize(resize), *crop, T.ToTensor(), normalize])


@pytest.mark.parametrize("size", [224, 384, 448])
def test_vpt_and_e2vpt_recipes_use_the_official_fgvc_transforms(size):
    from PIL import Image

    from fastprompt.train.transforms import MEANS, build_transform, resize_size

    assert resize_size(size, 0.875) == {224: 256, 384: 438, 448: 512}[size]
    rng = torch.Generator().manual_seed(size)
    pixels = (torch.rand(size + 77, size + 31, 3, generator=rng) * 255).to(torch.uint8)
    image = Image.fromarray(pixels.numpy())
    for name in ("vpt", "e2vpt"):
        recipe = RECIPES[name]
        assert (recipe.train_transform, recipe.test_transform) == ("fgvc", "resize-crop")
        for split, kind in (("train", recipe.train_transform), ("test", recipe.test_transform)):
            ours = build_transform(
                kind,
                (size, size),
                *MEANS["imagenet"],
                recipe.interpolation,
                recipe.crop_pct,
                recipe.resize_rounding,
            )
            for seed in (0, 1, 2):  # the same crop and flip from the same generator state
                torch.manual_seed(seed)
                want = official_vpt_transform(split, size)(image)
                torch.manual_seed(seed)
                assert torch.equal(ours(image), want), (name, split, seed)


def test_vtab_presets_keep_the_square_resize_and_deep_dropout(capsys):
    from fastprompt.cli.train import add_train_parser, method_args

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    preset = ["train", "--preset", "vtab1k-dtd"]

    def dropout(*extra):
        return method_args(parser.parse_args([*preset, *extra]))[1]["dropout"]

    assert dropout() == 0.1  # every official VTAB-1k VPT-deep command
    assert dropout("--shallow") == 0.0  # the official code uses none for VPT-shallow
    assert dropout("--prompt-dropout", "0.05") == 0.05
    assert method_args(parser.parse_args(["train", "--prompts", "4"]))[1]["dropout"] == 0.0
    assert main([*preset, "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "train_transform  resize\n" in out and "test_transform   resize\n" in out
    assert "normalize        imagenet" in out
    # A method option training would refuse is refused before the recipe is printed.
    with pytest.raises(SystemExit):
        main(["train", "--method", "pgn", "--preset", "vtab1k-dtd", "--print-recipe"])
    assert "--preset does not apply to --method pgn" in capsys.readouterr().err


def test_help_says_what_lr_epochs_and_best_mean(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "rescales the warmup to the same share" in out and "--warmup-epochs keeps" in out
    assert "SOLVER.BASE_LR" in out and "--set lr_scaling=none" in out
    assert "e2vpt and pc-finetune recipes peak at lr x batch / 256" in out
    assert "not published" in out  # --preset: no per-task batch, lr, weight decay
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "selected on that data" in out and "official VPT/E2VPT protocol reports" in out


def test_a_warmup_that_never_ends_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "5", "--warmup-epochs", "5", "--print-recipe"])
    err = capsys.readouterr().err
    assert "--warmup-epochs 5 must be below the 5 epochs of the run" in err
    with pytest.raises(SystemExit):
        main(["train", "--warmup-epochs", "100", "--print-recipe"])
    assert "--warmup-epochs 100 must be below the 100 epochs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="warmup_epochs=3 must be below the 3 epochs"):
        fastprompt.fit(torch.nn.Linear(1, 1), [], epochs=3, lr=0.1, warmup_epochs=3)
    # Rescaled with the epochs, as before, and said.
    assert main(["train", "--epochs", "20", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "warmup_epochs    2\n" in out
    assert "the warmup is rescaled from 10 to 2 epochs" in out and "--warmup-epochs 10" in out


def _recording(monkeypatch) -> list:
    """Patch the Trainer that ``fastprompt.fit`` builds so its recipes are recorded."""
    import fastprompt.train.simple as simple

    seen = []

    class Recording(simple.Trainer):
        def __init__(self, model, recipe, *args, **kwargs):
            seen.append(recipe)
            super().__init__(model, recipe, *args, **kwargs)

    monkeypatch.setattr(simple, "Trainer", Recording)
    return seen


def test_fit_and_pruning_scale_lr_and_warmup_as_the_cli(monkeypatch, capsys):
    from helpers import tiny_vit
    from torch.utils.data import DataLoader, TensorDataset

    from fastprompt.cli.train import add_train_parser, resolve_recipe
    from fastprompt.train.recipes import apply_changes

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    seen = _recording(monkeypatch)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,)))
    loader = DataLoader(data, batch_size=8)
    prompted = fastprompt.vpt(tiny_vit(), 2)
    with pytest.warns(UserWarning, match="rescaled from 10 to 2 epochs.*warmup_epochs=10"):
        fastprompt.fit(prompted, loader, epochs=20, lr=0.5, recipe="vpt", progress=False)
    cli = ["train", "--epochs", "20", "--lr", "0.5", "--batch-size", "8"]
    assert seen[-1] == resolve_recipe(parser.parse_args(cli))[0]
    assert seen[-1].lr_at(2) == pytest.approx(0.5 * 8 / 256)  # the peak, after 2 warmup epochs
    # A loader without a batch size: the recipe's batch.
    batches = [(data.tensors[0], data.tensors[1])]
    fastprompt.fit(prompted, batches, epochs=3, lr=0.5, warmup_epochs=1, recipe="e2vpt")
    assert seen[-1].peak_lr() == pytest.approx(0.5 * 64 / 256) and seen[-1].warmup_epochs == 1
    # E2VPT's rewinding retrains at the first run's peak (the official rewind reuses its lr).
    e2vpt = fastprompt.e2vpt(tiny_vit(), 3, 2)
    seen.clear()
    with pytest.warns(UserWarning, match="rescaled from 10 to 0 epochs"):
        fastprompt.e2vpt_pruning(
            e2vpt, loader, loader, epochs=3, lr=0.1, tokens=[1], segments=[2], progress=False
        )
    first, _ = apply_changes(get_recipe("e2vpt"), {"epochs": 3, "lr": 0.1, "batch_size": 8})
    assert seen == [first] and first.peak_lr() == pytest.approx(0.1 * 8 / 256)
    # Without a recipe the lr is the peak, as before.
    fastprompt.fit(prompted, loader, epochs=1, lr=0.5, progress=False)
    assert seen[-1].peak_lr() == 0.5


def test_an_older_run_resumes_with_its_transforms_and_says_what_it_reports(tiny_csv, tmp_path):
    """A run folder written before the fgvc default and the floored resize (its run.json and
    trainer.pt recipes lack ``resize_rounding`` and hold ``resize-crop``) resumes with the
    transforms it began with; the finished run reports its last epoch beside its best."""
    from fastprompt.train.checkpoints import sha256
    from fastprompt.train.run import read_run, transforms_for

    model_args = ["img_size=20", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
    tiny = [*TINY_MODEL[:3], *model_args, "--no-pretrained"]  # 20 / 0.875: 22 floored, 23 rounded
    run = tmp_path / "old"
    args = ["train", *tiny, "--data", str(tiny_csv), "--val", str(tiny_csv), "--prompts", "2"]
    assert main([*args, *FAST, "--epochs", "2", "--stop-after", "1", "--out", str(run)]) == 0
    log = (run / "log.txt").read_text()
    assert "the warmup is rescaled from 10 to 0 epochs" in log and "--warmup-epochs 10" in log

    def age(recipe: dict) -> None:
        assert recipe.pop("resize_rounding") == "floor" and recipe["train_transform"] == "fgvc"
        recipe["train_transform"] = "resize-crop"

    saved = json.loads((run / "run.json").read_text())
    age(saved["config"]["recipe"])
    (run / "run.json").write_text(json.dumps(saved))
    trainer_pt = run / "last" / "trainer.pt"
    state = torch.load(trainer_pt, weights_only=False)
    age(state["trainer"]["schedule"]["recipe"])
    torch.save(state, trainer_pt)
    (run / "last" / "trainer.pt.sha256").write_text(f"{sha256(str(trainer_pt))}  trainer.pt\n")

    assert main(["train", "--resume", str(run), "--no-progress", "--quiet"]) == 0
    config, _ = read_run(str(run))
    assert config.recipe.train_transform == "resize-crop"
    assert config.recipe.resize_rounding == "round"
    model = fastprompt.train.load_run_model(str(run), "last")
    train_tf, test_tf, _ = transforms_for(model.model, config.recipe)
    assert [type(t).__name__ for t in train_tf.transforms[:2]] == ["Resize", "CenterCrop"]
    assert train_tf.transforms[0].size == test_tf.transforms[0].size == 23
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    done = (run / "log.txt").read_text().splitlines()[-1]
    assert done.startswith(f"done: last epoch's validation top-1 {100 * rows[-1]['val_acc']:.2f}%")
    assert f"{run}/last" in done and "selected on this validation data" in done
    # A new run: the official augmentation and the official (floored) resize.
    new, _, _ = transforms_for(model.model, RECIPES["vpt"])
    assert [type(t).__name__ for t in new.transforms[:3]] == [
        "Resize",
        "RandomCrop",
        "RandomHorizontalFlip",
    ]
    assert new.transforms[0].size == 22


def test_best_can_be_the_lowest_validation_loss(tiny_csv, tmp_path):
    """``best_by=val_loss``: the official PGN ModelCheckpoint's choice (min val_loss)."""
    run = tmp_path / "run"
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), *FAST]
    args += ["--prompts", "2", "--epochs", "4", "--warmup-epochs", "1", "--out", str(run)]
    assert main([*args, "--set", "best_by=val_loss"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["epoch"] == min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert (run / "log.txt").read_text().rstrip().endswith("by val_loss)")


def test_a_vtab_preset_run_has_the_tasks_classes_though_train800_lacks_some(tmp_path, capsys):
    """A VTAB-1k train800 list may hold no image of a task's last classes (sun397: 800 images,
    397 classes), which val200 and test have. The head had max label + 1 outputs and the run was
    refused ("--val ... has 1 class(es) the run was not trained on"); the official head has the
    task's DATA.NUMBER_CLASSES outputs and counts such images as errors."""
    from train_helpers import write_images

    rows = write_images(tmp_path / "images", 12, 4)
    (tmp_path / "train800.txt").write_text("".join(f"{p} {y % 3}\n" for p, y in rows[:8]))
    (tmp_path / "val200.txt").write_text("".join(f"{p} {y}\n" for p, y in rows[8:]))
    base = ["train", *TINY_MODEL, *FAST, "--epochs", "1", "--data", str(tmp_path / "train800.txt")]
    base += ["--val", str(tmp_path / "val200.txt")]
    assert main([*base, "--preset", "vtab1k-clevr_dist", "--out", str(tmp_path / "r")]) == 0
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["classes"] == [str(i) for i in range(6)]  # clevr_dist: 6 classes
    assert run["config"]["data"]["num_classes"] == 6
    assert main(["evaluate", str(tmp_path / "r"), "--data", str(tmp_path / "val200.txt")]) == 0
    capsys.readouterr()
    # Without the class count the error says how to give it.
    with pytest.raises(SystemExit):
        main([*base, "--prompts", "2", "--out", str(tmp_path / "m")])
    assert "give its class count (--num-classes N, or --preset" in capsys.readouterr().err
    # --num-classes says it without a preset; a label beyond it is refused, naming it.
    assert main([*base, "--prompts", "2", "--num-classes", "4", "--out", str(tmp_path / "n")]) == 0
    assert len(json.loads((tmp_path / "n" / "run.json").read_text())["classes"]) == 4
    with pytest.raises(SystemExit):
        main([*base, "--preset", "vtab1k-patch_camelyon", "--out", str(tmp_path / "p")])
    assert "has label 2, no class of a task of 2 classes" in capsys.readouterr().err
