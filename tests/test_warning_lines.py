"""Warnings name the line of the person's code that led to them, not a line inside fastprompt or
pytest: a fixed ``stacklevel`` counts frames from where the warning is raised, and the same code
sits at other depths under each caller (``fastprompt._warnings.warn_at_caller``). The probe's and
the dispatch cache's are in ``test_backends.py``, the hooks' in ``test_dropin.py``."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from helpers import make_prompts, make_qkv, tiny_vit

import fastprompt
from fastprompt.kernels.cascade import _merge
from fastprompt.kernels.torch import _sdpa
from fastprompt.ops import prompt_attention


def _said_here(said, match: str, line: int) -> None:
    """The warning matching ``match`` (others, a library's, may come first) names ``line``."""
    ours = [w for w in said if match in str(w.message)]
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line)]


def _loader(n: int = 4, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_keep_one_as_a_count_is_said_at_the_prompt_condensation_call():
    prompted = fastprompt.vpt(tiny_vit(), 2)
    with pytest.warns(UserWarning, match="keep=1 is a count") as said:
        line = inspect.currentframe().f_lineno + 1
        fastprompt.prompt_condensation(prompted, _loader(), keep=1, epochs=0, progress=False)
    _said_here(said, "keep=1 is a count", line)


def test_a_rescaled_warmup_is_said_at_the_e2vpt_pruning_call():
    e2vpt = fastprompt.e2vpt(tiny_vit(), 3, 2)
    loader = _loader()
    with pytest.warns(UserWarning, match="rescaled from 10 to 0 epochs") as said:
        line = inspect.currentframe().f_lineno + 1
        fastprompt.e2vpt_pruning(e2vpt, loader, loader, 3, 0.1, [1], [2], progress=False)
    _said_here(said, "rescaled from 10 to 0 epochs", line)


def test_a_one_point_picture_is_said_at_the_domain_report_call(monkeypatch, tmp_path):
    pytest.importorskip("sklearn")  # domain_report requires its extra
    pytest.importorskip("matplotlib")
    from fastprompt.train import domains

    same = torch.zeros(8, 4)
    same[:, 1] = 1  # a saturated generator: every image's mixture weights are one-hot, the same
    monkeypatch.setattr(domains, "mixture_features", lambda *a: (same, torch.arange(8) % 2))
    monkeypatch.setattr(domains, "separation", lambda *a: (0.5, 0.5, 4))
    with pytest.warns(UserWarning, match="every image's features are the same") as said:
        line = inspect.currentframe().f_lineno + 1
        domains.domain_report(None, [], torch.arange(2), ["a", "b"], str(tmp_path / "d.png"))
    _said_here(said, "every image's features are the same", line)


def test_the_math_kernel_fallback_is_said_at_the_caller(monkeypatch):
    """On a GPU, from a model's forward; here ``kernel_for``'s own caller stands in for it (a
    stand-in q on a CUDA device: nothing is launched)."""
    monkeypatch.setattr(_sdpa, "_SAID", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_sdpa, "enabled_cuda_kernels", lambda: frozenset({"flash", "efficient"}))
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64, shape=(1, 1, 2, 64))
    with pytest.warns(RuntimeWarning, match="materialise their scores") as said:
        line = inspect.currentframe().f_lineno + 1
        assert _sdpa.kernel_for(q, False) == "math"
    _said_here(said, "materialise their scores", line)


def _op_inputs(dtype: torch.dtype):
    return (
        *make_qkv(2, 2, 5, 64, dtype=dtype, device="cuda"),
        *make_prompts(1, 2, 3, 64, dtype=dtype, device="cuda"),
    )


@pytest.mark.gpu
def test_the_math_kernel_fallback_is_said_at_the_op_call(monkeypatch):
    monkeypatch.setattr(_sdpa, "_SAID", set())
    with pytest.warns(RuntimeWarning, match="materialise their scores") as said:
        line = inspect.currentframe().f_lineno + 1
        prompt_attention(*_op_inputs(torch.float64), backend="torch")
    _said_here(said, "materialise their scores", line)


@pytest.mark.gpu
def test_a_merge_kernel_that_cannot_run_is_said_at_the_op_call(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(_merge, "_BROKEN", [])
    monkeypatch.setattr(_merge, "merge_triton", broken)
    with pytest.warns(RuntimeWarning, match="merge kernel cannot run here") as said:
        line = inspect.currentframe().f_lineno + 1
        prompt_attention(*_op_inputs(torch.float32), backend="cascade")
    _said_here(said, "merge kernel cannot run here", line)


def test_under_python_m_fastprompt_a_warning_names_the_command(tmp_path):
    """Under ``python -m fastprompt`` every warning pointed at ``<frozen runpy>:88``: there is
    no line of the person's code, so it names the command they typed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = tmp_path / "dispatch.json"
    bad.write_text("{not json")
    env = dict(os.environ, FASTPROMPT_DISPATCH_CACHE=str(bad), PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-m", "fastprompt", "info"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"<fastprompt info>:0: RuntimeWarning: fastprompt: dispatch cache: cannot read {bad}"
        in (result.stderr)
    )
    assert "runpy" not in result.stderr
