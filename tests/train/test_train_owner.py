"""Run-folder ownership, the lock, interrupted saves, and folders written by the previous
version (no marker, no split.json, checkpoints without checksums)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import FAST, TINY_MODEL

from fastprompt.cli import main
from fastprompt.train import leftovers, owner
from fastprompt.train.folder import save_dir


def test_a_run_may_write_only_a_new_empty_or_marked_folder(tmp_path):
    owner.check_out(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    owner.check_out(str(tmp_path / "empty"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(owner.OwnerError, match="is not empty and is not a fastprompt run folder"):
        owner.check_out(str(tmp_path / "mine"))
    owner.check_out(str(tmp_path / "mine"), overwrite=True)  # checked, nothing moved yet
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    moved = owner.claim(str(tmp_path / "mine"), overwrite=True)
    try:
        assert moved and open(os.path.join(moved, "notes.txt")).read() == "mine"
        assert sorted(os.listdir(tmp_path / "mine")) == [owner.LOCK, owner.MARKER]
        assert owner.is_run_folder(str(tmp_path / "mine"))
        # Marked but never prepared (no run.json): the next run may reuse it.
        owner.check_out(str(tmp_path / "mine"))
    finally:
        owner.release(str(tmp_path / "mine"))


def test_the_lock_is_per_process_and_reentrant(tmp_path):
    run = str(tmp_path / "run")
    owner.claim(run)
    try:
        with owner.hold(run):  # the same process again: fine
            pass
        # Another process is refused while this one holds it, with this one's pid.
        code = (
            "import sys; from fastprompt.train import owner\n"
            "try:\n    owner.hold_lock(sys.argv[1])\nexcept owner.OwnerError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, run], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 3 and f"pid {os.getpid()}" in done.stdout, done
    finally:
        owner.release(run)
    done = subprocess.run(
        [sys.executable, "-c", code, run], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def write(text: str = "new"):
    """A checkpoint writer for save_dir: its prompts file holds ``text``."""

    def into(folder):
        with open(os.path.join(folder, "prompts.safetensors"), "w") as f:
            f.write(text)

    return into


def test_clean_stale_removes_only_what_interrupted_saves_leave(tmp_path):
    run = tmp_path / "run"
    for d in (
        "last",
        ".last.swap",
        ".best.swap",
        ".last-abcd1234",
        ".init-_x_y_z_1",
        ".best-xyzw1234",
    ):
        (run / d).mkdir(parents=True)
    for swap in (".best.swap", ".last.swap"):  # what a save moved aside bears the mark
        (run / swap / leftovers.SWAP_MARK).write_text("")
    (run / ".best.swap" / "prompts.safetensors").write_text("the previous best")
    (run / ".last.swap" / "prompts.safetensors").write_text("the last but one")
    (run / ".last.swap" / "notes.txt").write_text("a person's, moved there by the swap")
    (run / ".best-xyzw1234" / "mine.txt").write_text("a person's hidden folder")
    (run / "last" / ".tmp-12345678").write_text("half")
    (run / "last" / "prompts.safetensors").write_text("the last")
    (run / ".lastly").mkdir()  # not ours: another name
    for backup in ("last.old", "init.old"):  # a person's names (init.old holds their notes)
        (run / backup).mkdir()
        (run / backup / "prompts.safetensors").write_text("a person's backup")
    (run / "init.old" / "notes.txt").write_text("mine")
    done = leftovers.clean_stale(str(run))
    assert sorted(os.listdir(run)) == [
        ".best-xyzw1234",
        ".lastly",
        "best",
        "init.old",
        "last",
        "last.old",
    ]
    assert sorted(os.listdir(run / "best")) == ["prompts.safetensors"]
    assert (run / "best" / "prompts.safetensors").read_text() == "the previous best"
    assert sorted(os.listdir(run / "last")) == ["notes.txt", "prompts.safetensors"]
    assert (run / "last" / "prompts.safetensors").read_text() == "the last"
    assert ".best.swap -> best" in done and ".last-abcd1234" in done and ".last.swap" in done
    assert (run / "last.old" / "prompts.safetensors").read_text() == "a person's backup"


def test_an_older_versions_interrupted_swap_is_renamed_back_never_removed(tmp_path):
    """The previous fastprompt swapped through NAME.old: with NAME gone and nothing but its files
    in NAME.old, resuming used to start over from init/ (cutting metrics.jsonl, replacing best/)."""
    (tmp_path / "last.old").mkdir()
    (tmp_path / "last.old" / "prompts.safetensors").write_text("epoch 2")
    (tmp_path / "last.old" / "trainer.pt").write_text("state")
    assert "last.old -> last" in leftovers.clean_stale(str(tmp_path))
    assert (tmp_path / "last" / "prompts.safetensors").read_text() == "epoch 2"


def test_a_folder_named_like_a_swap_that_fastprompt_did_not_make_is_left(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "prompts.safetensors").write_text("old")
    (tmp_path / ".best.swap").mkdir()  # a person's copy, under the hidden name
    (tmp_path / ".best.swap" / "prompts.safetensors").write_text("a person's copy")
    assert leftovers.clean_stale(str(tmp_path)) == []
    with pytest.raises(OSError, match="fastprompt did not make this folder"):
        save_dir(str(tmp_path), "best", write())
    assert (tmp_path / ".best.swap" / "prompts.safetensors").read_text() == "a person's copy"
    assert (tmp_path / "best" / "prompts.safetensors").read_text() == "old"
    assert leftovers.leftover_swaps(str(tmp_path)) == [str(tmp_path / ".best.swap")]


def test_an_interrupted_save_keeps_a_persons_files(tmp_path):
    """Interrupted after the old checkpoint moved aside: the person's files are in the previous
    copy, which the next save (or clean_stale) hands over to the new checkpoint."""

    (tmp_path / ".best.swap").mkdir()
    (tmp_path / ".best.swap" / leftovers.SWAP_MARK).write_text("")
    (tmp_path / ".best.swap" / "prompts.safetensors").write_text("old")
    (tmp_path / ".best.swap" / "draft.tex").write_text("mine")
    save_dir(str(tmp_path), "best", write("new"))
    assert sorted(os.listdir(tmp_path)) == ["best"]
    assert (tmp_path / "best" / "prompts.safetensors").read_text() == "new"
    assert (tmp_path / "best" / "draft.tex").read_text() == "mine"
    # A person's file named as fastprompt names a file of another checkpoint (best.json is
    # best/'s) is theirs in last/.
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "best.json").write_text("my notes")
    save_dir(str(tmp_path), "last", write("new"))
    assert (tmp_path / "last" / "best.json").read_text() == "my notes"


class _Killed(BaseException):
    """A SIGKILL, at a chosen file-system call (nothing after it runs, no handler catches it)."""


def test_a_save_killed_while_it_removes_the_previous_copy_resumes(tmp_path, monkeypatch):
    """Killed after the swap, while the previous copy was being removed (its mark gone first,
    in the listing's order), the save left a .last.swap without its mark: the resume refused it
    as a folder fastprompt did not make (the badinput kill case failed now and then)."""
    settled = []
    for stop in range(5):  # the mark, two files and the folder: killed before each
        run = tmp_path / f"run{stop}"
        run.mkdir()
        save_dir(str(run), "last", write("old"))
        (run / "last" / "config.json").write_text("{}")
        calls = [0]

        def killed_at(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] > stop:
                    raise _Killed
                return real(*args, **kwargs)

            return call

        with monkeypatch.context() as m:
            for name in ("remove", "unlink", "rmdir"):
                m.setattr(os, name, killed_at(getattr(os, name)))
            try:
                save_dir(str(run), "last", write("new"))
            except _Killed:
                pass
        settled.append(leftovers.clean_stale(str(run)))
        assert leftovers.leftover_swaps(str(run)) == [], (stop, os.listdir(run))
        assert (run / "last" / "prompts.safetensors").read_text() == "new"
    assert any(settled)  # some were cut short


def test_a_checkpoint_save_carries_a_persons_files_over(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "prompts.safetensors").write_text("old")
    (tmp_path / "best" / "draft.tex").write_text("mine")
    save_dir(str(tmp_path), "best", write())
    assert (tmp_path / "best" / "prompts.safetensors").read_text() == "new"
    assert (tmp_path / "best" / "draft.tex").read_text() == "mine"
    assert oct(os.stat(tmp_path / "best").st_mode & 0o777) != oct(0o700)  # not owner-only


def _as_previous_version(run) -> None:
    """What the previous fastprompt wrote: no marker, no split.json, no trainer.pt checksum,
    checkpoints without tensor checksum or class names."""
    os.remove(run / owner.MARKER)
    os.remove(run / owner.LOCK)
    os.remove(run / "split.json")
    for folder in ("init", "best", "last"):
        file = run / folder / "prompts.safetensors"
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata())
        config = json.loads(meta["config"])
        config.pop("classes")
        save_file(
            load_file(str(file)),
            str(file),
            metadata={"format": meta["format"], "config": json.dumps(config)},
        )
        (run / folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.remove(run / "last" / "trainer.pt.sha256")
    saved = json.loads((run / "run.json").read_text())
    del saved["data"]["split"]
    (run / "run.json").write_text(json.dumps(saved, indent=2))


def test_a_run_folder_of_the_previous_version_resumes_and_evaluates(tiny_csv, tmp_path):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val-split", "0.25"]
    args += ["--prompts", "2", *FAST, "--epochs", "2"]
    run = tmp_path / "run"
    assert main([*args, "--stop-after", "1", "--out", str(run)]) == 0
    _as_previous_version(run)
    assert main(["train", "--resume", str(run), "--no-progress", "--quiet"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / owner.MARKER).is_file()  # adopted
    assert main(["evaluate", str(run), "--checkpoint", "init", "--no-progress"]) == 0
    # A new run refuses it as a run, not as a person's folder.
    with pytest.raises(SystemExit):
        main([*args, "--out", str(run)])


def test_no_run_folder_is_made_inside_another(tiny_csv, tmp_path, capsys):
    """`condense --out` inside its source run (or `train --out` inside any run) was accepted: the
    source's --overwrite then moved the new run along, and its saves carried it."""
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val-split", "0.25"]
    args += ["--prompts", "2", *FAST, "--epochs", "1"]
    run = tmp_path / "run"
    assert main([*args, "--out", str(run)]) == 0
    inside = [run / "pc", run / "best" / "pc", run / "x" / "y"]
    for out in inside:
        for argv in (
            ["condense", str(run), "--finetune-epochs", "1", "--quiet", "--out", str(out)],
            [*args, "--out", str(out)],
        ):
            with pytest.raises(SystemExit):
                main(argv)
            assert f"is inside the run folder {run}" in capsys.readouterr().err, argv
            assert not out.exists()
    assert owner.enclosing_run(str(tmp_path / "elsewhere")) is None


def test_overwrite_never_moves_the_images_a_list_names(tmp_path, capsys):
    """`--data list.csv --out IMAGES --overwrite` moved the folder of the listed images aside
    (to IMAGES.old-...), then the run failed on images that were no longer there."""
    from train_helpers import write_images

    rows = write_images(tmp_path / "img", 8, 2)
    (tmp_path / "data.csv").write_text("".join(f"{p},{y}\n" for p, y in rows))
    args = ["train", *TINY_MODEL, "--data", str(tmp_path / "data.csv"), "--val-split", "2"]
    args += ["--prompts", "2", *FAST, "--epochs", "1", "--overwrite"]
    for out in (tmp_path / "img", tmp_path / "img" / ".."):
        with pytest.raises(SystemExit):
            main([*args, "--out", str(out)])
        assert "--overwrite would move it aside" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "img"]
    assert len(os.listdir(tmp_path / "img")) == 8


def test_overwrite_never_moves_data_reached_through_a_link_in_out(tmp_path):
    """`--out run --overwrite` with `run/data -> /elsewhere/imgs` and `--data run/data`: the real
    path of the data is outside `run`, so `run` (and the link in it) was moved aside and the data
    path led nowhere. The same for a link on the way (`a -> run/sub`, data `a/imgs`), and for a
    condense source reached through `run/`."""
    (tmp_path / "elsewhere" / "imgs").mkdir(parents=True)
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "imgs").symlink_to(tmp_path / "elsewhere" / "imgs")
    (run / "data").symlink_to(tmp_path / "elsewhere" / "imgs")
    (tmp_path / "a").symlink_to(run / "sub")
    for data in (run / "data", run / "data" / "x.csv", tmp_path / "a" / "imgs"):
        (tmp_path / "elsewhere" / "imgs" / "x.csv").write_text("")
        with pytest.raises(
            owner.OwnerError, match=r"holds a link on the way to .*--overwrite would"
        ):
            owner.check_out(str(run), True, "--out", [str(data)])
    # The data itself, reached without passing through run/, does not hold it back.
    owner.check_out(str(run), True, "--out", [str(tmp_path / "elsewhere" / "imgs")])


def test_overwrite_never_moves_images_a_list_links_into_out(tmp_path, capsys):
    """A list naming `img/0.png -> run/keep/0.png`: the folder `img` is outside `run`, so
    `--out run --overwrite` moved the linked images aside and the run failed reading them."""
    from train_helpers import write_images

    run = tmp_path / "run"
    rows = write_images(run / "keep", 8, 2)
    (tmp_path / "img").mkdir()
    for i in range(8):
        (tmp_path / "img" / f"{i}.png").symlink_to(run / "keep" / f"{i}.png")
    (tmp_path / "data.csv").write_text(
        "".join(f"img/{i}.png,{y}\n" for i, (_, y) in enumerate(rows))
    )
    args = ["train", *TINY_MODEL, "--data", str(tmp_path / "data.csv"), "--val-split", "2"]
    args += ["--prompts", "2", *FAST, "--epochs", "1", "--overwrite", "--out", str(run)]
    with pytest.raises(SystemExit):
        main(args)
    assert "--overwrite would move it aside" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "img", "run"]
    assert len(os.listdir(run / "keep")) == 8


def test_a_reader_shares_the_lock_and_keeps_writers_out(tmp_path):
    """While condense reads a run (owner.reading), another reader may read it too, and a writer
    (`train --resume`, `--overwrite`) is refused."""
    run = str(tmp_path / "run")
    owner.claim(run)
    owner.release(run)
    take = (
        "import sys; from fastprompt.train import owner\n"
        "try:\n    {}\nexcept owner.OwnerError as e:\n    print(e); sys.exit(3)\n"
    )
    calls = {
        "owner.hold_lock(sys.argv[1])": 3,
        "owner.check_out(sys.argv[1], True)": 3,
        "with owner.reading(sys.argv[1]): pass": 0,
    }
    with owner.reading(run):
        for call, code in calls.items():
            done = subprocess.run(
                [sys.executable, "-c", take.format(call), run],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == code, (call, done.stdout, done.stderr)
            assert code == 0 or "or a condense reading it" in done.stdout
    with owner.hold(run):  # once read, the folder is free again
        pass
