"""A script copied into another project without hypermarl_extras.py trains; the features that need
the helper refuse at once, in one line, and write nothing."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args
from test_mamujoco import tiny_argv

TINY = {
    "ippo_hyper_vmas": tiny_args("runs"),
    "mappo_hyper_vmas": tiny_args("runs"),
    "reinforce_matrix_games": ["--num-trials", "40", "--eval-interval", "20"],
    "mappo_hyper_mamujoco": tiny_argv("runs"),
}


def run_alone(name, tmp_path, *argv):
    """The script alone in tmp_path, run there: nothing of the repository is importable."""
    shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, f"{name}.py", *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("name", ["ippo_hyper_vmas", "reinforce_matrix_games"])
def test_a_script_copied_alone_trains(name, tmp_path):
    code, out, err = run_alone(name, tmp_path, *TINY[name])
    assert code == 0, err
    assert "eval" in out and "Traceback" not in err
    assert os.listdir(tmp_path / "runs")  # its TensorBoard run


@pytest.mark.parametrize("name, flag", [("ippo_hyper_vmas", "--save-model"), ("mappo_hyper_vmas", "--eval-only"),
                                        ("mappo_hyper_mamujoco", "--save-model"),
                                        ("mappo_hyper_mamujoco", "--capture-video"),
                                        ("reinforce_matrix_games", "--save-model")])
def test_what_needs_the_helper_is_refused_in_one_line(name, flag, tmp_path):
    code, out, err = run_alone(name, tmp_path, *TINY[name], flag)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {flag}: needs hypermarl_extras.py beside this script"], err
    assert sorted(os.listdir(tmp_path)) == [f"{name}.py"]  # no run folder, no checkpoint
