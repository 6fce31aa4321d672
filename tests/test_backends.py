"""The backend registry: declarations, dispatch (fixed order, strict, probed, measured), the
``FASTPROMPT_*`` settings and what ``fastprompt info`` says."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
import warnings

import pytest
import torch
from helpers import make_prompts, make_qkv

from fastprompt import _config, backends
from fastprompt.backends import Backend, Call, choose, measure, probe
from fastprompt.backends import cache as dispatch_cache
from fastprompt.backends.info import describe
from fastprompt.ops import prompt_attention

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object needs no GPU; nothing here launches on it
F32 = torch.float32


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch, tmp_path):
    """Every test starts with no decisions, no probes, its own cache file, no overrides."""
    for name in ("FASTPROMPT_BACKEND", "FASTPROMPT_PROBE", "FASTPROMPT_MEASURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTPROMPT_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    backends._warned.clear()
    probe.forget()
    measure.forget()
    dispatch_cache.forget()
    yield
    probe.forget()
    measure.forget()
    dispatch_cache.forget()


@pytest.fixture
def no_gpu_no_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("Triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _declare(name: str, module: str, **kw) -> Backend:
    features = kw.pop("features", frozenset(backends.FEATURES))
    lacks = {f: "not in this test backend" for f in backends.FEATURES if f not in features}
    args = dict(
        summary="test",
        measured="-",
        devices=("cpu",),
        dtypes=(F32,),
        features=frozenset(features),
        lacks=lacks,
        auto={"cpu": (F32,)},
    )
    args.update(kw)
    return Backend(name=name, kernels=module, **args)


def _register(monkeypatch, *extra: Backend, only: tuple[str, ...] | None = None) -> None:
    kept = [b for b in backends.BACKENDS if only is None or b.name in only]
    registry = (*extra, *kept)
    monkeypatch.setattr(backends, "BACKENDS", registry)
    monkeypatch.setattr(backends, "NAMES", tuple(b.name for b in registry))


# ----------------------------------------------------------------------------------------------
# Declarations
# ----------------------------------------------------------------------------------------------


def test_every_backend_implements_what_it_declares():
    assert backends.NAMES == tuple(b.name for b in backends.BACKENDS)
    assert backends.YARDSTICK in backends.NAMES
    for b in backends.BACKENDS:
        assert b.kernels == f"fastprompt.kernels.{b.name}"
        module = b.module()
        for fn in ("availability", "prompt_attention_fwd", "prompt_attention_bwd"):
            assert callable(getattr(module, fn)), (b.name, fn)
        assert hasattr(module, "prompt_attention_bwd_scored") == ("scores" in b.features), b.name
        for hook in backends.HOOKS:  # declared hooks exist, and no hook goes undeclared
            assert hasattr(module, hook) == (hook in b.hooks), (b.name, hook)
        assert set(b.features) | set(b.lacks) == set(backends.FEATURES), b.name
        assert all(b.lacks.values()), b.name


def test_a_declaration_must_give_a_reason_for_every_feature_it_lacks():
    with pytest.raises(ValueError, match="either implemented or lacked with a reason"):
        Backend("x", "m", "s", "-", ("cpu",), (F32,), frozenset({"scores"}))
    with pytest.raises(ValueError, match="unknown features"):
        _declare("x", "m", features={"scores", "teleport"})


def test_triton_is_chosen_automatically_only_where_it_is_covered():
    triton = backends.get("triton")
    assert "not chosen automatically on cpu" in triton.auto_reasons(Call(CPU, torch.float16, 64))[0]
    assert "only float16/bfloat16" in triton.auto_reasons(Call(CUDA, F32, 64))[0]
    assert any("head dim 48" in r for r in triton.auto_reasons(Call(CUDA, torch.float16, 48)))
    assert triton.auto_reasons(Call(CUDA, torch.bfloat16, 64)) == [] or torch.cuda.is_available()


def test_the_triton_declaration_is_stated_once():
    """The kernels' head-dim split and the registry read the same declaration module."""
    from fastprompt.kernels.triton import _capability

    triton = backends.get("triton")
    assert triton.head_dims == tuple(sorted(_capability.HEAD_DIM_SPLITS))
    assert triton.dtypes == _capability.SUPPORTED_DTYPES
    assert triton.auto_head_dims == _capability.AUTO_HEAD_DIMS


def test_describe_reports_declarations_and_availability():
    rows = describe(probe=lambda b: None if b.name == "torch" else f"{b.name} is switched off")
    by_name = {r["backend"]: r for r in rows}
    assert by_name["torch"]["available"] == "yes"
    assert by_name["triton"]["available"] == "triton is switched off"
    assert by_name["triton"]["auto"].startswith("cuda: float16/bfloat16 (head dims 32")
    assert "key_bias: the Triton kernels add no bias" in by_name["triton"]["lacks"]
    assert by_name["cascade"]["measured_candidate"].startswith("cpu: float32")
    assert all(r["summary"] and r["measured"] for r in rows)


def test_describe_puts_the_gpu_capabilities_on_the_cuda_entries_only():
    """`fastprompt info` used to print cpp as chosen on "cpu: float32/bfloat16 (sm_80, sm_90)",
    a GPU restriction on its CPU choice, and nothing beside the CUDA candidate it narrows."""
    by_name = {r["backend"]: r for r in describe(probe=lambda b: None)}
    assert by_name["cpp"]["auto"] == "cpu: float32/bfloat16"
    assert by_name["cpp"]["measured_candidate"] == (
        "cpu: float16, cuda: float32/float16/bfloat16 (sm_80, sm_90)"
    )


# ----------------------------------------------------------------------------------------------
# Fixed-order choice
# ----------------------------------------------------------------------------------------------


def test_cpu_defaults_are_the_measured_winners_silently(no_gpu_no_interpreter):
    """cpp for fp32 and bf16 (benchmarks/results/cpu-2core/op_cascade), torch for the rest."""
    cpp_runs = backends.get("cpp").availability("cpu") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (F32, torch.bfloat16):
            assert choose("op", Call(CPU, dtype, 64)).name == ("cpp" if cpp_runs else "torch")
        for dtype in (torch.float64, torch.float16):
            assert choose("op", Call(CPU, dtype, 64)).name == "torch"


def test_on_cuda_the_cascade_replaces_the_materialised_path(no_gpu_no_interpreter):
    """Triton first where covered; its fallback is the cascade, said once."""
    call = Call(CUDA, torch.bfloat16, 64)
    with pytest.warns(RuntimeWarning, match="uses backend 'cascade' because 'triton' cannot run"):
        assert choose("op", call).name == "cascade"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose("op", call).name == "cascade"
        assert choose("op", Call(CUDA, F32, 64)).name == "cascade"


def test_explicit_choice_is_strict_and_lists_every_reason(no_gpu_no_interpreter):
    with pytest.raises(NotImplementedError) as err:
        choose("op", Call(CPU, torch.float64, 40), "triton")
    message = str(err.value)
    assert "no CUDA device" in message and "dtype torch.float64" in message
    assert "head dim 40" in message
    with pytest.raises(ValueError, match="backend='cuda-magic' does not exist; choose one of"):
        choose("op", Call(CPU, F32, 64), "cuda-magic")


def test_a_missing_feature_rules_a_backend_out_with_its_reason(monkeypatch):
    narrow = _declare(
        "narrow",
        "fastprompt.kernels.torch",
        features={"prompt_index"},
        dtypes=(torch.float64,),
        auto={"cpu": (torch.float64,)},
    )
    _register(monkeypatch, narrow)
    f64 = torch.float64
    assert choose("op", Call(CPU, f64, 64, frozenset({"prompt_index"}))).name == "narrow"
    assert choose("op", Call(CPU, f64, 64, frozenset({"scores"}))).name == "torch"
    with pytest.raises(NotImplementedError, match="no scores: not in this test backend"):
        choose("op", Call(CPU, f64, 64, frozenset({"scores"})), "narrow")


def test_environment_override(monkeypatch, no_gpu_no_interpreter):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "TORCH")
    assert _config.get().backend == "torch"
    assert choose("op", Call(CPU, F32, 64)).name == "torch"
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="requested"):
        choose("op", Call(CPU, F32, 64))
    monkeypatch.setenv("FASTPROMPT_BACKEND", "fast")
    assert _config.get().backend == "fast"  # the settings module knows no backend names
    with pytest.raises(ValueError, match="FASTPROMPT_BACKEND='fast' does not exist"):
        choose("op", Call(CPU, F32, 64))


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False), ("yes", True)])
def test_verbose_flag(monkeypatch, value, expected):
    monkeypatch.setenv("FASTPROMPT_VERBOSE", value)
    assert _config.get().verbose is expected


@pytest.mark.parametrize(
    "name",
    [
        "FASTPROMPT_VERBOSE",
        "FASTPROMPT_EXT_JIT",
        "FASTPROMPT_SKIP_CUDA_BUILD",
        "FASTPROMPT_FORCE_CUDA",
    ],
)
def test_a_switch_holding_no_switch_is_refused_not_read_as_on(monkeypatch, name):
    """FASTPROMPT_EXT_JIT=disabled used to leave compilation allowed (anything not 0/false/no/off
    was on)."""
    monkeypatch.setenv(name, "OFF")
    assert getattr(_config.get(), _SWITCHES[name]) is False
    monkeypatch.setenv(name, "disabled")
    with pytest.raises(ValueError, match=f"{name}='disabled' is not a switch: use 1 or 0"):
        _config.get()


_SWITCHES = {
    "FASTPROMPT_VERBOSE": "verbose",
    "FASTPROMPT_EXT_JIT": "ext_jit",
    "FASTPROMPT_SKIP_CUDA_BUILD": "skip_cuda_build",
    "FASTPROMPT_FORCE_CUDA": "force_cuda",
}


@pytest.mark.parametrize("value, expected", [("1", True), ("y", True), ("2", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, expected):
    """TRITON_INTERPRET=2 is off for Triton; fastprompt used to read it as on and send CPU
    tensors to kernels Triton compiles for a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _config.get().triton_interpret is expected


def test_verbose_dispatch_lines_are_shown_without_any_logging_set_up():
    """FASTPROMPT_VERBOSE=1 used to log at INFO to a logger nobody had configured: nothing
    appeared."""
    import os

    code = (
        "import torch; from fastprompt.ops import prompt_attention; "
        "q = torch.randn(1, 2, 3, 8); p = torch.randn(1, 2, 2, 8); "
        "prompt_attention(q, q, q, p, p, backend='torch')"
    )
    env = dict(os.environ, FASTPROMPT_VERBOSE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prompt_attention: backend 'torch' on cpu (torch.float32), requested by backend" in (
        result.stderr
    )
    result = subprocess.run(
        [sys.executable, "-c", code.replace(", backend='torch'", "")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "prompt_attention: backend " in result.stderr and ", chosen" in result.stderr


def test_probe_and_measure_settings(monkeypatch):
    settings = _config.get()
    assert settings.probe == settings.measure == "auto"
    monkeypatch.setenv("FASTPROMPT_PROBE", "off")
    monkeypatch.setenv("FASTPROMPT_MEASURE", "ALWAYS")
    monkeypatch.setenv("FASTPROMPT_DISPATCH_CACHE", "off")
    settings = _config.get()
    assert (settings.probe, settings.measure, settings.dispatch_cache) == ("off", "always", None)
    monkeypatch.setenv("FASTPROMPT_MEASURE", "sometimes")
    with pytest.raises(ValueError, match="FASTPROMPT_MEASURE='sometimes' is not one of"):
        _config.get()


def test_settings_hold_no_unused_knob():
    assert not hasattr(_config.get(), "build_ext")  # setup.py reads FASTPROMPT_BUILD_EXT itself


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


def test_the_layers_hold_as_the_import_contracts_say():
    """ops -> backends -> kernels, references import only torch, no circle (pyproject.toml)."""
    pytest.importorskip("importlinter")
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Kernels that check themselves
# ----------------------------------------------------------------------------------------------


def _fake_kernels(monkeypatch, name: str, skew: float = 0.0, fail: bool = False, wrong=None):
    """A kernels module: the cascade's kernels with every output but lse off by ``skew``, or
    raising; with ``wrong(function name, args, kwargs)``, off only in the calls it picks."""
    from fastprompt.kernels import cascade

    module = types.ModuleType(name)

    def skewed(fn, results, args, kw):
        off = skew if wrong is None or wrong(fn, args, kw) else 0.0
        return tuple(r * (1 + off) for r in results)

    def fwd(*args, **kw):
        if fail:
            raise RuntimeError("no kernel image for this device")
        out, lse = cascade.prompt_attention_fwd(*args, **kw)
        return skewed("fwd", (out,), args, kw)[0], lse

    def bwd(*args, **kw):
        return skewed("bwd", cascade.prompt_attention_bwd(*args, **kw), args, kw)

    def bwd_scored(*args, **kw):
        return skewed("bwd_scored", cascade.prompt_attention_bwd_scored(*args, **kw), args, kw)

    module.availability = lambda: None
    module.prompt_attention_fwd, module.prompt_attention_bwd = fwd, bwd
    module.prompt_attention_bwd_scored = bwd_scored
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_a_wrong_kernel_is_disabled_once_with_its_error(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    wrong = _declare(
        "wrong",
        _fake_kernels(monkeypatch, "fp_wrong_kernels", skew=0.01),
        features={"prompt_index", "prompt_lengths"},
    )
    _register(monkeypatch, wrong, only=("cascade", "torch"))
    with pytest.warns(RuntimeWarning, match=r"'wrong' failed its self-check .* out: error"):
        assert choose("op", Call(CPU, F32, 32)).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert choose("op", Call(CPU, F32, 32)).name == "torch"
    (_, result), *_ = [(k, r) for k, r in probe.results().items() if k[0] == "wrong"]
    assert not result.ok and "against float64" in result.detail
    recorded = dispatch_cache.entries("probes")
    assert any(k.startswith("wrong|") and not v["ok"] for k, v in recorded.items())
    assert probe.results()[("torch", "cpu", "torch.float32", 32)].ok


def test_a_kernel_that_raises_fails_its_probe_and_one_within_the_rule_passes(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    broken = _declare("broken", _fake_kernels(monkeypatch, "fp_broken", fail=True))
    close = _declare("close", _fake_kernels(monkeypatch, "fp_close", skew=1e-7))
    _register(monkeypatch, broken, close, only=("cascade", "torch"))
    with pytest.warns(RuntimeWarning, match="'broken' failed .* raised RuntimeError: no kernel"):
        assert choose("op", Call(CPU, F32, 16)).name == "close"


def test_a_kernel_wrong_only_on_full_tiles_fails_its_probe(monkeypatch):
    """Right wherever a 128-row tile is partial, as in the probe's small cases, wrong once one is
    full (the unmasked code path every ViT-sized call runs): the probe has a case for it."""
    module = _fake_kernels(
        monkeypatch, "fp_full_tiles", skew=0.01, wrong=lambda fn, a, kw: a[0].shape[2] >= 128
    )
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    tiles = _declare("tiles", module)
    _register(monkeypatch, tiles, only=("cascade", "torch"))
    with pytest.warns(RuntimeWarning, match=r"'tiles' failed its self-check .* out: error"):
        assert choose("op", Call(CPU, F32, 32)).name == "torch"


def _dense(t) -> bool:
    return t.is_contiguous()


# Kernels right on every input the probe once made, wrong only on: (what the probe must name, when)
WRONG_ONLY_ON = {
    # q, k, v as timm hands them: views of one (B, N, 3, H, d) qkv buffer
    "qkv views": ("out", lambda fn, a, kw: fn == "fwd" and not _dense(a[0])),
    # prompt keys/values made by one kv projection, seen through their views
    "prompt views": ("dq", lambda fn, a, kw: fn == "bwd" and not _dense(a[4])),
    # the gradient of a (B, N, H, d) output seen as (B, H, N, d)
    "dout views": ("dq", lambda fn, a, kw: fn == "bwd" and not _dense(a[0])),
    # Prompt Condensation's scored backward
    "scored backward": ("dq", lambda fn, a, kw: fn == "bwd_scored"),
    # a frozen backbone's first prompted block: prompt gradients only
    "no image gradients": ("dprompt_k", lambda fn, a, kw: kw.get("image_grads") is False),
    # batches where kernels may sum several sequences' prompt gradients per program
    "large shared batch": ("dq", lambda fn, a, kw: fn == "bwd" and a[1].shape[0] >= 128),
}


@pytest.mark.parametrize("where", list(WRONG_ONLY_ON))
def test_a_kernel_wrong_only_where_models_call_it_fails_its_probe(monkeypatch, where):
    """Each case the review found the probe did not exercise: a kernel wrong only there (by 1%)
    is disabled, naming the output, the variant and the case."""
    output, wrong = WRONG_ONLY_ON[where]
    module = _fake_kernels(monkeypatch, f"fp_only_{where.replace(' ', '_')}", 0.01, wrong=wrong)
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    planted = _declare("planted", module, prompt_grads_only=True)
    _register(monkeypatch, planted, only=("cascade", "torch"))
    with pytest.warns(RuntimeWarning, match=rf"'planted' failed its self-check .* {output}: error"):
        assert choose("op", Call(CPU, F32, 32)).name == "torch"


def test_the_probe_engages_tritons_sequence_groups():
    """The large-batch case is one where Triton's prompt-key programs sum several sequences."""
    pytest.importorskip("triton")
    from fastprompt.kernels.triton import prompt_attention_backward as tb

    b, h, _, _, t, p = probe.GROUPED
    assert t == 1 and tb._GROUP_OVERRIDE is None
    assert b % tb.seq_group(b, h, p) != 0 and tb.seq_group(b, h, p) > 1


def test_a_requested_backend_is_probed_too(monkeypatch):
    """``backend=`` (a CLI's --backend) once skipped the probe: a wrong kernel was used as asked.
    Its failure is said by the error alone (it was also warned, so the person read it twice);
    an automatic choice later still says why the backend is left out, once."""
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    wrong = _declare("wrong", _fake_kernels(monkeypatch, "fp_wrong_asked", skew=0.01))
    _register(monkeypatch, wrong, only=("cascade", "torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(NotImplementedError, match=r"'wrong' was requested .* self-check"):
                choose("op", Call(CPU, F32, 32), "wrong")
        assert choose("op", Call(CPU, F32, 32), "torch").name == "torch"
    with pytest.warns(RuntimeWarning, match="'wrong' failed its self-check"):
        assert choose("op", Call(CPU, F32, 32)).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert choose("op", Call(CPU, F32, 32)).name == "torch"


def _op_call(d: int = 32):
    """A prompt_attention call as a model makes it: (q, k, v, prompt_k, prompt_v)."""
    return (*make_qkv(2, 2, 5, d), *make_prompts(1, 2, 3, d))


def test_the_probe_warning_points_at_the_persons_call(monkeypatch):
    """The warning named a line of pytest (a fixed stacklevel counted from the probe, which sits
    at another depth under every caller), never the call that led to it."""
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    wrong = _declare("wrong", _fake_kernels(monkeypatch, "fp_wrong_where", skew=0.01))
    _register(monkeypatch, wrong, only=("cascade", "torch"))
    with pytest.warns(RuntimeWarning, match="'wrong' failed its self-check") as said:
        line = inspect.currentframe().f_lineno + 1
        prompt_attention(*_op_call())
    assert (said[0].filename, said[0].lineno) == (__file__, line)


def test_an_unreadable_dispatch_cache_is_said_at_the_persons_call(monkeypatch, tmp_path):
    cache_file = tmp_path / "dispatch.json"
    cache_file.write_text("{not json")
    monkeypatch.setenv("FASTPROMPT_DISPATCH_CACHE", str(cache_file))
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")  # a probe records its result in the file
    _register(monkeypatch, only=("cascade", "torch"))
    with pytest.warns(RuntimeWarning, match="dispatch cache: cannot read") as said:
        line = inspect.currentframe().f_lineno + 1
        prompt_attention(*_op_call(16))
    assert (said[0].filename, said[0].lineno) == (__file__, line)


def test_the_probe_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_PROBE", "off")
    wrong = _declare("wrong", _fake_kernels(monkeypatch, "fp_wrong_off", skew=0.5))
    _register(monkeypatch, wrong, only=("cascade", "torch"))
    assert choose("op", Call(CPU, F32, 16)).name == "wrong"
    assert probe.results() == {}


# ----------------------------------------------------------------------------------------------
# Dispatch by measurement
# ----------------------------------------------------------------------------------------------

SHAPE = (2, 2, 9, 9, 1, 5)


def test_measured_choice_keeps_the_fastest_and_caches_it_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPROMPT_MEASURE", "always")
    _register(monkeypatch, only=("cascade", "torch"))
    timed = []

    def fake_time(backend, call, shape, training):
        timed.append(backend.name)
        return {"cascade": 1.0, "torch": 2.0}[backend.name] * (3 if training else 1)

    monkeypatch.setattr(measure, "time_backend", fake_time)
    call = Call(CPU, F32, 16)
    assert choose("op", call, shape=SHAPE).name == "cascade"
    assert choose("op", call, shape=SHAPE).name == "cascade"
    assert timed == ["cascade", "torch"]  # measured once per bucket
    assert choose("op", call, shape=SHAPE, training=True).name == "cascade"
    assert len(timed) == 4  # training is its own bucket
    stored = json.loads((tmp_path / "dispatch.json").read_text())
    (section,) = stored.values()
    keys = list(section["measured"])
    assert any("|infer|" in k for k in keys) and any("|train|" in k for k in keys)
    assert section["measured"][keys[0]]["ms"] == {"cascade": 1.0, "torch": 2.0} or (
        section["measured"][keys[0]]["ms"] == {"cascade": 3.0, "torch": 6.0}
    )
    # A new process reads the decision from disk without timing anything.
    measure.forget()
    dispatch_cache.forget()
    monkeypatch.setattr(measure, "time_backend", lambda *a: pytest.fail("timed again"))
    assert choose("op", call, shape=SHAPE).name == "cascade"
    # backend= and FASTPROMPT_BACKEND still force one.
    assert choose("op", call, "torch", shape=SHAPE).name == "torch"
    monkeypatch.setenv("FASTPROMPT_BACKEND", "torch")
    assert choose("op", call, shape=SHAPE).name == "torch"


def test_measurement_is_off_on_a_cpu_by_default(monkeypatch):
    monkeypatch.setattr(measure, "time_backend", lambda *a: pytest.fail("timed on a CPU"))
    assert choose("op", Call(CPU, torch.float64, 16), shape=SHAPE).name == "torch"


def test_real_timings_of_the_op_pick_a_candidate(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_MEASURE", "always")
    _register(monkeypatch, only=("cascade", "torch"))
    q, k, v = make_qkv(2, 2, 9, 16)
    pk, pv = make_prompts(2, 2, 5, 16)
    index = torch.tensor([1, 0])
    prompt_attention(q, k, v, pk, pv, index)
    (key, name), *_ = measure.decisions().items()
    assert name in ("cascade", "torch") and "prompt_index" in key and "|P8|N16|" in key


def test_measured_and_probed_choice_inside_torch_compile(monkeypatch):
    """The decision runs while tracing and stays a constant of the compiled graph."""
    monkeypatch.setenv("FASTPROMPT_MEASURE", "always")
    monkeypatch.setenv("FASTPROMPT_PROBE", "always")
    _register(monkeypatch, only=("cascade", "torch"))
    monkeypatch.setattr(
        measure, "time_backend", lambda b, *a: {"cascade": 2.0, "torch": 1.0}[b.name]
    )
    q, k, v = make_qkv(2, 2, 9, 16)
    pk, pv = make_prompts(1, 2, 5, 16)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    compiled = torch.compile(
        lambda *a: prompt_attention(*a)[0], fullgraph=True, backend="aot_eager"
    )
    out = compiled(*leaves)
    torch.autograd.grad(out.sum(), leaves)
    assert list(measure.decisions().values()) == ["torch"]
    assert {k[0] for k in probe.results()} == {"cascade", "torch"}


# ----------------------------------------------------------------------------------------------
# fastprompt info
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variable, value", [("FASTPROMPT_PROBE", "bogus"), ("FASTPROMPT_EXT_JIT", "nope")]
)
def test_info_reports_a_malformed_variable_and_goes_on(variable, value):
    """`fastprompt info` used to end in a traceback on a bad FASTPROMPT_PROBE or MEASURE."""
    import os

    env = dict(os.environ, **{variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "fastprompt", "info"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"  settings: {variable}={value!r}" in result.stdout
    for name in backends.NAMES:
        assert f"  {name}: " in result.stdout


def test_info_reports_bad_settings_probe_results_and_measured_choices(monkeypatch, tmp_path):
    """It used to crash on an invalid FASTPROMPT_BACKEND; now it says so and goes on."""
    import os

    cache_file = tmp_path / "dispatch.json"
    monkeypatch.setenv("FASTPROMPT_DISPATCH_CACHE", str(cache_file))
    dispatch_cache.record(
        "probes", "triton|NVIDIA H100|torch.bfloat16|d64", {"ok": False, "detail": "dq: error 0.5"}
    )
    dispatch_cache.record(
        "measured",
        "prompt_attention|NVIDIA H100|bfloat16|d64|P256|N256|infer|plain",
        {"backend": "cascade", "ms": {"cascade": 0.1}},
    )
    env = dict(os.environ, FASTPROMPT_BACKEND="bogus", FASTPROMPT_DISPATCH_CACHE=str(cache_file))
    result = subprocess.run(
        [sys.executable, "-m", "fastprompt", "info"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "FASTPROMPT_BACKEND: 'bogus' is not a backend" in out
    for name in backends.NAMES:
        assert f"  {name}: " in out
    assert "measured:" in out and "lacks:" in out
    assert "probe triton|NVIDIA H100|torch.bfloat16|d64: FAILED: dq: error 0.5" in out
    assert "P256|N256|infer|plain: cascade" in out


def test_measured_choice_with_a_batch_traced_symbolically(monkeypatch):
    """A dynamic batch cannot be a constant of the choice: it is left out, N and P key it."""
    monkeypatch.setenv("FASTPROMPT_MEASURE", "always")
    _register(monkeypatch, only=("cascade", "torch"))
    shapes = []

    def fake_time(backend, call, shape, training):
        shapes.append(shape)
        return {"cascade": 1.0, "torch": 2.0}[backend.name]

    monkeypatch.setattr(measure, "time_backend", fake_time)
    compiled = torch.compile(
        lambda *a: prompt_attention(*a)[0], fullgraph=True, dynamic=True, backend="eager"
    )
    for b in (2, 3):
        q, k, v = make_qkv(b, 2, 9, 16)
        pk, pv = make_prompts(1, 2, 5, 16)
        compiled(q, k, v, pk, pv)
    assert set(measure.decisions().values()) == {"cascade"}
    assert {s[2] for s in shapes} == {9} and {s[5] for s in shapes} == {5}
