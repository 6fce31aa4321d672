"""The ``benchmarks/`` scripts as a user runs them: their ``--out`` folder (the rule ``fastprompt
bench`` follows), their refusals before measuring, and the commit results record. Tiny shapes,
one repetition: nothing here is a timing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The smallest run of bench_op.py: one dtype, one mode, the naive baseline alone.
OP_TINY = ["--tiny", "--impls", "cat_sdpa", "--dtypes", "float32", "--modes", "fwd", "--device"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # A dataclass in the script looks its module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bench_op_run_again_replaces_its_rows(tmp_path):
    """A second run into the same --out holds its own rows only (rows.jsonl was appended to, so
    the report's folder mixed two runs)."""
    op = _script("bench_op")
    out = tmp_path / "op"
    for _ in range(2):
        assert op.main([*OP_TINY, "cpu", "--out", str(out)]) == 0
    rows = (out / "rows.jsonl").read_text().splitlines()
    report = json.loads((out / "report.json").read_text())
    assert len(rows) == len(report["rows"]) == 2  # shared and per-image sets


def test_bench_op_refuses_a_persons_files_and_another_tools_report(tmp_path, capsys):
    op = _script("bench_op")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    err = _refused(op.main, [*OP_TINY, "cpu", "--out", str(mine)], capsys)
    assert "holds report.md, which benchmarks/bench_op.py did not write" in err
    assert (mine / "report.md").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]
    # fastprompt bench's report.json (it holds a config) is not bench_op's to replace.
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "report.json").write_text(json.dumps({"config": {}, "env": {}, "rows": []}))
    err = _refused(op.main, [*OP_TINY, "cpu", "--out", str(bench)], capsys)
    assert "holds report.json, which benchmarks/bench_op.py did not write" in err


def test_a_run_killed_while_writing_leaves_a_folder_the_next_run_takes(tmp_path):
    """A run killed mid-line in rows.jsonl, or mid-write of report.json, left a file that did not
    parse, and every later run refused the folder as not the tool's own."""
    op = _script("bench_op")
    out = tmp_path / "op"
    assert op.main([*OP_TINY, "cpu", "--out", str(out)]) == 0
    row = (out / "rows.jsonl").read_text().splitlines()[0]
    (out / "rows.jsonl").write_text(row + "\n" + row[:20])
    (out / "report.json").write_text((out / "report.json").read_text()[:30])
    assert op.main([*OP_TINY, "cpu", "--out", str(out)]) == 0
    assert len(json.loads((out / "report.json").read_text())["rows"]) == 2


def test_a_broken_line_inside_the_rows_is_not_taken_for_a_cut_short_run(tmp_path, capsys):
    op = _script("bench_op")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "rows.jsonl").write_text("not json\n{}\n")
    err = _refused(op.main, [*OP_TINY, "cpu", "--out", str(mine)], capsys)
    assert "holds rows.jsonl, which benchmarks/bench_op.py did not write" in err


def test_bench_op_with_every_impl_skipped_reports_why(tmp_path):
    """Triton on a CPU is skipped, with the reason (was a ZeroDivisionError after the skip)."""
    op = _script("bench_op")
    argv = ["--tiny", "--impls", "triton", "--dtypes", "float32", "--modes", "fwd"]
    assert op.main([*argv, "--device", "cpu", "--out", str(tmp_path / "op")]) == 0
    rows = json.loads((tmp_path / "op" / "report.json").read_text())["rows"]
    assert rows and all("interpreter" in r["skipped"] for r in rows)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bench_op_refuses_counts_below_one(argv, said, tmp_path, capsys):
    op = _script("bench_op")
    err = _refused(op.main, [*argv, "--device", "cpu", "--out", str(tmp_path / "o")], capsys)
    assert said in err and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
@pytest.mark.parametrize(
    "name, argv",
    [
        ("bench_op", ["--tiny", "--device", "cuda"]),
        ("bench_e2vpt", ["--tiny", "--device", "cuda"]),
        ("bench_multitask", ["--tiny", "--device", "cuda"]),
        ("bench_condensation_latency", ["--device", "cuda"]),
        ("bench_pgn", ["--device", "cuda"]),
        ("bench_train", ["--quick", "--device", "cuda"]),
        ("bench_train_condense", ["--quick", "--device", "cuda"]),
        ("probe_cost", ["--device", "cuda"]),
        ("bench_cpp_cuda", []),
    ],
)
def test_gpu_runs_refuse_clearly_without_a_gpu(name, argv, tmp_path, capsys):
    """One line, before anything is built or measured (was a traceback from torch.cuda)."""
    main = _script(name).main
    err = _refused(main, [*argv, "--out", str(tmp_path / "o")], capsys)
    assert "torch sees no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
@pytest.mark.parametrize("argv", [[], ["flash"], ["--help"]])
def test_int32_offsets_check_refuses_without_a_gpu_not_crashed(argv, capsys):
    """Its children failed to start CUDA and each read as "CRASHED", a kernel fault; --help was
    taken for a kernel name."""
    main = _script("check_int32_offsets").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert "CRASHED" not in captured.out
    if argv == ["--help"]:
        assert e.value.code == 0 and "--tiny" in captured.out
    else:
        assert e.value.code == 2 and "torch sees no CUDA device" in captured.err


@pytest.mark.parametrize(
    "name, argv, said",
    [
        ("bench_condensation_latency", ["--keep", "0"], "--keep takes shares"),
        ("bench_condensation_latency", ["--batch", "0"], "--batch must be >= 1"),
        ("bench_train_condense", ["--quick", "--keep", "1.5"], "--keep takes shares"),
        ("bench_multitask", ["--tiny", "--prompts", "9", "3"], "LOW <= HIGH"),
        ("bench_e2vpt", ["--tiny", "--reps", "0"], "--reps must be >= 1"),
    ],
)
def test_scripts_refuse_bad_counts_before_measuring(name, argv, said, tmp_path, capsys):
    main = _script(name).main
    err = _refused(main, [*argv, "--device", "cpu", "--out", str(tmp_path / "o")], capsys)
    assert said in err


def test_e2vpt_replaces_its_own_report_not_a_persons(tmp_path, capsys):
    e2vpt = _script("bench_e2vpt")
    out = tmp_path / "e"
    e2vpt.main(["--tiny", "--device", "cpu", "--out", str(out)])
    (out / "notes.md").write_text("kept")  # another name: not the script's to remove
    e2vpt.main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["e2vpt.json", "e2vpt.md", "notes.md"]
    (out / "e2vpt.json").write_text('{"mine": 1}')
    err = _refused(e2vpt.main, ["--tiny", "--device", "cpu", "--out", str(out)], capsys)
    assert "which benchmarks/bench_e2vpt.py did not write" in err
    assert (out / "e2vpt.json").read_text() == '{"mine": 1}'


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_recorded_commit_says_when_the_tree_is_dirty(tmp_path):
    from fastprompt.measure import git_commit

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for name in "abcd":
        (repo / f"{name}.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "first")
    sha = _git(repo, "rev-parse", "--short", "HEAD")
    assert git_commit(repo) == sha
    (repo / "results.json").write_text("{}")  # untracked output is not code
    assert git_commit(repo) == sha
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo) == f"{sha}+dirty (a.py)"
    for name in "bcd":
        (repo / f"{name}.py").write_text("x = 2\n")
    assert git_commit(repo) == f"{sha}+dirty (4 paths)"
    (repo / "sub").mkdir()
    assert git_commit(repo / "sub") is None  # not the top of a work tree: not its code
    assert git_commit(tmp_path) is None


def _repo(path: Path) -> str:
    """A git repository at ``path`` with code and a committed result; its short hash."""
    (path / "benchmarks" / "results" / "cpu").mkdir(parents=True)
    _git(path, "init", "-q")
    (path / "a.py").write_text("x = 1\n")
    (path / "benchmarks" / "results" / "cpu" / "report.json").write_text("{}")
    _git(path, "add", ".")
    _git(path, "commit", "-qm", "first")
    return _git(path, "rev-parse", "--short", "HEAD")


def test_rewriting_committed_results_leaves_the_commit_clean(tmp_path):
    """A rerun into a committed results folder removes its files before measuring (most scripts
    record the commit after that): the figures said +dirty on unchanged code."""
    from fastprompt.measure import git_commit

    sha = _repo(tmp_path)
    (tmp_path / "benchmarks" / "results" / "cpu" / "report.json").unlink()
    assert git_commit(tmp_path) == sha
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{sha}+dirty (a.py)"


def test_recorded_commit_of_a_checkout_whose_path_has_a_space(tmp_path):
    """Such a checkout recorded no commit at all."""
    from fastprompt.measure import git_commit

    repo = tmp_path / "my checkout"
    repo.mkdir()
    sha = _repo(repo)
    assert git_commit(repo) == sha


def test_recording_the_commit_does_not_write_the_index(tmp_path):
    """git status refreshed the checkout's index (taking its lock) when a file's timestamp
    changed: a benchmark starting beside a git commit could make it fail."""
    import os

    from fastprompt.measure import git_commit

    sha = _repo(tmp_path)
    index = (tmp_path / ".git" / "index").read_bytes()
    os.utime(tmp_path / "a.py", (1, 1))  # same content, other stat
    assert git_commit(tmp_path) == sha
    assert (tmp_path / ".git" / "index").read_bytes() == index


def test_environment_records_the_commit_with_its_state():
    from fastprompt.measure import environment, git_commit

    assert environment(torch.device("cpu"))["commit"] == git_commit()


def test_gpu_validate_refuses_a_step_it_does_not_have(tmp_path, capsys):
    """An unknown --steps name ran nothing and wrote an empty summary, as if validated."""
    main = _script("gpu_validate").main
    argv = ["--dry-run", "--steps", "op", "bogus", "--out", str(tmp_path / "v")]
    err = _refused(main, argv, capsys)
    assert "--steps takes env, precompile" in err and "got bogus" in err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "name, folder",
    [
        ("bench_condensation_latency", "cpu-2core/condensation"),
        ("bench_e2vpt", "cpu-2core/e2vpt_inference"),
        ("bench_multitask", "cpu-2core/multitask"),
        ("bench_pgn", "cpu-2core/pgn"),
        ("pgn_inversion_report", "cpu-2core/pgn"),
        ("bench_prompt_attention_cpu", "cpu-2core/prompt_attention_cpu"),
        ("bench_op", "cpu-2core/op_cascade"),
        ("bench_train", "cpu-2core/train"),
        ("bench_train_condense", "cpu-2core/train"),
        ("static_report", "static"),
        ("cuda_ptxas_report", "static"),
    ],
)
def test_committed_results_are_their_scripts_to_write_again(name, folder):
    """Each script knows its committed results as its own (rerunning into them replaces them),
    and none takes fastprompt bench's report.json for its own."""
    from fastprompt.outputs import _foreign

    outputs = _script(name).OUTPUTS
    assert _foreign(str(ROOT / "benchmarks" / "results" / folder), outputs) is None
    bench = ROOT / "benchmarks" / "results" / "cpu-2core" / "swin_b_deep50"
    if (bench / outputs.names[0]).exists():
        assert "did not write" in _foreign(str(bench), outputs)


def test_tiny_runs_keep_the_options_given(tmp_path):
    """--tiny fills in what the options do not say (it replaced --prompts, --reps, --batch)."""
    op = _script("bench_op")
    argv = ["--tiny", "--prompts", "2", "--impls", "cat_sdpa", "--dtypes", "float32"]
    op.main(
        [*argv, "--modes", "fwd", "--sets", "shared", "--device", "cpu", "--out", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [r["prompts"] for r in rows] == [2]
    e2vpt = _script("bench_e2vpt")
    e2vpt.main(["--tiny", "--batch", "2", "--reps", "1", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "e2vpt.json").read_text())
    assert report["batch"] == 2
    assert all(r["free"]["reps"] == 1 for r in report["rows"])


@pytest.mark.parametrize("existing", [True, False])
def test_probe_cost_refuses_a_folder_for_out_before_measuring(existing, tmp_path, capsys):
    """An --out ending in a separator was taken and failed only when writing, after measuring."""
    folder = tmp_path / "probe"
    if existing:
        folder.mkdir()
    argv = ["--device", "cpu", "--dtypes", "float32", "--out", f"{folder}{os.sep}"]
    err = _refused(_script("probe_cost").main, argv, capsys)
    assert "is a folder; it names the JSON file to write" in err
    assert folder.exists() == existing


def test_pgn_inversion_report_defaults_to_this_machines_cpu_folder(tmp_path, monkeypatch):
    """It wrote into cpu-2core on any machine, where bench_prompt_attention_cpu.py uses the
    machine's core count: one rule for both."""
    from fastprompt.outputs import cpu_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert cpu_folder("pgn") == os.path.join("benchmarks", "results", "cpu-3core", "pgn")
    _script("pgn_inversion_report").main(["--models", "vit_tiny_patch16_224", "--images", "1"])
    assert (tmp_path / cpu_folder("pgn") / "inversion.json").is_file()


def test_compare_cpp_builds_records_the_commit_and_environment(tmp_path, monkeypatch):
    """Its report held the times alone: not which commit or torch measured them."""
    from fastprompt.measure import git_commit

    compare = _script("compare_cpp_builds")
    libs = [tmp_path / "old.so", tmp_path / "new.so"]
    for lib in libs:
        lib.write_text("")

    def child(cmd, **kwargs):  # what a child process prints: its medians in ms
        return subprocess.CompletedProcess(cmd, 0, stdout='{"vit fwd": 1.0}\n', stderr="")

    monkeypatch.setattr(compare.subprocess, "run", child)
    out = tmp_path / "x"
    compare.main([*map(str, libs), "--rounds", "1", "--reps", "1", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["env"]["commit"] == git_commit() and report["env"]["torch"] == torch.__version__
    assert f"commit {git_commit()}" in (out / "report.md").read_text()
    # Its committed results, written before it recorded them, stay its own to write again.
    assert compare.OUTPUTS.is_rows([{"build": "old"}])
    compare.main([*map(str, libs), "--rounds", "1", "--reps", "1", "--out", str(out)])
