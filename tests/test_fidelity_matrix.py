"""Fidelity of the matrix games to the paper's Tables 2 and 6 (reinforce_matrix_games.py), and the
sweep that builds those tables (benchmark/matrix_games.py)."""

import json
import os
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

from conftest import HANG, ROOT

import reinforce_matrix_games as mg  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import matrix_games as bench  # noqa: E402

SCRIPT = os.path.join(ROOT, "reinforce_matrix_games.py")
BENCHMARK = os.path.join(ROOT, "benchmark", "matrix_games.py")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one thread, restored after


def make_args(**overrides):
    args = mg.Args(**overrides)
    mg.check_args(args, set(overrides))
    return args


# ----- Table 2, FuPS+ID, Specialisation, n = 8 -----
def test_team_reward_is_the_default_and_only_changes_games_where_payoffs_differ():
    assert mg.Args().reward == "team"
    few = dict(num_trials=300, eval_interval=300)
    for game, n, same in (("synchronisation", 4, True),  # every agent already gets the same payoff
                          ("specialisation", 2, True),  # Table 1: both players get the same payoff
                          ("specialisation", 4, False)):  # 1 / k_i differs between agents
        team = mg.train(game, "fups", n, [1, 2], make_args(**few))
        individual = mg.train(game, "fups", n, [1, 2], make_args(reward="individual", **few))
        assert (team["sampled"] == individual["sampled"] and team["grad_var"] == individual["grad_var"]) == same, (game, n)


def test_fups_with_id_specialisation_n8_matches_table_2_with_the_team_reward():
    # Table 2: 0.53 +- 0.09 over 5 seeds. The team reward (default) gives 0.55 +- 0.15 on seeds 1-5;
    # each agent's own payoff learns faster (0.80 +- 0.19): more than one std from the paper.
    paper_mean, paper_std = 0.53, 0.09
    team = np.array(mg.train("specialisation", "fups", 8, [1, 2, 3, 4, 5], make_args(eval_interval=10_000))["argmax"])
    assert abs(team.mean() - paper_mean) <= max(team.std(), paper_std)
    individual = np.array(mg.train("specialisation", "fups", 8, [1, 2, 3, 4, 5],
                                   make_args(reward="individual", eval_interval=10_000))["argmax"])
    assert abs(individual.mean() - paper_mean) > max(individual.std(), paper_std)


# ----- Synchronisation at n = 8: learned only by chance -----
def test_fups_with_id_argmax_actions_coincide_at_initialisation_in_about_one_seed_in_eight():
    # Table 2's FuPS+ID 0.30 +- 0.35 with Table 6's .1250 +- 0 is one seed in five whose untrained
    # agents' argmax actions happen to coincide: that happens to 13.7% of seeds (1,000 seeds).
    pop = mg.Population("fups", 8, list(range(1, 301)), make_args())
    with torch.no_grad():
        actions = pop.logits().argmax(-1)
    coincide = (actions == actions[:, :1]).all(-1).float().mean().item()
    assert 0.08 < coincide < 0.2, coincide


@pytest.mark.parametrize("seed, learns", [(55, True), (92, True), (1, False)])
def test_fups_without_id_learns_synchronisation_n8_only_after_a_batch_with_an_all_match_trial(seed, learns):
    # Table 6's FuPS .30 +- .35 is one seed in five at 1.0. The gradient is exactly zero until some
    # batch contains a trial where all 8 agents match (then the normalised returns differ), which
    # happens to 5 seeds in 100 (benchmark/results/matrix_games_ablations/sync_n8_100_seeds): seeds 55
    # and 92 are two of them, seed 1 is not.
    out = mg.train("synchronisation", "fups-noid", 8, [seed], make_args(eval_interval=10_000))
    if learns:
        assert out["sampled"][0] > 0.99 and out["grad_var"][0] > 0
    else:
        assert out["sampled"][0] == 0.125 and out["grad_var"][0] == 0.0


# ----- the sweep lives in benchmark/, and the script needs no matplotlib -----
def test_the_script_needs_no_matplotlib(tmp_path):
    assert "matplotlib" not in open(SCRIPT).read()
    blocker = "import sys; sys.modules['matplotlib'] = None; import runpy; sys.argv = ['x'] + sys.argv[1:]; " \
              f"runpy.run_path({SCRIPT!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", blocker, "--num-trials", "50", "--runs-dir", "runs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "specialisation n=2 nops:" in proc.stdout
    proc = subprocess.run([sys.executable, SCRIPT, "--sweep"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 2 and "--sweep" in proc.stderr and proc.stdout == ""


def test_benchmark_sweep_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, BENCHMARK, "--n-agents", "2", "--num-trials", "300", "--num-seeds", "2", "--eval-trials", "200",
         "--out", "res", "--runs-dir", "runs"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "res" / "matrix_games_sweep.md").read_text()
    assert "Generated by `python benchmark/matrix_games.py --n-agents 2 --num-trials 300" in md
    assert "Table 2 (argmax evaluation)" in md and "Table 6 (sampled actions)" in md
    for name in bench.NAMES.values():
        assert f"| {name} |" in md
    assert "(1.00 ± 0.00)" in md and "(0.9996 ± 0.0004)" in md  # paper values beside ours
    assert "| NoPS | 36 (36) |" in md and "Seeds at the optimum" in md  # Table 8: NoPS has 36 parameters at n = 2
    data = json.loads((tmp_path / "res" / "matrix_games_sweep.json").read_text())
    assert len(data["results"]) == 2 * 5 and all(len(r["sampled"]) == 2 for r in data["results"])
    # Theorem B.1's exact expected reward, which the sweep computes: FuPS (no ID) never above 0.75 in Specialisation
    fups = next(r for r in data["results"] if (r["game"], r["hypernet"]) == ("specialisation", "fups-noid"))
    assert len(fups["expected"]) == 2 and max(fups["expected"]) <= 0.75 + 1e-6
    assert (tmp_path / "res" / "matrix_games_n2.png").stat().st_size > 1000
    assert len(os.listdir(tmp_path / "runs")) == 2 * 5 * 2  # one TensorBoard run per game x family x seed
    assert set(os.listdir(tmp_path)) == {"res", "runs"}


def committed_results():
    results = os.path.join(ROOT, "benchmark", "results")
    return {os.path.join(folder, name): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(results) if "__pycache__" not in folder for name in names}


def test_benchmark_default_output_is_a_new_folder_with_the_tensorboard_runs_inside(tmp_path):
    before = committed_results()
    argv = [sys.executable, BENCHMARK, "--games", "specialisation", "--n-agents", "2", "--hypernets", "nops", "fups-noid",
            "--num-trials", "20", "--num-seeds", "2", "--eval-trials", "10"]
    for _ in range(2):
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert committed_results() == before and os.listdir(tmp_path) == ["runs"]
    folders = sorted(os.listdir(tmp_path / "runs"))
    assert len(folders) == 2 and all(folder.startswith("matrix_games_") for folder in folders)  # never reused
    for folder in folders:
        assert sorted(os.listdir(tmp_path / "runs" / folder)) == ["matrix_games_n2.png", "matrix_games_sweep.json",
                                                                 "matrix_games_sweep.md", "runs"]
        assert len(os.listdir(tmp_path / "runs" / folder / "runs")) == 2 * 2  # family x seed
    # progress: configurations done, elapsed time, and an estimate of the rest until the last
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[1/2] ") and "elapsed " in lines[0] and " eta " in lines[0]
    assert lines[1].startswith("[2/2] ") and " eta " not in lines[1]


def test_benchmark_takes_family_flags_when_one_of_its_families_uses_them(tmp_path):
    argv = [sys.executable, BENCHMARK, "--games", "specialisation", "--n-agents", "2", "--hypernets", "nops", "mlp",
            "--hypernet-embedding-dim", "8", "--num-trials", "20", "--num-seeds", "1", "--eval-trials", "10",
            "--out", "res"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "res" / "matrix_games_sweep.json").read_text())
    assert data["args"]["hypernet_embedding_dim"] == 8


def test_benchmark_without_matplotlib_stops_before_the_sweep(tmp_path):
    blocker = "import sys; sys.modules['matplotlib'] = None; import runpy; sys.argv = ['x'] + sys.argv[1:]; " \
              f"runpy.run_path({BENCHMARK!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", blocker, "--n-agents", "2", "--num-trials", "20", "--out", "res"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "matplotlib" in lines[0], proc.stderr
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_benchmark_num_seeds_in_equals_form_is_kept(tmp_path):
    argv = [sys.executable, BENCHMARK, "--games", "specialisation", "--n-agents", "2", "--hypernets", "nops",
            "--num-trials", "20", "--num-seeds=2", "--eval-trials", "10", "--out", "res", "--runs-dir", "tb"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "res" / "matrix_games_sweep.json").read_text())
    assert data["args"]["num_seeds"] == 2 and len(data["results"][0]["sampled"]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["--n-agents", "1"], "--n-agents"),
    (["--out", SCRIPT], "--out"),  # a file, not a folder
    (["--hypernets", "qmix"], "--hypernets"),
    (["--hypernets", "fups-id"], "--hypernets"),
    (["--games", "chess"], "--games"),
    (["--game", "synchronisation"], "--game"),
    (["--hypernet", "mlp"], "--hypernet: the sweep sets it; use --hypernets"),
    (["--num-trials", "0"], "--num-trials"),
    (["--out", os.path.join(SCRIPT, "res")], "--out"),  # inside a file
    (["--out", "/proc/sys/x"], "--out"),  # not writable
    (["--runs-dir", "/proc/sys/x"], "--runs-dir"),
    (["--seed", "-1"], "--seed"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--hypernets", "nops", "fups", "--hypernet-embedding-dim", "8"],
     "--hypernet-embedding-dim: only with --hypernet mlp, got --hypernets nops fups"),
    (["--hypernets", "mlp", "--no-hyper-linear-shared-bias"], "--no-hyper-linear-shared-bias"),
])
def test_benchmark_bad_input_is_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    code, out, err = run_benchmark_in_process(argv, tmp_path, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not lines[0].startswith("error: argument")  # the repository's "error: --flag: ..." form
    assert out == "" and os.listdir(tmp_path) == []


def run_benchmark_in_process(argv, tmp_path, monkeypatch, capsys):
    """(exit status, stdout, stderr) of benchmark/matrix_games.py on bad input argv, run in tmp_path:
    in-process, to spare a Python start per case (test_benchmark_without_matplotlib_... runs the command)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.mark.parametrize("argv, needle", [(["--reward", "mine"], "'mine'"), (["--bogus"], "--bogus"),
                                          (["--methods", "nops"], "--methods")])
def test_benchmark_passes_the_scripts_flags_to_tyro(argv, needle, tmp_path, monkeypatch, capsys):
    # The script's flags are checked as the script checks them: tyro's message, exit 2, nothing written.
    code, out, err = run_benchmark_in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and needle in err and "reinforce_matrix_games.py --help" in err, err
    assert out == "" and os.listdir(tmp_path) == []


def test_benchmark_names_every_family_in_the_papers_order():
    assert list(bench.NAMES) == ["nops", "fups-noid", "fups", "linear", "mlp"]
    assert set(bench.NAMES) == set(typing.get_args(typing.get_type_hints(mg.Args)["hypernet"]))
