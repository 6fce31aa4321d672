"""Runs over several datasets, the domain report and synchronised BatchNorm (issue 21): clear
errors before anything is written."""

from __future__ import annotations

from fixtures import MODEL, image_folder
from harness import Case

RUN = ["--prompts", "2", "--epochs", "1", "--workers", "0", "--quiet", "--out", "{case}/run"]
DATA = ["--data", "a={fx}/data.csv", "--data"]


def _two_folders_named_data(ws) -> None:
    image_folder(ws.path("x", "data"), {"a": 3, "b": 3})
    image_folder(ws.path("y", "data"), {"a": 3, "b": 3})


def _one_without_val(ws) -> None:
    image_folder(ws.path("split", "train"), {"a": 3, "b": 3})
    image_folder(ws.path("split", "val"), {"a": 2, "b": 2})
    image_folder(ws.path("plain"), {"a": 3, "b": 3})


CASES = [
    Case(
        "mixture-two-datasets-with-one-name",
        argv=["train", *MODEL, "--data", "{case}/x/data", "--data", "{case}/y/data", *RUN],
        setup=_two_folders_named_data,
        error=r"two datasets are both named 'data'; name them: --data NAME=PATH",
    ),
    Case(
        "mixture-one-val-for-two-datasets",
        argv=["train", *MODEL, *DATA, "b={fx}/data.csv", "--val", "{fx}/data.csv", *RUN],
        error=r"2 datasets need one --val each",
        names=["--val"],
    ),
    Case(
        "mixture-one-dataset-twice-under-two-names",
        argv=["train", *MODEL, *DATA, "b={fx}/data.csv", *RUN],
        error=r"datasets 'a' and 'b' are given the same data",
        names=["{fx}/data.csv"],
    ),
    Case(
        "mixture-with-num-classes",
        argv=["train", *MODEL, *DATA, "b={case}/x", "--num-classes", "5", *RUN],
        error=r"--num-classes 5 applies to one --data",
        names=["--num-classes"],
    ),
    Case(
        "mixture-second-dataset-missing",
        argv=["train", *MODEL, *DATA, "b={case}/nothing", *RUN],
        error=r"does not exist",
        names=["{case}/nothing"],
    ),
    Case(
        "mixture-one-dataset-without-validation",
        argv=["train", *MODEL, "--data", "s={case}/split", "--data", "p={case}/plain", *RUN],
        setup=_one_without_val,
        error=r"has no validation split",
        names=["{case}/plain"],
    ),
    Case(
        "sync-bn-on-a-model-without-batchnorm",
        argv=[
            "train",
            *MODEL,
            "--data",
            "{fx}/data.csv",
            "--val",
            "{fx}/data.csv",
            "--sync-bn",
            *RUN,
        ],
        error=r"batch_norm='sync', but a 'vpt' model's prompts have no BatchNorm",
    ),
    Case(
        "domains-of-a-one-dataset-run",
        argv=["domains", "{fx}/pgn", "--out", "{case}/d.png"],
        error=r"trained on one dataset",
        names=["{fx}/pgn"],
    ),
    Case(
        "domains-out-not-a-png",
        argv=["domains", "{fx}/pgn", "--out", "{case}/d.jpg"],
        error=r"the report is a PNG",
        names=["--out {case}/d.jpg"],
    ),
]
