"""A state dict records no method: one that another method's (or an official ablation's) would
hold the same tensors as loads only when ``method`` names it, and layouts fastprompt cannot run
are refused with what they are. Nothing loads as another method."""

from __future__ import annotations

import pytest
import torch
from helpers import images, tiny_swin, tiny_vit

import fastprompt


def _scrambled(prompted):
    with torch.no_grad():
        for p in prompted.trainable_parameters().values():
            p.add_(torch.randn_like(p))
    return prompted.eval()


def _official(prompted, blocks: int | None = None) -> dict[str, torch.Tensor]:
    """The official ViT code's names for a fastprompt ViT model's prompts and head (and, when
    ``blocks`` is given, one weight of each of that many backbone blocks)."""
    state = {
        f"enc.transformer.{k}": v.detach().clone()
        for k, v in prompted.prompt_state().items()
        if "prompt" in k
    }
    state["head.last_layer.weight"] = prompted.model.head.weight.detach().clone()
    state["head.last_layer.bias"] = prompted.model.head.bias.detach().clone()
    for i in range(blocks or 0):
        state[f"enc.transformer.encoder.layer.{i}.attn.query.weight"] = torch.zeros(1)
    return state


def _same_logits(a, b) -> None:
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6, rtol=1e-6)


def test_a_deep_shared_ablation_state_dict_is_not_read_as_vpt_shallow():
    """It holds what a VPT-shallow wrapper's does (prompt_embeddings, no deep prompts): it used
    to load as VPT-shallow, prompts before block 0 only, without a word."""
    shared = _scrambled(fastprompt.vpt_ablation(tiny_vit(), 3, deep_shared=True))
    with pytest.raises(ValueError, match=r"vpt_ablation\(\.\.\., deep_shared=True\) hold the same"):
        fastprompt.load_prompts(tiny_vit(), shared.state_dict())
    with pytest.raises(ValueError, match="records neither deep_shared nor num_deep_layers"):
        fastprompt.load_prompts(tiny_vit(), shared.state_dict(), method="vpt_ablation")
    # Named, it is VPT-shallow; the ablation's own wrapper loads it.
    plain = _scrambled(fastprompt.vpt(tiny_vit(), 3, deep=False))
    loaded = fastprompt.load_prompts(tiny_vit(), plain.state_dict(), method="vpt")
    assert loaded.method == "vpt" and not loaded.config.deep
    _same_logits(loaded, plain)
    again = fastprompt.vpt_ablation(tiny_vit(), 3, deep_shared=True)
    again.load_state_dict(shared.state_dict())
    _same_logits(again, shared)


def test_bare_official_shallow_prompts_load_as_vpt_without_method():
    """Only a whole wrapper state dict can be the deep_shared ablation's; the prompts alone, as
    official VPT-shallow prompts are shared, stay VPT-shallow."""
    plain = _scrambled(fastprompt.vpt(tiny_vit(), 3, deep=False))
    trained = {k: v for k, v in plain.state_dict().items() if k.startswith(("prompt", "head"))}
    loaded = fastprompt.load_prompts(tiny_vit(), trained)
    assert loaded.method == "vpt" and not loaded.config.deep
    _same_logits(loaded, plain)


def test_official_num_deep_layers_checkpoints_say_what_they_are_and_load_when_named():
    """Deep prompts in the first k of L blocks, (k - 1, P, D): refused as "another model?"."""
    trained = _scrambled(fastprompt.vpt_ablation(tiny_vit(), 3, num_deep_layers=2))
    official = _official(trained, blocks=3)
    with pytest.raises(
        ValueError,
        match=r"deep prompts for 2 of the model's 3 blocks: the NUM_DEEP_LAYERS=2 ablation.*"
        r"num_deep_layers=2\).*pass method='vpt_ablation'",
    ):
        fastprompt.load_prompts(tiny_vit(), official)
    with pytest.raises(ValueError, match=r"NUM_DEEP_LAYERS=2 ablation's layout, not VPT's"):
        fastprompt.load_prompts(tiny_vit(), official, method="vpt")
    loaded = fastprompt.load_prompts(tiny_vit(), official, method="vpt_ablation")
    assert loaded.method == "vpt_ablation" and loaded.config.num_deep_layers == 2
    _same_logits(loaded, trained)
    with pytest.raises(ValueError, match=r"a ViT of 2 blocks, but the model has 3"):
        fastprompt.load_prompts(tiny_vit(), _official(trained, blocks=2), method="vpt_ablation")
    # A wrapper's state dict holds its backbone: another depth's prompts loaded without a word.
    shallower = fastprompt.vpt(tiny_vit(depth=2), 3, deep=False).state_dict()
    with pytest.raises(ValueError, match=r"a ViT of 2 blocks, but the model has 3"):
        fastprompt.load_prompts(tiny_vit(), shallower, method="vpt")
    full = _official(_scrambled(fastprompt.vpt(tiny_vit(), 3)))
    with pytest.raises(ValueError, match=r"VPT-deep's layout, which method='vpt' loads"):
        fastprompt.load_prompts(tiny_vit(), full, method="vpt_ablation")
    assert fastprompt.load_prompts(tiny_vit(), full).method == "vpt"


def test_reverse_deep_state_dicts():
    """No prompt_embeddings, deep prompts for the last k blocks: fastprompt's own loads when
    named; the official code's is refused (it overwrites patch tokens, fastprompt inserts)."""
    ours = _scrambled(fastprompt.vpt_ablation(tiny_vit(), 3, num_deep_layers=2, reverse_deep=True))
    with pytest.raises(ValueError, match=r"REVERSE_DEEP ablation.*pass method='vpt_ablation'"):
        fastprompt.load_prompts(tiny_vit(), ours.state_dict())
    loaded = fastprompt.load_prompts(tiny_vit(), ours.state_dict(), method="vpt_ablation")
    assert loaded.config.reverse_deep and loaded.config.num_deep_layers == 2
    _same_logits(loaded, ours)
    for method in (None, "vpt_ablation"):
        with pytest.raises(ValueError, match="overwrites the first P patch tokens"):
            fastprompt.load_prompts(tiny_vit(), _official(ours), method=method)


def test_an_official_add_location_checkpoint_is_not_read_as_vpt():
    """LOCATION="add" saves one prompt per token of the official model (class token + patches,
    17 here), added to the tokens: it loaded as VPT with 17 prepended prompts."""
    official = _official(_scrambled(fastprompt.vpt(tiny_vit(), 17)))
    official["enc.transformer.embeddings.position_embeddings"] = torch.zeros(1, 17, 64)
    with pytest.raises(ValueError, match=r"17 prompts, as many as .* LOCATION='add'"):
        fastprompt.load_prompts(tiny_vit(), official)
    assert fastprompt.load_prompts(tiny_vit(), official, method="vpt").config.num_prompts == 17


def test_official_swin_checkpoints_of_other_stage_depths_say_so():
    swin = fastprompt.vpt(tiny_swin(), 3)
    official = {f"enc.{k}": v.detach() for k, v in swin.prompt_state().items() if "prompt" in k}
    official["head.last_layer.weight"], official["head.last_layer.bias"] = swin.head.fc.parameters()
    four = {**official, "enc.deep_prompt_embeddings_3": torch.zeros(2, 3, 128)}
    with pytest.raises(ValueError, match=r"prompts for 4 stages .*the model has 3 stages"):
        fastprompt.load_prompts(tiny_swin(), four)
    first = {**official, "enc.deep_prompt_embeddings_0": torch.zeros(2, 3, 16)}
    with pytest.raises(ValueError, match=r"stage 0 has 2 blocks: it needs \(1, P, D\)"):
        fastprompt.load_prompts(tiny_swin(), first)
    # A Swin has no depth ablation: a fastprompt VPT-shallow Swin's state dict is not ambiguous.
    shallow = _scrambled(fastprompt.vpt(tiny_swin(), 3, deep=False))
    assert not fastprompt.load_prompts(tiny_swin(), shallow.state_dict()).config.deep
