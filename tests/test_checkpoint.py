"""Prompt checkpoints round-trip exactly, official VPT ones load, wrong models are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import images, tiny_swin, tiny_vit

import fastprompt


def _trained(**kw):
    prompted = fastprompt.vpt(tiny_vit(), 5, project=kw.pop("project", -1), **kw)
    with torch.no_grad():
        for p in prompted.trainable_parameters().values():
            p.add_(torch.randn_like(p))
    return prompted


@pytest.mark.parametrize("kw", [dict(), dict(deep=False), dict(project=16, dropout=0.1)])
def test_save_load_round_trips_bit_exactly(tmp_path, kw):
    prompted = _trained(**kw)
    prompted.save_prompts(tmp_path / "run")
    loaded = fastprompt.load_prompts(tiny_vit(), tmp_path / "run")
    assert loaded.config == prompted.config
    for name, p in prompted.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name
    prompted.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(prompted(images(2)), loaded(images(2)))


def test_official_vpt_checkpoint_loads(tmp_path):
    prompted = _trained()
    official = {
        "enc.transformer.prompt_embeddings": prompted.prompt_embeddings.detach(),
        "enc.transformer.deep_prompt_embeddings": prompted.deep_prompt_embeddings.detach(),
        "head.last_layer.weight": prompted.model.head.weight.detach(),
        "head.last_layer.bias": prompted.model.head.bias.detach(),
        "enc.transformer.embeddings.patch_embeddings.weight": torch.zeros(1),
    }
    torch.save({"model": official}, tmp_path / "official.pth")
    loaded = fastprompt.load_prompts(tiny_vit(), tmp_path / "official.pth")
    assert loaded.config.num_prompts == 5 and loaded.config.deep
    for name, p in prompted.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name


@pytest.mark.parametrize("swin", [False, True], ids=["vit", "swin"])
def test_an_official_checkpoint_of_other_backbone_weights_is_refused(swin):
    """The official code saves the whole backbone with the prompts: its patch embedding must be
    the model's (a model created without pretrained=True, or with another tag, is refused)."""
    make = tiny_swin if swin else tiny_vit
    prompted = fastprompt.vpt(make(), 2, deep=False)
    patch = prompted.model.patch_embed.proj.weight.detach()
    name = (
        "enc.patch_embed.proj.weight"
        if swin
        else ("enc.transformer.embeddings.patch_embeddings.weight")
    )
    prefix = "enc." if swin else "enc.transformer."
    head = prompted.backbone.classifier()
    official = {
        f"{prefix}prompt_embeddings": prompted.prompt_embeddings.detach(),
        "head.last_layer.weight": head.weight.detach(),
        "head.last_layer.bias": head.bias.detach(),
    }
    as_given = fastprompt.load_prompts(make(), {"model": {**official, name: patch}})
    assert torch.equal(as_given.prompt_embeddings, prompted.prompt_embeddings)
    other = {**official, name: patch + 0.1 * patch.abs().max()}
    with pytest.raises(ValueError, match=r"trained on other backbone weights \(patch_embed"):
        fastprompt.load_prompts(make(), other)
    fastprompt.load_prompts(make(), other, check_weights=False)


@pytest.mark.parametrize("method", ["vpt", "e2vpt"])
def test_an_official_checkpoint_with_a_hidden_layer_head_is_refused(tmp_path, method):
    """The official MODEL.MLP_NUM > 0 puts head.projection.* before head.last_layer (of the same
    shape as a timm head): loading last_layer alone dropped the hidden layers without a word."""
    prompted = _trained()
    official = {
        "enc.transformer.prompt_embeddings": prompted.prompt_embeddings.detach(),
        "head.projection.0.0.weight": torch.zeros(64, 64),
        "head.projection.0.0.bias": torch.zeros(64),
        "head.last_layer.weight": prompted.model.head.weight.detach(),
        "head.last_layer.bias": prompted.model.head.bias.detach(),
    }
    if method == "e2vpt":
        official["enc.transformer.encoder.layer.0.attn.deep_QKV_embeddings"] = torch.zeros(1, 2, 64)
    torch.save({"model": official}, tmp_path / "official.pth")
    with pytest.raises(
        ValueError,
        match=r"head has hidden layers \(head\.projection\.0\.0\.bias and 1 more.*MLP_NUM",
    ):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "official.pth")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _trained().save_prompts(tmp_path / "run")
    with pytest.raises(
        ValueError,
        match=r"another model shape.*embed_dim: checkpoint 64, model 32",
    ):
        fastprompt.load_prompts(tiny_vit(embed_dim=32), tmp_path / "run")
    with pytest.raises(ValueError, match="num_classes"):
        fastprompt.load_prompts(tiny_vit(num_classes=7), tmp_path / "run")
    official = {"prompt_embeddings": torch.zeros(1, 5, 32)}
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        fastprompt.load_prompts(tiny_vit(num_classes=0), official)
    with pytest.raises(TypeError, match=r"already prompted \(a PromptedViT\); call .unwrap"):
        fastprompt.load_prompts(fastprompt.vpt(tiny_vit(), 2), tmp_path / "run")


def test_the_tensors_file_alone_is_a_checkpoint(tmp_path):
    prompted = _trained(readout="patches+prompts", dropout=0.1)
    prompted.save_prompts(tmp_path / "run")
    loaded = fastprompt.load_prompts(tiny_vit(), tmp_path / "run" / "prompts.safetensors")
    assert loaded.config == prompted.config  # the readout is not lost (it changes the logits)
    prompted.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(prompted(images(2)), loaded(images(2)))


def test_config_json_records_the_method(tmp_path):
    import json

    _trained().save_prompts(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["format"] == "fastprompt.prompts/2" and saved["method"] == "vpt"
    assert saved["config"]["num_prompts"] == 5 and saved["model"]["embed_dim"] == 64


def test_format_1_folders_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    prompted = _trained()
    folder = tmp_path / "old"
    folder.mkdir()
    tensors = {n: p.detach().contiguous() for n, p in prompted.trainable_parameters().items()}
    save_file(tensors, folder / "prompts.safetensors", metadata={"format": "fastprompt.prompts/1"})
    config = {
        "format": "fastprompt.prompts/1",
        "vpt": {
            "num_prompts": 5,
            "deep": True,
            "dropout": 0.0,
            "project": -1,
            "readout": "cls",
            "layer_counts": None,
        },
        "model": prompted.backbone.signature(),
        "impl": "fused",
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = fastprompt.load_prompts(tiny_vit(), folder)
    for name, p in prompted.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import safetensors.torch

    first = _trained()
    first.save_prompts(tmp_path / "run")
    second = _trained()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_prompts(tmp_path / "run")
    monkeypatch.undo()
    loaded = fastprompt.load_prompts(tiny_vit(), tmp_path / "run")
    for name, p in first.trainable_parameters().items():
        assert torch.equal(p, loaded.trainable_parameters()[name]), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "prompts.safetensors",
    ]


def test_a_dict_checkpoint_error_does_not_print_the_tensors():
    official = {"prompt_embeddings": torch.zeros(1, 5, 32)}
    with pytest.raises(ValueError) as err:
        fastprompt.load_prompts(tiny_vit(num_classes=0), official)
    assert "the given state dict" in str(err.value) and "tensor(" not in str(err.value)


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    _trained().save_prompts(tmp_path / "run")
    with pytest.raises(ValueError, match="holds a 'vpt' model, not 'pgn'"):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "run", method="pgn")
    with pytest.raises(FileNotFoundError, match=r"holds no prompts\.safetensors"):
        fastprompt.load_prompts(tiny_vit(), tmp_path)


def test_checkpoints_carry_a_checksum_and_their_classes(tmp_path):
    import warnings

    from safetensors import safe_open

    from fastprompt.checkpoint import CheckpointError, checkpoint_info, save_prompts

    prompted = _trained()
    with pytest.raises(ValueError, match="10 class names for a head of 5 classes"):
        save_prompts(prompted, tmp_path / "ck", classes=[f"c{i}" for i in range(10)])
    save_prompts(prompted, tmp_path / "ck", classes=[f"c{i}" for i in range(5)])
    with safe_open(str(tmp_path / "ck" / "prompts.safetensors"), framework="pt") as f:
        assert len(f.metadata()["tensors_sha256"]) == 64
    assert checkpoint_info(tmp_path / "ck")["classes"][:2] == ["c0", "c1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastprompt.load_prompts(tiny_vit(), tmp_path / "ck")  # no warning when all agree
    data = bytearray((tmp_path / "ck" / "prompts.safetensors").read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "ck" / "prompts.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "ck")
    data[-3] ^= 0x01
    (tmp_path / "ck" / "prompts.safetensors").write_bytes(bytes(data))
    # config.json is a copy for people: an edit there is said to have no effect.
    (tmp_path / "ck" / "config.json").write_text('{"edited": true}')
    with pytest.warns(UserWarning, match="config.json does not match the config stored inside"):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "ck")


def test_prompts_of_other_backbone_weights_are_refused(tmp_path):
    """The same architecture with other weights (a model created without pretrained=True) took
    the prompts without a word; the logits were meaningless."""
    _trained().save_prompts(tmp_path / "run")
    with pytest.raises(ValueError, match=r"trained on other backbone weights \(.*check_weights"):
        fastprompt.load_prompts(tiny_vit(seed=1), tmp_path / "run")
    assert fastprompt.load_prompts(tiny_vit(seed=1), tmp_path / "run", check_weights=False)
    # The same weights in bfloat16 are the same weights.
    assert fastprompt.load_prompts(tiny_vit().bfloat16(), tmp_path / "run")
    assert len(fastprompt.checkpoint.checkpoint_info(tmp_path / "run")["weights_probe"]) == 3


def test_the_same_weights_at_another_input_size_take_the_prompts(tmp_path):
    """timm resamples pos_embed for another img_size: the same weights, another shape. The probe
    compared it by position and refused; it is now looked up by name and skipped by shape."""
    import timm

    def vit(size):
        torch.manual_seed(0)
        kw = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
        return timm.create_model("vit_tiny_patch16_224", img_size=size, **kw)

    fastprompt.vpt(vit(32), 2).save_prompts(tmp_path / "run")
    bigger = vit(32)
    bigger.set_input_size(img_size=48)
    assert fastprompt.load_prompts(bigger, tmp_path / "run")
