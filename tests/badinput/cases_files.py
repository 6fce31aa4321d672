"""Typed recipe fields and damaged or mismatched files: one clear error naming the argument or
the file, before anything is written (issue 23, unclear errors)."""

from __future__ import annotations

import json
import os
import shutil

from fixtures import TRAIN, edit_metadata, flip_byte, tiny_vit, truncate
from harness import Case, Workspace

NEW = ["--data", "{fx}/data.csv", "--val", "{fx}/data.csv", "--prompts", "2", "--epochs", "1"]
RESUME = ["train", "--resume", "{case}/vpt", "--no-progress", "--quiet"]
EVALUATE = ["evaluate", "{case}/vpt", "--no-progress"]
RUN_OWNS = ["vpt/.fastprompt-lock"]


def _new(*extra: str) -> list[str]:
    return [*TRAIN, *NEW, *extra, "--out", "{case}/r"]


def _weights(path: str) -> list[str]:
    """A new run on ``--weights path`` (which --no-pretrained contradicts)."""
    return [a for a in _new("--weights", path) if a != "--no-pretrained"]


def _run_with(change):
    """Setup: a copy of the fixture VPT run, then ``change(ws, run)``."""

    def setup(ws: Workspace) -> None:
        change(ws, ws.copy("vpt"))

    return setup


def _weights_of_another_model(ws: Workspace) -> None:
    import torch

    torch.save(tiny_vit(embed_dim=48, depth=3).state_dict(), ws.path("other.pth"))


def _weights_safetensors_cut(ws: Workspace) -> None:
    from safetensors.torch import save_file

    save_file(tiny_vit().state_dict(), ws.path("w.safetensors"))
    truncate(ws.path("w.safetensors"))


def _format1(ws: Workspace, run: str, config) -> None:
    """best/ as format 1 wrote it: no description in the safetensors file, config.json only."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(run, "best", "prompts.safetensors")
    save_file(load_file(file), file)
    with open(os.path.join(run, "best", "config.json"), "w") as f:
        f.write(config)


def _drop_run_config(ws: Workspace, run: str) -> None:
    path = os.path.join(run, "run.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["config"]
    with open(path, "w") as f:
        json.dump(saved, f)


def _best_of_another_run(ws: Workspace, run: str) -> None:
    shutil.rmtree(os.path.join(run, "best"))
    shutil.copytree(os.path.join(ws.fx, "digits59", "best"), os.path.join(run, "best"))


def _cut_without_checksum(ws: Workspace, run: str) -> None:
    """trainer.pt cut short in a run written before checksums (no trainer.pt.sha256)."""
    truncate(os.path.join(run, "last", "trainer.pt"))
    digest = os.path.join(run, "last", "trainer.pt.sha256")
    if os.path.exists(digest):
        os.remove(digest)


def _load_best(ws: Workspace, model=None, folder: str = "vpt", path: str | None = None):
    import fastprompt

    return fastprompt.load_prompts(model or tiny_vit(), path or ws.path(folder, "best"))


def _multitask(ws: Workspace):
    import fastprompt

    return fastprompt.multitask({"a": ws.path("vpt"), "b": ws.path("vpt")})


def _pgn_unknown_field(ws: Workspace) -> None:
    run = ws.copy("pgn")
    edit_metadata(os.path.join(run, "best"), lambda c: c["config"].update(foo=1))


CASES = [
    Case(
        "set-epochs-not-a-number",
        argv=_new("--set", "epochs=abc"),
        error=r"--set epochs=abc: epochs must be an int, got 'abc'",
    ),
    Case(
        "set-crop-pct-not-a-number",
        argv=_new("--set", "crop_pct=abc"),
        error=r"--set crop_pct=abc: crop_pct must be a finite number, got 'abc'",
    ),
    Case(
        "set-lr-nan",
        argv=_new("--set", "lr=nan"),
        error=r"--set lr=nan: lr must be a finite number or none",
    ),
    Case(
        "set-no-decay-typo",
        argv=_new("--set", "no_decay=head.bais"),
        error=r"no_decay names 'head.bais', which is not a trainable tensor .*"
        r"closest: \['head.bias'",
    ),
    Case(
        "set-unknown-field",
        argv=_new("--set", "lrr=1"),
        error=r"unknown fields \['lrr'\] \(did you mean 'lr'\?\)",
    ),
    Case(
        "weights-a-text-file",
        argv=_weights("{fx}/data.csv"),
        error=r"is not a PyTorch checkpoint",
        names=["--weights {fx}/data.csv"],
    ),
    Case(
        "weights-of-another-model",
        argv=_weights("{case}/other.pth"),
        setup=_weights_of_another_model,
        error=r"is not a state dict of vit_tiny_patch16_224 .*shapes differ",
        names=["--weights {case}/other.pth"],
    ),
    Case(
        "weights-truncated-safetensors",
        argv=_weights("{case}/w.safetensors"),
        setup=_weights_safetensors_cut,
        error=r"is truncated: \d+ bytes, but its tensors need \d+",
        names=["--weights {case}/w.safetensors"],
    ),
    Case(
        "resume-run-json-truncated",
        argv=RESUME,
        setup=_run_with(lambda ws, run: truncate(os.path.join(run, "run.json"))),
        error=r"run.json is not valid JSON .*damaged or cut short",
        names=["{case}/vpt/run.json"],
    ),
    Case(
        "resume-run-json-missing-config",
        argv=RESUME,
        setup=_run_with(_drop_run_config),
        error=r"lacks \['config'\]",
        names=["{case}/vpt/run.json"],
    ),
    Case(
        "resume-trainer-state-missing",
        argv=RESUME,
        setup=_run_with(lambda ws, run: os.remove(os.path.join(run, "last", "trainer.pt"))),
        error=r"trainer.pt is missing, so the run cannot continue",
        names=["{case}/vpt/last/trainer.pt"],
        writes=RUN_OWNS,
    ),
    Case(
        "resume-trainer-state-truncated",
        argv=RESUME,
        setup=_run_with(lambda ws, run: truncate(os.path.join(run, "last", "trainer.pt"))),
        error=r"trainer.pt is damaged: it does not match the checksum",
        names=["{case}/vpt/last/trainer.pt"],
        writes=RUN_OWNS,
    ),
    Case(
        "resume-trainer-state-truncated-without-checksum",
        argv=RESUME,
        setup=_run_with(_cut_without_checksum),
        error=r"trainer.pt is truncated \(\d+ bytes, its archive has no end\)",
        names=["{case}/vpt/last/trainer.pt"],
        writes=RUN_OWNS,
    ),
    Case(
        "resume-trainer-state-flipped-byte",
        argv=RESUME,
        setup=_run_with(lambda ws, run: flip_byte(os.path.join(run, "last", "trainer.pt"), 900)),
        error=r"is damaged: it does not match the checksum",
        names=["{case}/vpt/last/trainer.pt"],
        writes=RUN_OWNS,
    ),
    Case(
        "evaluate-prompts-truncated",
        argv=EVALUATE,
        setup=_run_with(lambda ws, run: truncate(os.path.join(run, "best", "prompts.safetensors"))),
        error=r"is truncated: \d+ bytes",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "evaluate-prompts-empty",
        argv=EVALUATE,
        setup=_run_with(
            lambda ws, run: truncate(os.path.join(run, "best", "prompts.safetensors"), 0)
        ),
        error=r"is empty \(0 bytes\)",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "evaluate-prompts-not-safetensors",
        argv=EVALUATE,
        setup=_run_with(
            lambda ws, run: open(os.path.join(run, "best", "prompts.safetensors"), "w").write(
                "these are not the tensors you are looking for\n" * 4
            )
        ),
        error=r"is not a safetensors file",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "evaluate-prompts-flipped-byte",
        argv=EVALUATE,
        setup=_run_with(
            lambda ws, run: flip_byte(os.path.join(run, "best", "prompts.safetensors"))
        ),
        error=r"is damaged: its tensor data does not match the checksum",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "multitask-run-with-a-flipped-byte",
        call=_multitask,
        setup=_run_with(
            lambda ws, run: flip_byte(os.path.join(run, "best", "prompts.safetensors"))
        ),
        error=r"is damaged: its tensor data does not match the checksum",
        exc="RunError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "evaluate-checkpoint-of-another-run",
        argv=EVALUATE,
        setup=_run_with(_best_of_another_run),
        error=r"holds a checkpoint for classes \['5', '6'.*was it copied from another run\?",
        names=["{case}/vpt/best"],
    ),
    Case(
        "load-config-missing-model",
        call=_load_best,
        setup=_run_with(lambda ws, run: edit_metadata(f"{run}/best", lambda c: c.pop("model"))),
        error=r"its config lacks \['model'\]; was it edited by hand\?",
        exc="CheckpointError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "load-config-missing-config",
        call=_load_best,
        setup=_run_with(lambda ws, run: edit_metadata(f"{run}/best", lambda c: c.pop("config"))),
        error=r"its config lacks \['config'\]",
        exc="CheckpointError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "load-config-missing-a-vpt-field",
        call=_load_best,
        setup=_run_with(
            lambda ws, run: edit_metadata(f"{run}/best", lambda c: c["config"].pop("num_prompts"))
        ),
        error=r"num_prompts",
        exc="CheckpointError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "load-format1-config-without-vpt",
        call=_load_best,
        setup=_run_with(lambda ws, run: _format1(ws, run, '{"format": "fastprompt.prompts/1"}')),
        error=r"its config lacks 'vpt' \(format 1\)",
        exc="CheckpointError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "load-format1-config-not-json",
        call=_load_best,
        setup=_run_with(lambda ws, run: _format1(ws, run, '{"format": "fastprompt.prom')),
        error=r"config.json is not valid JSON",
        exc="CheckpointError",
        names=["{case}/vpt/best/config.json"],
    ),
    Case(
        "load-pgn-unknown-field",
        call=lambda ws: _load_best(ws, folder="pgn"),
        setup=_pgn_unknown_field,
        error=r"prompts.safetensors: unknown PGN config fields \['foo'\]",
        exc="CheckpointError",
        names=["{case}/pgn/best/prompts.safetensors"],
    ),
    Case(
        "load-into-another-model-shape",
        call=lambda ws: _load_best(ws, tiny_vit(depth=3)),
        setup=lambda ws: ws.copy("vpt"),
        error=r"was saved from another model shape",
        exc="CheckpointError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "load-into-another-class-count",
        call=lambda ws: _load_best(ws, tiny_vit(num_classes=5)),
        setup=lambda ws: ws.copy("vpt"),
        error=r"was trained for 3 classes \(\['0', '1', '2'\]\), but the model's head has 5",
        exc="CheckpointError",
        names=["{case}/vpt/best/prompts.safetensors"],
    ),
    Case(
        "load-a-text-file-as-official-vpt",
        call=lambda ws: _load_best(ws, path=os.path.join(ws.fx, "data.csv")),
        error=r"is not a PyTorch checkpoint",
        exc="CheckpointError",
        names=["{fx}/data.csv"],
    ),
]
