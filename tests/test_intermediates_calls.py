"""How a prompted model takes timm's calls: the final output of ``forward_intermediates`` (and
``forward_features``) is the same under every impl and memory policy, arguments bind by each
family's timm signature, and a keyword nobody takes is refused by name."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, images, tiny_swin, tiny_vit
from test_intermediates import naive_swin, naive_vit

import fastprompt


def _close(got, want, name):
    assert_close(got, want, name, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", ["none", "block"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_stop_early_final_output_is_the_same_under_every_impl(deep, memory):
    """timm's: the model's own tokens after the last block run, normed (a ViT) — never the
    prompt outputs, which the naive path computes and the fused path skips."""
    x = images(2)
    for impl in ("fused", "naive"):
        prompted = fastprompt.vpt(tiny_vit(depth=4), 3, deep=deep, impl=impl).eval()
        prompted.memory = memory
        want, _ = naive_vit(prompted, x)
        final, _ = prompted.forward_intermediates(x, [1], stop_early=True)
        _close(final, prompted.model.norm(want[1]), f"{impl}: final output")
        out = prompted.forward_intermediates(x, [1], stop_early=True, output_dict=True)
        _close(out["image_features"], final, f"{impl}: image_features")


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_swin_stop_early_final_output_is_the_same_under_every_impl(deep):
    x = images(2)
    for impl in ("fused", "naive"):
        prompted = fastprompt.vpt(tiny_swin(), 2, deep=deep, impl=impl).eval()
        want, _ = naive_swin(prompted, x)
        final, _ = prompted.forward_intermediates(x, [0], stop_early=True)
        _close(final, want[0].flatten(1, 2), f"{impl}: stage 0, no prompts, no norm (timm)")


@pytest.mark.parametrize("readout", ["cls", "patches", "patches+prompts"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_forward_features_holds_prompts_only_where_the_readout_reads_them(deep, readout):
    """Under every impl; otherwise timm's own layout, (B, n_prefix + N, D)."""
    x = images(2)
    got = {}
    for impl in ("fused", "naive"):
        prompted = fastprompt.vpt(tiny_vit(), 3, deep=deep, impl=impl, readout=readout).eval()
        feats = prompted.forward_features(x)
        final, _ = prompted.forward_intermediates(x, [0])
        _close(final, feats, f"{impl}: final output is forward_features")
        _close(prompted.forward_head(feats), prompted(x), f"{impl}: forward_head reads it")
        got[impl] = feats
    _, final = naive_vit(prompted, x)
    if readout != "patches+prompts":
        final = torch.cat([final[:, :1], final[:, 4:]], dim=1)
        assert final.shape == prompted.model.forward_features(x).shape
    _close(got["fused"], final, "fused")
    _close(got["naive"], final, "naive")


def test_arguments_bind_by_each_familys_timm_signature():
    """Positional arguments as timm's own method of the family takes them (a Swin has no
    return_prefix_tokens, so its third argument is norm)."""
    x = images(2)
    calls = {  # norm, stop_early, intermediates_only; a ViT's tokens as NLC
        "vit": (tiny_vit(), ([1], False, True, True, "NLC", True)),
        "swin": (tiny_swin(), ([1], True, True, "NCHW", True)),
    }
    for family, (model, args) in calls.items():
        prompted = fastprompt.vpt(model, 0).eval()
        want = prompted.model.forward_intermediates(x, *args)
        got = prompted.forward_intermediates(x, *args)
        assert isinstance(got, list) and len(got) == len(want) == 1, family
        _close(got[0], want[0], f"{family}: positional arguments")
    vit = fastprompt.vpt(tiny_vit(), 2).eval()
    with pytest.raises(TypeError, match="got multiple values for argument 'norm'"):
        vit.forward_intermediates(x, None, False, True, norm=True)


def test_a_keyword_nobody_takes_is_refused_naming_it():
    vit = fastprompt.vpt(tiny_vit(), 2).eval()
    x = images(1)
    for call in (vit, vit.forward_features):
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'tsak'; a vpt model's"):
            call(x, tsak=1)
    with pytest.raises(TypeError, match=r"'stop_erly' \(did you mean 'stop_early'\?\)"):
        vit.forward_intermediates(x, stop_erly=True)
    with pytest.raises(TypeError, match=r"'nrom' \(did you mean 'norm'\?\)"):
        vit.get_intermediate_layers(x, nrom=True)

    def backbone():
        model = tiny_vit()
        model.reset_classifier(4)
        return model

    mixed = fastprompt.multitask(
        {"a": fastprompt.vpt(backbone(), 2), "b": fastprompt.vpt(backbone(), 3)}
    ).eval()
    with pytest.raises(TypeError, match=r"'tsak' \(did you mean 'task'\?\).* and task"):
        mixed.forward_intermediates(x, task=["a"], tsak=1)
    with pytest.raises(TypeError, match=r"'tsak' \(did you mean 'task'\?\)"):
        mixed.forward_features(x, tsak=1)


def test_a_sources_forward_inputs_come_from_its_prepare():
    """A source of one's own (the seam) need not declare them: prepare's named parameters are
    checked by the model, a prepare taking any keyword checks them itself."""
    from fastprompt.sources import PromptSource

    class Named(PromptSource):
        def prepare(self, images, task=None, *, scale=1.0):
            return task

    class Anything(PromptSource):
        def prepare(self, images, **inputs):
            return inputs

    assert Named().forward_inputs() == ("task", "scale")
    assert Anything().forward_inputs() is None
    assert PromptSource().forward_inputs() == ()


def test_a_sources_signature_is_read_once_not_at_every_forward(monkeypatch):
    """The keywords of every forward are checked against prepare's signature, which was read
    anew at each call (~15 us, more than the check): a mixed-task model paid it per forward."""
    import inspect

    from fastprompt.sources import PromptSource

    class Named(PromptSource):
        def prepare(self, images, task=None):
            return task

    reads = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda f, *a, **k: reads.append(f) or real(f))
    source = Named()
    assert [source.forward_inputs() for _ in range(3)] == [("task",)] * 3
    assert Named().forward_inputs() == ("task",)
    assert len(reads) == 1
