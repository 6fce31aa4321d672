"""Package hygiene: every import says what it gets; the public API is explicit."""

from __future__ import annotations

import importlib
import pkgutil

import fastprompt


def _modules():
    for info in pkgutil.walk_packages(fastprompt.__path__, "fastprompt."):
        if ".cli" in info.name and info.name.endswith("__main__"):
            continue
        yield info.name


def test_a_module_is_never_shadowed_by_a_function_of_the_same_name():
    for name in _modules():
        module = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        assert getattr(importlib.import_module(parent), child) is module, (
            f"`import {name}` would not give the module"
        )


def test_public_names_are_exported_explicitly():
    for name in fastprompt.__all__:
        assert hasattr(fastprompt, name), name
    assert {"vpt", "pgn", "load_prompts", "save_prompts", "score_prompts", "fit"} <= set(
        fastprompt.__all__
    )


# torch APIs newer than the oldest supported torch (2.6), each asked for only in _compat.
NEWER_THAN_TORCH_2_6 = ("torch.compiler.is_exporting",)


def test_torch_apis_newer_than_2_6_are_asked_for_through_compat(monkeypatch):
    import pathlib

    import torch

    from fastprompt._compat import tracing

    root = pathlib.Path(fastprompt.__file__).parent
    for path in root.rglob("*.py"):
        if path.name != "_compat.py":
            text = path.read_text()
            used = [api for api in NEWER_THAN_TORCH_2_6 if api in text]
            assert not used, f"{path.relative_to(root)} uses {used}: go through fastprompt._compat"
    monkeypatch.delattr(torch.compiler, "is_exporting", raising=False)
    assert tracing() is False


def test_modules_stay_under_500_lines():
    """The project's convention (README, "Development"): a module past 500 lines is split along
    a seam of its own."""
    import pathlib

    root = pathlib.Path(fastprompt.__file__).parent
    over = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if len(path.read_text().splitlines()) > 500
    }
    assert not over, over
