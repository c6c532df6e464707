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
    ("update_step.py", ["--repeats", "abc"], "--repeats: invalid int value: 'abc'"),
    ("update_step.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
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
