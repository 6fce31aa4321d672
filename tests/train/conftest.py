"""Fixtures of the training-layer tests: a tiny image dataset on disk."""

from __future__ import annotations

import pytest
from train_helpers import write_images


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory):
    """24 images of 3 classes listed in data.csv (with a header row)."""
    root = tmp_path_factory.mktemp("tiny")
    rows = write_images(root / "img", 24, 3)
    text = "path,label\n" + "".join(f"{p},{y}\n" for p, y in rows)
    (root / "data.csv").write_text(text)
    return root / "data.csv"
