"""Training on a mixture of datasets (fastprompt.train.multi), the domain report
(fastprompt.train.domains) and synchronised BatchNorm (fastprompt.train.syncbn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from train_helpers import (
    TINY_MODEL,
    sync_bn_nets,
    sync_bn_step,
    sync_bn_worker,
    torchrun,
    write_images,
)

from fastprompt.cli import main
from fastprompt.train import multi as M
from fastprompt.train.datasets import DataError
from fastprompt.train.folder import DataConfig
from fastprompt.train.recipes import get_recipe
from fastprompt.train.splits import open_data
from fastprompt.train.syncbn import SyncBatchNorm2d, sync_batchnorm

PGN = ["--method", "pgn", "--library-size", "8", "--pgn-resolution", "32", "--prompts", "3"]
FAST = ["--warmup-epochs", "0", "--batch-size", "8", "--lr", "0.5", "--workers", "0"]
FAST += ["--device", "cpu", "--no-progress", "--quiet"]
SLOW = pytest.mark.slow


def _csv(root, count: int, classes: int, seed: int):
    rows = write_images(root / "img", count, classes, seed=seed)
    (root / "data.csv").write_text("".join(f"{p},{y}\n" for p, y in rows))
    return root / "data.csv"


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two lists: 'a' (3 classes, 20 images) and 'b' (2 classes, 16 images), both labelled 0..."""
    root = tmp_path_factory.mktemp("mix")
    a = _csv(root / "a", 20, 3, seed=1)
    b = _csv(root / "b", 16, 2, seed=2)
    return str(a), str(b)


def test_a_mixture_keeps_every_dataset_s_labels_apart(two_sets):
    a, b = two_sets
    cfg = DataConfig(train=[f"a={a}", f"b={b}"], val_split="4")
    data = open_data(cfg, seed=0)
    assert data.classes == ["a/0", "a/1", "a/2", "b/0", "b/1"]
    for part in (data.train, data.val):
        assert isinstance(part, M.Mixture) and part.names == ["a", "b"]
        for (_, label), sid, k in zip(part.samples, part.ids, part.domains, strict=True):
            name = ["a", "b"][k]
            assert sid.startswith(name + "/") and data.classes[label].startswith(name + "/")
        for i in range(len(part)):  # items agree with the listed samples
            assert part[i][1] == part.samples[i][1]
    # --val-split applies to each dataset: 4 held out of each.
    assert [part.domains.count(k) for k in (0, 1) for part in [data.val]] == [4, 4]
    assert len(data.train) == 20 + 16 - 8
    ids = set(data.train.ids)
    assert not ids & set(data.val.ids)


def test_mixture_names_and_counts_are_checked(two_sets):
    a, b = two_sets
    with pytest.raises(DataError, match="both named 'data'"):
        M.parse_specs([a, b])
    with pytest.raises(DataError, match="at least two"):
        M.parse_specs([a])
    assert M.parse_specs([f"x={a}", "digits:0-4"]) == [("x", a), ("digits:0-4", "digits:0-4")]
    cfg = DataConfig(train=[f"a={a}", f"b={b}"], val=[a])
    with pytest.raises(DataError, match="one --val each"):
        open_data(cfg)


def test_per_dataset_metrics_add_up_to_the_totals():
    torch.manual_seed(0)
    names, domains = M.class_domains(["a/x", "a/y", "a/z", "b/x", "b/y"])
    assert names == ["a", "b"] and domains.tolist() == [0, 0, 0, 1, 1]
    logits, labels = torch.randn(40, 5), torch.randint(0, 5, (40,))
    sums = M.domain_stats(logits, labels, domains)
    metrics = M.per_dataset(sums.tolist(), names)
    pred = logits.argmax(-1)
    assert sum(m["samples"] for m in metrics.values()) == 40
    correct = sum(m["acc"] * m["samples"] for m in metrics.values())
    assert correct == pytest.approx(float((pred == labels).sum()))
    loss = sum(m["loss"] * m["samples"] for m in metrics.values())
    total = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    assert loss == pytest.approx(float(total), rel=1e-6)
    for k, name in enumerate(names):  # the plain computation, per dataset
        sel = domains[labels] == k
        own = torch.nonzero(domains == k).flatten()
        within = own[logits[sel][:, own].argmax(-1)]
        assert metrics[name]["acc_within"] == pytest.approx(
            float((within == labels[sel]).float().mean())
        )
        assert metrics[name]["domain_acc"] == pytest.approx(
            float((domains[pred[sel]] == k).float().mean())
        )
        assert metrics[name]["acc_within"] >= metrics[name]["acc"]


def _train(args, out):
    assert main(["train", *TINY_MODEL, *args, *FAST, "--out", str(out)]) == 0
    return out


def test_a_pgn_run_over_two_datasets_reports_per_dataset_and_domains(two_sets, tmp_path, capsys):
    a, b = two_sets
    data = ["--data", f"a={a}", "--data", f"b={b}", "--val-split", "4"]
    run = _train([*PGN, *data, "--epochs", "2", "--stop-after", "1"], tmp_path / "run")
    assert main(["train", "--resume", str(run), "--no-progress", "--quiet"]) == 0
    saved = json.loads((run / "run.json").read_text())
    assert saved["classes"] == ["a/0", "a/1", "a/2", "b/0", "b/1"]
    assert saved["config"]["data"]["train"] == [f"a={a}", f"b={b}"]
    split = json.loads((run / "split.json").read_text())
    for part in ("train", "val"):
        for sid, label in zip(split[part]["ids"], split[part]["labels"], strict=True):
            assert saved["classes"][label].split("/")[0] == sid.split("/")[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        per = row["val_datasets"]
        assert list(per) == ["a", "b"] and [per[n]["samples"] for n in per] == [4, 4]
        assert sum(m["samples"] for m in per.values()) == row["val_samples"]
        correct = sum(m["acc"] * m["samples"] for m in per.values())
        assert correct == pytest.approx(row["val_acc"] * row["val_samples"])
    report = json.loads((run / "domains.json").read_text())
    assert (run / "domains.png").stat().st_size > 0
    assert 0.0 <= report["separation"] <= 1.0 and report["samples"] == {"a": 4, "b": 4}
    assert 0.0 <= report["separation_baseline"] <= 1.0  # the untrained model's, for comparison
    assert "domain discovery" in (run / "log.txt").read_text()
    # One dataset of the run, named as in the run: its held-out images (all of b holds the
    # run's training images, refused); and the report again, from the command line.
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--data", f"b={b}", "--no-progress"])
    assert "12 of its 16 evaluation images are images" in capsys.readouterr().err
    held = [
        (os.path.join(os.path.dirname(b), sid[2:]), saved["classes"][y][2:])
        for sid, y in zip(split["val"]["ids"], split["val"]["labels"], strict=True)
        if sid.startswith("b/")
    ]
    (tmp_path / "held.csv").write_text("".join(f"{p},{y}\n" for p, y in held))
    assert (
        main(["evaluate", str(run), "--data", f"b={tmp_path / 'held.csv'}", "--no-progress"]) == 0
    )
    assert "are the run's validation images, on which best/ was chosen" in capsys.readouterr().err
    record = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert record["samples"] == 4 and list(record["datasets"]) == ["b"]
    # Unnamed, a dataset's classes are not the run's: the error says how to name it.
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--data", b, "--no-progress"])
    assert f"--data NAME=PATH (the run's: a={a}, b={b})" in capsys.readouterr().err
    assert main(["domains", str(run), "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").exists() and (tmp_path / "d.json").exists()


def test_cli_refuses_mismatched_val_and_duplicate_names(two_sets, tmp_path, capsys):
    a, b = two_sets
    args = ["train", *TINY_MODEL, *PGN, *FAST, "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit):
        main([*args, "--data", a, "--data", b])
    assert "both named 'data'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--data", f"a={a}", "--data", f"b={b}", "--val", a])
    assert "one --val each" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


def test_domain_report_separation_and_missing_extra(monkeypatch):
    from fastprompt.train import domains as DM

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    apart = torch.randn(60, 8, generator=g) * 0.1 + 5 * torch.eye(8)[labels]
    acc, chance, held = DM.separation(apart, labels)
    assert acc == 1.0 and chance == pytest.approx(1 / 3) and held == 30
    mixed = torch.randn(60, 8, generator=g)
    acc, _, _ = DM.separation(mixed, labels)
    assert 0.0 <= acc <= 1.0
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"fastprompt\[domains\]"):
        DM.separation(apart, labels)


def test_the_picture_of_a_saturated_generator_is_one_point_not_a_crash():
    """`fastprompt domains --embedding tsne` of a run whose generator saturated (one-hot mixture
    weights, the same for every image) died of a segmentation fault in scikit-learn's t-SNE."""
    pytest.importorskip("sklearn")
    code = (
        "import torch; from fastprompt.train.domains import embed_2d\n"
        "x = torch.zeros(9, 8); x[:, 1] = 1; x[0, 2] = 1e-29\n"
        "for how in ('tsne', 'pca'): assert (embed_2d(x, how) == 0).all()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "every image's features are the same" in done.stderr


# -- synchronised BatchNorm ----------------------------------------------------------------------


def test_recipes_default_to_per_process_batchnorm_and_sync_swaps_the_generator_s():
    import fastprompt
    from fastprompt.train.loop import Trainer

    assert get_recipe("pgn").batch_norm == "per-process"
    torch.manual_seed(0)
    import timm

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    model = fastprompt.pgn(timm.create_model("vit_tiny_patch16_224", **kw), 3, 8, resolution=32)
    keys = set(model.state_dict())
    plain = [m for m in model.source.modules() if isinstance(m, nn.BatchNorm2d)]
    Trainer(model, get_recipe("pgn").override(batch_norm="sync"), progress=False)
    synced = [m for m in model.source.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(synced) == len(plain) > 0 and all(isinstance(m, SyncBatchNorm2d) for m in synced)
    assert set(model.state_dict()) == keys
    assert synced[0].weight is plain[0].weight  # the same tensors: the optimiser still sees them
    vpt = fastprompt.vpt(timm.create_model("vit_tiny_patch16_224", **kw), 2)
    with pytest.raises(ValueError, match="no BatchNorm"):
        Trainer(vpt, get_recipe("vpt").override(batch_norm="sync"), progress=False)


def test_sync_batchnorm_in_one_process_is_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    twin = nn.Sequential(*[m for m in net])  # same layers
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 3, 8, 8)
    y_ref = net(x)
    y_ref.square().sum().backward()
    g_ref = net[0].weight.grad.clone()
    net.load_state_dict(ref)
    net[0].weight.grad = None
    assert sync_batchnorm(twin) == 2 and isinstance(twin[1], SyncBatchNorm2d)
    y = twin(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(net[0].weight.grad, g_ref)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_sync_batchnorm_over_two_processes_is_batchnorm_over_the_global_batch(tmp_path):
    """In float64, so that any difference beyond rounding (~1e-16) is a difference in what is
    computed: each process's outputs and input gradients, the parameter gradients summed over
    processes and the running statistics against one BatchNorm over the whole batch, also for a
    generator given one image per process (a 1x1 last feature map: 2 values per channel)."""
    import torch.multiprocessing as mp

    mp.spawn(sync_bn_worker, (2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    tight = dict(rtol=1e-12, atol=1e-12)
    for name, (net, images) in sync_bn_nets().items():
        y, dx = sync_bn_step(net, images)
        for rank in range(2):
            mine = got[rank][name]
            torch.testing.assert_close(mine["y"], y[rank::2], **tight, msg=name)
            torch.testing.assert_close(mine["dx"], dx[rank::2], **tight, msg=name)
            for key, p in net.named_parameters():
                torch.testing.assert_close(mine["grads"][key], p.grad, **tight, msg=key)
            for key, buf in net.named_buffers():
                torch.testing.assert_close(mine["buffers"][key], buf, **tight, msg=key)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=SLOW), pytest.param(2, marks=SLOW)])
def test_two_processes_with_sync_bn_train_what_one_process_trains(two_sets, tmp_path, seed):
    """With the global batch's statistics, 2 processes × 4 images train what 1 process × 8
    trains: the same 26 images (the last step's 2 are one per process, not dropped), the
    generator's BatchNorm running statistics and every trained tensor."""
    a, b = two_sets
    args = [*TINY_MODEL, *PGN, "--data", f"a={a}", "--data", f"b={b}", "--val-split", "5"]
    args += [*FAST, "--epochs", "1", "--sync-bn", "--train-transform", "pgn-test"]
    # The two differ by float order alone: in float64 they agree to 1e-13 at every step (and
    # test_sync_batchnorm_over_two_processes_is_batchnorm_over_the_global_batch). Two things
    # amplify it past the bound below on some seeds: FAST's lr 0.5, at which this run's loss
    # climbs (1.5 to 7 in 4 steps) and a 4e-7 rounding difference grows tenfold a step; and a
    # 1x1 last feature map (resolution 32), where the last step's BatchNorm over 2 values per
    # channel gives ±1 whatever they are, so its input gradient is a cancellation (seed 5: 1e-5
    # to 9e-4 of the gradient in that step). At lr 0.05 and a 2x2 map (64) the largest
    # difference stays at a few float32 ulps, at most 1/70 of the bound (seeds 0-5).
    args += ["--pgn-resolution", "64", "--lr", "0.05", "--seed", str(seed)]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    torchrun(["train", *args], tmp_path / "two")
    for run in ("one", "two"):
        row = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])
        assert row["train_samples"] == 26, run
    one = load_file(tmp_path / "one" / "last" / "prompts.safetensors")
    two = load_file(tmp_path / "two" / "last" / "prompts.safetensors")
    assert any("running_var" in n for n in one)
    for name in one:
        if name.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_report_is_written_for_pgn_runs_that_leave_the_generator_default(monkeypatch):
    """A Python-API config may omit ``generator`` (the default ResNet-10): still PGN's report."""
    from types import SimpleNamespace

    from fastprompt.train import domains as DM

    calls, lines = [], []
    stub = DM.DomainReport(1.0, 0.5, 2, {"a": 2, "b": 2}, "pca", "x.png", "x.json")
    monkeypatch.setattr(DM, "run_report", lambda run, device="cpu": calls.append(run) or stub)
    M.report_domains("r", SimpleNamespace(method="pgn", method_args={}), lines.append)
    M.report_domains("r", SimpleNamespace(method="pgn", method_args={"generator": None}), print)
    M.report_domains("r", SimpleNamespace(method="vpt", method_args={}), print)
    assert calls == ["r"] and "100.0%" in lines[0]


def test_the_separation_of_a_saturated_generator_is_a_number_not_a_crash():
    """A PGN run whose generator saturated (every image the same mixture weights) finished
    training, then died in its domain report with scikit-learn's "All features have zero
    variance" (NearestCentroid refuses constant features); `fastprompt domains` died the same."""
    pytest.importorskip("sklearn")
    from fastprompt.train import domains as DM

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    same = torch.zeros(10, 6)
    same[:, 2] = 1.0  # one-hot: the same library token for every image
    acc, chance, held = DM.separation(same, labels)
    assert held == 5 and chance == pytest.approx(3 / 5)
    assert acc == pytest.approx(2 / 5)  # every held-out image read as the first dataset


def test_one_dataset_given_twice_under_two_names_is_refused(two_sets, tmp_path):
    """`--data cifar=data/c --data dtd=data/c` (a path typo among several) trained every image as
    two classes, cifar/x and dtd/x, without a word."""
    a, b = two_sets
    link = tmp_path / "same.csv"
    link.symlink_to(a)
    for twice in (a, str(link)):
        with pytest.raises(DataError, match="datasets 'a' and 'c' are given the same data"):
            open_data(DataConfig(train=[f"a={a}", f"b={b}", f"c={twice}"], val_split="4"))
    with pytest.raises(DataError, match="'x' and 'y' are given the same data"):
        open_data(DataConfig(train=["x=digits:0-2", "y=digits:0-2"], val_split="4"))
    assert open_data(DataConfig(train=["x=digits:0-2", "y=digits:3-5"], val_split="4")).classes
    # The same --val for two datasets validated the second on the first's images.
    with pytest.raises(DataError, match=r"--val: datasets 'a' and 'b' are given the same data"):
        open_data(DataConfig(train=[f"a={a}", f"b={b}"], val=[a, a]))


def test_the_cli_refuses_a_dataset_twice_and_num_classes_of_a_mixture_before_any_work(
    two_sets, tmp_path, capsys
):
    a, b = two_sets
    args = ["train", *TINY_MODEL, *PGN, *FAST, "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit):
        main([*args, "--data", f"a={a}", "--data", f"b={a}"])
    assert "datasets 'a' and 'b' are given the same data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--data", f"a={a}", "--data", f"b={b}", "--val", a, "--val", a])
    assert "--val: datasets 'a' and 'b' are given the same data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--data", f"a={a}", "--data", f"b={b}", "--num-classes", "9"])
    assert "--num-classes 9 applies to one --data" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
