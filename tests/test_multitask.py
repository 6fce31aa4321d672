"""Batches that mix tasks: one pass over one frozen backbone gives each image its own task's logits,
equal to that task's own model (VPT-deep of different prompt counts, a condensed model, E²VPT with
pruned masks, different heads and readouts); tasks that cannot share blocks are refused."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from helpers import assert_close, images, tiny_swin, tiny_vit

import fastprompt
from fastprompt.methods import e2vpt as E


def _backbone(classes=5, **kw):
    model = tiny_vit(**kw)  # the same seed: the same frozen weights
    model.reset_classifier(classes)
    return model


def _tasks():
    torch.manual_seed(1)
    vpt3 = fastprompt.vpt(_backbone(), 3)
    vpt5 = fastprompt.vpt(_backbone(7), 5, readout="patches")
    deep = fastprompt.vpt(_backbone(4), 4)
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    condensed = fastprompt.condense(deep, keep)  # blocks hold 3, 0 and 2 prompts
    e2 = E.e2vpt(_backbone(6), 3, 2)
    with torch.no_grad():
        e2.source.masks()[0][1] = 0.0  # a pruned zero token
        e2.source.masks()[1][:, :3] = 0.0
    tasks = {"vpt3": vpt3, "vpt5": vpt5, "condensed": condensed, "e2vpt": e2}
    return {name: task.eval() for name, task in tasks.items()}


def test_each_image_gets_its_own_tasks_logits_and_gradients():
    tasks = _tasks()
    mixed = fastprompt.multitask(tasks).eval()
    assert mixed.num_classes == (5, 7, 4, 6)
    names = ["e2vpt", "vpt3", "condensed", "vpt5", "e2vpt", "vpt3", "vpt5"]
    x = images(len(names))
    out = mixed(x, names)
    for t, (name, task) in enumerate(tasks.items()):
        rows = [i for i, n in enumerate(names) if n == name]
        ref = task(x[rows])
        assert_close(out[rows, : ref.shape[1]], ref, name, atol=2e-5, rtol=1e-5)
        assert torch.isinf(out[rows, ref.shape[1] :]).all()
        # Gradients reach each task's own (copied) prompts as in its own model.
        params = list(mixed.tasks[t].parameters()) + list(mixed.heads[t].parameters())
        got = torch.autograd.grad(out[rows, : ref.shape[1]].sum(), params, retain_graph=True)
        own = list(task.source.parameters()) + list(task.backbone.classifier().parameters())
        want = torch.autograd.grad(ref.sum(), own, allow_unused=True)
        for g, w in zip(got, want):
            assert_close(g, torch.zeros_like(g) if w is None else w, name, atol=3e-5, rtol=1e-4)
    with torch.no_grad(), mixed.frozen_prompts():
        again = mixed(x, torch.tensor([3, 0, 2, 1, 3, 0, 1]))
    finite = torch.isfinite(out)
    assert_close(again[finite], out.detach()[finite], "frozen", atol=2e-5, rtol=1e-5)


def test_tasks_are_named_or_indexed():
    tasks = _tasks()
    mixed = fastprompt.multitask({"a": tasks["vpt3"], "b": tasks["e2vpt"]}).eval()
    x = images(3)
    with torch.no_grad():
        by_name = mixed(x, ["b", "a", "b"])
        assert torch.equal(by_name, mixed(x, [1, 0, 1]))
        assert torch.equal(mixed(x, "a"), mixed(x, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"unknown task 'c' \(tasks: \['a', 'b'\]\)"):
        mixed(x, ["a", "c", "a"])
    with pytest.raises(ValueError, match="2 tasks given for 3 images"):
        mixed(x, ["a", "b"])
    with pytest.raises(ValueError, match=r"task indices must be in \[0, 2\)"):
        mixed(x, [0, 2, 1])
    with pytest.raises(ValueError, match=r"task indices must be in \[0, 2\), got \[0, -1, 1\]"):
        mixed(x, torch.tensor([0, -1, 1]))
    # numpy integers index as ints do (a list of them was "unknown task 1"); bools are refused
    # (True counted as task 1).
    with torch.no_grad():
        want = mixed(x, [1, 0, 1])
        assert torch.equal(mixed(x, [np.int64(1), np.int32(0), 1]), want)
        assert torch.equal(mixed(x, np.array([1, 0, 1])), want)
        assert torch.equal(mixed(x, np.int64(1)), mixed(x, 1))
    with pytest.raises(TypeError, match=r"each task must be a name or an integer index, got True"):
        mixed(x, [True, False, True])
    with pytest.raises(TypeError, match="task must name tasks or index them"):
        mixed(x, True)


def test_each_task_keeps_its_class_count_and_the_backbone_head_is_not_offered():
    tasks = _tasks()
    mixed = fastprompt.multitask({"a": tasks["vpt3"], "b": tasks["e2vpt"]})
    assert mixed.num_classes == (5, 6)
    with pytest.raises(NotImplementedError, match=r"each task has its own head \(heads\[t\]\)"):
        mixed.get_classifier()


def test_task_indices_on_a_device_are_checked_there_not_read_back():
    """Reading a device's indices back synchronised the host at every forward (meta stands in
    for CUDA: it has no values to read)."""
    tasks = _tasks()
    mixed = fastprompt.multitask({"a": tasks["vpt3"], "b": tasks["e2vpt"]})
    meta = torch.device("meta")
    assert mixed.task_index(torch.tensor([1, 0], device=meta), 2, meta).device == meta
    assert mixed.task_index(["b", "a"], 2, meta).device == meta


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fastprompt.vpt(tiny_vit(seed=3), 2), r"backbone weights differ .*\(cls_token\)"),
        (lambda: fastprompt.vpt(tiny_vit(embed_dim=32), 2), "another backbone .*embed_dim"),
        (lambda: fastprompt.vpt(_backbone(), 2, deep=False), r"tokens of block\(s\) \[0, 1, 2\]"),
        (lambda: fastprompt.pgn(_backbone(), 2), "depend on the image"),
        (lambda: fastprompt.pgn(_backbone(), 2, generator=None), "tokens of block"),
        (
            lambda: fastprompt.vpt(_backbone(global_pool="avg"), 2, readout="patches+prompts"),
            r"tokens of block\(s\) \[2\] .*readout 'patches\+prompts' reads prompt outputs: "
            r"build it with readout='patches'",
        ),
    ],
    ids=["weights", "architecture", "vpt-shallow", "pgn", "iip", "prompt-readout"],
)
def test_tasks_that_cannot_share_the_blocks_are_refused(build, match):
    ok = fastprompt.vpt(_backbone(), 2)
    with pytest.raises(ValueError, match=match):
        fastprompt.multitask({"ok": ok, "other": build()})


def test_the_task_models_are_copied_and_left_alone():
    tasks = _tasks()
    before = copy.deepcopy(tasks["vpt3"].state_dict())
    mixed = fastprompt.multitask(tasks)
    assert mixed.tasks[0].prompt_embeddings is not tasks["vpt3"].prompt_embeddings
    after = tasks["vpt3"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tasks["vpt3"](images(1)).shape == (1, 5)  # still live
    with pytest.raises(NotImplementedError, match="save each task's model"):
        mixed.save_prompts("unused")
    with pytest.raises(NotImplementedError, match=r"each task has its own head \(heads\[t\]\)"):
        mixed.reset_classifier(9)


def test_a_compiled_mixed_model_gives_the_eager_logits_and_gradients():
    """``fullgraph=True``: the task indices are neither read back to the host for their range
    check nor to pick the heads (a graph break each); the check runs inside the graph."""
    torch._dynamo.reset()
    mixed = fastprompt.multitask(_tasks()).eval()
    x = images(5)
    task = torch.tensor([3, 0, 2, 0, 1])
    params = [p for p in mixed.parameters() if p.requires_grad]
    ref = mixed(x, task)
    finite = torch.isfinite(ref)
    ref_grads = torch.autograd.grad(ref[finite].sum(), params, allow_unused=True)
    compiled = torch.compile(mixed, fullgraph=True, backend="eager")
    got = compiled(x, task)
    grads = torch.autograd.grad(got[finite].sum(), params, allow_unused=True)
    assert torch.equal(torch.isfinite(got), finite)
    assert_close(got[finite], ref[finite], "compiled logits", atol=2e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert_close(g, r, "compiled gradient", atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"task indices must be in \[0, 4\)"):
        compiled(x, torch.tensor([3, 0, 4, 0, 1]))


def test_no_module_keeps_a_bound_method_of_a_plain_object():
    """torch 2.6's Dynamo cannot trace a call of a plain object's bound method kept on a module
    (it loses the object's source, and a fullgraph compile fails at the first model attribute the
    method reads: "Unexpected type in sourceless builder"); the table kept the adapter's
    ``prompt_kv``. The object itself traces on every torch. Checked here on any torch, since CI
    runs only the newest."""
    tasks = _tasks()
    mixed = fastprompt.multitask(tasks).eval()
    for owner in (mixed, *tasks.values()):
        # The source is held outside the module tree (its parameters are adopted one by one).
        for module in (*owner.modules(), *owner.source.modules()):
            bound = [
                key
                for key, value in vars(module).items()
                if inspect.ismethod(value) and not isinstance(value.__self__, torch.nn.Module)
            ]
            assert not bound, f"a {type(module).__name__} of {type(owner).__name__} keeps {bound}"


def test_a_swin_task_index_changed_between_forwards_is_read_anew():
    """Swin keeps each stage's window-to-set index for the blocks of one forward only: a caller's
    index buffer (here sharing a numpy array's memory, so writes bump no version counter) may
    hold other tasks at the next forward."""
    torch.manual_seed(1)
    tasks = {
        n: fastprompt.vpt(tiny_swin(), p, readout="patches").eval() for n, p in (("a", 2), ("b", 3))
    }
    mixed = fastprompt.multitask(tasks).eval()
    x = torch.randn(2, 3, 32, 32)
    values = np.zeros(2, dtype=np.int64)
    index = torch.from_numpy(values)
    with torch.no_grad():
        mixed(x, index)
        values[:] = [1, 0]
        got = mixed(x, index)
        want = mixed(x, torch.tensor([1, 0]))
    assert torch.equal(got, want)


def test_swin_tasks_with_a_block_no_task_prompts():
    """Condensed Swin tasks that all keep no prompt in block 1: the mixed model runs that block
    without prompts, as each task does (it used to ask for keys/values there)."""
    base = tiny_swin()
    keep = torch.ones(6, 3, dtype=torch.bool)
    keep[1] = False
    tasks = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        prompted = fastprompt.vpt(copy.deepcopy(base), 3, readout="patches")
        tasks[name] = fastprompt.condense(prompted, keep).eval()
    mixed = fastprompt.multitask(tasks).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = mixed(x, ["b", "a", "b"])
        for name, rows in (("a", [1]), ("b", [0, 2])):
            assert_close(out[rows], tasks[name](x[rows]), name, atol=2e-5, rtol=1e-5)
