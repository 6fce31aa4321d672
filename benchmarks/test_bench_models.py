"""pytest-benchmark suites: prompt-free vs naive VPT vs fastprompt, and the op.

    pip install -e ".[bench]" && python -m pytest benchmarks/ --benchmark-only

ViT-S/16 so it runs on a CPU in minutes (the ViT-B/16 figures come from ``fastprompt bench``).
On a GPU, timings synchronise the device after each call.
"""

from __future__ import annotations

import pytest
import timm
import torch

import fastprompt
from fastprompt.ops import prompt_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = "vit_small_patch16_224"
BATCH = 64 if DEVICE == "cuda" else 4


def _synced(fn):
    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return call


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, num_classes=100).to(DEVICE).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(BATCH, 3, 224, 224, device=DEVICE)


@pytest.mark.parametrize("variant", ["prompt-free", "naive", "fused"])
@pytest.mark.parametrize("prompts", [200])
def test_inference(benchmark, model, images, variant, prompts):
    net = (
        model
        if variant == "prompt-free"
        else fastprompt.vpt(model, prompts, impl="naive" if variant == "naive" else "fused").eval()
    )
    with torch.inference_mode():
        benchmark.pedantic(_synced(lambda: net(images)), rounds=3, warmup_rounds=1)
    if net is not model:
        net.unwrap()


@pytest.mark.parametrize("variant", ["naive", "fused"])
def test_training_step(benchmark, model, images, variant):
    net = fastprompt.vpt(model, 200, impl=variant).train()

    def step():
        net(images).logsumexp(-1).mean().backward()
        net.zero_grad(set_to_none=True)

    benchmark.pedantic(_synced(step), rounds=3, warmup_rounds=1)
    net.unwrap()


@pytest.mark.parametrize("prompts", [10, 200])
def test_op_forward_backward(benchmark, prompts):
    b, h, n, d = BATCH, 6, 197, 64
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(1, h, prompts, d, device=DEVICE, requires_grad=True) for _ in range(2))

    def call():
        out, _ = prompt_attention(q, k, v, pk, pv)
        torch.autograd.grad(out.sum(), (q, k, v, pk, pv))

    benchmark.pedantic(_synced(call), rounds=5, warmup_rounds=1)
