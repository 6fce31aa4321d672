"""VPT on Swin v1 against the official VPT-Swin written plainly (``swin_official.py``): logits and
every prompt gradient, shallow and deep, both computations; the per-image rule and the official
window mixing; dropout masks; parameters, init and official checkpoints; what is refused."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
import warnings

import pytest
import torch
from helpers import assert_close, tiny_swin, tiny_vit
from safetensors import safe_open
from safetensors.torch import save_file
from swin_official import assert_matches_official, official_of, official_vpt_swin

import fastprompt


def _images(b, size=32, seed=7):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompts(prompted):
    return [p for n, p in prompted.named_parameters() if "prompt_embeddings" in n]


# (impl, prompts, batch, dropout of a model in eval): every count, both batch sizes, with and
# without dropout on the fused path; the naive path (the official computation) once more.
CASES = [
    ("fused", 1, 1, 0.0),
    ("fused", 5, 3, 0.3),
    ("fused", 10, 3, 0.0),
    ("fused", 10, 1, 0.3),
    ("naive", 5, 3, 0.3),
]


@pytest.mark.parametrize("impl, p, batch, dropout", CASES)
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_matches_the_official_vpt_swin(deep, impl, p, batch, dropout):
    prompted = fastprompt.vpt(tiny_swin(), p, deep=deep, dropout=dropout, impl=impl).eval()
    assert_matches_official(prompted, _images(batch))


@pytest.mark.parametrize("backend", ["cpp", "cascade", "torch"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_every_backend_with_a_key_bias_gives_the_official_vpt_swin(deep, backend):
    """The windows' relative-position bias and shift mask through each backend that takes a
    key_bias (``cpp`` is the CPU default; the cases above run it)."""
    prompted = fastprompt.vpt(tiny_swin(), 5, deep=deep, backend=backend).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no backend may fall back here
        assert_matches_official(prompted, _images(3))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "cascade", "torch"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_every_backend_with_a_key_bias_gives_the_official_vpt_swin_on_cuda(deep, backend):
    """On CUDA the bias goes to PyTorch's memory-efficient kernel (cascade, cpp) aligned as it
    needs; fp32 there runs as 3xTF32, hence the looser tolerance."""
    prompted = fastprompt.vpt(tiny_swin(), 5, deep=deep, backend=backend).eval().cuda()
    assert_matches_official(prompted, _images(3).cuda(), tol=10.0)


@pytest.mark.parametrize("fused_attn", [False, True], ids=["written-out", "sdpa"])
def test_naive_attends_as_the_models_own_window_attention(fused_attn):
    """``impl="naive"`` follows timm's ``fused_attn`` switch (off by default for Swin, as the
    official code writes attention out): either way it is the official VPT-Swin."""
    model = tiny_swin()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused_attn
    prompted = fastprompt.vpt(model, 5, deep=True, impl="naive").eval()
    assert_matches_official(prompted, _images(3))


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_dropout_masks_are_the_official_ones(deep, impl):
    """Training mode: the shallow mask per image, one mask per stage tensor, in that order."""
    prompted = fastprompt.vpt(tiny_swin(), 4, deep=deep, dropout=0.4, impl=impl).train()
    assert_matches_official(prompted, _images(3), training=True, seed=3)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_the_official_window_mixing_only_behind_its_flag(deep):
    """Per image by default; the official cross-image mixing with window_mixing=True. They
    differ only with several images and several windows (deep: in the last stage)."""
    model = tiny_swin(depths=(2, 2), num_heads=(2, 2))  # the last stage has 4 windows
    x = _images(3)
    per_image = fastprompt.vpt(model, 3, deep=deep).eval()
    assert_matches_official(per_image, x, mixing=False)
    with torch.no_grad():
        ours = per_image(x)
        mixed = official_of(per_image, x, mixing=True)
        assert (ours - mixed).abs().max() > 1e-4  # the defect is real at B > 1
        assert_close(per_image(x[:1]), official_of(per_image, x[:1], mixing=True), "B = 1")
    official = fastprompt.vpt(per_image.unwrap(), 3, deep=deep, window_mixing=True).eval()
    assert_matches_official(official, x, mixing=True)


def test_deep_mode_with_one_last_stage_window_mixes_under_prompt_dropout_only():
    """The last stage has one window per image (Swin-T/B at 224 alike): without prompt dropout
    every image receives the same sets, so the official mixing changes nothing; in training with
    dropout block 0's shallow set carries a mask per image, which the official code hands to
    other images' windows (``docs/design.md`` §2, "VPT on Swin")."""
    x = _images(3)
    prompted = fastprompt.vpt(tiny_swin(), 3, deep=True, dropout=0.3).train()
    with torch.no_grad():
        torch.manual_seed(5)
        ours = prompted(x)
        torch.manual_seed(5)
        mixed = official_of(prompted, x, mixing=True, training=True)
        assert (ours - mixed).abs().max() > 1e-4  # dropout on: the batch reaches block 0
        prompted.eval()
        assert_close(prompted(x), official_of(prompted, x, mixing=True), "no dropout acting")


def test_an_image_does_not_see_its_batch():
    prompted = fastprompt.vpt(tiny_swin(), 3, deep=False).eval()
    x = _images(3)
    with torch.no_grad():
        together = prompted(x)
        for i in range(3):
            assert_close(prompted(x[i : i + 1])[0], together[i], f"image {i}")


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_windows_padded_as_timm_pads_them(deep):
    """36×36 images: 18×18, 9×9, 5×5 patches, none a whole number of 4×4 windows (the official
    code never pads; fastprompt hands the prompts to every window timm makes)."""
    prompted = fastprompt.vpt(tiny_swin(img_size=36), 3, deep=deep).eval()
    x = _images(2, size=36)
    out = prompted(x)
    prompted.impl = "naive"
    ref = prompted(x)
    assert_close(out, ref, "fused vs naive", atol=2e-5, rtol=1e-5)
    prompted.impl = "fused"
    with torch.no_grad(), prompted.frozen_prompts():
        assert_close(prompted(x), ref.detach(), "frozen", atol=2e-5, rtol=1e-5)


def test_frozen_prompts_and_the_fused_path_shape():
    """Deep blocks attend to one shared set (computed once per block, never per window), every
    window a sequence; only the last block computes prompt rows (the readout reads them)."""
    prompted = fastprompt.vpt(tiny_swin(), 5).eval()
    x = _images(2)
    calls, biases = [], []

    def spy(call):
        calls.append((call.block, tuple(call.q.shape), call.prompt_k.shape[0], call.windows))
        if call.key_bias is not None:  # one bias per window of an image, never one per image
            biases.append((call.block, call.key_bias.shape[0]))
        return fastprompt.prompted.run_attention(call)[0]

    with torch.no_grad():
        ref = prompted(x)
        with prompted.attention_override(spy):
            assert_close(prompted(x), ref, "override")
        with prompted.frozen_prompts():
            assert_close(prompted(x), ref, "frozen")
    windows = {0: 16, 1: 16, 2: 4, 3: 4, 4: 1, 5: 1}
    for block, q, sets, count in calls[:-2]:
        assert (q[0], q[2], sets, count) == (2 * windows[block], 16, 1, windows[block])
    assert [c[0] for c in calls[-2:]] == [5, 5] and calls[-1][1][2] == 5  # prompt rows
    shifted = {block: rows for block, rows in biases if rows > 1}
    assert shifted == {1: 16, 3: 4}, biases


def test_a_set_every_image_holds_is_projected_once_and_window_indices_are_kept(monkeypatch):
    """The last deep block's prompt tokens (one set for the batch) attend as that one set, their
    queries the same rows for every window; shallow prompts (one set per image) give each window
    its image's set through one index tensor per stage, reused by the stage's blocks (a new one
    costs the CUDA extension a host synchronisation)."""
    x = _images(3)
    run = fastprompt.prompted.run_attention
    calls = []

    def spy(call):
        calls.append(call)
        return run(call)

    monkeypatch.setattr(fastprompt.block_loop, "run_attention", spy)  # what the loop calls
    for deep in (True, False):
        prompted = fastprompt.vpt(tiny_swin(), 5, deep=deep).eval()
        calls.clear()
        assert_matches_official(prompted, x)  # logits and prompt gradients, the spy looking on
        calls.clear()
        with torch.no_grad():
            prompted(x)
        if deep:
            last = [c for c in calls if c.block == 5]
            assert all(c.prompt_k.shape[0] == 1 and c.prompt_index is None for c in last)
            assert last[-1].q.stride(0) == 0  # the set's queries, not one copy per window
            continue
        assert all(c.prompt_index is None for c in calls if c.block == 0)  # the parameter itself
        owners = {}
        for c in (c for c in calls if c.block > 0):
            owners.setdefault(c.windows, set()).add(id(c.prompt_index))
            expected = torch.arange(3).repeat_interleave(c.windows)
            assert torch.equal(c.prompt_index, expected), c.block
        assert all(len(ids) == 1 for ids in owners.values()), owners


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_compiled_swin_gives_the_eager_logits_and_prompt_gradients(deep):
    """``fullgraph=True`` through the fused Swin block: the window-index cache stays out of the
    trace, shallow prompts included (one set per image, read through an index per window)."""
    torch._dynamo.reset()
    prompted = fastprompt.vpt(tiny_swin(), 5, deep=deep).eval()
    x = _images(3)
    ref = prompted(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), _prompts(prompted))
    kept = dict(prompted.backbone._window_sets)
    compiled = torch.compile(prompted, fullgraph=True, backend="eager")
    for _ in range(2):
        got = compiled(x)
        grads = torch.autograd.grad(got.square().sum(), _prompts(prompted))
        assert_close(got, ref, "compiled logits", atol=2e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, "compiled prompt gradient", atol=2e-5, rtol=1e-5)
    assert prompted.backbone._window_sets == kept  # what eager kept; the trace added nothing


def test_the_window_index_cache_stays_out_of_a_trace():
    """Traced with an index tensor (a table of sets), the cache is neither read nor filled: its
    ids, weak references and versions are not the trace's to keep."""
    torch._dynamo.reset()
    backbone = fastprompt.vpt(tiny_swin(), 5).backbone

    def windows(index):
        return backbone._window_index(index, 2, 3, index.device)

    traced = torch.compile(windows, fullgraph=True, backend="eager")
    assert torch.equal(traced(torch.tensor([2, 0])), torch.tensor([2, 2, 2, 0, 0, 0]))
    assert backbone._window_sets == {}


def test_a_kept_window_index_follows_its_index():
    backbone = fastprompt.vpt(tiny_swin(), 5).backbone
    index = torch.tensor([2, 0])
    first = backbone._window_index(index, 2, 3, index.device)
    assert torch.equal(first, torch.tensor([2, 2, 2, 0, 0, 0]))
    assert backbone._window_index(index, 2, 3, index.device) is first
    index[1] = 1  # changed in place: made anew
    assert torch.equal(
        backbone._window_index(index, 2, 3, index.device), torch.tensor([2] * 3 + [1] * 3)
    )
    backbone.window_mixing = True
    assert torch.equal(backbone._window_index(None, 2, 3, index.device), torch.tensor([0, 1] * 3))
    # The cache (weak references) is dropped when the adapter is pickled or copied; it refills.
    for clone in (pickle.loads(pickle.dumps(backbone)), copy.deepcopy(backbone)):
        assert clone._window_sets == {}


def test_parameters_names_and_the_official_init():
    model = tiny_swin()
    prompted = fastprompt.vpt(model, 5)
    shapes = {n: tuple(p.shape) for n, p in prompted.named_parameters() if "prompt" in n}
    assert shapes == {
        "prompt_embeddings": (1, 5, 16),
        "deep_prompt_embeddings_0": (1, 5, 16),
        "deep_prompt_embeddings_1": (2, 5, 32),
        "deep_prompt_embeddings_2": (2, 5, 64),
    }
    bound = math.sqrt(6.0 / (3 * 2 * 2 + 16))  # the stage-0 width for every stage
    for name, p in prompted.named_parameters():
        if "prompt" in name:
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, name
    head = prompted.model.head.fc
    assert torch.allclose(head.bias, torch.full_like(head.bias, -math.log(99)))
    assert set(prompted.trainable_parameters()) == set(shapes) | {"head.fc.weight", "head.fc.bias"}
    shallow = fastprompt.vpt(prompted.unwrap(), 2, deep=False)
    assert [n for n, _ in shallow.named_parameters() if "prompt" in n] == ["prompt_embeddings"]


def _official_state(prompted, prefix="enc."):
    """A state dict as the official code saves it (``enc.`` backbone, ``head.last_layer``)."""
    state = {
        prefix + n: p.detach().clone() for n, p in prompted.named_parameters() if "prompt" in n
    }
    state["head.last_layer.weight"] = prompted.model.head.fc.weight.detach().clone()
    state["head.last_layer.bias"] = prompted.model.head.fc.bias.detach().clone()
    return state


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_official_checkpoints_load(deep, tmp_path):
    trained = fastprompt.vpt(tiny_swin(), 3, deep=deep).eval()
    with torch.no_grad():
        for p in _prompts(trained):
            p.normal_()
    state = _official_state(trained)
    loaded = fastprompt.load_prompts(tiny_swin(), state).eval()
    assert loaded.config.deep is deep and loaded.config.num_prompts == 3
    assert loaded.readout == "patches+prompts"
    x = _images(2)
    with torch.no_grad():
        assert_close(loaded(x), official_of(trained, x), "loaded")
    torch.save(state, tmp_path / "official.pth")
    state["enc.prompt_proj.weight"] = torch.zeros(16, 8)  # built, never applied by that code
    state["enc.prompt_proj.bias"] = torch.zeros(16)
    with pytest.warns(UserWarning, match="never applies it"):
        again = fastprompt.load_prompts(tiny_swin(), state, window_mixing=True)
    assert again.backbone.window_mixing and not hasattr(again, "prompt_proj")
    assert fastprompt.load_prompts(tiny_swin(), tmp_path / "official.pth").config.deep is deep


def test_checkpoints_of_the_other_family_are_refused():
    swin = _official_state(fastprompt.vpt(tiny_swin(), 3))
    with pytest.raises(ValueError, match=r"per-stage .*VPT-Swin.*VisionTransformer"):
        fastprompt.load_prompts(tiny_vit(), swin)
    vit = {n: p.detach() for n, p in fastprompt.vpt(tiny_vit(), 3).named_parameters()}
    with pytest.raises(ValueError, match=r"VPT-ViT.*SwinTransformer"):
        fastprompt.load_prompts(tiny_swin(), vit)


def test_checkpoints_round_trip(tmp_path):
    prompted = fastprompt.vpt(tiny_swin(), 4, window_mixing=True, dropout=0.1)
    with torch.no_grad():
        prompted.deep_prompt_embeddings_1.add_(1.0)
    prompted.save_prompts(tmp_path / "run")
    loaded = fastprompt.load_prompts(tiny_swin(seed=0), tmp_path / "run")
    assert loaded.config == prompted.config and loaded.backbone.window_mixing
    for name, p in prompted.prompt_state().items():
        assert torch.equal(loaded.prompt_state()[name], p), name
    with pytest.raises(ValueError, match="another model shape"):
        fastprompt.load_prompts(tiny_swin(depths=(2, 2), num_heads=(2, 2)), tmp_path / "run")
    # Every width the same, other windows (as Swin-B at window 7 and at 12): another model.
    with pytest.raises(ValueError, match=r"window_size: checkpoint \[\[4, 4\], .*\[2, 2\]"):
        fastprompt.load_prompts(tiny_swin(window_size=2), tmp_path / "run")


def test_a_checkpoint_saved_before_a_signature_field_existed_loads(tmp_path):
    prompted = fastprompt.vpt(tiny_swin(), 4)
    prompted.save_prompts(tmp_path / "run")
    path = tmp_path / "run" / "prompts.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["model"]["window_size"]
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    (path.parent / "config.json").write_text(json.dumps(config))
    loaded = fastprompt.load_prompts(tiny_swin(), path)
    for name, p in prompted.prompt_state().items():
        assert torch.equal(loaded.prompt_state()[name], p), name


def test_a_vit_checkpoint_records_no_window_mixing(tmp_path):
    fastprompt.vpt(tiny_vit(), 2).save_prompts(tmp_path / "run")
    text = (tmp_path / "run" / "config.json").read_text()
    assert "window_mixing" not in text


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda m: fastprompt.vpt(m, 2, project=8), "builds prompt_proj but never applies it"),
        (lambda m: fastprompt.vpt_ablation(m, 2, num_deep_layers=2), "shallow or deep prompts"),
        (lambda m: fastprompt.pgn(m, 2, generator=None), "one width per stage"),
        (
            lambda m: fastprompt.vpt(m, 2, backend="triton"),
            r"backend 'triton' cannot run a timm SwinTransformer.*no key_bias \(the Triton",
        ),
    ],
    ids=["project", "ablation", "pgn", "triton"],
)
def test_what_swin_refuses(build, match):
    model = tiny_swin()
    with pytest.raises(ValueError, match=match):
        build(model)
    fastprompt.vpt(model, 2).unwrap()  # the refused build left the model free


def test_other_pools_are_refused():
    try:
        model = tiny_swin(global_pool="max")
    except AssertionError:
        pytest.skip("this timm builds Swin only with global_pool 'avg' (before timm 1.0.31)")
    with pytest.raises(ValueError, match="global_pool='max'"):
        fastprompt.vpt(model, 2)


def test_window_mixing_on_a_vit_is_refused():
    with pytest.raises(ValueError, match="has no windows"):
        fastprompt.vpt(tiny_vit(), 2, window_mixing=True)


def test_official_transcription_is_the_prompt_free_model_without_prompts():
    """The oracle itself: with no prompts it is timm's own Swin."""
    model = tiny_swin()
    x = _images(2)
    with torch.no_grad(), warnings.catch_warnings():
        empty = torch.zeros(1, 0, 16)
        deep = [torch.zeros(1, 0, 16), torch.zeros(2, 0, 32), torch.zeros(2, 0, 64)]
        assert_close(official_vpt_swin(model, empty, deep, x), model(x), "no prompts")


def test_bench_rows_on_a_shrunk_swin():
    """``fastprompt bench``'s measurement on a Swin: the prompt-free model, naive VPT-Swin and
    fastprompt side by side (no timing is asserted), read out as the official VPT-Swin reads."""
    from fastprompt import bench

    shrunk = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2))
    cfg = bench.BenchConfig(
        model="swin_tiny_patch4_window7_224",
        prompts=[3],
        batch=2,
        reps=1,
        img_size=16,
        model_kwargs=shrunk,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a backend fallback names its reason
        rows = bench.run(cfg)["rows"]
    assert [(r["prompts"], r["variant"]) for r in rows] == [
        (0, "prompt-free"),
        (3, "naive"),
        (3, "fused"),
        (3, "fused+block"),  # a Swin offers no "mlp": its blocks are checkpointed whole
    ]
    for row in rows[:3]:
        assert row["infer"]["median_s"] > 0 and row["train"]["median_s"] > 0
        assert row["activation_bytes"] > 0 and row["gflops"] > 0
    for row in rows[1:]:  # beside the frozen prompt-free step, a prompt method's floor
        assert row["train_vs_frozen"] > 0
    free, naive, fused, blocked = rows
    assert blocked["activation_bytes"] < fused["activation_bytes"]
    # Prompts add work to naive VPT-Swin; the fused path computes prompt K/V once per model.
    assert naive["gflops"] > fused["gflops"] > free["gflops"]
    assert naive["activation_bytes"] > fused["activation_bytes"]


@pytest.mark.parametrize("frozen", [False, True])
def test_inference_mode_gives_the_logits_of_no_grad(frozen):
    """The per-window prompt index is an ordinary tensor even under torch.inference_mode (the
    op's host-side check reads its version counter, which inference tensors lack)."""
    prompted = fastprompt.vpt(tiny_swin(), 3).eval()
    x = _images(2)
    with torch.no_grad():
        expected = prompted(x)
    with torch.inference_mode(), prompted.frozen_prompts() if frozen else contextlib.nullcontext():
        out = prompted(x)
    assert_close(out, expected, "logits", atol=1e-6, rtol=1e-5)


def test_naive_flops_count_the_prompt_rows_the_official_code_computes():
    """The official block runs one MLP over every token, so its FLOPs include the prompt rows of
    deep blocks whose prompt outputs the next block drops; a traced count must keep them: deep
    and shallow naive VPT-Swin then differ only by the patch mergings of the shallow prompts."""
    from fvcore.nn import FlopCountAnalysis

    from fastprompt.bench import FLOP_HANDLES

    model, p, x = tiny_swin(), 10, _images(1)
    linear = {}
    for deep in (True, False):
        prompted = fastprompt.vpt(model, p, deep=deep, impl="naive").eval()
        with torch.no_grad():
            analysis = FlopCountAnalysis(prompted, (x,)).set_op_handle(**FLOP_HANDLES)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            linear[deep] = analysis.by_operator()["linear"]
        prompted.unwrap()
    merges = p * sum(4 * c * 2 * c for c in (16, 32))  # a prompt merged as cat([p, p, p, p])
    assert linear[False] - linear[True] == merges


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_no_prompts_give_the_models_own_logits(deep, impl):
    """``num_prompts=0`` (allowed, as for a ViT) used to fail on the fused path."""
    model = tiny_swin()
    x = _images(2)
    with torch.no_grad():
        want = model(x)
        prompted = fastprompt.vpt(model, 0, deep=deep, impl=impl, head_init="keep").eval()
        assert_close(prompted(x), want, "logits", atol=2e-6, rtol=1e-6)
