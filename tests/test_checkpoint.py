"""Prompt checkpoints round-trip exactly, official VPT ones load, wrong models are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import images, tiny_vit

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
