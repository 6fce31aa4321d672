"""Recipes: the per-epoch schedules against the official formulas, optimiser groups, overrides."""

from __future__ import annotations

import math

import pytest
import torch

from fastprompt.cli import main
from fastprompt.train.recipes import (
    RECIPES,
    VTAB1K_PROMPTS,
    Recipe,
    apply_changes,
    get_recipe,
    lr_factor,
    make_optimizer,
    param_groups,
)


def official_vpt_lr(base_lr: float, batch: int, epoch: int, warmup: int, total: int) -> float:
    """KMnP/vpt, written out: tune_*.py scales the base lr by batch / 256; the scheduler is a
    LambdaLR over WarmupCosineSchedule(warmup_steps=WARMUP_EPOCH, t_total=TOTAL_EPOCH), created
    before training (so epoch 0 uses the lambda of step 0) and stepped once after every epoch:
    step < warmup: step / max(1, warmup); else, with p = (step - warmup) / max(1, total - warmup),
    max(0, 0.5 · (1 + cos(π · cycles · 2 · p))) with cycles = 0.5."""
    lr = base_lr / 256 * batch
    if epoch < warmup:
        return lr * epoch / max(1.0, warmup)
    p = (epoch - warmup) / max(1, total - warmup)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * p)))


def official_pgn_lr(base: float, epoch: int, warmup: int = 50, total: int = 100) -> float:
    """jochemloedeman/PGN's CosineWithWarmup stepped once per epoch (eta = base / 100): epoch 0
    at base / W, 1 <= e < W at e · base / W, then eta + (base - eta)(1 + cos(π(e - W)/(T - W)))/2.
    """
    eta = base / 100
    if epoch == 0:
        return base / warmup
    if epoch < warmup:
        return epoch * base / warmup
    return eta + (base - eta) * (1 + math.cos(math.pi * (epoch - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("base_lr, batch, warmup, total", [(0.25, 128, 10, 100), (5.0, 64, 3, 7)])
def test_vpt_schedule_is_the_official_formula(base_lr, batch, warmup, total):
    recipe = get_recipe("vpt").override(
        lr=base_lr, batch_size=batch, warmup_epochs=warmup, epochs=total
    )
    for epoch in range(total):
        expected = official_vpt_lr(base_lr, batch, epoch, warmup, total)
        assert recipe.lr_at(epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15), epoch
    assert recipe.lr_at(0) == 0.0


def test_vpt_schedule_equals_a_lambda_lr_stepped_per_epoch():
    """The mechanism, not only the formula: LambdaLR built before training, stepped per epoch."""
    recipe = get_recipe("vpt")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=recipe.peak_lr())
    lam = lambda step: lr_factor("vpt", step, recipe.epochs, recipe.warmup_epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    for epoch in range(recipe.epochs):
        assert opt.param_groups[0]["lr"] == pytest.approx(recipe.lr_at(epoch), abs=1e-15)
        opt.step()
        sched.step()


def test_pgn_schedule_is_the_official_formula():
    recipe = get_recipe("pgn")
    for epoch in range(100):
        assert recipe.lr_at(epoch) == pytest.approx(official_pgn_lr(0.1, epoch), rel=1e-12)
    # The values the official scheduler prints (checked against it in the PGN notes).
    for epoch, lr in ((0, 0.002), (1, 0.002), (49, 0.098), (50, 0.1), (75, 0.0505)):
        assert recipe.lr_at(epoch) == pytest.approx(lr, rel=1e-12)
    assert recipe.lr_at(99) == pytest.approx(0.0010977, rel=1e-4)
    assert recipe.lr_scaling == "none" and recipe.batch_size == 128


def test_pgn_recipe_is_the_official_optimiser():
    recipe = get_recipe("pgn")
    named = {
        "generator.w": torch.nn.Parameter(torch.ones(2)),
        "head.bias": torch.nn.Parameter(torch.ones(2)),
    }
    opt = make_optimizer(named, recipe)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["dampening"], group["nesterov"]) == (
        0.9,
        0.0,
        0,
        False,
    )
    assert (recipe.train_transform, recipe.test_transform, recipe.normalize) == (
        "pgn",
        "pgn-test",
        "backbone",
    )


def test_vpt_weight_decay_spares_only_the_head_bias():
    names = [
        "prompt_embeddings",
        "deep_prompt_embeddings",
        "prompt_proj.bias",
        "head.weight",
        "head.bias",
    ]
    named = {n: torch.nn.Parameter(torch.ones(1)) for n in names}
    groups = param_groups(named, get_recipe("vpt"))
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert groups[1]["params"] == [named["head.bias"]]
    assert len(groups[0]["params"]) == 4
    # A head without bias: one group, nothing exempt.
    named.pop("head.bias")
    assert len(param_groups(named, get_recipe("vpt"))) == 1


def test_pc_finetune_needs_a_base_lr_and_turns_dropout_off():
    recipe = get_recipe("pc-finetune")
    assert recipe.prompt_dropout == 0.0 and recipe.warmup_epochs == 0 and recipe.epochs == 20
    with pytest.raises(ValueError, match="lr is not set"):
        recipe.lr_at(0)
    assert recipe.lr_at(0, base=0.1) == pytest.approx(0.1 * 128 / 256)


def test_overrides_are_checked():
    recipe = get_recipe("vpt").override(
        epochs=5, warmup_epochs=1, no_decay=["head.bias", "prompt_proj.bias"]
    )
    assert recipe.epochs == 5 and recipe.no_decay == ("head.bias", "prompt_proj.bias")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown fields \\['lrr'\\]"):
        recipe.override(lrr=1)
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        recipe.override(epochs=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        recipe.override(schedule="step")
    with pytest.raises(ValueError, match="no recipe named 'sgd'"):
        get_recipe("sgd")


def test_a_recipe_whose_warmup_outlasts_its_epochs_is_refused():
    """``override`` does not rescale the warmup (``apply_changes`` does): the pgn recipe with 2
    epochs kept its 50 warmup epochs and trained the whole run at lr/50, without a word."""
    with pytest.raises(ValueError, match="warmup_epochs=50 must be below epochs=2"):
        get_recipe("pgn").override(epochs=2)
    with pytest.raises(ValueError, match="warmup_epochs=10 must be below epochs=10"):
        Recipe(name="mine", epochs=10, batch_size=8, lr=0.1)
    assert get_recipe("pgn").override(epochs=2, schedule="constant").warmup_epochs == 50
    assert apply_changes(get_recipe("pgn"), {"epochs": 2})[0].warmup_epochs == 1


def test_vtab_presets_are_the_official_prompt_counts():
    assert {k: VTAB1K_PROMPTS[k] for k in ("cifar100", "svhn", "clevr_dist", "sun397")} == {
        "cifar100": 10,
        "svhn": 50,
        "clevr_dist": 200,
        "sun397": 5,
    }
    assert len(VTAB1K_PROMPTS) == 19
    assert VTAB1K_PROMPTS["smallnorb_azi"] == VTAB1K_PROMPTS["smallnorb_ele"] == 200
    assert {
        VTAB1K_PROMPTS[k] for k in ("oxford_flowers102", "oxford_iiit_pet", "diabetic_retinopathy")
    } == {1}


def test_recipes_are_printed(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert f"recipe {name}" in out
    assert "vtab1k-cifar100" in out and "lr by epoch" in out
    # Each preset's class count and E2VPT's counts too, not VPT's alone.
    assert " ".join(next(x for x in out.splitlines() if "vtab1k-sun397" in x).split()) == (
        "vtab1k-sun397 397 5 10/5"
    )
    main(["train", "--recipe", "pgn", "--epochs", "10", "--print-recipe"])
    out = capsys.readouterr().out
    # Shortening a run keeps the recipe's warmup share (PGN: half).
    assert "warmup_epochs    5" in out and "recipe pgn" in out


def test_fields_are_typed_before_anything_runs():
    from fastprompt.train.recipes import coerce_field

    assert coerce_field("epochs", "12") == 12 and coerce_field("epochs", 12.0) == 12
    assert coerce_field("lr", "none") is None and coerce_field("crop_pct", "0.9") == 0.9
    assert coerce_field("no_decay", "head.bias, prompt_proj.bias") == (
        "head.bias",
        "prompt_proj.bias",
    )
    for field, value, want in (
        ("epochs", "abc", "an int"),
        ("epochs", True, "an int"),
        ("crop_pct", "abc", "a finite number"),
        ("momentum", float("nan"), "a finite number"),
        ("schedule", 3, "a string"),
    ):
        with pytest.raises(ValueError, match=f"{field} must be {want}"):
            coerce_field(field, value)
    with pytest.raises(ValueError, match="must be an int, got 'abc'"):
        Recipe.from_dict({**get_recipe("vpt").to_dict(), "epochs": "abc"})


def test_no_decay_names_must_be_trainable_tensors():
    import timm

    import fastprompt
    from fastprompt.train.recipes import check_no_decay

    model = fastprompt.vpt(
        timm.create_model(
            "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2
        ),
        1,
    )
    named = model.trainable_parameters()
    check_no_decay(model, named, get_recipe("vpt"))
    with pytest.raises(ValueError, match=r"'head.bais'.*closest: \['head.bias'"):
        check_no_decay(model, named, get_recipe("vpt").override(no_decay="head.bais"))
    with pytest.raises(ValueError, match="'pos_embed', a frozen tensor"):
        check_no_decay(model, named, get_recipe("vpt").override(no_decay="pos_embed"))
    model.unwrap()
    # A bias-free head: the vpt recipe's head.bias exempts nothing, and says nothing.
    bare = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2
    )
    bare.head = torch.nn.Linear(32, 3, bias=False)
    model = fastprompt.vpt(bare, 1)
    check_no_decay(model, model.trainable_parameters(), get_recipe("vpt"))
