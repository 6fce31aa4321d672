"""``fastprompt bench`` end to end on a tiny model, the FLOP handles, ``--compare`` and ``info``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tiny_vit

import fastprompt
from fastprompt.bench import activation_bytes, flops
from fastprompt.cli import main
from fastprompt.measure import _ALLOCATOR_VARS


def _bench(tmp_path, name, *extra):
    out = tmp_path / name
    args = [
        "bench",
        "--quick",
        "--model",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--prompts",
        "4",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    return out


def test_bench_quick_writes_a_valid_report(tmp_path, capsys):
    out = _bench(tmp_path, "a")
    report = json.loads((out / "report.json").read_text())
    assert {"device", "torch", "timm", "triton", "commit", "date"} <= set(report["env"])
    assert report["env"]["cpu_allocator"] == (
        {k: v for k, v in os.environ.items() if k.startswith(_ALLOCATOR_VARS)} or "default"
    )
    variants = [(r["prompts"], r["variant"]) for r in report["rows"]]
    policies = [(4, "fused+mlp"), (4, "fused+block")]
    assert variants == [(0, "prompt-free"), (4, "naive"), (4, "fused"), *policies]
    for row in report["rows"]:
        assert row["train"]["median_s"] > 0 and row["activation_bytes"] > 0
        assert row["peak_bytes"] > 0 and row["peak_of"] == "tensors alive"
        if row["variant"] in ("prompt-free", "naive", "fused"):  # policies change no inference
            assert row["infer"]["median_s"] > 0 and row["gflops"] > 0
    naive, fused = report["rows"][1], report["rows"][2]
    # Each memory policy keeps less than the one before it, for backward and at the peak.
    for key in ("activation_bytes", "peak_bytes"):
        kept = [r[key] for r in report["rows"][2:]]
        assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3, (key, kept)
    for kind in ("infer", "train"):
        assert fused[f"{kind}_vs_naive"] == pytest.approx(
            fused[kind]["median_s"] / naive[kind]["median_s"]
        )
        assert fused[f"{kind}_vs_free"] == pytest.approx(
            fused[kind]["median_s"] / fused[f"{kind}_free_median_s"]
        )
        for row in report["rows"]:  # inclusive quantiles stay inside the measured range
            if kind in row:
                assert row[kind]["p20_s"] <= row[kind]["median_s"] <= row[kind]["p80_s"]
        refs = {"free", "naive"} | ({"frozen"} if kind == "train" else set())
        assert set(fused[f"{kind}_paired"]) == refs and set(naive[f"{kind}_paired"]) == refs - {
            "naive"
        }
        paired = fused[f"{kind}_paired"]["naive"]
        assert paired["p20"] <= paired["median"] <= paired["p80"]
    # Each row was also written as it was final, one JSON line: the prompt-free row last.
    written = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert len(written) == len(report["rows"])
    assert written == report["rows"][1:] + report["rows"][:1]
    md = (out / "report.md").read_text()
    assert "| prompts | variant |" in md
    assert ", CPU allocator " in md
    spread = fused["train_paired"]["frozen"]
    assert f"{fused['train_vs_frozen']:.3f} ({spread['p20']:.2f}–{spread['p80']:.2f})" in md
    for png in ("latency.png", "memory.png", "peak_memory.png"):
        assert (out / png).stat().st_size > 0
    assert "fused" in capsys.readouterr().out


def test_bench_never_replaces_a_persons_files(tmp_path, capsys):
    """A folder holding a report.md (or a figure) bench did not write is refused before any
    measuring; an earlier bench's folder is written again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes")
    args = ["bench", "--quick", "--model", "vit_tiny_patch16_224", "--out", str(mine)]
    assert main(args) == 2
    assert (mine / "report.md").read_text() == "my own notes"
    assert "holds report.md, which fastprompt bench did not write" in capsys.readouterr().err
    (mine / "report.json").write_text('{"env": "prod"}')  # a person's JSON is not bench's
    assert main(args) == 2
    assert (mine / "report.md").read_text() == "my own notes"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "rows.jsonl").write_text('{"id": 1}\n')  # a person's rows are not bench's
    args[-1] = str(theirs)
    assert main(args) == 2
    assert (theirs / "rows.jsonl").read_text() == '{"id": 1}\n'
    assert "holds rows.jsonl, which fastprompt bench did not write" in capsys.readouterr().err
    out = _bench(tmp_path, "again", "--no-train", "--no-memory", "--no-flops")
    _bench(tmp_path, "again", "--no-train", "--no-memory", "--no-flops")
    assert json.loads((out / "report.json").read_text())["rows"]


def test_a_bench_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """Rows are written as they are final: a bench that stops during its second prompt count
    (killed, out of time) leaves the first count's rows; its folder is bench's to write again."""
    real_vpt = fastprompt.vpt

    def vpt(model, prompts, **kw):
        if prompts == 6:
            raise KeyboardInterrupt("cut short")
        return real_vpt(model, prompts, **kw)

    monkeypatch.setattr(fastprompt, "vpt", vpt)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, "cut", "--prompts", "4", "6", "--reps", "1", "--no-train", "--no-flops")
    out = tmp_path / "cut"
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["prompts"], r["variant"]) for r in rows][:2] == [(4, "naive"), (4, "fused")]
    assert {r["prompts"] for r in rows} == {4} and "prompt-free" not in str(rows)
    assert rows[1]["infer_vs_naive"] > 0 and rows[1]["memory_vs_free"] > 0
    assert not (out / "report.json").exists()
    monkeypatch.setattr(fastprompt, "vpt", real_vpt)
    _bench(tmp_path, "cut", "--no-train", "--no-memory", "--no-flops")
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(json.loads((out / "report.json").read_text())["rows"])


def test_a_new_bench_leaves_nothing_of_an_earlier_one_in_its_folder(tmp_path, monkeypatch):
    """An earlier bench's report and figures are removed before a new run measures: a run
    cut short, or one that draws fewer figures, never sits beside the earlier run's files."""
    out = _bench(tmp_path, "r", "--no-train", "--reps", "1")
    assert (out / "memory.png").exists() and (out / "gflops.png").exists()
    real_vpt = fastprompt.vpt

    def vpt(model, prompts, **kw):
        raise KeyboardInterrupt("cut short")

    monkeypatch.setattr(fastprompt, "vpt", vpt)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, "r", "--no-train", "--reps", "1")
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    assert not (out / "memory.png").exists()
    monkeypatch.setattr(fastprompt, "vpt", real_vpt)
    _bench(tmp_path, "r", "--no-train", "--no-memory", "--no-flops", "--reps", "1")
    assert sorted(p.name for p in out.iterdir()) == [
        "latency.png",
        "report.json",
        "report.md",
        "rows.jsonl",
    ]


@pytest.mark.parametrize("fits", [False, True])
def test_bench_refuses_an_out_it_cannot_write_before_measuring(tmp_path, capsys, fits):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "report"
    args = ["bench", "--img-size", "32", "--prompts", "2", "--device", "cpu", "--out", str(out)]
    if fits:
        args += ["--fits", "0.02", "--fits-models", "vit_tiny_patch16_224"]
    else:
        args += ["--model", "vit_tiny_patch16_224", "--quick"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} cannot be written" in err and "nothing was measured" in err
    assert "depth 2" not in err  # --fits says each copy it measures: none was


@pytest.mark.parametrize(
    "args, match",
    [
        (["--prompts", "50", "200"], "--fits takes one prompt count >= 1 (--prompts N)"),
        (["--prompts", "0"], "--fits takes one prompt count >= 1"),
        (["--model", "vit_large_patch16_224"], "--fits does not take --model"),
        (["--dtype", "bfloat16"], "--fits does not take --dtype (it measures fp32)"),
        (["--shallow"], "--fits does not take --shallow"),
        (["--batch", "4"], "--fits does not take --batch"),
        (["--quick"], "--fits does not take --quick"),
        (["--no-train"], "--fits does not take --no-train (it times no step)"),
        (["--no-flops"], "--fits does not take --no-flops"),
        (
            ["--fits-models", "swin_tiny_patch4_window7_224"],
            "is a SwinTransformer, not a ViT with one stack of blocks",
        ),
        (
            ["--fits-models", "vit_tiny_patch16_224", "--img-size", "40"],
            "--img-size 40 is not a multiple of vit_tiny_patch16_224's patch size 16x16",
        ),
    ],
)
def test_bench_fits_refuses_what_it_would_ignore(args, match, capsys, tmp_path):
    """--fits measures fp32 VPT-deep at one prompt count and batches of its own: options that
    set anything else were ignored; they are refused, before anything is measured."""
    if "--fits-models" not in args:  # a tiny model, where they were ignored
        args = [*args, "--fits-models", "vit_tiny_patch16_224", "--img-size", "32"]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--fits", "24", "--device", "cpu", "--out", str(tmp_path / "r"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in err and err.startswith("fastprompt: error: bench: ")
    assert not (tmp_path / "r").exists()


def test_paired_ratios_cancel_drift_between_repetitions():
    from fastprompt.bench import paired_ratios

    slow_down = [1.0, 2.0, 4.0]  # the machine's speed drifts; the variant is always half as fast
    r = paired_ratios([2 * t for t in slow_down], slow_down)
    assert r == {"median": 2.0, "p20": 2.0, "p80": 2.0}
    with pytest.raises(ValueError, match="3 timings against 2"):
        paired_ratios(slow_down, [1.0, 2.0])


def test_bench_compare_sets_two_reports_side_by_side(tmp_path, capsys):
    first = _bench(tmp_path, "a", "--no-memory", "--no-flops", "--no-train")
    second = _bench(
        tmp_path,
        "b",
        "--no-memory",
        "--no-flops",
        "--no-train",
        "--compare",
        str(first / "report.json"),
    )
    text = (second / "report.md").read_text()
    assert "infer ms A | infer ms B | B/A" in text and "| 4 | fused |" in text
    assert "| 4 | fused+" not in text  # memory policies change inference in nothing: no rows
    assert "measured under different settings" not in text
    third = _bench(tmp_path, "c", "--no-memory", "--no-train", "--batch", "3")
    _bench(tmp_path, "d", "--no-memory", "--no-train", "--compare", str(third / "report.json"))
    text = (tmp_path / "d" / "report.md").read_text()
    assert "measured under different settings" in text and "batch 3 (A) vs 2 (B)" in text
    # The header says what the columns are: ratios' direction, what the FLOPs count.
    assert "this row's figure over y's" in text and "one multiply-add is one flop" in text
    # ... and what was measured: the image size --img-size set, the backend.
    assert "batch 2, images 32x32, float32, backend automatic," in text


def test_info_says_why_a_backend_cannot_run(capsys, monkeypatch):
    from fastprompt import backends

    monkeypatch.setattr(
        backends.Backend,
        "status",
        lambda self: None if self.name == "torch" else "switched off",
    )
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for b in backends.BACKENDS:
        assert f"  {b.name}: {b.summary}" in out
    assert out.count("available here: switched off") == len(backends.BACKENDS) - 1
    assert out.count("available here: yes") == 1


def test_summarize_never_extrapolates():
    from fastprompt.bench import summarize

    s = summarize([2.0, 0.1, 4.1])
    assert 0.1 <= s["p20_s"] <= s["median_s"] == 2.0 <= s["p80_s"] <= 4.1


def test_interleaved_timing_rotates_the_order():
    """No variant always follows the same other one (it would inherit its allocator state)."""
    from fastprompt.bench import time_interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(fns, torch.device("cpu"), reps=3, warmup=0)
    assert calls == list("abcbcacab")
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize(
    "args, match",
    [
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--prompts", "-3"], "--prompts must be >= 0"),
        (["--model", "vit_nope"], "'vit_nope' is not a timm model name"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (["--compare", "missing.json"], "--compare missing.json is not a readable report.json"),
        (["--fits", "0"], "--fits takes budgets in GiB > 0, got [0.0]"),
        (["--fits", "24", "--fits-models", "vit_nope"], "--fits-models 'vit_nope' is not a timm"),
        (["--fits-models", "vit_base_patch16_224"], "--fits-models goes with --fits GIB"),
        (["--prompts", "0"], "--prompts needs a count >= 1 to set beside the prompt-free"),
        (["--img-size", "200"], "--img-size 200 is not a multiple of vit_base_patch16_224's"),
        (["--model", "resnet18"], "--model: model must be a timm VisionTransformer"),
    ],
)
def test_bench_validates_before_running(args, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--out", str(tmp_path / "r"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in err and err.startswith("fastprompt: error: bench: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs where CUDA is")
def test_bench_refuses_a_backend_that_cannot_run_before_measuring(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' own: Triton on the CPU
    with pytest.raises(SystemExit):
        main(["bench", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert "--backend triton cannot run on cpu here: no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_fits_writes_the_largest_batches(tmp_path, capsys):
    out = tmp_path / "fits"
    args = ["bench", "--fits", "0.02", "0.05", "--fits-models", "vit_tiny_patch16_224"]
    args += ["--img-size", "32", "--prompts", "2", "--memory", "block", "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 0
    found = json.loads((out / "fits.json").read_text())["fits"]
    variants = ["full fine-tuning", "naive VPT", "fastprompt, block"]
    assert [f["variant"] for f in found] == variants
    for f in found:
        assert f["model"] == "vit_tiny_patch16_224" and set(f["batches"]) == {"0.02", "0.05"}
        assert f["batches"]["0.02"] <= f["batches"]["0.05"]
    table = (out / "fits.md").read_text()
    assert "| vit_tiny_patch16_224 | fastprompt, block |" in table and "estimate" in table
    # What was measured is said: the prompt count in the table and in the JSON.
    assert "2 VPT-deep prompts per block" in table
    config = json.loads((out / "fits.json").read_text())["config"]
    assert config == {
        "models": ["vit_tiny_patch16_224"],
        "budgets_gib": [0.02, 0.05],
        "prompts": 2,
        "img_size": 32,
        "device": "cpu",
    }
    assert "batch in 0.05 GiB" in capsys.readouterr().out


def test_bench_refuses_an_out_file_and_cuda_without_a_gpu(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["bench", "--out", str(tmp_path / "file")])
    assert "exists and is not a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["bench", "--device", "cuda", "--out", str(tmp_path / "r")])
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_flop_handles_match_hand_counts():
    """fvcore convention (1 multiply-add = 1 flop). Tiny ViT: 17 tokens, D=64, 3 blocks."""
    model = tiny_vit(num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    n, d, depth, patches, patch_dim = 17, 64, 3, 16, 3 * 8 * 8
    linear = depth * (n * d * 3 * d + n * d * d + 2 * n * d * 4 * d)
    attention = depth * 2 * n * n * d
    norms = (2 * depth + 1) * n * d * 5  # fvcore counts LayerNorm as 5 flops per element
    expected = linear + attention + patches * patch_dim * d + d * 5 + norms
    assert abs(flops(model, x) * 1e9 - expected) / expected < 1e-6
    prompted = fastprompt.vpt(model, 7, impl="naive").eval()
    m = n + 7
    expected_naive = (
        expected
        - linear
        - attention
        - norms
        + depth * (m * d * 3 * d + m * d * d + 2 * m * d * 4 * d + 2 * m * m * d)
        + (2 * depth + 1) * m * d * 5
    )
    assert abs(flops(prompted, x) * 1e9 - expected_naive) / expected_naive < 1e-6
    prompted.impl = "fused"
    # Fused at inference: image rows only, attending to 7 extra keys; prompt K/V are cached.
    expected_fused = expected + depth * 2 * n * 7 * d
    assert abs(flops(prompted, x) * 1e9 - expected_fused) / expected_fused < 1e-6


def test_activation_bytes_counts_storages_once():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    # mm saves x for w's grad; w itself is excluded as a parameter.
    assert activation_bytes(lambda: (x @ w).sum(), [w]) == x.numel() * 4


@pytest.mark.slow
def test_naive_vpt_reproduces_the_papers_gflops():
    """Prompt Condensation's table for ViT-B/16: 17.6/22.2/26.9/31.8/36.7 GFLOPs, within 2 %."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    for prompts, paper in zip((0, 50, 100, 150, 200), (17.6, 22.2, 26.9, 31.8, 36.7)):
        prompted = fastprompt.vpt(model, prompts, impl="naive").eval()
        assert abs(flops(prompted, x) - paper) / paper < 0.02, prompts
        prompted.unwrap()


def test_a_malformed_variable_is_refused_before_any_work(capsys, monkeypatch):
    """A bad FASTPROMPT_PROBE used to surface as a traceback at the first op call, after the
    command had started its work (bench: building models)."""
    import fastprompt.cli as cli

    def ran(_args):
        raise AssertionError("bench ran despite the bad variable")

    monkeypatch.setattr(cli, "_bench", ran)
    monkeypatch.setenv("FASTPROMPT_PROBE", "sometimes")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--quick"])
    assert exit_.value.code == 2
    assert "bench: FASTPROMPT_PROBE='sometimes' is not one of" in capsys.readouterr().err
    monkeypatch.delenv("FASTPROMPT_PROBE")
    monkeypatch.setenv("FASTPROMPT_BACKEND", "fast")
    with pytest.raises(SystemExit):
        main(["bench", "--quick"])
    assert "bench: FASTPROMPT_BACKEND='fast' does not exist" in capsys.readouterr().err
