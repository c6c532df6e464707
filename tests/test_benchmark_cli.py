"""The benchmark scripts follow the repository's bad-input convention: one line, exit 2, no file."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("sps.py", ["--repeats", "0"], "--repeats: must be at least 1, got 0"),
    ("sps.py", ["--iterations", "1"], "--iterations: must be at least 4, got 1"),
    ("sps.py", ["--only", "foo"], "--only: invalid choice: 'foo'"),
    ("sps.py", ["--only", "envs", "--env-counts", "0"], "--env-counts: must be at least 1, got 0"),
    ("sps.py", ["--only", "envs", "--env-counts", "16", "abc"], "--env-counts: invalid int value: 'abc'"),
    ("sps.py", ["--only", "envs", "--env-counts"], "--env-counts: expected at least one argument"),
    ("sps.py", ["--only", "envs", "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    ("sps.py", ["--only", "envs", "--desync", "yes"], "unrecognized arguments: yes"),
    ("update_step.py", ["--repeats", "abc"], "--repeats: invalid int value: 'abc'"),
    ("update_step.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("compare_videos.py", ["--checkpoints", "a.pt", "b.pt", "--labels", "A"], "--labels: one per checkpoint (2), got 1"),
    ("compare_videos.py", ["--checkpoints", "no.pt", "--labels", "A"], "--checkpoints: no such file 'no.pt'"),
    ("compare_videos.py", ["--checkpoints", __file__, "--labels", "A"], "--out: must be a .gif file"),
]


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CASES])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, script, argv, message):
    out = tmp_path / "result.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", script), "--out", str(out)] + argv,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr  # not "error: argument --x"
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("argv, message", [(["--rounds", "0"], "--rounds: must be at least 1, got 0"),
                                           (["--scenario", "football"], "--scenario: invalid choice: 'football' (choose from 'dispersion', 'navigation')")])
def test_distributions_cost_bad_flag_is_one_line_exit_2(tmp_path, argv, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "distributions_cost.py")] + argv,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {message}"], result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("out", [True, False], ids=["--out", "default folder"])
def test_sps_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, out):
    argv = ["--only", "envs", "--device", "cuda"] + (["--out", str(tmp_path / "result.md")] if out else [])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "sps.py")] + argv, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == ["error: --device: cuda is not available on this machine"], result.stderr
    assert result.stdout == "" and os.listdir(tmp_path) == []  # neither result.md nor runs/sps_<time>


# ----- outputs: never a committed file by default, and a bad --out fails before any work -----
def run_tool(script, argv, cwd, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", script)] + argv, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def committed_results():
    """Name -> bytes of every file under benchmark/results (the committed results)."""
    results = os.path.join(ROOT, "benchmark", "results")
    return {os.path.join(folder, name): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(results) if "__pycache__" not in folder for name in names}


BAD_OUTS = {"a folder": lambda tmp: str(tmp), "inside a file": lambda tmp: str(tmp / "notes.txt" / "result.md"),
            "not writable": lambda tmp: "/proc/sys/x/result.md"}


@pytest.mark.parametrize("script", ["sps.py", "init_scale.py", "update_step.py"])
@pytest.mark.parametrize("where", sorted(BAD_OUTS))
def test_bad_out_fails_at_once_with_one_line(tmp_path, script, where):
    (tmp_path / "notes.txt").write_text("keep")
    result = run_tool(script, ["--out", BAD_OUTS[where](tmp_path)], tmp_path, timeout=60)  # the benchmarks take minutes
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out: "), result.stderr
    assert result.stdout == "" and os.listdir(tmp_path) == ["notes.txt"]


def test_init_scale_writes_a_new_folder_in_runs_not_the_committed_results(tmp_path):
    before = committed_results()
    for _ in range(2):
        result = run_tool("init_scale.py", ["--seeds", "1", "--n-agents", "2"], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert committed_results() == before
    folders = sorted(os.listdir(tmp_path / "runs"))
    assert len(folders) == 2 and all(f.startswith("init_scale_") for f in folders)  # never reused
    assert all(os.listdir(tmp_path / "runs" / f) == ["init_scale.md"] for f in folders)
    assert os.listdir(tmp_path) == ["runs"]


def test_default_output_folders_are_new_even_within_one_second(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import sps

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sps.time, "strftime", lambda *_: "20260101-000000")
    first, second = sps.new_output_folder("sps"), sps.new_output_folder("sps")
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert sorted(os.listdir(tmp_path / "runs")) == ["sps_20260101-000000", "sps_20260101-000000_1"]
