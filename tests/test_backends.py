"""The backend registry: dispatch, the strict explicit choice, the one-time fallback message and the
``FASTPROMPT_*`` settings."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastprompt import _config, backends
from fastprompt.backends import Call, choose, describe

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object needs no GPU; nothing here launches on it


@pytest.fixture
def no_gpu_no_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("Triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTPROMPT_BACKEND", raising=False)
    backends._warned.clear()


def test_every_name_in_one_place():
    assert backends.NAMES == tuple(b.name for b in backends.BACKENDS)
    for b in backends.BACKENDS:
        assert b.kernels == f"fastprompt.kernels.{b.name}"
        module = b.module()
        for fn in ("availability", "prompt_attention_fwd", "prompt_attention_bwd"):
            assert callable(getattr(module, fn)), (b.name, fn)
        assert hasattr(module, "prompt_attention_bwd_scored")
        assert ("scores" in b.features) == (module.prompt_attention_bwd_scored is not None)


def test_cpu_picks_the_extension_for_fp32_and_torch_otherwise_silently(no_gpu_no_interpreter):
    cpp_runs = backends.get("cpp").availability("cpu") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if cpp_runs:
            assert choose("op", Call(CPU, torch.float32, 64)).name == "cpp"
        for dtype in (torch.float64, torch.bfloat16):
            assert choose("op", Call(CPU, dtype, 64)).name == "torch"


def test_fallback_from_a_better_backend_is_said_once(no_gpu_no_interpreter):
    call = Call(CUDA, torch.bfloat16, 64)
    with pytest.warns(
        RuntimeWarning, match="uses backend 'torch' because 'triton' cannot run: no CUDA"
    ):
        assert choose("op", call).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose("op", call).name == "torch"


def test_explicit_choice_is_strict_and_lists_every_reason(no_gpu_no_interpreter):
    with pytest.raises(NotImplementedError) as err:
        choose("op", Call(CPU, torch.float64, 40), "triton")
    message = str(err.value)
    assert "no CUDA device" in message and "dtype torch.float64" in message
    assert "head dim 40" in message
    with pytest.raises(ValueError, match="does not exist; choose one of"):
        choose("op", Call(CPU, torch.float32, 64), "cuda-magic")


def test_a_missing_feature_rules_a_backend_out(monkeypatch):
    narrow = backends.Backend(
        name="narrow",
        kernels="fastprompt.kernels.torch",
        summary="test",
        devices=("cpu",),
        auto={"cpu": (torch.float64,)},
        dtypes=(torch.float64,),
        features=frozenset({"prompt_index"}),
    )
    monkeypatch.setattr(backends, "BACKENDS", (narrow, *backends.BACKENDS))
    f64 = torch.float64
    assert choose("op", Call(CPU, f64, 64, frozenset({"prompt_index"}))).name == "narrow"
    assert choose("op", Call(CPU, f64, 64, frozenset({"scores"}))).name == "torch"
    with pytest.raises(NotImplementedError, match="does not implement scores"):
        choose("op", Call(CPU, f64, 64, frozenset({"scores"})), "narrow")


def test_environment_override(monkeypatch, no_gpu_no_interpreter):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "TORCH")
    assert _config.get().backend == "torch"
    assert choose("op", Call(CPU, torch.float32, 64)).name == "torch"
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="requested"):
        choose("op", Call(CPU, torch.float32, 64))
    monkeypatch.setenv("FASTPROMPT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTPROMPT_BACKEND='fast' is not a backend"):
        _config.get()


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False), ("yes", True)])
def test_verbose_flag(monkeypatch, value, expected):
    monkeypatch.setenv("FASTPROMPT_VERBOSE", value)
    assert _config.get().verbose is expected


def test_describe_reports_what_availability_says():
    rows = describe(probe=lambda b: None if b.name == "torch" else f"{b.name} is switched off")
    by_name = {r["backend"]: r for r in rows}
    assert by_name["torch"]["available"] == "yes"
    assert by_name["triton"]["available"] == "triton is switched off"
    assert by_name["triton"]["auto"] == "cuda: float16/bfloat16"


def test_only_config_reads_fastprompt_environment_variables():
    import pathlib
    import re

    import fastprompt

    reading = re.compile(r"(environ(\.get)?|getenv)\(?\[?\s*[\"']FASTPROMPT_")
    root = pathlib.Path(fastprompt.__file__).parent
    readers = [
        p.relative_to(root).as_posix() for p in root.rglob("*.py") if reading.search(p.read_text())
    ]
    assert readers == ["_config.py"]
