"""The seams the next backbones and methods build on, each exercised without touching the core:

- a backbone of another family (stages of different widths, a merge between them, a token state
  that keeps prompts apart) plugs in as one adapter and one ``register_backbone`` call;
- a source that hands blocks keys/values directly (E²VPT's key-value prompts) and a source of
  per-image task sets of different lengths (mixed-task batches) run through the core unchanged;
- wrappers copy, and bad backends are refused on every path.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import assert_close, images, tiny_vit
from torch import nn

import fastprompt
from fastprompt import backbones
from fastprompt.backbones import Backbone, BlockShape
from fastprompt.backbones.vit import block_with_kv, kv_from_normed
from fastprompt.prompted import PromptedViT
from fastprompt.sources import PromptSource


def test_models_of_no_family_are_refused_with_the_families():
    with pytest.raises(TypeError, match=r"model must be a timm VisionTransformer .*got torch"):
        backbones.adapter_for(nn.Linear(2, 2), "fastprompt.vpt")
    assert any("VisionTransformer" in f for f in backbones.families())


# -- a backbone of stages: widths 32, 32, 48, tokens merged 32 -> 48 before block 2 ------------


class Staged(nn.Module):
    """Not a timm model: three timm blocks in two stages and a linear merge between them."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 32, 8, 8)
        self.blocks = nn.ModuleList([Block(32, 2), Block(32, 2), Block(48, 2)])
        self.merge = nn.Linear(32, 48)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 5)


class StagedBackbone(Backbone):
    """Its adapter. The token state is ``(patches (B, N, W), prompts (B, P, W) or None)``."""

    family = "staged"
    description = "test Staged model"
    readouts = ("patches", "patches+prompts")

    @classmethod
    def check(cls, model, who):
        if not isinstance(model, Staged):
            raise TypeError(f"{who}: not a Staged model")

    def fused_unsupported_reasons(self):
        return []

    @property
    def depth(self):
        return 3

    def block_shape(self, block):
        width = 32 if block < 2 else 48
        return BlockShape(width, 2, width // 2)

    def patch_size(self):
        return (8, 8)

    def default_readout(self):
        return "patches+prompts"

    def reads_prompts(self, readout):
        return readout == "patches+prompts"

    def classifier(self):
        return self.model.head

    def embed(self, x):
        return self.model.embed(x).flatten(2).transpose(1, 2), None

    def enter(self, block, tokens, held):
        x, p = tokens
        if block != 2:
            return tokens
        return self.model.merge(x), None if p is None else self.model.merge(p)

    def insert(self, tokens, block, prompts, position):
        return tokens[0], prompts.expand(tokens[0].shape[0], -1, -1)

    def remove(self, tokens, count, position):
        return tokens[0], None

    def _split(self, seq, p):
        return (seq, None) if p is None else (seq[:, p.shape[1] :], seq[:, : p.shape[1]])

    def block(self, block, tokens, held):
        x, p = tokens
        return self._split(self.model.blocks[block](x if p is None else torch.cat([p, x], 1)), p)

    def fused_block(self, block, tokens, held, kv, attend, backend):
        x, p = tokens
        seq = x if p is None else torch.cat([p, x], 1)
        return self._split(block_with_kv(self.model.blocks[block], block, seq, kv, attend, None), p)

    def prompt_kv(self, block, prompts):
        blk = self.model.blocks[block]
        return kv_from_normed(blk, blk.norm1(prompts))

    def features(self, tokens):
        x, p = tokens
        return self.model.norm(x if p is None else torch.cat([p, x], 1))

    def pool(self, features, readout, held, position):
        return features.mean(1) if readout == "patches+prompts" else features[:, held:].mean(1)

    def head(self, pooled, pre_logits=False):
        return pooled if pre_logits else self.model.head(pooled)


class WidthPrompts(PromptSource):
    """One learned set per receiving block, at that block's width (as VPT-Swin's per stage)."""

    def __init__(self, schedule, widths, p=3):
        super().__init__()
        self.schedule = schedule
        self.sets = nn.ParameterList(
            [
                nn.Parameter(torch.randn(p, w) if s else torch.zeros(0, w))
                for s, w in zip(schedule, widths)
            ]
        )

    def receives(self, block):
        return self.schedule[block]

    def count(self, block):
        return self.sets[block].shape[0] if self.schedule[block] else 0

    def shared(self, block):
        return self.sets[block].unsqueeze(0)

    def tokens(self, block, batch, state):
        return self.shared(block)

    def config(self):
        return None


def naive_staged(model, source, readout, x):
    """The staged model with prompts, written out: merge, replace, block; pool; head."""
    tokens, prompts = model.embed(x).flatten(2).transpose(1, 2), None
    for i, blk in enumerate(model.blocks):
        if i == 2:
            tokens = model.merge(tokens)
            prompts = None if prompts is None else model.merge(prompts)
        if source.schedule[i]:
            prompts = source.sets[i].unsqueeze(0).expand(x.shape[0], -1, -1)
        held = 0 if prompts is None else prompts.shape[1]
        seq = blk(tokens if prompts is None else torch.cat([prompts, tokens], 1))
        tokens, prompts = seq[:, held:], (seq[:, :held] if held else None)
    held = 0 if prompts is None else prompts.shape[1]
    feats = model.norm(tokens if prompts is None else torch.cat([prompts, tokens], 1))
    return model.head(feats.mean(1) if readout == "patches+prompts" else feats[:, held:].mean(1))


@pytest.fixture
def staged_family():
    key = f"{Staged.__module__}.{Staged.__qualname__}"
    backbones.register_backbone(Staged, StagedBackbone)
    yield
    backbones._REGISTRY.pop(key)


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("readout", ["patches", "patches+prompts"])
@pytest.mark.parametrize(
    "schedule",
    [(True, False, False), (True, True, True), (True, False, True), (False, True, True)],
    ids=["shallow", "deep", "mixed", "late"],
)
def test_a_backbone_of_stages_plugs_in_as_one_adapter(staged_family, schedule, readout, impl):
    model = Staged()
    torch.manual_seed(1)
    source = WidthPrompts(schedule, [32, 32, 48])
    prompted = PromptedViT(model, source, readout=readout, impl=impl)
    x = images(2)
    params = list(source.parameters())
    out = prompted(x)
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    ref = naive_staged(model, source, readout, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    assert_close(out, ref, "logits", atol=2e-5, rtol=1e-5)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any(), i
            continue
        assert_close(g, r, f"grad of set {i}", atol=2e-5, rtol=1e-4)
    with torch.no_grad(), prompted.frozen_prompts():
        assert_close(prompted.eval()(x), ref.detach(), "frozen", atol=2e-5, rtol=1e-5)


# -- a source with keys/values of its own (E²VPT's key-value prompts) --------------------------


class KeyValuePrompts(PromptSource):
    """Deep visual prompts and, per block, one (H, N, d) tensor used as both key and value
    prompt, joined after the qkv projection (E²VPT's shared key-value prompts)."""

    def __init__(self, depth, visual, n, width=64, heads=4):
        super().__init__()
        self.visual = nn.Parameter(0.5 * torch.randn(depth, visual, width))
        self.key_values = nn.Parameter(torch.randn(depth, heads, n, width // heads))

    def receives(self, block):
        return True

    def count(self, block):
        return self.visual.shape[1]

    def shared(self, block):
        return self.visual[block].unsqueeze(0)

    def tokens(self, block, batch, state):
        return self.shared(block)

    def kv(self, block, batch, state):
        kv = self.key_values[block].unsqueeze(0)
        return kv, kv

    def config(self):
        return None


def naive_key_values(model, source, x):
    """Every block's attention with the key-value prompts in front of its keys and values."""
    npre, b = model.num_prefix_tokens, x.shape[0]
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        p = source.visual[i].unsqueeze(0).expand(b, -1, -1)
        held = 0 if i == 0 else source.visual.shape[1]
        h = torch.cat([h[:, :npre], p, h[:, npre + held :]], 1)
        attn, n = blk.attn, h.shape[1]
        y = blk.norm1(h)
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        kv = source.key_values[i].unsqueeze(0).expand(b, -1, -1, -1)
        k, v = torch.cat([kv, k], 2), torch.cat([kv, v], 2)
        o = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
        h = h + attn.proj(o.transpose(1, 2).reshape(b, n, -1))
        h = h + blk.mlp(blk.norm2(h))
    return model.head(model.norm(h)[:, 0])


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_a_source_with_keys_and_values_of_its_own(impl):
    model = tiny_vit()
    torch.manual_seed(2)
    source = KeyValuePrompts(3, visual=2, n=3)
    prompted = PromptedViT(model, source, impl=impl)
    x = images(2)
    out = prompted(x)
    grads = torch.autograd.grad(out.square().sum(), list(source.parameters()))
    ref = naive_key_values(model, source, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(source.parameters()))
    assert_close(out, ref, "logits", atol=2e-5, rtol=1e-5)
    for g, r, name in zip(grads, ref_grads, ("visual", "key_values")):
        assert_close(g, r, f"grad {name}", atol=2e-5, rtol=1e-4)


# -- per-image task sets of different lengths (mixed-task batches) ----------------------------


class TaskTable(PromptSource):
    """Deep prompts of T tasks in one table, padded to P; each image reads its task's set."""

    def __init__(self, lengths, depth=3, p=3, width=64):
        super().__init__()
        self.table = nn.Parameter(torch.randn(len(lengths), depth, p, width))
        self.register_buffer("lengths", torch.tensor(lengths))

    def receives(self, block):
        return True

    def count(self, block):
        return self.table.shape[2]

    def prepare(self, images, task=None):
        return task

    def tokens(self, block, batch, state):
        return self.table[:, block]

    def selection(self, block, batch, state):
        return state, self.lengths

    def config(self):
        return None


def test_images_of_several_tasks_in_one_batch():
    backbone = tiny_vit()
    torch.manual_seed(3)
    table = TaskTable([3, 2])
    with torch.no_grad():
        table.table[1, :, 2:] = 1e3  # past task 1's length: must influence nothing
    twins = [copy.deepcopy(backbone) for _ in range(2)]
    mixed = PromptedViT(backbone, table, readout="cls").eval()
    task = torch.tensor([1, 0, 1])
    x = images(3)
    with torch.no_grad():
        got = mixed(x, task=task)
        for t, twin in enumerate(twins):
            n = int(table.lengths[t])
            single = fastprompt.vpt(twin, n, head_init="keep").eval()
            single.prompt_embeddings.copy_(table.table[t, :1, :n])
            single.deep_prompt_embeddings.copy_(table.table[t, 1:, :n])
            rows = task == t
            assert_close(got[rows], single(x[rows]), f"task {t}", atol=2e-5, rtol=1e-5)
    mixed.impl = "naive"
    with pytest.raises(ValueError, match="differ in length"):
        mixed(x, task=task)


# -- copies and backends --------------------------------------------------------------------


def _saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "clone",
    [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj)), _saved_and_loaded],
    ids=["deepcopy", "pickle", "torch.save"],
)
def test_a_copy_is_an_independent_live_wrapper(clone):
    """Deep-copied, pickled or saved whole with ``torch.save`` (pickling used to fail on the
    wrapping's weak references)."""
    model = tiny_vit()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prompted = fastprompt.vpt(model, 3).eval()
    twin = clone(prompted)
    assert twin.model is not model and twin.prompt_embeddings is not prompted.prompt_embeddings
    assert twin.model.head is twin.head and twin.source.prompt_embeddings is twin.prompt_embeddings
    with torch.no_grad():
        assert torch.equal(twin(images(2)), prompted(images(2)))
    with pytest.raises(TypeError, match="already wrapped by a live PromptedViT"):
        fastprompt.vpt(twin.model, 2)
    back = twin.unwrap()
    assert {n: p.requires_grad for n, p in back.named_parameters()} == flags
    assert prompted(images(1)).shape == (1, 5)  # the original is untouched
    keep = torch.ones(3, 3, dtype=torch.bool)
    pair = clone([prompted, fastprompt.condense(prompted, keep)])
    assert pair[1].model is pair[0].model  # copied together, they share the copied backbone
    pair[1].unwrap()
    with pytest.raises(RuntimeError, match="was unwrapped"):
        pair[0](images(1))


@pytest.mark.parametrize(
    "build",
    [
        lambda m: fastprompt.vpt(m, 2, backend="bogus"),
        lambda m: fastprompt.vpt(m, 2, impl="naive", backend="bogus"),
        lambda m: fastprompt.vpt(m, 2, deep=False, backend="bogus"),
        lambda m: fastprompt.pgn(m, 2, generator=None, backend="bogus"),
        lambda m: fastprompt.vpt_ablation(m, 2, num_deep_layers=1, backend="bogus"),
    ],
    ids=["fused", "naive", "shallow", "pgn", "ablation"],
)
def test_an_unknown_backend_is_refused_at_wrap_time(build):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'bogus'"):
        build(tiny_vit())


def test_an_unknown_backend_is_refused_when_loading(tmp_path):
    fastprompt.pgn(tiny_vit(), 2, generator=None).save_prompts(tmp_path / "run")
    with pytest.raises(ValueError, match="got 'bogus'"):
        fastprompt.load_prompts(tiny_vit(), tmp_path / "run", backend="bogus")


def test_pgn_runs_and_records_the_impl_it_is_given(tmp_path):
    from fastprompt.methods import pgn

    config = pgn.PGNConfig(num_prompts=2, generator=None)
    prompted = pgn.build(tiny_vit(), config, impl="fused")
    assert prompted.impl == "fused"  # the build used to drop it and record "naive"
    prompted.save_prompts(tmp_path / "run")
    assert fastprompt.load_prompts(tiny_vit(), tmp_path / "run").impl == "fused"
