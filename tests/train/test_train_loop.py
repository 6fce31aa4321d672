"""The loop: what trains, label and data errors, mixed precision, compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit

import fastprompt
from fastprompt.train import Trainer, get_recipe
from fastprompt.train.loop import LabelError, evaluate_model

CLASSES = 5


def _model(dropout: float = 0.0, seed: int = 0, **kw):
    return fastprompt.vpt(tiny_vit(seed=seed, depth=2), 3, dropout=dropout, **kw)


def _batches(n: int = 3, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 32, 32, generator=g),
            torch.randint(0, CLASSES, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def _recipe(**kw):
    return get_recipe("vpt").override(**{"epochs": 4, "warmup_epochs": 1, "batch_size": 4, **kw})


def test_an_epoch_trains_exactly_the_trainable_tensors():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, _recipe(lr=64.0), progress=False)
    trainer.train_epoch(_batches(), 0)  # warmup epoch 0: lr 0, momentum buffers fill
    m = trainer.train_epoch(_batches(), 1)
    assert m["lr"] == pytest.approx(64.0 * 4 / 256) and trainer.epoch == 2
    assert m["train_samples"] == 12 and 0.0 <= m["data_wait"] <= 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(model.trainable_parameters())
    ev = trainer.evaluate(_batches(seed=2), progress=False)
    assert ev["samples"] == 12 and 0.0 <= ev["acc"] <= 1.0 and ev["loss"] > 0


def test_labels_that_do_not_fit_the_head_are_refused_before_the_loss():
    trainer = Trainer(_model(), _recipe(), progress=False)
    bad = [(torch.randn(2, 3, 32, 32), torch.tensor([0, CLASSES]))]
    with pytest.raises(LabelError, match=f"label 5 does not fit the model's head of {CLASSES}"):
        trainer.train_epoch(bad, 0)
    with pytest.raises(LabelError, match="label 5 does not fit"):
        fastprompt.evaluate(trainer.model, bad)
    with pytest.raises(LabelError, match="integer class indices"):
        trainer.train_epoch([(torch.randn(2, 3, 32, 32), torch.tensor([0.0, 1.0]))], 0)


def test_an_empty_loader_and_a_diverged_run_are_errors():
    trainer = Trainer(_model(), _recipe(warmup_epochs=0), progress=False)
    with pytest.raises(ValueError, match="yielded no samples"):
        trainer.train_epoch([], 0)
    with pytest.raises(ValueError, match="yielded no samples"):
        trainer.evaluate([], progress=False)
    nan = [(torch.full((2, 3, 32, 32), float("nan")), torch.tensor([0, 1]))]
    with pytest.raises(FloatingPointError, match="epoch 0: the training loss is nan"):
        trainer.train_epoch(nan, 0)


def test_fit_is_the_trainer_with_a_plain_recipe():
    a, b = _model(), _model()
    losses = fastprompt.fit(a, _batches(), epochs=2, lr=0.5, warmup_epochs=1, progress=False)
    recipe = _recipe(epochs=2, lr=0.5, lr_scaling="none", warmup_epochs=1)
    trainer = Trainer(b, recipe, progress=False)
    expected = [trainer.train_epoch(_batches(), e)["train_loss"] for e in range(2)]
    assert losses == expected
    for (n, p), q in zip(a.trainable_parameters().items(), b.trainable_parameters().values()):
        assert torch.equal(p, q), n
    assert fastprompt.evaluate(a, _batches()) == evaluate_model(b, _batches())["acc"]


def test_bf16_autocast_trains_close_to_fp32():
    runs = {}
    for p in ("fp32", "bf16"):
        model = _model()
        trainer = Trainer(model, _recipe(warmup_epochs=0, lr=8.0), precision=p, progress=False)
        runs[p] = ([trainer.train_epoch(_batches(), e)["train_loss"] for e in range(2)], model)
    (l32, m32), (l16, m16) = runs["fp32"], runs["bf16"]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(l32, l16)), (l32, l16)
    assert m16.prompt_embeddings.dtype == torch.float32  # parameters stay fp32
    assert not torch.equal(m32.prompt_embeddings, m16.prompt_embeddings)  # autocast was on


def test_a_bfloat16_model_reads_a_float32_loader_in_every_loop():
    """The loops move images to the model's device and weights' dtype: ``model.to(bfloat16)``
    then fit, evaluate, score_prompts or E2VPT's mask_scores on an ordinary loader ran into
    PyTorch's "Input type (float) and bias type (c10::BFloat16)"."""
    from fastprompt.methods import e2vpt as E

    model = _model().to(torch.bfloat16)
    ev = fastprompt.evaluate(model, _batches())
    assert 0.0 <= ev <= 1.0
    losses = fastprompt.fit(model, _batches(), epochs=1, lr=0.1, progress=False)
    assert len(losses) == 1 and losses[0] > 0
    scores = fastprompt.score_prompts(model, _batches(), method="taylor", progress=False)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    e2vpt = E.e2vpt(tiny_vit(depth=2), 3, 2).to(torch.bfloat16)
    tokens, segments = E.mask_scores(e2vpt, _batches())
    assert tokens.shape == (3,) and torch.isfinite(segments).all()


def test_fp16_uses_a_grad_scaler_that_skips_overflowing_steps():
    model = _model()
    trainer = Trainer(model, _recipe(warmup_epochs=0, lr=8.0), precision="fp16", progress=False)
    assert trainer.scaler.is_enabled()
    start = trainer.scaler.get_scale()
    before = model.prompt_embeddings.detach().clone()
    losses = [trainer.train_epoch(_batches(), e)["train_loss"] for e in range(4)]
    # Steps whose fp16 gradients overflow are skipped while the scale comes down; then it trains.
    assert trainer.scaler.get_scale() < start
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.prompt_embeddings, before)
    state = trainer.state_dict()["scaler"]
    assert state["scale"] == trainer.scaler.get_scale()


def test_the_prompted_model_compiles_without_graph_breaks():
    model = _model(dropout=0.1)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    train = torch._dynamo.explain(model)(x)
    model.eval()
    with model.frozen_prompts():
        infer = torch._dynamo.explain(model)(x)
    assert (train.graph_break_count, infer.graph_break_count) == (0, 0)
    assert (train.graph_count, infer.graph_count) == (1, 1)


def test_compiled_training_matches_eager_and_does_not_recompile_per_epoch():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    data = [*_batches(), (torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))]  # a short last batch
    eager, compiled = _model(), _model()
    t_eager = Trainer(eager, _recipe(warmup_epochs=0, lr=8.0), progress=False)
    t_comp = Trainer(
        compiled, _recipe(warmup_epochs=0, lr=8.0), compile="aot_eager", progress=False
    )
    graphs = []
    for epoch in range(4):
        a = t_eager.train_epoch(data, epoch)["train_loss"]
        b = t_comp.train_epoch(data, epoch)["train_loss"]
        assert b == pytest.approx(a, rel=1e-4)
        assert t_comp.evaluate(data, progress=False)["loss"] == pytest.approx(
            t_eager.evaluate(data, progress=False)["loss"], rel=1e-4
        )
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], graphs  # train + eval graphs, then nothing new


def test_the_loss_is_taken_in_the_models_precision_or_float32_at_least(monkeypatch):
    """The loops took the loss of ``logits.float()``: a float64 model's logits were cut to
    float32 (its loss and gradients lost precision); half-precision ones are upcast."""
    import torch.nn.functional as F

    from fastprompt.train.multi import domain_stats

    real, seen = F.cross_entropy, []

    def recording(logits, *args, **kw):
        seen.append(logits.dtype)
        return real(logits, *args, **kw)

    monkeypatch.setattr(F, "cross_entropy", recording)
    for dtype, loss_dtype in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        seen.clear()
        model = _model().to(dtype)
        trainer = Trainer(model, _recipe(warmup_epochs=0), progress=False)
        trainer.train_epoch(_batches(n=1), 0)
        domains = torch.tensor([0, 0, 1, 1, 1])
        evaluate_model(model, _batches(n=1), progress=False, domains=domains)
        domain_stats(torch.zeros(2, CLASSES, dtype=dtype), torch.tensor([0, 3]), domains)
        assert seen and set(seen) == {loss_dtype}, (dtype, seen)
