"""What opening a dataset costs before a run starts: the file system calls per image."""

from __future__ import annotations

import os

from train_helpers import write_images

from fastprompt.train import data as D
from fastprompt.train import datasets


def _count_stats(monkeypatch, images: set[str]) -> list[str]:
    """The paths of ``images`` that ``os.stat`` is asked about (``os.path.isfile`` too)."""
    seen: list[str] = []
    real = os.stat

    def stat(path, *args, **kwargs):
        if os.path.abspath(os.fspath(path)) in images:
            seen.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    return seen


def test_opening_a_dataset_stats_no_image(tmp_path, monkeypatch):
    """Checking that every image is a file took a stat per image (a million on an ImageNet
    folder or list, at every start: minutes on a cold cache or a network file system); the
    folders' listings already say which names are plain files."""
    folder = tmp_path / "folder"
    rows = []
    for cls in ("a", "b"):
        rows += write_images(folder / cls, 6, 1)
    (tmp_path / "l.txt").write_text("".join(f"folder/{p} {y}\n" for p, y in rows))
    images = {str(folder / p) for p, _ in rows}
    seen = _count_stats(monkeypatch, images)
    assert len(D.open_dataset(str(folder))) == 12
    assert len(D.open_dataset(str(tmp_path / "l.txt"))) == 12
    assert seen == []


def test_a_name_its_folder_listing_lacks_is_asked_about_on_its_own(tmp_path, monkeypatch):
    """A folder that cannot be listed (or a case-insensitive file system, where the listing
    spells a name otherwise): the name is checked by itself, neither refused nor passed."""
    rows = write_images(tmp_path / "img", 4, 2)
    listed = [*rows, ("img/gone.png", 0)]
    (tmp_path / "l.txt").write_text("".join(f"{p} {y}\n" for p, y in listed))
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "img":
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert datasets._not_files(str(tmp_path / p) for p, _ in listed) == [
        str(tmp_path / "img/gone.png")
    ]
