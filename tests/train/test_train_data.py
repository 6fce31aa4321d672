"""Datasets (ImageFolder, lists, digits), splits, transforms, normalisation and loaders."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from train_helpers import write_images

from fastprompt.train import data as D


def test_image_folder_sorts_classes_and_finds_images(tmp_path):
    write_images(tmp_path / "b_cat", 3, 1)
    write_images(tmp_path / "a_dog", 2, 1)
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    ds = D.open_dataset(str(tmp_path))
    assert ds.classes == ["a_dog", "b_cat"] and len(ds) == 5
    image, label = ds[0]
    assert image.mode == "RGB" and label == 0 and ds[4][1] == 1


def test_split_folder_gives_train_and_val(tmp_path):
    for part, n in (("train", 4), ("val", 2)):
        for cls in ("x", "y"):
            write_images(tmp_path / part / cls, n, 1)
    assert D.has_own_val(str(tmp_path))
    assert len(D.open_dataset(str(tmp_path), "train")) == 8
    assert len(D.open_dataset(str(tmp_path), "val")) == 4


def test_bad_folders_are_refused_with_the_reason(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.open_dataset(str(tmp_path / "missing"))
    with pytest.raises(D.DataError, match="no class sub-folders"):
        D.open_dataset(str(tmp_path))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(D.DataError, match="holds no images in its 1 class folders"):
        D.open_dataset(str(tmp_path))


def test_images_that_cannot_be_read_are_named_before_a_run_starts(tmp_path):
    """A list row past the first naming a missing file or a folder, or a broken link in a class
    folder, failed only when a loader reached it, mid-epoch, with a traceback."""
    rows = write_images(tmp_path / "img", 4, 2)
    (tmp_path / "img" / "sub").mkdir()
    for bad in ("img/gone.png", "img/sub"):
        listed = [*rows[:2], (bad, 1), *rows[2:]]
        (tmp_path / "l.txt").write_text("".join(f"{p} {y}\n" for p, y in listed))
        with pytest.raises(D.DataError, match=f"row 3: .*{bad} does not exist or is no file"):
            D.open_dataset(str(tmp_path / "l.txt"))
    folder = tmp_path / "folder"
    for cls in ("a", "b"):
        write_images(folder / cls, 2, 1)
    (folder / "a" / "link.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(D.DataError, match=r"1 image name\(s\) lead to no file .*a/link\.png"):
        D.open_dataset(str(folder))
    # One that cannot be decoded is found when it is read: named, in one line, from a worker too.
    (folder / "a" / "link.png").unlink()
    (folder / "a" / "bad.png").write_text("not an image")
    loader = DataLoader(D.open_dataset(str(folder)), num_workers=1, collate_fn=list)
    with pytest.raises(D.DataError) as info:
        list(loader)
    assert str(info.value).startswith(f"the image {folder / 'a' / 'bad.png'} cannot be read")
    assert "\n" not in str(info.value)


def test_csv_and_txt_lists(tmp_path):
    rows = write_images(tmp_path / "img", 4, 2)
    names = {0: "zebra", 1: "ant"}
    (tmp_path / "named.csv").write_text(
        "filename,label\n" + "".join(f"{p},{names[y]}\n" for p, y in rows)
    )
    ds = D.open_dataset(str(tmp_path / "named.csv"))
    assert ds.classes == ["ant", "zebra"]
    assert [y for _, y in ds.samples] == [1, 0, 1, 0]
    # VTAB-1k's lists: "path label", whitespace-separated, integer labels.
    (tmp_path / "train800.txt").write_text("".join(f"{p} {y + 3}\n" for p, y in rows))
    ds = D.open_dataset(str(tmp_path / "train800.txt"))
    assert ds.classes == [str(i) for i in range(5)] and ds[1][1] == 4
    assert ds[0][0].size == (12, 12)


def test_bad_lists_are_refused_with_the_reason(tmp_path):
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(D.DataError, match="lists no images"):
        D.open_dataset(str(tmp_path / "empty.csv"))
    (tmp_path / "short.csv").write_text("a.png\n")
    with pytest.raises(D.DataError, match=r"line 1: expected 'path,label'"):
        D.open_dataset(str(tmp_path / "short.csv"))
    (tmp_path / "missing.csv").write_text("nope.png,0\n")
    with pytest.raises(D.DataError, match=r"row 1: .*nope\.png does not exist"):
        D.open_dataset(str(tmp_path / "missing.csv"))
    (tmp_path / "negative.csv").write_text("a.png,-1\n")
    with pytest.raises(D.DataError, match="labels must be >= 0"):
        D.open_dataset(str(tmp_path / "negative.csv"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(D.DataError, match=r"neither a folder nor a \.csv/\.txt list"):
        D.open_dataset(str(tmp_path / "x.json"))


def test_digits_are_relabelled_and_split_by_class():
    sklearn = pytest.importorskip("sklearn.datasets")
    train, test = D.open_dataset("digits:5-9", "train"), D.open_dataset("digits:5-9", "test")
    assert train.classes == ["5", "6", "7", "8", "9"]
    assert len(train) + len(test) == int((sklearn.load_digits().target >= 5).sum())
    assert not {i for i, _ in train.samples} & {i for i, _ in test.samples}
    counts = torch.bincount(torch.tensor([y for _, y in train.samples]))
    assert counts.min() >= 100  # ~60 % of each class
    image, label = train[0]
    assert image.size == (8, 8) and image.mode == "RGB" and 0 <= label < 5
    assert D.open_dataset("digits:0,2").classes == ["0", "2"]
    with pytest.raises(D.DataError, match="digits:5-9 or digits:0,2,4"):
        D.open_dataset("digits:five")


def test_a_digits_split_does_not_depend_on_the_other_digits_listed():
    # evaluate --data digits:6-9 on a digits:5-9 run tested on 169 of its training images.
    pytest.importorskip("sklearn.datasets")

    def images(spec: str, part: str) -> set[int]:
        return {i for i, _ in D.open_dataset(spec, part).samples}

    trained = images("digits:5-9", "train")
    for spec in ("digits:6-9", "digits:9,5", "digits"):
        assert not trained & images(spec, "test"), spec
    assert images("digits:9,5", "test") <= images("digits:5-9", "test")


def test_splits():
    assert D.split_dataset(1000, "vtab-1k") == (list(range(800)), list(range(800, 1000)))
    with pytest.raises(D.DataError, match="needs the 1000 training images"):
        D.split_dataset(999, "vtab-1k")
    train, val = D.split_dataset(50, "0.2", seed=3)
    assert len(val) == 10 and sorted(train + val) == list(range(50))
    assert D.split_dataset(50, "0.2", seed=3) == (train, val)
    assert len(D.split_dataset(50, "7")[1]) == 7
    for bad in ("50", "1.5", "x", "0"):
        with pytest.raises(D.DataError, match="--val-split"):
            D.split_dataset(50, bad)
    # "1.0" was a count of one validation image; as a fraction it is every image.
    with pytest.raises(D.DataError, match=r"--val-split 1\.0 is a fraction of 1"):
        D.split_dataset(50, "1.0")


def test_a_val_split_leaving_one_class_to_train_on_says_so(tmp_path):
    """It blamed --data for holding one class (and the folder layout), when --data held four."""
    from fastprompt.train.folder import DataConfig
    from fastprompt.train.splits import open_data

    for i, cls in enumerate("abcd"):
        write_images(tmp_path / cls, 1 + 4 * (i == 0), 1)
    cfg = DataConfig(train=str(tmp_path), val_split="7")
    with pytest.raises(D.DataError) as info:
        open_data(cfg, seed=0)
    assert "the training part --val-split 7 leaves of --data" in str(info.value)
    assert "all 4 classes of --data: hold out fewer images" in str(info.value)


def test_a_val_split_holds_out_every_class_and_keeps_an_old_runs_split(tmp_path):
    """--val-split drew its images from all of them: 20 images of `a` and 3 of `b` with 0.2 held
    out 5 images of `a` and none of `b` (seed 0), so b's accuracy was never measured. Now each
    class holds out its share (at least one); a run made before stratification (no split.json)
    recomputes the random split it began with."""
    from fastprompt.train.folder import DataConfig
    from fastprompt.train.splits import open_data

    write_images(tmp_path / "a", 20, 1)
    write_images(tmp_path / "b", 3, 1, seed=1)
    cfg = DataConfig(train=str(tmp_path), val_split="0.2")
    data = open_data(cfg, seed=0)
    labels = sorted(y for _, y in data.val.samples)
    assert labels == [0, 0, 0, 0, 1] and len(data.train) == 18
    assert data.how == "--val-split 0.2 (stratified by class)" and not data.notes
    old = open_data(cfg, seed=0, stratify=False)
    assert sorted(y for _, y in old.val.samples) == [0] * 5
    assert "holds out no image of 1 class(es) (['b'])" in old.notes[0]
    # A count below the classes cannot reach each; the note says which got none.
    write_images(tmp_path / "c", 3, 1, seed=2)
    data = open_data(DataConfig(train=str(tmp_path), val_split="2"), seed=0)
    assert len(data.val) == 2 and "holds out no image of 2 class(es) (['b', 'c'])" in data.notes[0]


def test_stratified_counts_keep_the_total_and_the_bounds():
    for sizes, count, want in (
        ({0: 20, 1: 3}, 5, {0: 4, 1: 1}),
        ({0: 10, 1: 10}, 3, {0: 2, 1: 1}),
        ({0: 50, 1: 2, 2: 2, 3: 2}, 3, None),  # fewer than the classes: some get none
        ({0: 5, 1: 1, 2: 1, 3: 1}, 7, {0: 4, 1: 1, 2: 1, 3: 1}),
        ({0: 2, 1: 9}, 9, {0: 1, 1: 8}),
    ):
        got = D.stratified_counts(sizes, count)
        assert sum(got.values()) == count and all(0 <= got[c] <= k for c, k in sizes.items())
        if want is not None:
            assert got == want, (sizes, count, got)
    # At least one per class of two or more, at most all but one, while the count allows.
    got = D.stratified_counts({0: 100, 1: 2, 2: 2}, 50)
    assert got[1] == got[2] == 1 and got[0] == 48


class _Cfg(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pretrained_cfg = cfg


def test_normalisation_comes_from_the_pretrained_config_without_weights():
    import timm

    # pretrained=False: timm fills pretrained_cfg from its registry; nothing is downloaded.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4)
    assert D.normalization(model, "backbone") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    clip = timm.models.get_pretrained_cfg("vit_base_patch32_clip_quickgelu_224.openai").to_dict()
    assert D.normalization(_Cfg(clip), "backbone") == D.MEANS["clip"]
    assert D.normalization(_Cfg({}), "backbone") == D.MEANS["imagenet"]
    assert D.normalization(model, "clip") == D.MEANS["clip"]
    assert D.image_size(model) == (16, 16)


@pytest.mark.parametrize("kind", ["resize-crop", "resize", "fgvc", "pgn", "pgn-test"])
def test_transforms_give_normalised_tensors_of_the_model_size(kind):
    from PIL import Image

    image = Image.new("RGB", (40, 30), (255, 0, 0))
    tf = D.build_transform(kind, (16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = tf(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    if kind in ("resize-crop", "resize", "pgn-test", "fgvc"):
        assert torch.allclose(out[0], torch.ones(16, 16)) and torch.allclose(
            out[1], -torch.ones(16, 16)
        )


def test_pgn_augmentation_is_random_and_seeded():
    from PIL import Image

    image = Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy())
    tf = D.build_transform("pgn", (16, 16), (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    a = [tf(image) for _ in range(6)]
    torch.manual_seed(0)
    b = [tf(image) for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def _order(spec, epoch):
    return [y.tolist() for _, y in D.make_loader(_Numbers(), spec, epoch)]


def test_loader_order_depends_on_seed_and_epoch_only():
    spec = D.LoaderSpec(batch_size=8, shuffle=True, seed=5)
    assert _order(spec, 3) == _order(spec, 3)
    assert _order(spec, 3) != _order(spec, 4)
    # Two processes with half the batch see, step by step, the samples one process sees.
    one = _order(spec, 2)
    halves = [
        _order(D.LoaderSpec(batch_size=4, shuffle=True, seed=5, rank=r, world=2), 2) for r in (0, 1)
    ]
    for step, batch in enumerate(one):
        assert sorted(batch) == sorted(halves[0][step] + halves[1][step])
    # Evaluation shards without padding or repeats.
    ev = [D.LoaderSpec(batch_size=5, rank=r, world=2) for r in (0, 1)]
    seen = [i for s in ev for batch in _order(s, 0) for i in batch]
    assert sorted(seen) == list(range(24))


def test_other_data_is_read_through_the_run_class_map(tmp_path):
    write_images(tmp_path / "b", 2, 1)
    write_images(tmp_path / "c", 2, 1)
    val = D.open_dataset(str(tmp_path))
    assert val.classes == ["b", "c"] and {y for _, y in val.samples} == {0, 1}
    mapped = D.map_classes(val, ["a", "b", "c"], "--val x")
    assert mapped.classes == ["a", "b", "c"] and [y for _, y in mapped.samples] == [1, 1, 2, 2]
    assert mapped[0][1] == 1 and mapped.ids == val.ids
    with pytest.raises(D.DataError, match=r"--val x has 1 class\(es\) the run was not trained on"):
        D.map_classes(val, ["a", "b"], "--val x")
    # Integer-labelled lists map by their numbers, whatever their own range.
    rows = write_images(tmp_path / "img", 3, 3)
    (tmp_path / "l.txt").write_text("".join(f"{p} {y + 2}\n" for p, y in rows))
    listed = D.open_dataset(str(tmp_path / "l.txt"))
    assert D.map_classes(listed, [str(i) for i in range(6)], "x") is listed


def test_run_folders_inside_an_image_folder_are_not_classes(tmp_path):
    from fastprompt.train import owner

    write_images(tmp_path / "a", 2, 1)
    write_images(tmp_path / "b", 2, 1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / owner.MARKER).write_text("{}")
    (tmp_path / "run" / "curves.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert D.open_dataset(str(tmp_path), exclude=[str(tmp_path / "empty")]).classes == ["a", "b"]
    with pytest.raises(D.DataError, match=r"class folder .*empty holds no images"):
        D.open_dataset(str(tmp_path))


def test_only_a_class_folders_own_images_are_its_samples(tmp_path):
    """Hidden files and folders (a notebook's checkpoint copy of another class's image, macOS's
    ._name files) and a run folder inside a class folder used to be read as that class's images:
    the walk was sorted before it was pruned, which pruned nothing."""
    from fastprompt.train import owner

    write_images(tmp_path / "cat", 2, 1)
    write_images(tmp_path / "dog" / "indoor", 2, 1)
    write_images(tmp_path / "dog", 1, 1)
    write_images(tmp_path / "dog" / ".ipynb_checkpoints", 1, 1)
    (tmp_path / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_images(tmp_path / "cat" / "run", 1, 1)
    (tmp_path / "cat" / "run" / owner.MARKER).write_text("{}")
    write_images(tmp_path / "cat" / "elsewhere", 1, 1)
    ds = D.open_dataset(str(tmp_path), exclude=[str(tmp_path / "cat" / "elsewhere")])
    assert ds.ids == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/indoor/0.png", "dog/indoor/1.png"]
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 1]


def test_a_split_is_stored_and_read_back(tmp_path):
    from fastprompt.train.folder import DataConfig
    from fastprompt.train.splits import open_data, read_split, write_split

    for cls in ("a", "b"):
        write_images(tmp_path / "data" / cls, 10, 1)
    cfg = DataConfig(train=str(tmp_path / "data"), val_split="0.3")
    first = open_data(cfg, seed=1)
    assert (len(first.train), len(first.val)) == (14, 6)
    (tmp_path / "run").mkdir()
    write_split(str(tmp_path / "run"), first)
    stored = read_split(str(tmp_path / "run"))
    write_images(tmp_path / "data" / "a" / "more", 3, 1)  # added since: left out, said so
    again = open_data(cfg, seed=2, classes=first.classes, stored=stored)
    assert again.train.ids == first.train.ids and again.val.ids == first.val.ids
    assert again.notes and "3 image(s)" in again.notes[0]


@pytest.mark.parametrize("how", ["same", "symlink", "listed"])
def test_validation_images_that_are_training_images_are_said_and_recorded(tmp_path, how):
    from fastprompt.train.folder import DataConfig
    from fastprompt.train.splits import open_data

    for cls in ("a", "b"):
        write_images(tmp_path / "data" / cls, 4, 1)
    val, shared = tmp_path / "data", 8
    if how == "symlink":
        (tmp_path / "link").symlink_to(tmp_path / "data")
        val = tmp_path / "link"
    elif how == "listed":
        (tmp_path / "val.txt").write_text("data/a/0.png a\ndata/b/1.png b\n")
        val, shared = tmp_path / "val.txt", 2
    run = open_data(DataConfig(train=str(tmp_path / "data"), val=str(val)))
    assert run.how.endswith(f"{shared} of its images also in --data")
    assert len(run.notes) == 1 and "training accuracy, not held-out" in run.notes[0]


def test_held_out_validation_images_are_not_noted(tmp_path):
    from fastprompt.train.folder import DataConfig
    from fastprompt.train.splits import open_data

    for cls in ("a", "b"):
        write_images(tmp_path / "data" / cls, 4, 1)
        write_images(tmp_path / "val" / cls, 2, 1, seed=1)
    run = open_data(DataConfig(train=str(tmp_path / "data"), val=str(tmp_path / "val")))
    assert (len(run.train), len(run.val), run.notes) == (8, 4, [])


def test_image_folders_apart_are_not_resolved_file_by_file(tmp_path, monkeypatch):
    from fastprompt.train import splits
    from fastprompt.train.folder import DataConfig

    for cls in ("a", "b"):
        write_images(tmp_path / "data" / cls, 4, 1)
        write_images(tmp_path / "val" / cls, 2, 1, seed=1)
    resolved = []
    real = splits.os.path.realpath
    monkeypatch.setattr(splits.os.path, "realpath", lambda p: resolved.append(p) or real(p))
    splits.open_data(DataConfig(train=str(tmp_path / "data"), val=str(tmp_path / "val")))
    assert not [p for p in resolved if p.endswith(".png")]  # roots compared, not every image
