"""``fastprompt evaluate RUN --data D``: never on the run's training images; recorded under the
run's lock."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from train_helpers import FAST, TINY_MODEL, another_writer, cli_error, write_images

from fastprompt.cli import main
from fastprompt.train import leftovers
from fastprompt.train.folder import save_dir
from fastprompt.train.run import RunError, load_run_model


def _evaluations(run) -> list[dict]:
    path = run / "evaluations.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def folder_run(tmp_path):
    """A run on a split folder: trains on data/train (2 classes, 8 images), validates on
    data/val (2 images)."""
    root = tmp_path / "data"
    for part, count in (("train", 4), ("val", 1)):
        for i, cls in enumerate("ab"):
            write_images(root / part / cls, count, 1, seed=10 * i + len(part))
    args = ["train", *TINY_MODEL, "--data", str(root), "--prompts", "1", *FAST]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run", root


def test_evaluate_refuses_the_runs_training_images(folder_run, tmp_path, capsys):
    """evaluate --data measured the training folder, or a list of training images, as if it
    were a test set: a top-1 of training accuracy, recorded as a result."""
    run, root = folder_run
    capsys.readouterr()
    err = cli_error(capsys, ["evaluate", str(run), "--data", str(root / "train")])
    assert f"--data {root / 'train'}: 8 of its 8 evaluation images are images {run} was " in err
    assert f"trained on (per {run / 'split.json'}): {root / 'train' / 'a' / '0.png'}, " in err
    assert "evaluate on images held out of training" in err
    # The same images reached another way: through a link to the folder, listed by a .csv.
    os.symlink(root / "train", tmp_path / "link")
    err = cli_error(capsys, ["evaluate", str(run), "--data", str(tmp_path / "link")])
    assert "8 of its 8 evaluation images are images" in err
    rows = [("data/val/a/0.png", "a"), ("data/train/b/3.png", "b")]
    (tmp_path / "mine.csv").write_text("".join(f"{p},{y}\n" for p, y in rows))
    err = cli_error(capsys, ["evaluate", str(run), "--data", str(tmp_path / "mine.csv")])
    assert f"1 of its 2 evaluation images are images {run} was trained on" in err
    assert str(root / "train" / "b" / "3.png") in err
    assert _evaluations(run) == []
    # A run older than split.json: its split is recomputed from its data, as a resume does.
    os.remove(run / "split.json")
    err = cli_error(capsys, ["evaluate", str(run), "--data", str(root / "train")])
    assert "(per its data and seed (it predates split.json))" in err
    # A fresh run's init has seen no image: its top-1 there is no training accuracy.
    assert main(["evaluate", str(run), "--checkpoint", "init", "--data", str(root / "train")]) == 0


def test_evaluate_on_the_validation_images_says_best_was_chosen_on_them(folder_run, capsys):
    run, root = folder_run
    capsys.readouterr()
    # A split folder without test/ is evaluated on its val/: the run's validation images.
    assert main(["evaluate", str(run), "--data", str(root), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: 2 of the 2 images of --data ") == 1
    assert "are the run's validation images, on which best/ was chosen" in err
    assert main(["evaluate", str(run), "--no-progress"]) == 0  # its validation data
    assert "best/ was chosen on these validation images" in capsys.readouterr().err
    args = ["evaluate", str(run), "--data", str(root), "--checkpoint", "last", "--no-progress"]
    assert main(args) == 0
    assert "note" not in capsys.readouterr().err
    assert [r["samples"] for r in _evaluations(run)] == [2, 2, 2]


def _old_digits_split(digits: list[int]) -> tuple[list[int], list[int]]:
    """The split digits:5-9 had before each digit's order was drawn on its own (a090a1c)."""
    import torch
    from sklearn.datasets import load_digits

    target = load_digits().target
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for digit in digits:
        idx = np.flatnonzero(target == digit)
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        cut = round(0.6 * len(idx))
        train += sorted(int(i) for i in idx[:cut])
        test += sorted(int(i) for i in idx[cut:])
    return train, test


def test_an_old_digits_run_is_not_evaluated_on_its_training_images(tmp_path, capsys):
    """A digits:5-9 run made before digits split each digit on its own holds, in split.json,
    training images that today's test part of digits:6-9 holds: 171 of its 286 images."""
    pytest.importorskip("sklearn.datasets")
    run = tmp_path / "run"
    args = ["train", *TINY_MODEL, "--data", "digits:5-9", "--prompts", "1", *FAST]
    assert main([*args, "--epochs", "1", "--stop-after", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    # Today's split: digits:6-9's test images are the run's validation images.
    assert main(["evaluate", str(run), "--data", "digits:6-9", "--no-progress"]) == 0
    assert "note: 286 of the 286 images of --data digits:6-9 are the run's validation" in (
        capsys.readouterr().err
    )
    split = json.loads((run / "split.json").read_text())
    train, test = _old_digits_split([5, 6, 7, 8, 9])
    for part, chosen in (("train", train), ("val", test)):
        split[part]["ids"] = [f"digits/{i}" for i in chosen]
    (run / "split.json").write_text(json.dumps(split))
    err = cli_error(capsys, ["evaluate", str(run), "--data", "digits:6-9"])
    assert "--data digits:6-9: 171 of its 286 evaluation images are images" in err
    assert "digits/" in err


def test_evaluate_records_under_the_runs_lock(folder_run, capsys):
    """evaluate appended to evaluations.jsonl without the run's lock: a `train --resume` or
    `--overwrite` of the run could start, or move the folder aside, mid-append."""
    run, _ = folder_run
    with another_writer(run) as writer:
        assert main(["evaluate", str(run), "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert "top-1" in captured.out  # the result is printed
        assert f"note: not recorded in {run / 'evaluations.jsonl'} (evaluate RUN {run} is in " in (
            captured.err
        )
        assert f"use by another fastprompt process (pid {writer.pid}" in captured.err
        assert _evaluations(run) == []
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    assert len(_evaluations(run)) == 1


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_evaluate_reads_best_where_a_killed_save_left_it(folder_run, capsys):
    """A save killed between moving best/ aside and swapping the new one in leaves only the
    marked .best.swap: evaluate refused the run ("has no best/ checkpoint"), while a resume
    restores it as best/."""
    run, _ = folder_run
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    before = _evaluations(run)[-1]
    (run / "best" / leftovers.SWAP_MARK).write_text("")
    (run / "best").rename(run / ".best.swap")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    assert "where an interrupted save left best/" in capsys.readouterr().err
    after = _evaluations(run)[-1]
    assert (after["top1"], after["loss"]) == (before["top1"], before["loss"])
    assert not (run / "best").exists()  # a reader leaves the folder as it found it


def test_evaluate_refuses_a_swap_folder_fastprompt_did_not_make(folder_run, capsys):
    """With best/ gone and an unmarked .best.swap (not a save's), the refusal said only "no
    best/ checkpoint"; a resume refuses that folder too, so the message names it."""
    run, _ = folder_run
    (run / "best").rename(run / ".best.swap")
    err = cli_error(capsys, ["evaluate", str(run), "--no-progress"])
    assert f"{run} has no best/ checkpoint, and {run / '.best.swap'} is not one a save" in err
    assert f"move it back to {run / 'best'}" in err


def test_a_checkpoint_swapped_while_it_is_loaded_is_read_again(folder_run, monkeypatch):
    """evaluate loads without the run's lock (a train may be running): a save that swapped
    best/ in while the load read the previous copy removed its files under it
    ("holds no prompts.safetensors"). Now a read the swap overlapped is repeated."""
    from fastprompt import checkpoint

    run, _ = folder_run
    (run / "best" / leftovers.SWAP_MARK).write_text("")
    (run / "best").rename(run / ".best.swap")  # a killed save's previous copy
    real_info = checkpoint.checkpoint_info
    saves = []

    def copy_init(tmp):
        for name in ("prompts.safetensors", "config.json"):
            shutil.copy(run / "init" / name, tmp)

    def info_then_save(path):
        out = real_info(path)
        if not saves:  # a train of the run saves a new best/ meanwhile (init's prompts)
            save_dir(str(run), "best", copy_init)
            saves.append(path)
        return out

    monkeypatch.setattr(checkpoint, "checkpoint_info", info_then_save)
    model = load_run_model(str(run), "best")
    assert saves == [str(run / ".best.swap")] and not (run / ".best.swap").exists()
    monkeypatch.setattr(checkpoint, "checkpoint_info", real_info)
    assert _same_weights(model, load_run_model(str(run), "init"))


def test_a_read_of_best_that_a_save_swaps_midway_is_one_saves_files(tmp_path):
    """The case evaluate meets while a run trains: best/ itself is swapped between the read of
    one of its files and the next. The read must not return the old save's first file with the
    new save's second (only the folder's identity tells them apart: both paths still exist)."""
    from fastprompt.train.folder import read_checkpoint

    def writer(tag):
        def write(tmp):
            for name in ("config.json", "prompts.safetensors"):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(tag)

        return write

    run = tmp_path / "run"
    run.mkdir()
    save_dir(str(run), "best", writer("first"))
    tags = iter(["second", "third"])

    def read(folder):
        head = open(os.path.join(folder, "config.json")).read()
        tag = next(tags, None)
        if tag is not None:  # a train of the run saves best/ meanwhile
            save_dir(str(run), "best", writer(tag))
        return head, open(os.path.join(folder, "prompts.safetensors")).read()

    assert read_checkpoint(str(run), "best", read) == ("third", "third")
    tags = iter(["again"] * 5)
    with pytest.raises(RunError, match="was replaced during each of 5 reads"):
        read_checkpoint(str(run), "best", read)


def test_a_damaged_checkpoint_that_stays_in_place_is_said_at_once(folder_run):
    """A read that fails on a checkpoint no save swapped is not repeated: its own error."""
    run, _ = folder_run
    (run / "best" / "prompts.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunError, match=r"best/prompts\.safetensors") as info:
        load_run_model(str(run), "best")
    assert "replaced" not in str(info.value)


def test_a_run_whose_backend_cannot_run_here_is_refused_first_and_evaluates_with_another(
    folder_run, capsys, monkeypatch
):
    """A run trained with --backend triton, evaluated, condensed or resumed on the CPU (as
    the refusal of its CUDA device advises), died of NotImplementedError at the first forward;
    evaluate had no way to run the checkpoint with another backend."""
    run, _ = folder_run
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    plain = _evaluations(run)[-1]
    saved = json.loads((run / "run.json").read_text())
    saved["config"]["method_args"]["backend"] = "triton"
    saved["config"]["device"] = "cpu"
    (run / "run.json").write_text(json.dumps(saved))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host, a CPU run
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    said = f"{run} runs with --backend triton, as it was trained, which cannot run on cpu here: "
    for argv, way in (
        (["evaluate", str(run)], "evaluate it with --backend auto (or another backend)"),
        (["condense", str(run)], "condense it with --backend auto (or another backend)"),
        (
            ["train", "--resume", str(run)],
            "continue it with --backend auto (or another backend), or where that one runs",
        ),
    ):
        err = cli_error(capsys, argv)
        assert said in err and err.endswith(way), err
    err = cli_error(capsys, ["evaluate", str(run), "--backend", "triton"])
    assert err.endswith(
        "--backend triton cannot run on cpu here: Triton kernels take CUDA "
        "tensors; CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, "
        "for tests: it runs each kernel in Python, very slowly)"
    )
    for backend in ("auto", "torch"):
        assert main(["evaluate", str(run), "--backend", backend, "--no-progress"]) == 0
        again = _evaluations(run)[-1]
        assert again["top1"] == plain["top1"]
        assert again["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # condense with another backend, which the condensed run records (so it resumes here).
    out = run.parent / "condensed"
    argv = ["condense", str(run), "--backend", "torch", "--finetune-epochs", "1", "--out", str(out)]
    assert main([*argv, "--workers", "0", "--no-progress", "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["method_args"]["backend"] == "torch"


def test_processes_that_read_different_saves_are_refused(folder_run, monkeypatch):
    """Under torchrun each process read the checkpoint on its own, without the run's lock: a
    save between two processes' reads summed the results of two models as one."""
    from fastprompt.train import folder

    run, _ = folder_run
    model = load_run_model(str(run), "best")
    env = folder.DistEnv(rank=0, world=2)
    gathered = []
    monkeypatch.setattr(folder, "all_gather_objects", lambda env, obj: gathered or [obj, obj])
    folder.check_one_save(env, model, str(run), "best")
    gathered.extend(["one save", "another"])
    with pytest.raises(RunError, match=r"the 2 processes read different saves of .*best"):
        folder.check_one_save(env, model, str(run), "best")


def test_evaluate_says_a_backend_has_no_effect_on_a_naive_run(tmp_path, capsys):
    """--backend on a run with --impl naive was accepted and silently had no effect."""
    root = tmp_path / "data"
    for part, count in (("train", 2), ("val", 1)):
        for i, cls in enumerate("ab"):
            write_images(root / part / cls, count, 1, seed=10 * i + len(part))
    args = ["train", *TINY_MODEL, "--data", str(root), "--prompts", "1", "--impl", "naive", *FAST]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--backend", "torch", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (
        f"note: {run} runs with --impl naive, as it was trained, which uses no prompt-attention "
        "backend: --backend torch has no effect"
    ) in err
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    assert "has no effect" not in capsys.readouterr().err


def test_a_checkpoint_folder_without_its_prompts_is_said_damaged(folder_run, capsys):
    """A best/ whose prompts.safetensors is gone read as "has no best/ checkpoint yet", as if
    training had not reached it."""
    run, _ = folder_run
    (run / "best" / "prompts.safetensors").unlink()
    said = (
        f"{run / 'best'} is there but holds no prompts.safetensors: the checkpoint is damaged or "
        "incomplete; restore it from a copy of the run, or use another of its checkpoints "
        "(best, last, init)"
    )
    assert cli_error(capsys, ["evaluate", str(run)]).endswith(said)
    with pytest.raises(RunError) as info:
        load_run_model(str(run), "best")
    assert str(info.value) == said
