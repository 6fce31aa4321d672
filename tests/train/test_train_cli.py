"""``fastprompt train / evaluate / condense`` end to end on a tiny ViT and 24 tiny images."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, TINY_MODEL, another_writer, cli_error, write_images

import fastprompt
from fastprompt.cli import main
from fastprompt.train.recipes import DATA_FIELDS

VALUES = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "best_epoch", "train_samples")


def _train(tiny_csv, out, *extra):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv)]
    args += ["--prompts", "3", *FAST, "--out", str(out), *extra]
    assert main(args) == 0
    return out


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_folder_holds_everything(tiny_csv, tmp_path):
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "3", "--warmup-epochs", "1")
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert {
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "images_per_s",
        "data_wait",
    } <= set(rows[0])
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == 16 * 8 / 256  # VPT's warmup starts at 0
    saved = json.loads((run / "run.json").read_text())
    assert saved["classes"] == ["0", "1", "2"] and saved["data"]["train_samples"] == 24
    assert saved["config"]["recipe"]["name"] == "vpt" and saved["data"]["mean"] == [0.5] * 3
    # best/ and last/ are prompt checkpoints fastprompt.load_prompts reads.
    import timm

    backbone = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=3,
    )
    # Another random init than the run's (--no-pretrained): the prompts load only when asked.
    with pytest.raises(ValueError, match="trained on other backbone weights"):
        fastprompt.load_prompts(backbone, run / "last")
    last = fastprompt.load_prompts(backbone, run / "last", check_weights=False)
    assert last.method == "vpt" and last.config.num_prompts == 3
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["val_acc"] == max(r["val_acc"] for r in rows)
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 3 and len(state["rng"]) == 1
    assert "momentum_buffer" in str(state["trainer"]["optimizer"]["state"])
    if _has_matplotlib():
        assert (run / "curves.png").stat().st_size > 0
    assert "epoch 3/3" in (run / "log.txt").read_text()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_resume_continues_bit_for_bit(tiny_csv, tmp_path):
    """2 epochs, stop, resume for 2 more == 4 epochs in one go (prompt dropout draws RNG)."""
    extra = ("--epochs", "4", "--warmup-epochs", "1", "--prompt-dropout", "0.2")
    whole = _train(tiny_csv, tmp_path / "whole", *extra)
    split = _train(tiny_csv, tmp_path / "split", *extra, "--stop-after", "2")
    assert len(_metrics(split)) == 2
    assert main(["train", "--resume", str(split), "--no-progress", "--quiet"]) == 0
    a, b = (
        load_file(whole / "last" / "prompts.safetensors"),
        load_file(split / "last" / "prompts.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for ra, rb in zip(_metrics(whole), _metrics(split), strict=True):
        assert {k: ra[k] for k in VALUES} == {k: rb[k] for k in VALUES}


def test_a_run_whose_backend_cannot_run_here_resumes_with_another(
    tiny_csv, tmp_path, capsys, monkeypatch
):
    """A run trained with --backend triton (on a GPU) could not be continued on a CPU: resume
    refused it with no way round. --backend on a resume picks how it runs (the same numbers)."""
    whole = _train(tiny_csv, tmp_path / "whole", "--epochs", "2", "--backend", "torch")
    split = _train(tiny_csv, tmp_path / "split", "--epochs", "2", "--stop-after", "1")
    saved = json.loads((split / "run.json").read_text())
    saved["config"]["method_args"]["backend"] = "triton"
    saved["config"]["device"] = "cpu"
    (split / "run.json").write_text(json.dumps(saved))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with monkeypatch.context() as gpu_host:  # a GPU host, a CPU run
        gpu_host.setattr(torch.cuda, "is_available", lambda: True)
        err = cli_error(capsys, ["train", "--resume", str(split)])
        assert err.endswith(
            "continue it with --backend auto (or another backend), or where that one runs"
        )
        err = cli_error(capsys, ["train", "--resume", str(split), "--backend", "triton"])
        assert "train: --backend triton cannot run on cpu here" in err
    assert main(["train", "--resume", str(split), "--backend", "auto", "--no-progress"]) == 0
    for ra, rb in zip(_metrics(whole), _metrics(split), strict=True):
        assert ra["val_acc"] == rb["val_acc"]
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)


def test_a_pgn_run_with_augmentation_and_batchnorm_resumes_bit_for_bit(tiny_csv, tmp_path):
    """The pgn recipe: its augmentation draws random numbers, its generator's BatchNorm keeps
    running statistics (saved in the checkpoint); resume still replays the run exactly, even
    with a loader worker augmenting instead of the main process."""
    extra = ("--method", "pgn", "--library-size", "8", "--pgn-resolution", "32", "--epochs", "4")
    whole = _train(tiny_csv, tmp_path / "whole", *extra)
    split = _train(tiny_csv, tmp_path / "split", *extra, "--stop-after", "2")
    resume = ["train", "--resume", str(split), "--workers", "1", "--no-progress", "--quiet"]
    assert main(resume) == 0
    a, b = (
        load_file(whole / "last" / "prompts.safetensors"),
        load_file(split / "last" / "prompts.safetensors"),
    )
    assert any("running_mean" in n for n in a) and "library" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    saved = json.loads((whole / "run.json").read_text())["config"]
    assert saved["recipe"]["name"] == "pgn" and saved["recipe"]["train_transform"] == "pgn"
    rows = _metrics(whole)
    assert [r["lr"] for r in rows] == pytest.approx([16 / 2, 16 / 2, 16, 16 * 0.505])  # --lr 16
    for ra, rb in zip(rows, _metrics(split), strict=True):
        assert {k: ra[k] for k in VALUES} == {k: rb[k] for k in VALUES}


def test_resume_refuses_changed_settings_and_accepts_repeated_ones(tiny_csv, tmp_path, capsys):
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "2", "--stop-after", "1")
    err = cli_error(capsys, ["train", "--resume", str(run), "--lr", "3"])
    assert "--lr 3.0 differs from the run's (16.0)" in err
    err = cli_error(capsys, ["train", "--resume", str(run), "--seed", "0"])
    assert "--seed was not given when the run began" in err and "None" not in err
    # The original command line with --resume appended (the README's form) is fine.
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv)]
    args += ["--prompts", "3", *FAST, "--out", str(run), "--epochs", "2", "--resume", str(run)]
    assert main(args) == 0
    assert len(_metrics(run)) == 2
    err = cli_error(
        capsys, ["train", *TINY_MODEL, "--data", str(tiny_csv), "--prompts", "1", "--out", str(run)]
    )
    assert f"--out {run} already holds a run; continue it with --resume" in err


def test_a_run_records_where_its_data_is(tiny_csv, tmp_path, monkeypatch):
    """Data given by a relative path is recorded absolute: a resume from another folder used to
    read whatever that folder held under the same relative path."""
    monkeypatch.chdir(tiny_csv.parent)
    run = tmp_path / "run"
    args = ["train", *TINY_MODEL, "--data", tiny_csv.name, "--val", tiny_csv.name, "--prompts"]
    assert main([*args, "3", *FAST, "--epochs", "2", "--stop-after", "1", "--out", str(run)]) == 0
    data = json.loads((run / "run.json").read_text())["config"]["data"]
    assert data["train"] == data["val"] == str(tiny_csv)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / tiny_csv.name).write_text("path,label\n")  # another data.csv, same name
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(run), "--no-progress", "--quiet"]) == 0
    assert len(_metrics(run)) == 2


def test_a_run_without_its_last_checkpoint_is_not_started_over(tiny_csv, tmp_path):
    """An older fastprompt's interrupted save left last.old and no last/: resume started over
    from init/, cutting metrics.jsonl and replacing best/. It is renamed back now; with last/
    gone for good the resume refuses."""
    import shutil

    from fastprompt.train.run import RunError, continue_run

    run = _train(tiny_csv, tmp_path / "run", "--epochs", "3", "--stop-after", "1")
    (run / "last").rename(run / "last.old")
    assert (
        main(["train", "--resume", str(run), "--stop-after", "2", "--no-progress", "--quiet"]) == 0
    )
    assert len(_metrics(run)) == 2 and not (run / "last.old").exists()
    shutil.rmtree(run / "last")
    with pytest.raises(RunError, match=r"has trained epochs .* but no last/ checkpoint"):
        continue_run(str(run), quiet=True, progress=False)
    assert len(_metrics(run)) == 2


def test_clear_errors_before_any_work(tiny_csv, tmp_path, capsys):
    base = ["train", *TINY_MODEL, "--out", str(tmp_path / "r")]
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    cases = [
        (["--data", str(tmp_path / "nope"), "--prompts", "2"], "--data .*nope does not exist"),
        (["--data", str(tiny_csv)], "--prompts is required for VPT"),
        (["--data", str(tiny_csv), "--prompts", "2"], "has no validation split; pass --val"),
        (["--data", str(empty), "--val-split", "0.5", "--prompts", "2"], "lists no images"),
        (
            ["--data", str(tmp_path / "noimages"), "--val-split", "0.5", "--prompts", "2"],
            "holds no images",
        ),
        (
            ["--data", str(tiny_csv), "--val", "x", "--val-split", "2", "--prompts", "2"],
            "either --val or --val-split",
        ),
        (
            ["--data", str(tiny_csv), "--prompts", "2", "--library-size", "8"],
            "--library-size does not apply to --method vpt",
        ),
        (
            ["--data", str(tiny_csv), "--prompts", "2", "--epochs", "0"],
            "--epochs must be >= 1, got 0",
        ),
        (
            ["--data", str(tiny_csv), "--prompts", "2", "--set", "lrr=1"],
            "unknown fields \\['lrr'\\]",
        ),
        (
            ["--data", str(tiny_csv), "--prompts", "2", "--val-split", "vtab-1k"],
            "needs the 1000 training images",
        ),
    ]
    import re

    for extra, pattern in cases:
        err = cli_error(capsys, base + extra)
        assert err.startswith("fastprompt: error: train: ") and re.search(pattern, err), (
            extra,
            err,
        )
    err = cli_error(
        capsys, ["train", "--model", "vit_nope", "--data", "digits", "--prompts", "1", "--out", "x"]
    )
    assert "'vit_nope' is not a timm model name" in err
    assert not (tmp_path / "r").exists()


def test_evaluate_a_run_and_refuse_labels_that_do_not_fit(tiny_csv, tmp_path, capsys):
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "2")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    best = json.loads((run / "best" / "best.json").read_text())
    assert f"top-1 {100 * best['val_acc']:.2f}%" in out and "(24 images)" in out
    record = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert record["top1"] == pytest.approx(best["val_acc"]) and record["checkpoint"] == "best"
    # A dataset with 4 classes does not fit a 3-class head.
    rows = write_images(tmp_path / "img4", 8, 4)
    (tmp_path / "four.csv").write_text("".join(f"{p},{y}\n" for p, y in rows))
    err = cli_error(capsys, ["evaluate", str(run), "--data", str(tmp_path / "four.csv")])
    assert "has 1 class(es) the run was not trained on: ['3']" in err
    err = cli_error(capsys, ["evaluate", str(tmp_path / "nothing")])
    assert "does not exist; is it a fastprompt run folder?" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the errors of a machine without CUDA")
def test_a_device_or_backend_this_machine_lacks_is_named_before_any_work(
    tiny_csv, tmp_path, capsys, monkeypatch
):
    """`train --backend triton` without CUDA failed at the first forward, a traceback after the
    run folder was made; `evaluate --device cuda`, or evaluating or condensing a run trained on
    CUDA, died of PyTorch's 'Found no NVIDIA driver' traceback; resuming it moved it to the
    default device."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), "--prompts"]
    err = cli_error(capsys, [*base, "2", "--backend", "triton", "--out", str(tmp_path / "t")])
    assert "--backend triton cannot run on cpu here: " in err
    assert not (tmp_path / "t").exists()
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "1")
    err = cli_error(capsys, ["evaluate", str(run), "--device", "cuda"])
    assert err.endswith("--device cuda was asked for, but torch sees no CUDA device")
    saved = json.loads((run / "run.json").read_text())
    saved["config"]["device"] = "cuda"
    (run / "run.json").write_text(json.dumps(saved))
    for argv in (["evaluate", str(run)], ["condense", str(run)], ["train", "--resume", str(run)]):
        err = cli_error(capsys, argv)
        assert "was trained with --device cuda, which torch does not see here" in err, err
    # A resumed run stays on its device unless told (it moved to the default one, silently).
    assert main(["train", "--resume", str(run), "--device", "cpu", "--quiet"]) == 0


def test_a_forced_backend_from_the_environment_is_checked_before_any_work(
    tiny_csv, tmp_path, capsys, monkeypatch
):
    """FASTPROMPT_BACKEND=triton without CUDA used to pass the checks of `--backend triton` and
    fail at the first forward, after the run folder was made."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    argv = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv)]
    err = cli_error(capsys, [*argv, "--prompts", "2", "--out", str(tmp_path / "t")])
    assert "FASTPROMPT_BACKEND=triton cannot run on cpu here: " in err
    assert not (tmp_path / "t").exists()


def test_triton_on_the_cpu_of_a_cuda_host_is_refused_before_any_work(
    tiny_csv, tmp_path, capsys, monkeypatch
):
    """`train --backend triton --device cpu` on a host with a GPU passed the checks (Triton was
    available: CUDA was seen) and the run failed at its first forward on CPU tensors."""
    from fastprompt.cli.train_checks import check_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv), "--device"]
    base += ["cpu", "--prompts", "2", "--epochs", "1", *FAST]
    err = cli_error(capsys, [*base, "--backend", "triton", "--out", str(tmp_path / "t")])
    assert err.endswith(
        "--backend triton cannot run on cpu here: Triton kernels take CUDA tensors; CPU tensors "
        "only under Triton's interpreter (TRITON_INTERPRET=1, for tests: it runs each kernel in "
        "Python, very slowly)"
    )
    assert not (tmp_path / "t").exists()
    assert check_backend("triton", "cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what the tests run the kernels under
    assert check_backend("triton", "cpu") is None


def test_evaluate_reads_a_split_folders_test_part(tmp_path, capsys):
    """A folder with train/, val/ and test/ trains on train/, validates on val/, and `evaluate
    --data` reads test/ (it read val/ again, which the help calls the test part)."""
    root = tmp_path / "data"
    for part, count in (("train", 4), ("val", 1), ("test", 3)):
        for i, cls in enumerate("ab"):
            write_images(root / part / cls, count, 1, seed=i)
    args = ["train", *TINY_MODEL, "--data", str(root), "--prompts", "1", *FAST]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(root), "--no-progress"]) == 0
    assert "(6 images)" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "evaluations.jsonl").read_text())
    assert record["data"] == str(root / "test") and record["samples"] == 6


def test_condense_a_run_into_a_new_run(tiny_csv, tmp_path, capsys):
    pipeline = ("--normalize", "imagenet", "--train-transform", "resize")
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "2", *pipeline)
    args = ["condense", str(run), "--keep", "0.5", "--score", "taylor_normed"]
    args += ["--finetune-epochs", "2", "--no-progress", "--quiet"]
    assert main(args) == 0
    new = tmp_path / "run-pc50-taylor_normed"
    saved = json.loads((new / "run.json").read_text())
    init = saved["config"]["init"]
    assert saved["config"]["method"] == "prompt_condensation"
    assert (
        init["kept_total"] == 3 and sum(init["layer_counts"]) == 3 and init["prompts_before"] == 6
    )
    assert saved["config"]["recipe"]["name"] == "pc-finetune"
    # Fine-tuned on the source run's pipeline (a VTAB-1k preset's resize and ImageNet mean/std).
    source = json.loads((run / "run.json").read_text())["config"]["recipe"]
    assert {k: saved["config"]["recipe"][k] for k in DATA_FIELDS} == {
        k: source[k] for k in DATA_FIELDS
    }
    assert saved["data"]["mean"] == [0.485, 0.456, 0.406]
    assert saved["config"]["base_lr"] == pytest.approx(1.6)  # a tenth of the source run's
    assert [r["epoch"] for r in _metrics(new)] == [0, 1]
    assert torch.load(new / "scores.pt", weights_only=True).shape == (2, 3)
    model = fastprompt.train.load_run_model(str(new), "last")
    assert model.method == "prompt_condensation" and model.config.dropout == 0.0
    assert main(["evaluate", str(new), "--checkpoint", "last", "--no-progress"]) == 0
    err = cli_error(capsys, ["condense", str(run), "--keep", "1.5"])
    assert "--keep ratio must be in [0, 1], got 1.5" in err
    err = cli_error(capsys, args)
    assert "already holds a run" in err


def test_condense_fine_tunes_at_a_tenth_of_a_peak_given_unscaled(tiny_csv, tmp_path):
    """A source run with lr_scaling=none (a SOLVER.BASE_LR peak) fine-tuned at a tenth of that
    peak scaled again by batch / 256: 1/320 of it at batch 8."""
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "1", "--set", "lr_scaling=none")
    assert _metrics(run)[0]["lr"] == 16  # FAST's --lr, the peak itself
    args = ["condense", str(run), "--keep", "0.5", "--finetune-epochs", "1", "--quiet"]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "pc")]) == 0
    assert _metrics(tmp_path / "pc")[0]["lr"] == pytest.approx(1.6)


def test_a_lone_last_image_is_dropped_for_batchnorm(tiny_csv, tmp_path):
    """24 images in batches of 23 leave one image, on which the generator's BatchNorm cannot
    train: that batch is dropped (and said so), not a crash mid-epoch."""
    extra = ("--method", "pgn", "--library-size", "8", "--pgn-resolution", "32", "--epochs", "1")
    run = _train(tiny_csv, tmp_path / "run", *extra, "--batch-size", "23")
    assert _metrics(run)[0]["train_samples"] == 23
    assert "last batch of 1 image is dropped" in (run / "log.txt").read_text()


def test_condense_is_refused_while_another_process_writes_its_source(tiny_csv, tmp_path, capsys):
    """condense read its source run without its lock: a `train --resume` (or `--overwrite`) of
    the source running meanwhile could change or move what condense read. Now it is refused,
    and reads once the writer is gone."""
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "1")
    with another_writer(run) as writer:
        args = ["condense", str(run), "--keep", "0.5", "--finetune-epochs", "1", "--quiet"]
        args += ["--no-progress", "--out", str(tmp_path / "pc")]
        err = cli_error(capsys, args)
        assert (
            f"condense RUN {run} is in use by another fastprompt process (pid {writer.pid}" in err
        )
        assert not (tmp_path / "pc").exists()
    assert main(args) == 0


def test_condense_fine_tunes_with_the_source_runs_optimiser(tiny_csv, tmp_path):
    """pc-finetune took VPT's default weight decay (1e-4) and momentum (0.9) whatever the source
    run was tuned with; the paper fine-tunes in the source's setup. Now the source's, unless
    --weight-decay / --momentum say otherwise."""
    tuned = ("--set", "weight_decay=0.003", "momentum=0.5", "no_decay=[]")
    run = _train(tiny_csv, tmp_path / "run", "--epochs", "1", *tuned)
    args = ["condense", str(run), "--keep", "0.5", "--finetune-epochs", "1", "--quiet"]
    args += ["--no-progress", "--stop-after", "1"]
    assert main([*args, "--out", str(tmp_path / "pc")]) == 0
    recipe = json.loads((tmp_path / "pc" / "run.json").read_text())["config"]["recipe"]
    assert (recipe["weight_decay"], recipe["momentum"], recipe["no_decay"]) == (0.003, 0.5, [])
    told = ["--weight-decay", "0", "--momentum", "0.9", "--out", str(tmp_path / "told")]
    assert main([*args, *told]) == 0
    recipe = json.loads((tmp_path / "told" / "run.json").read_text())["config"]["recipe"]
    assert (recipe["weight_decay"], recipe["momentum"]) == (0.0, 0.9)
