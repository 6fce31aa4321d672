"""Memory policies and timm's gradient-checkpointing switch (``docs/design.md`` §4, "Memory").

Every policy gives the logits and gradients of the default run bitwise on the CPU (the same
kernels run; backward only reads recomputed copies of what it would have saved), for every
prompt source (E²VPT's key-value prompts and mixed-task batches included), with prompt dropout
(the random state replayed), under autocast, torch.compile and Prompt Condensation's scored
attention (whose sink fires once per block, not again while a block is recomputed); each policy
saves less than the one before it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import images, tiny_swin, tiny_vit

import fastprompt
from fastprompt.bench import activation_bytes
from fastprompt.methods import e2vpt as E
from fastprompt.ops.scores import scored_prompt_attention
from fastprompt.prompted import MEMORY_POLICIES


def _spread(prompted):
    with torch.no_grad():  # away from the init, so that every prompt matters
        for param in prompted.trainable_parameters().values():
            param.add_(0.3 * torch.randn_like(param))
    return prompted


def _vit(**kw):
    return tiny_vit(depth=2, **kw)


def _condensed():
    prompted = fastprompt.vpt(_vit(), 4)
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    return fastprompt.condense(prompted, keep)


MODELS = {
    "vpt-deep": lambda: fastprompt.vpt(_vit(), 3),
    "vpt-deep-dropout-projected": lambda: fastprompt.vpt(_vit(), 3, dropout=0.3, project=16),
    "vpt-deep-naive-dropout": lambda: fastprompt.vpt(_vit(), 3, dropout=0.3, impl="naive"),
    "vpt-shallow-dropout": lambda: fastprompt.vpt(_vit(), 3, deep=False, dropout=0.3),
    "vpt-prompt-readout": lambda: fastprompt.vpt(_vit(class_token=False, global_pool="avg"), 3),
    "vpt-registers-layerscale": lambda: fastprompt.vpt(
        _vit(reg_tokens=2, init_values=0.1), 3, dropout=0.3
    ),
    "vpt-swiglu": lambda: fastprompt.vpt(_vit(**_swiglu()), 3),
    "pgn": lambda: fastprompt.pgn(_vit(), num_prompts=4, library_size=6, resolution=32),
    "iip": lambda: fastprompt.pgn(_vit(), num_prompts=4, generator=None, resolution=32),
    "condensed": _condensed,
    "ablation-first2": lambda: fastprompt.vpt_ablation(tiny_vit(), 3, num_deep_layers=2),
    "ablation-last2": lambda: fastprompt.vpt_ablation(
        tiny_vit(), 3, num_deep_layers=2, reverse_deep=True, dropout=0.3
    ),
    "ablation-shared": lambda: fastprompt.vpt_ablation(
        tiny_vit(), 3, deep_shared=True, dropout=0.3
    ),
    "e2vpt-dropout-masks": lambda: E.e2vpt(_vit(), 3, 2, dropout=0.3),
    "e2vpt-separate-kv-shallow": lambda: E.e2vpt(
        _vit(), 3, 2, shared_kv=False, deep=False, dropout=0.3
    ),
}


def _swiglu():
    from timm.layers import SwiGLU

    return {"mlp_layer": SwiGLU}


def _run(prompted, x, seed=3):
    """Logits and every trainable tensor's gradient of one training step."""
    named = prompted.trainable_parameters()
    torch.manual_seed(seed)
    out = prompted(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.float() * weights).sum(), list(named.values()))
    after = torch.rand(3)  # the random state a step leaves behind
    return out.detach(), dict(zip(named, grads)), after


def _assert_equal(got, ref, what):
    out, grads, after = got
    assert torch.equal(out, ref[0]), f"{what}: logits"
    for name, g in grads.items():
        assert torch.equal(g, ref[1][name]), f"{what}: grad {name}"
    assert torch.equal(after, ref[2]), f"{what}: the random state after the step"


@pytest.mark.parametrize("case", list(MODELS))
def test_every_policy_gives_the_default_gradients_bitwise(case):
    torch.manual_seed(0)
    prompted = _spread(MODELS[case]()).train()
    x = images(2)
    ref = _run(prompted, x)
    for policy in ("mlp", "block"):
        prompted.memory = policy
        _assert_equal(_run(prompted, x), ref, f"{case}, memory={policy}")


class _Mixed(torch.nn.Module):
    """A mixed-task model called on images only (each image's task fixed), for :func:`_run`."""

    def __init__(self, mixed, task):
        super().__init__()
        self.mixed, self.task = mixed, task

    def trainable_parameters(self):
        return {n: p for n, p in self.mixed.named_parameters() if p.requires_grad}

    def forward(self, x):
        return self.mixed(x, self.task)


def test_mixed_task_batches_give_the_default_gradients_bitwise():
    torch.manual_seed(1)
    tasks = {"vpt": fastprompt.vpt(_vit(), 3, dropout=0.3), "e2vpt": E.e2vpt(_vit(), 3, 2)}
    mixed = _spread(fastprompt.multitask(tasks)).train()
    model = _Mixed(mixed, ["e2vpt", "vpt", "vpt"])
    assert mixed.memory_policies() == MEMORY_POLICIES
    x = images(3)
    ref = _run(model, x)
    saved = [activation_bytes(lambda: model(x), list(mixed.parameters()))]
    for policy in ("mlp", "block"):
        mixed.memory = policy
        _assert_equal(_run(model, x), ref, f"mixed tasks, memory={policy}")
        saved.append(activation_bytes(lambda: model(x), list(mixed.parameters())))
    assert saved[0] > saved[1] > saved[2], saved


@pytest.mark.parametrize("deep", [True, False])
def test_swin_honours_timms_switch_with_the_default_gradients(deep):
    # timm's Swin keeps the switch on its stages; its blocks are checkpointed whole.
    torch.manual_seed(0)
    model = tiny_swin()
    prompted = _spread(fastprompt.vpt(model, 3, deep=deep, dropout=0.3)).train()
    assert prompted.memory_policies() == ("none", "block")
    x = images(2)
    ref = _run(prompted, x)
    default = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    model.set_grad_checkpointing(True)
    assert prompted.grad_checkpointing and prompted.memory_policy() == "block"
    _assert_equal(_run(prompted, x), ref, f"swin, deep={deep}, timm's switch")
    saved = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    assert saved < default / 2, (saved, default)


def test_timms_switch_is_honoured_whether_set_before_or_after_wrapping():
    x = images(2)
    model = _vit()
    model.set_grad_checkpointing(True)  # before wrapping
    prompted = _spread(fastprompt.vpt(model, 3, dropout=0.3)).train()
    assert prompted.grad_checkpointing and prompted.memory_policy() == "block"
    before = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    checkpointed = _run(prompted, x)
    model.set_grad_checkpointing(False)  # the model's own flag, after wrapping
    assert prompted.memory_policy() == "none"
    _assert_equal(checkpointed, _run(prompted, x), "set_grad_checkpointing")
    default = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    prompted.set_grad_checkpointing()  # the wrapper's switch turns the model's flag
    assert model.grad_checkpointing and prompted.memory_policy() == "block"
    after = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    prompted.memory = "block"
    policy = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    assert before == after == policy < default / 3
    prompted.set_grad_checkpointing(False)
    assert not model.grad_checkpointing and prompted.memory_policy() == "block"  # its own policy


@pytest.mark.parametrize("case", ["vpt-deep", "vpt-deep-naive-dropout", "pgn"])
def test_each_policy_saves_less_than_the_one_before(case):
    torch.manual_seed(0)
    prompted = MODELS[case]().train()
    x = images(4)
    saved = []
    for policy in MEMORY_POLICIES:
        prompted.memory = policy
        saved.append(activation_bytes(lambda: prompted(x), list(prompted.parameters())))
    assert saved[0] > saved[1] > saved[2], dict(zip(MEMORY_POLICIES, saved))


def test_no_checkpointing_in_inference_and_where_no_gradient_flows():
    prompted = fastprompt.vpt_ablation(tiny_vit(), 3, num_deep_layers=1, reverse_deep=True)
    prompted.train()
    x = images(2)
    prompted.memory = "block"
    # The first two blocks see no prompt: nothing of theirs is kept, whatever the policy.
    blocked = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    prompted.memory = "none"
    default = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    assert blocked < default
    prompted.eval()
    with torch.no_grad():
        ref = prompted(x)
        prompted.memory = "block"
        assert torch.equal(prompted(x), ref)


def test_scored_attention_fires_its_sink_once_per_block_per_backward():
    torch.manual_seed(0)
    prompted = _spread(fastprompt.vpt(tiny_vit(), 3)).eval()
    x = images(2)
    params = prompted.source.prompt_parameters()
    u = torch.randn(2, 1, 4, 3, 16)

    def run(policy):
        calls, terms = [], {}

        def attend(call):
            def sink(t, gate):
                calls.append(call.block)
                terms[call.block] = (t.clone(), gate.clone())

            return scored_prompt_attention(
                call.q,
                call.k,
                call.v,
                call.prompt_k,
                call.prompt_v,
                u,
                u,
                sink,
                call.prompt_index,
                call.scale,
                call.backend,
                call.prompt_lengths,
            )[0]

        prompted.memory = policy
        with prompted.attention_override(attend):
            grads = torch.autograd.grad(prompted(x).square().sum(), params)
        return sorted(calls), terms, grads

    ref_calls, ref_terms, ref_grads = run("none")
    assert ref_calls == [0, 1, 2]
    for policy in ("mlp", "block"):
        calls, terms, grads = run(policy)
        assert calls == ref_calls, policy
        for block, (t, gate) in terms.items():
            assert torch.equal(t, ref_terms[block][0]) and torch.equal(gate, ref_terms[block][1])
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_prompt_condensation_scores_are_the_same_under_every_policy():
    torch.manual_seed(0)
    prompted = _spread(fastprompt.vpt(tiny_vit(), 3))
    loader = [(images(2), torch.tensor([0, 3]))]
    ref = fastprompt.score_prompts(prompted, loader, progress=False)
    prompted.set_grad_checkpointing(True)
    assert torch.equal(fastprompt.score_prompts(prompted, loader, progress=False), ref)


def test_autocast_gradients_are_the_same_under_every_policy():
    torch.manual_seed(0)
    prompted = _spread(fastprompt.vpt(tiny_vit(), 3, dropout=0.3)).train()
    x = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(prompted, x)
        for policy in ("mlp", "block"):
            prompted.memory = policy
            _assert_equal(_run(prompted, x), ref, f"bf16 autocast, memory={policy}")


def test_compiled_training_step_gives_the_eager_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    prompted = _spread(fastprompt.vpt(_vit(), 3, dropout=0.3)).train()
    x = images(2)
    ref = _run(prompted, x)
    compiled = torch.compile(prompted, fullgraph=True, backend="aot_eager")
    for policy in ("mlp", "block"):
        prompted.memory = policy
        _assert_equal(_run(compiled, x), ref, f"compiled, memory={policy}")


def test_blocks_the_adapter_cannot_split_are_checkpointed_whole():
    from timm.models.vision_transformer import Block

    class Wrapped(Block):  # same computation, another forward: not timm's Block to the adapter
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x)

    torch.manual_seed(0)
    prompted = _spread(fastprompt.vpt(tiny_vit(block_fn=Wrapped), 3, impl="naive")).train()
    assert prompted.memory_policies() == ("none", "block")
    with pytest.raises(ValueError, match=r"one of \('none', 'block'\) .*'mlp': block 0 is Wrapped"):
        prompted.memory = "mlp"
    x = images(2)
    ref = _run(prompted, x)
    prompted.memory = "block"
    _assert_equal(_run(prompted, x), ref, "whole-step checkpoint")
    saved = activation_bytes(lambda: prompted(x), list(prompted.parameters()))
    prompted.memory = "none"
    assert saved < activation_bytes(lambda: prompted(x), list(prompted.parameters())) / 3


def test_bad_policies_are_refused_with_the_choices():
    prompted = fastprompt.vpt(tiny_vit(), 3)
    with pytest.raises(ValueError, match=r"memory must be one of \('none', 'mlp', 'block'\)"):
        prompted.memory = "full"
    assert prompted.memory == "none"
    prompted.memory = "mlp"
    assert "memory='mlp'" in repr(prompted)
