"""An interpreter that cannot run the kernels refuses the Triton backend with the remedy.

Triton 3.2's interpreter with numpy >= 2.4 fails every kernel that loops over an argument (all of
them) with "only 0-dimensional arrays can be converted to Python scalars"; the backend says so,
and what to install, before anything launches.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_prompts, make_qkv

pytest.importorskip("triton")

from fastprompt.kernels import triton as tk
from fastprompt.kernels.triton import _interpreter
from fastprompt.ops import prompt_attention

NUMPY_24 = (
    "InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python scalars')"
)


class _Failing:
    """A kernel whose interpreted launch raises ``message`` (as Triton 3.2's does with numpy >=
    2.4, by default)."""

    def __init__(self, message: str = NUMPY_24) -> None:
        self.message = message

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(self.message)

        return launch


@pytest.fixture
def failing_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_interpreter, "_count_kernel", _Failing())
    monkeypatch.setattr(_interpreter, "_DEFECT", [])


def test_an_interpreter_that_cannot_loop_over_an_argument_refuses_the_backend(
    failing_interpreter,
):
    why = tk.availability()
    assert why is not None and "numpy >= 2.4 refuses" in why and "install numpy<2.4" in why
    assert "triton-lang/triton#9171" in why and "triton " in why and "numpy " in why
    q, k, v = make_qkv(1, 2, 5, 16)
    pk, pv = make_prompts(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match=r"install numpy<2\.4"):
        prompt_attention(q, k, v, pk, pv, backend="triton")


def test_another_interpreter_failure_is_said_as_it_is(monkeypatch, failing_interpreter):
    monkeypatch.setattr(_interpreter, "_count_kernel", _Failing("something else"))
    why = tk.availability()
    assert why is not None and "cannot run a minimal kernel: RuntimeError: something else" in why


def test_the_interpreter_here_runs_the_probe_once(monkeypatch):
    if not torch.cuda.is_available():
        assert tk.availability() == _interpreter.defect()
    monkeypatch.setattr(_interpreter, "_DEFECT", [])
    monkeypatch.setattr(_interpreter, "_probe", lambda: "probed")
    assert _interpreter.defect() == "probed"
    monkeypatch.setattr(_interpreter, "_probe", lambda: pytest.fail("probed twice"))
    assert _interpreter.defect() == "probed"
