"""Why an image cannot be read, with advice for that cause, from a loader worker too."""

from __future__ import annotations

import errno

import pytest
from PIL import Image
from torch.utils.data import DataLoader
from train_helpers import write_images

from fastprompt.train import data as D


def _read_all(dataset, workers: int, context: str = "fork"):
    # fork: the worker inherits the test's patches (PIL's limit, a failing open).
    context = context if workers else None
    loader = DataLoader(
        dataset, num_workers=workers, collate_fn=list, multiprocessing_context=context
    )
    with pytest.raises(D.DataError) as info:
        list(loader)
    return info.value


@pytest.fixture
def folder(tmp_path):
    for i, cls in enumerate("ab"):
        write_images(tmp_path / "data" / cls, 2, 1, seed=i)
    return tmp_path / "data"


@pytest.mark.parametrize("workers", [0, 1])
def test_each_cause_gets_its_own_advice(folder, monkeypatch, workers):
    """Every unreadable image said 'replace or remove it', also one over PIL's
    decompression-bomb limit (a fine image, too large) and one a failing or remote file system
    could not read this once; and from a worker the error was its traceback, parsed as text."""
    first = str(folder / "a" / "0.png")
    dataset = D.open_dataset(str(folder))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 12x12 images: over twice the limit
    e = _read_all(dataset, workers)
    assert "set FASTPROMPT_MAX_IMAGE_PIXELS in the environment" in str(e) and "shrink it" in str(e)
    assert "replace or remove" not in str(e) and "\n" not in str(e)
    assert isinstance(e, D.ImageError) and (e.cause, e.path) == ("too-large", first)
    monkeypatch.undo()

    def failing(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Image, "open", failing)
    e = _read_all(dataset, workers)
    assert "the system said Input/output error (EIO)" in str(e) and "retry" in str(e)
    assert "replace or remove" not in str(e) and "\n" not in str(e)
    assert (e.cause, e.path) == ("system", first)
    monkeypatch.undo()

    (folder / "b" / "0.png").write_text("not an image")
    e = _read_all(dataset, workers)
    assert (e.cause, e.path) == ("undecodable", str(folder / "b" / "0.png"))
    assert str(e).endswith("replace or remove it") and "\n" not in str(e)
    (folder / "b" / "0.png").unlink()
    e = _read_all(dataset, workers)
    assert e.cause == "missing" and "restore it, or remove it from the data" in str(e)


def test_a_list_says_which_row(tmp_path):
    rows = write_images(tmp_path / "img", 2, 2)
    (tmp_path / "l.csv").write_text("".join(f"{p},{y}\n" for p, y in rows))
    dataset = D.open_dataset(str(tmp_path / "l.csv"))
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG broken")
    e = _read_all(dataset, 1)
    assert str(e).startswith(f"the image {tmp_path / 'img' / '1.png'} (row 2 of ")
    assert e.where == f" (row 2 of {tmp_path / 'l.csv'})" and e.cause == "undecodable"


def test_the_image_size_limit_is_set_by_an_environment_variable_workers_see(
    folder, monkeypatch, capsys
):
    """The advice for an image over PIL's limit was to raise PIL.Image.MAX_IMAGE_PIXELS in the
    Python that runs the training: not the CLI user's to change, and a DataLoader worker started
    by spawn (or forkserver) would not see it. FASTPROMPT_MAX_IMAGE_PIXELS is the environment's,
    which every worker inherits."""
    from train_helpers import cli_error

    dataset = D.open_dataset(str(folder))
    monkeypatch.setenv("FASTPROMPT_MAX_IMAGE_PIXELS", "143")  # 12x12 images: 144 pixels
    e = _read_all(dataset, 1, "spawn")
    assert (e.cause, e.path) == ("too-large", str(folder / "a" / "0.png"))
    assert "(DecompressionBombError: Image size (144 pixels) exceeds " in str(e)
    assert "FASTPROMPT_MAX_IMAGE_PIXELS=143); shrink it" in str(e)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL's own limit: replaced, not added to
    for limit in ("144", "none"):
        monkeypatch.setenv("FASTPROMPT_MAX_IMAGE_PIXELS", limit)
        assert dataset[0][0].size == (12, 12)
        assert Image.MAX_IMAGE_PIXELS == 10  # a caller's own setting is theirs again
    monkeypatch.setenv("FASTPROMPT_MAX_IMAGE_PIXELS", "lots")
    err = cli_error(capsys, ["evaluate", str(folder)])
    assert err.endswith(
        "evaluate: FASTPROMPT_MAX_IMAGE_PIXELS='lots' is not a positive whole number of pixels "
        "or 'none' (no limit)"
    )


def test_reads_in_threads_give_pils_own_limit_back(folder, monkeypatch):
    """With FASTPROMPT_MAX_IMAGE_PIXELS set each read turned PIL's limit off and restored what it
    found: two reads overlapping in threads, the second found the first's None and put it back
    last, so the process's PIL was left without its decompression-bomb limit."""
    import threading

    from fastprompt.train.images import read_rgb

    monkeypatch.setenv("FASTPROMPT_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    real_open = Image.open
    first_in, second_in, first_done = (threading.Event() for _ in range(3))
    turns = iter([(first_in, second_in), (second_in, first_done)])
    lock = threading.Lock()

    def overlapping_open(path, *args, **kw):
        # The first read opens once the second is inside too; the second once the first is done.
        with lock:
            arrived, wait_for = next(turns)
        arrived.set()
        assert wait_for.wait(60)
        return real_open(path, *args, **kw)

    monkeypatch.setattr(Image, "open", overlapping_open)
    image = str(folder / "a" / "0.png")
    errors = []

    def read(done=None):
        try:
            read_rgb(image)
        except BaseException as e:
            errors.append(e)
        if done is not None:
            done.set()

    first = threading.Thread(target=read, args=(first_done,))
    second = threading.Thread(target=read)
    first.start()
    assert first_in.wait(60)
    second.start()
    first.join()
    second.join()
    assert not errors
    assert Image.MAX_IMAGE_PIXELS == 10
