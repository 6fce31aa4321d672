"""Data: class maps that travel with the run, labels read as what they are, splits that stay
(issue 23, silently wrong)."""

from __future__ import annotations

import json
import os
import shutil

from fixtures import TRAIN, image_folder, write_images
from harness import Case, Workspace, equals

RUN = ["--prompts", "2", "--epochs", "1"]


def _open(spec: str, part: str = "train"):
    from fastprompt.train import data as D

    return D.open_dataset(spec, part)


# -- class maps ----------------------------------------------------------------------------------


def _val_lacks_a_class(ws: Workspace) -> None:
    image_folder(ws.path("data", "train"), {"a": 4, "b": 4, "c": 4})
    image_folder(ws.path("data", "val"), {"b": 2, "c": 2})


def _val_labelled_by_name(ws: Workspace, _) -> None:
    with open(ws.path("run", "split.json")) as f:
        split = json.load(f)
    assert split["classes"] == ["a", "b", "c"], split["classes"]
    for sid, label in zip(split["val"]["ids"], split["val"]["labels"], strict=True):
        assert sid.split(os.sep)[0] == split["classes"][label], (sid, label)
    with open(ws.path("run", "run.json")) as f:
        assert json.load(f)["classes"] == ["a", "b", "c"]


def _evaluate(ws: Workspace, run: str, data: str) -> dict:
    from fastprompt.cli import main

    assert main(["evaluate", run, "--data", data, "--no-progress"]) == 0
    with open(os.path.join(run, "evaluations.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def _evaluate_reordered(ws: Workspace) -> dict:
    run = ws.copy("digits59")
    return {spec: _evaluate(ws, run, spec) for spec in ("digits:5-9", "digits:9,8,7,6,5")}


def _same_top1(ws: Workspace, got: dict) -> None:
    a, b = got["digits:5-9"], got["digits:9,8,7,6,5"]
    assert a["samples"] == b["samples"] and a["top1"] == b["top1"], (a, b)


def _evaluate_subset(ws: Workspace) -> dict:
    """``evaluate`` on digits:6-9, and the same accuracy computed here by hand."""
    import torch

    from fastprompt.train import data as D
    from fastprompt.train.run import load_run_model, read_run, transforms_for

    run = ws.copy("digits59")
    got = _evaluate(ws, run, "digits:6-9")
    config, _ = read_run(run)
    model = load_run_model(run)
    _, tf, _ = transforms_for(model.model, config.recipe)
    test = D.Digits([6, 7, 8, 9], "test")
    right = 0
    with torch.no_grad():
        for image, label in test:
            right += int(model(tf(image)[None]).argmax(-1).item() == label + 1)  # "6" is index 1
    return {"cli": got["top1"], "by_hand": right / len(test), "samples": got["samples"]}


def _subset_right(ws: Workspace, got: dict) -> None:
    assert abs(got["cli"] - got["by_hand"]) < 1e-9, got


# -- list labels ---------------------------------------------------------------------------------


def _csv(ws: Workspace, labels: list[str], name: str = "data.csv", bom: bool = False) -> str:
    rows = write_images(ws.path("img"), len(labels), 1)
    text = "path,label\n" + "".join(f"{p},{y}\n" for (p, _), y in zip(rows, labels, strict=True))
    with open(ws.path(name), "w", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write(text)
    return ws.path(name)


def _labels_of(ws: Workspace):
    ds = _open(ws.path("data.csv"))
    return ds.classes, [y for _, y in ds.samples]


def _int_labels(ws: Workspace, got) -> None:
    assert got == (["0", "1", "2"], [0, 1, 2, 0, 1, 2]), got


def _numeric_order(ws: Workspace, got) -> None:
    classes, labels = got
    assert classes == [str(i) for i in range(12)], classes
    assert labels == [*range(12), 3], labels


def _first_image(ws: Workspace):
    image, label = _open(ws.path("data.csv"))[0]
    return image.size, label


# -- one class, empty class ----------------------------------------------------------------------


def _one_class(ws: Workspace) -> None:
    image_folder(ws.path("data"), {"only": 6})


def _empty_class(ws: Workspace) -> None:
    image_folder(ws.path("data"), {"a": 3, "b": 3})
    os.makedirs(ws.path("data", "c_empty"))


# -- --out inside --data, splits that stay -------------------------------------------------------


def _out_inside_data(ws: Workspace):
    from fastprompt.cli import main

    data, run = ws.path("data"), ws.path("data", "run")
    args = [*TRAIN, "--data", data, "--val-split", "0.25", "--prompts", "2", "--epochs", "2"]
    assert main([*args, "--stop-after", "1", "--out", run]) == 0
    assert main(["train", "--resume", run, "--no-progress", "--quiet"]) == 0
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)["classes"]


def _stopped_split_run(ws: Workspace) -> None:
    from fastprompt.cli import main

    image_folder(ws.path("data"), {"a": 20, "b": 20})
    args = [*TRAIN, "--data", ws.path("data"), "--val-split", "0.25", "--prompts", "2"]
    assert main([*args, "--epochs", "2", "--stop-after", "1", "--out", ws.path("run")]) == 0
    if os.path.exists(ws.path("run", "split.json")):
        shutil.copy(ws.path("run", "split.json"), ws.path("split-before.json"))


def _add_an_image(ws: Workspace) -> None:
    _stopped_split_run(ws)
    shutil.copy(ws.path("data", "a", "0.png"), ws.path("data", "a", "added.png"))


def _split_kept(ws: Workspace, _) -> None:
    with open(ws.path("run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["train_samples"] for r in rows] == [30, 30], rows
    with open(ws.path("run", "log.txt")) as f:
        assert "1 image(s) in the data are not in the run's split" in f.read()
    with open(ws.path("split-before.json")) as f, open(ws.path("run", "split.json")) as g:
        assert json.load(f) == json.load(g)


def _remove_an_image(ws: Workspace) -> None:
    _stopped_split_run(ws)
    os.remove(ws.path("data", "a", "0.png"))


def _relabel_a_row(ws: Workspace) -> None:
    from fastprompt.cli import main

    path = _csv(ws, ["0", "1", "2"] * 4)
    args = [*TRAIN, "--data", path, "--val-split", "0.25", "--prompts", "2", "--epochs", "2"]
    assert main([*args, "--stop-after", "1", "--out", ws.path("run")]) == 0
    with open(path) as f:
        lines = f.read().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",1"  # img/0.png: class 0 -> 1
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


CASES = [
    Case(
        "imagefolder-val-lacks-a-class",
        argv=[*TRAIN, "--data", "{case}/data", *RUN, "--out", "{case}/run"],
        setup=_val_lacks_a_class,
        writes=["run", "run/*", "run/*/*"],
        check=_val_labelled_by_name,
    ),
    Case(
        "imagefolder-val-has-an-unseen-class",
        argv=[*TRAIN, "--data", "{case}/data", *RUN, "--out", "{case}/run"],
        setup=lambda ws: (
            image_folder(ws.path("data", "train"), {"a": 3, "b": 3}),
            image_folder(ws.path("data", "val"), {"a": 2, "zebra": 2}),
        ),
        error=r"1 class\(es\) the run was not trained on: \['zebra'\]",
        names=["{case}/data"],
    ),
    Case(
        "evaluate-digits0-4-on-a-digits5-9-run",
        argv=["evaluate", "{fx}/digits59", "--data", "digits:0-4", "--no-progress"],
        error=r"5 class\(es\) the run was not trained on: \['0', '1', '2', '3', '4'\]",
        names=["--data digits:0-4"],
    ),
    Case(
        "evaluate-digits-in-another-order",
        call=_evaluate_reordered,
        writes=["digits59", "digits59/*", "digits59/*/*"],
        check=_same_top1,
    ),
    Case(
        "evaluate-digits-subset",
        call=_evaluate_subset,
        writes=["digits59", "digits59/*", "digits59/*/*"],
        check=_subset_right,
    ),
    Case(
        "csv-label-1.0-is-an-integer",
        setup=lambda ws: _csv(ws, ["0", "1", "2", "0", "1.0", "2"]),
        call=_labels_of,
        check=_int_labels,
    ),
    Case(
        "csv-labels-sort-as-numbers",
        setup=lambda ws: _csv(ws, [str(i) for i in range(12)] + ["3.0"]),
        call=_labels_of,
        check=_numeric_order,
    ),
    Case(
        "csv-with-a-byte-order-mark",
        setup=lambda ws: _csv(ws, ["0", "1", "0", "1"], bom=True),
        call=_first_image,
        check=equals(((12, 12), 0)),
    ),
    Case(
        "imagefolder-one-class",
        argv=[*TRAIN, "--data", "{case}/data", "--val-split", "0.5", *RUN, "--out", "{case}/r"],
        setup=_one_class,
        error=r"holds one class only \('only'",
        names=["--data {case}/data"],
    ),
    Case(
        "imagefolder-empty-class-folder",
        argv=[*TRAIN, "--data", "{case}/data", "--val-split", "0.5", *RUN, "--out", "{case}/r"],
        setup=_empty_class,
        error=r"the class folder .* holds no images",
        names=["{case}/data/c_empty"],
    ),
    Case(
        "out-inside-data",
        setup=lambda ws: image_folder(ws.path("data"), {"a": 6, "b": 6}),
        call=_out_inside_data,
        writes=["data/run", "data/run/*", "data/run/*/*"],
        check=equals(["a", "b"]),
    ),
    Case(
        "val-split-resume-after-adding-an-image",
        argv=["train", "--resume", "{case}/run", "--no-progress", "--quiet"],
        setup=_add_an_image,
        writes=["run/*", "run/*/*"],
        check=_split_kept,
    ),
    Case(
        "resume-after-an-image-is-gone",
        argv=["train", "--resume", "{case}/run", "--no-progress", "--quiet"],
        setup=_remove_an_image,
        error=r"1 of the run's \d+ images are gone from --data .*\(first: a/0.png\); the run "
        r"continues only on the data it began with",
        names=["--data {case}/data"],
    ),
    Case(
        "resume-after-a-row-is-relabelled",
        argv=["train", "--resume", "{case}/run", "--no-progress", "--quiet"],
        setup=_relabel_a_row,
        error=r"the image img/0.png was class '0' when the run began and is '1' now",
        names=["{case}/data.csv"],
    ),
    Case(
        "model-args-not-a-number",
        argv=[
            "train",
            "--model",
            "vit_tiny_patch16_224",
            "--model-args",
            "img_size=16",
            "depth=abc",
            "--no-pretrained",
            "--data",
            "{fx}/data.csv",
            "--val-split",
            "0.5",
            "--prompts",
            "2",
            "--out",
            "{case}/r",
        ],
        error=r"--model-args depth='abc': timm's vit_tiny_patch16_224 does not take it",
    ),
    Case(
        "model-args-a-python-tuple",
        argv=[
            "train",
            "--model",
            "vit_tiny_patch16_224",
            "--model-args",
            "img_size=(16,16)",
            "--no-pretrained",
            "--data",
            "{fx}/data.csv",
            "--val-split",
            "0.5",
            "--prompts",
            "2",
            "--out",
            "{case}/r",
        ],
        error=r"read as the string '\(16,16\)': values are JSON, a list as \[2, 2, 2\]",
    ),
    Case(
        "model-args-a-bare-comma-list",  # depths=2,2 for a Swin: timm's TypeError alone
        argv=[
            "train",
            "--model",
            "vit_tiny_patch16_224",
            "--model-args",
            "img_size=16,16",
            "--no-pretrained",
            "--data",
            "{fx}/data.csv",
            "--val-split",
            "0.5",
            "--prompts",
            "2",
            "--out",
            "{case}/r",
        ],
        error=r"read as the string '16,16': values are JSON, a list as \[2, 2, 2\]",
    ),
    Case(
        "memory-policy-the-backbone-does-not-offer",
        argv=[
            "train",
            "--model",
            "swin_tiny_patch4_window7_224",
            "--model-args",
            "img_size=16",
            "patch_size=2",
            "window_size=4",
            "embed_dim=16",
            "depths=[2,2]",
            "num_heads=[2,2]",
            "--no-pretrained",
            "--data",
            "{fx}/data.csv",
            "--val-split",
            "0.5",
            "--prompts",
            "2",
            "--memory",
            "mlp",
            "--out",
            "{case}/r",
        ],
        error=r"memory must be one of \('none', 'block'\) for this model.*got 'mlp'",
    ),
]
