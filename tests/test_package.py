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
