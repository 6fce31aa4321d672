"""The prompted core as a user drives it: parameter ownership, caching, compile, wrapping twice.

Each test here reproduces a defect found by using the package (architecture issue, section 2).
"""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import assert_close, images, naive_vpt_of, tiny_vit

import fastprompt
from fastprompt import _compat


def _fresh(prompted, x):
    with torch.no_grad():
        return naive_vpt_of(prompted, x)


# -- 1. nothing stale after any kind of update ---------------------------------------------------


def _fused_adamw(prompted):
    opt = torch.optim.AdamW(prompted.trainable_parameters().values(), lr=0.5, fused=True)
    _step(prompted, opt)


def _fused_sgd(prompted):
    opt = torch.optim.SGD(prompted.trainable_parameters().values(), lr=5.0, fused=True)
    _step(prompted, opt)


def _foreach_adam(prompted):
    opt = torch.optim.Adam(prompted.trainable_parameters().values(), lr=0.5, foreach=True)
    _step(prompted, opt)


def _step(prompted, opt):
    prompted.train()
    prompted(images(2)).square().sum().backward()
    opt.step()
    prompted.eval()


def _data_write(prompted):
    # What EMA code does. Random, not a constant: LayerNorm ignores a constant shift of a prompt.
    prompted.deep_prompt_embeddings.data += torch.randn_like(prompted.deep_prompt_embeddings)


def _foreach_add(prompted):
    with torch.no_grad():
        params = list(prompted.trainable_parameters().values())
        torch._foreach_add_(params, [torch.randn_like(p) for p in params])


def _load_state_dict(prompted):
    sd = {
        k: v + torch.randn_like(v) if "prompt" in k else v for k, v in prompted.state_dict().items()
    }
    prompted.load_state_dict(sd)


@pytest.mark.parametrize(
    "update",
    [_fused_adamw, _fused_sgd, _foreach_adam, _data_write, _foreach_add, _load_state_dict],
    ids=lambda f: f.__name__.strip("_"),
)
def test_eval_logits_follow_every_kind_of_update(update):
    prompted = fastprompt.vpt(tiny_vit(), 4).eval()
    x = images(2)
    with torch.no_grad():
        before = prompted(x)
    update(prompted)
    with torch.no_grad():
        after = prompted(x)
    assert not torch.allclose(before, after, atol=1e-4)
    assert_close(after, _fresh(prompted, x), "logits after update", atol=2e-5, rtol=1e-5)


def test_frozen_prompts_reuses_kv_and_sees_updates_after():
    prompted = fastprompt.vpt(tiny_vit(), 4).eval()
    x = images(2)
    with torch.no_grad():
        plain = prompted(x)
        with prompted.frozen_prompts():
            cached = prompted(x)
            prompted.deep_prompt_embeddings.add_(torch.randn_like(prompted.deep_prompt_embeddings))
            still = prompted(x)  # constants inside the block, as documented
        after = prompted(x)
        with prompted.frozen_prompts():
            refrozen = prompted(x)
    assert_close(cached, plain, "frozen logits", atol=2e-5, rtol=1e-5)
    assert torch.equal(still, cached)
    assert_close(after, _fresh(prompted, x), "after leaving", atol=2e-5, rtol=1e-5)
    assert_close(refrozen, after, "frozen again", atol=2e-5, rtol=1e-5)


def test_frozen_prompts_under_autocast():
    prompted = fastprompt.vpt(tiny_vit(), 4).eval()
    x = images(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = prompted(x)
        with prompted.frozen_prompts():
            cached = prompted(x)
    assert cached.dtype == plain.dtype
    assert_close(cached.float(), plain.float(), "bf16 logits", atol=0.1, rtol=0.05)


# -- 2. one owner for every parameter -------------------------------------------------------------


def test_load_state_dict_assign_reaches_the_forward():
    prompted = fastprompt.vpt(tiny_vit(), 3).eval()
    sd = {
        k: v.clone() + (0.3 if k in ("pos_embed", "cls_token") else 0.0)
        for k, v in prompted.state_dict().items()
    }
    prompted.load_state_dict(sd, assign=True)
    assert prompted.model.pos_embed is prompted.pos_embed
    x = images(2)
    with torch.no_grad():
        assert_close(prompted(x), _fresh(prompted, x), "logits", atol=2e-5, rtol=1e-5)
        assert torch.equal(prompted.model.pos_embed, sd["pos_embed"])


def test_meta_init_then_to_empty():
    real = fastprompt.vpt(tiny_vit(), 3)
    try:
        with torch.device("meta"):
            model = tiny_vit()
    except RuntimeError as e:  # timm < 1.0.10 reads a value while building (stochastic depth)
        pytest.skip(f"this timm cannot build a model on the meta device: {e}")
    prompted = fastprompt.vpt(model, 3)
    prompted.to_empty(device="cpu")
    prompted.load_state_dict(real.state_dict())
    x = images(2)
    prompted.eval()
    with torch.no_grad():
        assert_close(prompted(x), _fresh(prompted, x), "logits", atol=2e-5, rtol=1e-5)
    assert prompted.model.cls_token.device.type == "cpu"


def test_dtype_conversion_with_parameter_overwriting():
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        prompted = fastprompt.vpt(tiny_vit(), 3).double().eval()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    m = prompted.model
    assert m.cls_token.dtype == m.pos_embed.dtype == torch.float64
    assert prompted.source.prompt_embeddings is prompted.prompt_embeddings
    x = images(2).double()
    with torch.no_grad():
        assert_close(prompted(x), _fresh(prompted, x), "float64 logits")


def test_torch_func_grad_says_to_use_autograd_or_the_naive_path():
    """PyTorch's own error names only an autograd.Function's setup_context."""
    x = images(2)
    prompted = fastprompt.vpt(tiny_vit(), 3)
    trained = {n: p.detach() for n, p in prompted.named_parameters() if p.requires_grad}

    def loss(params):
        return torch.func.functional_call(prompted, params, (x,)).square().sum()

    with pytest.raises(RuntimeError, match=r"torch\.func transforms.*impl='naive'"):
        torch.func.grad(loss)(trained)
    expected = torch.autograd.grad(prompted(x).square().sum(), prompted.deep_prompt_embeddings)[0]
    prompted.impl = "naive"
    got = torch.func.grad(loss)(trained)["deep_prompt_embeddings"]
    assert_close(got, expected, "prompt gradient", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("transform", ["jvp", "forward_ad"])
def test_forward_mode_over_the_fused_path_is_refused(transform):
    """The custom op has no forward-mode rule, and PyTorch drops the tangent through it without
    an error: the fused path's jvp was wrong (half the finite difference here), silently."""
    import torch.autograd.forward_ad as fwAD

    x = images(2)
    prompted = fastprompt.vpt(tiny_vit(), 3).eval()
    params = {n: p.detach() for n, p in prompted.named_parameters() if p.requires_grad}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def logits(p):
        return torch.func.functional_call(prompted, p, (x,))

    with pytest.raises(RuntimeError, match=r"torch\.func transforms.*impl='naive'"):
        if transform == "jvp":
            torch.func.jvp(logits, (params,), (tangents,))
        else:
            with fwAD.dual_level():
                logits({n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()})


def test_functional_call_swaps_prompts_and_top_level_parameters():
    prompted = fastprompt.vpt(tiny_vit(), 3).eval()
    x = images(2)
    new = {
        "deep_prompt_embeddings": torch.randn_like(prompted.deep_prompt_embeddings),
        "pos_embed": torch.randn_like(prompted.pos_embed),
    }
    with torch.no_grad():
        got = torch.func.functional_call(prompted, new, (x,))
        original = prompted(x)
        for name, value in new.items():
            getattr(prompted, name).data, value.data = (
                value.data.clone(),
                getattr(prompted, name).data,
            )
        expected = _fresh(prompted, x)
    assert_close(got, expected, "functional_call logits", atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, original)


def test_replacing_the_head_on_the_wrapper_reaches_the_model():
    prompted = fastprompt.vpt(tiny_vit(), 2)
    prompted.head = torch.nn.Linear(64, 3)
    assert prompted.model.head is prompted.head
    assert prompted(images(1)).shape == (1, 3)


@pytest.mark.parametrize("on", ["model", "wrapper"])
def test_timms_reset_classifier_gives_a_new_head_that_trains(on):
    """Called on the wrapped model, the new head used to be put back to the old one at the next
    forward (the wrapper re-pointed the model's entry at its own)."""
    model = tiny_vit()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prompted = fastprompt.vpt(model, 2)
    (model if on == "model" else prompted).reset_classifier(7)
    assert prompted(images(2)).shape == (2, 7)
    assert prompted.head is model.head and model.head.out_features == 7
    trainable = set(prompted.trainable_parameters())
    assert trainable == {"prompt_embeddings", "deep_prompt_embeddings", "head.weight", "head.bias"}
    assert not model.head.training
    prompted.unwrap()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_replaced_head_is_seen_before_any_forward():
    """Listing, converting, saving and loading see the model's new head at once (they used to
    see the old one until a forward: the optimizer trained a head no forward used)."""
    model = tiny_vit()
    prompted = fastprompt.vpt(model, 2)
    model.reset_classifier(7)
    assert prompted.trainable_parameters()["head.weight"] is model.head.weight
    assert prompted.state_dict()["head.weight"].shape == (7, 64)
    prompted.double()
    assert model.head.weight.dtype == model.pos_embed.dtype == torch.float64
    assert prompted(images(2).double()).shape == (2, 7)
    prompted.load_state_dict(prompted.state_dict())


def test_a_functional_call_leaves_a_wrapper_sharing_the_model_alone():
    """functional_call's stand-in tensors pass through the shared model during the call; the
    condensed model sharing it must not take them for the model's own replacement."""
    model = tiny_vit()
    parent = fastprompt.vpt(model, 3).eval()
    child = fastprompt.condense(parent, torch.ones(3, 3, dtype=torch.bool)).eval()
    x = images(2)
    with torch.no_grad():
        before = child(x)
        torch.func.functional_call(parent, {"pos_embed": torch.zeros_like(parent.pos_embed)}, (x,))
        assert torch.equal(child(x), before)
    assert child.pos_embed is parent.pos_embed is model.pos_embed
    stand_in = parent.pos_embed.detach() + torch.zeros_like(parent.pos_embed, requires_grad=True)
    torch.func.functional_call(parent, {"pos_embed": stand_in}, (x,))
    assert child(x).shape == (2, 5)  # a non-leaf stand-in used to crash the other wrapper


def test_a_replacement_met_inside_a_compiled_forward_is_refused_clearly():
    """Or, where Dynamo itself lists the wrapper's parameters eagerly before tracing its forward
    (torch 2.6), the replacement is taken then, as an eager forward takes it, and the trace never
    meets it: the compiled forward gives the new head's logits."""
    torch._dynamo.reset()
    model = tiny_vit()
    prompted = fastprompt.vpt(model, 2).eval()
    compiled = torch.compile(prompted, fullgraph=True, backend="eager")
    x = images(2)
    compiled(x)
    model.reset_classifier(7)
    if _compat.dynamo_lists_parameters_itself():
        got = compiled(x)
        assert prompted.head is model.head
        with torch.no_grad():
            assert_close(got, _fresh(prompted, x), "compiled logits with the new head")
        return
    with pytest.raises(Exception, match="the wrapped model replaced its 'head'"):
        compiled(x)
    prompted.trainable_parameters()  # seen eagerly: the compiled forward recompiles with it
    assert compiled(x).shape == (2, 7)


def test_timms_set_input_size_on_the_wrapped_model_reaches_the_forward():
    """A resized position embedding stays frozen and is not put back to the old one (which
    failed at the new size)."""
    model = tiny_vit()
    prompted = fastprompt.vpt(model, 2).eval()
    model.set_input_size(img_size=(48, 48))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        got = prompted(x)
    assert prompted.pos_embed is model.pos_embed and model.pos_embed.shape[1] == 37
    assert not model.pos_embed.requires_grad
    with torch.no_grad():
        assert_close(got, _fresh(prompted, x), "logits at 48 px", atol=2e-5, rtol=1e-5)


# -- 3. one live wrapper per model --------------------------------------------------------------


def test_wrapping_a_wrapped_model_is_refused_and_unwrap_restores():
    model = tiny_vit().train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = fastprompt.vpt(model, 2)
    head = model.head.weight.detach().clone()
    with pytest.raises(TypeError, match="already wrapped by a live PromptedViT"):
        fastprompt.vpt(model, 3)
    assert torch.equal(model.head.weight, head)  # the refused wrap changed nothing
    back = first.unwrap()
    assert back is model and model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(RuntimeError, match="was unwrapped"):
        first(images(1))
    second = fastprompt.vpt(model, 3)  # a new wrap after unwrap is fine
    assert second(images(1)).shape == (1, 5)


def test_a_dropped_wrapper_frees_the_model_and_keeps_its_original_state():
    model = tiny_vit()
    model.blocks[0].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fastprompt.vpt(model, 2)  # dropped without unwrap()
    gc.collect()
    again = fastprompt.vpt(model, 2)
    again.unwrap()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_unwrapped_model_computes_what_it_did_before():
    model = tiny_vit().eval()
    x = images(2)
    with torch.no_grad():
        before = model(x)
    prompted = fastprompt.vpt(model, 4, head_init="keep")
    with torch.no_grad():
        prompted.deep_prompt_embeddings.add_(torch.randn_like(prompted.deep_prompt_embeddings))
    back = prompted.unwrap()
    with torch.no_grad():
        assert torch.equal(back(x), before)


# -- 4. compiled inference -------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen_prompts"])
def test_compiled_eval_inference_works_on_every_call(frozen):
    torch._dynamo.reset()
    prompted = fastprompt.vpt(tiny_vit(), 4).eval()
    compiled = torch.compile(prompted, fullgraph=True, backend="eager")
    x = images(2)
    with torch.no_grad():
        expected = prompted(x)
        ctx = prompted.frozen_prompts() if frozen else torch.no_grad()
        with ctx:
            for _ in range(3):
                assert_close(compiled(x), expected, "compiled logits", atol=2e-5, rtol=1e-5)
        prompted.deep_prompt_embeddings.add_(torch.randn_like(prompted.deep_prompt_embeddings))
        assert_close(compiled(x), _fresh(prompted, x), "after update", atol=2e-5, rtol=1e-5)


# -- the plug-in point ---------------------------------------------------------------------------


def test_attention_override_sees_every_block_and_is_exact():
    prompted = fastprompt.vpt(tiny_vit(), 4, impl="naive").eval()
    seen = []

    def attend(call):
        seen.append((call.block, tuple(call.prompt_k.shape)))
        out, _ = fastprompt.prompt_attention(
            call.q,
            call.k,
            call.v,
            call.prompt_k,
            call.prompt_v,
            call.prompt_index,
            scale=call.scale,
        )
        return out

    x = images(2)
    with torch.no_grad(), prompted.attention_override(attend):
        got = prompted(x)
    assert [b for b, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 4, 4, 16)
    assert prompted.impl == "naive"
    with torch.no_grad():
        assert_close(got, prompted(x), "override vs naive", atol=2e-5, rtol=1e-5)


def test_attention_override_refuses_what_the_fused_path_cannot_run():
    from timm.models.vision_transformer import Block, ResPostBlock

    class Changed(Block):
        def forward(self, x, attn_mask=None):
            return super().forward(x, attn_mask) * 2

    for block_fn, name in ((ResPostBlock, "ResPostBlock"), (Changed, "Changed")):
        prompted = fastprompt.vpt(tiny_vit(block_fn=block_fn), 2, impl="naive")
        with pytest.raises(TypeError, match=name), prompted.attention_override(lambda c: None):
            pass
    with pytest.raises(TypeError, match="not deep"):
        with fastprompt.vpt(tiny_vit(), 2, deep=False).attention_override(lambda c: None):
            pass


# -- 12. smaller ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_of_no_images(mode):
    prompted = fastprompt.vpt(tiny_vit(), 3, dropout=0.2).train(mode == "train")
    out = prompted(torch.zeros(0, 3, 32, 32))
    assert out.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(dropout=None), TypeError, "dropout must be a float"),
        (dict(dropout="0.1"), TypeError, "dropout must be a float"),
        (dict(head_init="zeros"), ValueError, "head_init must be one of"),
        (dict(impl="fast"), ValueError, "impl must be one of"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, err, match):
    with pytest.raises(err, match=match):
        fastprompt.vpt(tiny_vit(), 2, **kwargs)
