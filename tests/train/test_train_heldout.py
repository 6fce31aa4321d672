"""What ``evaluate --data`` knows of a run's training images (fastprompt.train.heldout), on run
folders written here: no training, so each case is milliseconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from train_helpers import write_images

from fastprompt.train import datasets as D
from fastprompt.train.datasets import DataError, Digits, ListData, digits_resplit
from fastprompt.train.folder import DataConfig, RunError
from fastprompt.train.heldout import check_held_out
from fastprompt.train.splits import SPLIT_FORMAT, run_data


def _run(tmp_path, data: DataConfig, split: dict | str | None = None, name: str = "run"):
    run = tmp_path / name
    run.mkdir()
    if split is not None:
        text = split if isinstance(split, str) else json.dumps({"format": SPLIT_FORMAT, **split})
        (run / "split.json").write_text(text)
    return str(run), SimpleNamespace(data=data, seed=0)


def test_digits_resplit_names_the_lists_whose_split_moved():
    assert not any(map(digits_resplit, ["digits", "digits:0-4", "digits:0,1,2"]))
    assert all(map(digits_resplit, ["digits:5-9", "digits:1-3", "digits:0,2", "digits:1,0"]))


def test_a_digits_run_older_than_split_json_is_not_checked_against_todays_split(tmp_path):
    """A digits:5-9 run older than split.json trained on the split digits had then, which holds
    171 of the 286 images of today's digits:6-9 test part: the check recomputed today's split
    and called them the run's validation images (a resume, the run's own evaluation, trained
    and validated on today's split alike)."""
    pytest.importorskip("sklearn.datasets")
    run, config = _run(tmp_path, DataConfig("digits:5-9"))
    saved = {"classes": list("56789"), "data": {}}
    with pytest.raises(RunError, match=r"digits:5-9 is split differently since .* began"):
        run_data(run, config, saved)
    notes = check_held_out(run, config, saved, Digits([6, 7, 8, 9], "test"), "--data T", "best")
    assert len(notes) == 1
    assert notes[0].startswith(f"note: whether --data T holds images {run} trained on is not ")
    assert "is not checked: digits:5-9 is split differently since " in notes[0]
    assert notes[0].count("predates split.json") == 1
    # digits and digits:0-K split as they did: recomputed, and checked.
    run0, config0 = _run(tmp_path, DataConfig("digits:0-4"), name="run0")
    saved0 = {"classes": list("01234"), "data": {}}
    assert len(run_data(run0, config0, saved0).train) > 0
    with pytest.raises(DataError, match=r"evaluation images are images .* was trained on"):
        check_held_out(run0, config0, saved0, Digits(range(5), "train"), "--data T", "best")


def test_a_damaged_split_json_is_said_not_refused(tmp_path):
    """evaluate --data on other images needs no split; a damaged split.json refused it."""
    pytest.importorskip("sklearn.datasets")
    run, config = _run(tmp_path, DataConfig("digits:0-4"), split="{not json")
    saved = {"classes": list("01234")}
    notes = check_held_out(run, config, saved, Digits(range(5), "test"), "--data T", "best")
    assert len(notes) == 1 and "is not checked: " in notes[0]
    assert "split.json is damaged (JSONDecodeError" in notes[0]


def test_a_second_listing_on_the_training_side_of_a_val_split_is_a_training_image(tmp_path):
    """A list naming a.png twice: --val-split put its first listing (a.png) in validation, its
    second (id a.png#2) in training. The check looked for a file named 'a.png#2', so a test
    list naming a.png (trained on) was evaluated, noted as a validation image."""
    write_images(tmp_path, 3, 1)
    rows = ["0.png,0", "1.png,1", "0.png,0", "2.png,1"]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    assert ListData(str(tmp_path / "all.csv")).ids == ["0.png", "1.png", "0.png#2", "2.png"]
    split = {
        "classes": ["0", "1"],
        "train": {"ids": ["1.png", "0.png#2"], "labels": [1, 0]},
        "val": {"ids": ["0.png", "2.png"], "labels": [0, 1]},
    }
    data = DataConfig(str(tmp_path / "all.csv"), val_split="0.5")
    run, config = _run(tmp_path, data, split)
    (tmp_path / "test.csv").write_text("0.png,0\n")
    test = ListData(str(tmp_path / "test.csv"))
    with pytest.raises(DataError, match=r"1 of its 1 evaluation images are images .* trained on"):
        check_held_out(run, config, {"classes": ["0", "1"]}, test, "--data T", "last")


def test_a_gone_image_folder_is_not_read_as_its_parent(tmp_path):
    """The run's image folder data/pets is gone: its ids (a/0.png) were resolved against its
    parent, so other images at data/a/0.png were refused as the run's training images."""
    split = {
        "classes": ["a", "b"],
        "train": {"ids": ["a/0.png", "b/0.png"], "labels": [0, 1]},
        "val": {"ids": ["a/1.png"], "labels": [0]},
    }
    run, config = _run(tmp_path, DataConfig(str(tmp_path / "data" / "pets"), val_split="1"), split)
    for cls in "ab":
        write_images(tmp_path / "data" / cls, 2, 1)
    other = D.open_dataset(str(tmp_path / "data"), "test")
    assert check_held_out(run, config, {"classes": ["a", "b"]}, other, "--data T", "best") == []
    # Where it is, it is read as itself.
    (tmp_path / "data").rename(tmp_path / "pets")
    (tmp_path / "data").mkdir()
    (tmp_path / "pets").rename(tmp_path / "data" / "pets")
    mine = D.open_dataset(str(tmp_path / "data" / "pets"), "test")
    with pytest.raises(DataError, match=r"2 of its 4 evaluation images are images .* trained on"):
        check_held_out(run, config, {"classes": ["a", "b"]}, mine, "--data T", "best")
