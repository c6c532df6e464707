"""benchmark/'s other tools: aggregate.py against hand computations on synthetic summary.json files (no
training); sps, update_step, init_scale, distributions_cost, snd_dataset and compare_videos: their
outputs (never a committed file by default), and bad input as one line, exit status 2, nothing written."""

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import ROOT, committed_results, read_args, run_python, run_tool, tiny_args, vmas_agent

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import aggregate  # noqa: E402

# ===== aggregate.py =====
REPS = 300


def write_summary(folder, grid, task, method, seed, evals, env="vmas", config=None, **extra):
    """A summary.json in launch.py's layout; evals: {step: [episode returns]} (or {step: {metric: [...]}})."""
    steps = {}
    for i, (step, value) in enumerate(sorted(evals.items())):
        metrics = value if isinstance(value, dict) else {"return": value, "snd": [0.5]}
        steps[f"step_{i}"] = {"step_count": step, **metrics}
    last = steps[f"step_{len(evals) - 1}"]
    summary = {"format": "hypermarl-summary/1", "grid": grid, "run_id": f"{grid}-{task}-{method}-s{seed}", "env": env,
               "task": task, "method": method, "seed": seed, "script": "ippo_hyper_vmas.py",
               "argv": ["--hypernet", method, "--seed", str(seed)], "config": config or {"num_envs": "16"},
               "git_commit": "abc123", "git_dirty": False, "total_timesteps": max(evals), "wall_seconds": 1.0,
               "sps": 1000.0, "final_return": float(np.mean(last["return"])), "final_snd": 0.5,
               "gradient": {"actor_var_mean": 1e-4, "actor_norm_mean": 1.0, "interference_mean": 0.1},
               "marl_eval": {env: {task: {method: {f"seed_{seed}": {**steps, "absolute_metrics": {
                   k: v for k, v in last.items() if k != "step_count"}}}}}}, **extra}
    path = folder / summary["run_id"] / "run" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    return path


def cli(*argv):
    return run_python([os.path.join(ROOT, "benchmark", "aggregate.py"), *argv])


class Opts:
    reps, seed, at, window, min_evaluations = REPS, 7, None, 0.1, 3


def hand_bootstrap(x, func, reps, seed):
    """rliable's stratified bootstrap written out: per draw, runs resampled with replacement within each
    task (np.random.choice on numpy's global RNG), then the 2.5 and 97.5 percentiles of func."""
    np.random.seed(seed)
    n, m = x.shape
    values = [func(x[np.random.choice(n, (n, m)), np.arange(m)]) for _ in range(reps)]
    return np.percentile(values, [2.5, 97.5])


def test_iqm_and_ci_match_a_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3))
    iqm, lo, hi = aggregate.iqm_ci(Opts, x)
    assert iqm == pytest.approx(scipy.stats.trim_mean(x.ravel(), 0.25))
    # rliable's definition by hand: drop the lowest and highest quarter (27 / 4 = 6.75 rounds down to 6 per side)
    flat = np.sort(x.ravel())
    assert iqm == pytest.approx(flat[6:-6].mean())
    hand = hand_bootstrap(x, lambda s: scipy.stats.trim_mean(s.ravel(), 0.25), REPS, Opts.seed)
    assert (lo, hi) == pytest.approx(tuple(hand), abs=1e-12)  # the same draws, not just close
    assert lo < iqm < hi


def test_ci_collapses_when_every_run_scores_the_same():
    iqm, lo, hi = aggregate.iqm_ci(Opts, np.full((5, 1), 3.25))
    assert iqm == lo == hi == 3.25


def test_probability_of_improvement_is_the_mann_whitney_count():
    x = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 0.0]])
    y = np.array([[2.0, 5.0], [0.5, 1.0], [3.0, 9.0]])
    p, lo, hi = aggregate.poi_ci(Opts, x, y)
    hand = np.mean([np.mean([(a > b) + 0.5 * (a == b) for a in x[:, t] for b in y[:, t]]) for t in range(2)])
    assert p == pytest.approx(hand)
    assert 0 <= lo <= p <= hi <= 1


def make_grid(tmp_path, budgets_reached=None):
    """figure2-like grid: 2 tasks x 2 methods x 4 seeds; returns {(task, method, seed): final score}."""
    rng = np.random.default_rng(1)
    finals = {}
    for task, offset in (("dispersion-4", 0.0), ("navigation-4-same", 100.0)):
        for method, shift in (("fups", 0.0), ("mlp", 1.0)):
            for seed in (1, 2, 3, 4):
                last = (budgets_reached or {}).get((task, method, seed), 200)
                evals = {step: list(offset + shift + rng.normal(size=3)) for step in range(100, last + 1, 100)}
                write_summary(tmp_path / "grids", "figure2-ippo", task, method, seed, evals)
                finals[task, method, seed] = evals
    return finals


def table_row(text, section, method):
    block = text.split(f"## {section}\n")[1].split("\n## ")[0]
    return next(line for line in block.splitlines() if line.startswith(f"| {method} |"))


def numbers(cell):
    return [float(v.replace(",", "")) for v in re.findall(r"-?[\d,]*\.\d+", cell)]


def test_tables_per_task_and_across_tasks(tmp_path):
    evals = make_grid(tmp_path)
    out = tmp_path / "out"
    done = cli(tmp_path / "grids", "--out", out, "--reps", REPS, "--seed", 7)
    assert done.returncode == 0, done.stderr
    text = (out / "figure2-ippo.md").read_text()
    assert "| 200 steps: IQM [95% CI] |" in text and "200 steps (the last step every run reached)" in text
    assert "Windows: at 200: evaluations from 100 to 200 steps (2 per run)." in text
    for name in ("final", "curves", "profile", "poi"):
        assert (out / f"figure2-ippo_{name}.png").stat().st_size > 1000
    score = {k: np.mean([np.mean(v[100]), np.mean(v[200])]) for k, v in evals.items()}  # both: at least 3 wanted
    x = np.array([score["dispersion-4", "mlp", s] for s in (1, 2, 3, 4)])
    cells = table_row(text, "dispersion-4", "mlp").split("|")
    assert numbers(cells[2])[0] == pytest.approx(scipy.stats.trim_mean(x, 0.25), abs=1e-3)
    assert numbers(cells[3]) == pytest.approx([x.mean(), x.std()], abs=1e-3)
    assert cells[4].strip() == "4"
    # across tasks: min-max per task over all runs of that task, then the IQM over runs x tasks
    tasks = ("dispersion-4", "navigation-4-same")
    norm = {}
    for t in tasks:
        allv = [score[t, m, s] for m in ("fups", "mlp") for s in (1, 2, 3, 4)]
        for m in ("fups", "mlp"):
            norm[t, m] = (np.array([score[t, m, s] for s in (1, 2, 3, 4)]) - min(allv)) / (max(allv) - min(allv))
    for m in ("fups", "mlp"):
        rect = np.stack([norm[t, m] for t in tasks], 1)
        cell = table_row(text, "Across tasks", m).split("|")[2]
        assert numbers(cell)[0] == pytest.approx(scipy.stats.trim_mean(rect.ravel(), 0.25), abs=1e-3)
    # probability of improvement fups over mlp: the Mann-Whitney count per task, averaged
    hand = np.mean([np.mean([(a > b) + 0.5 * (a == b) for a in norm[t, "fups"] for b in norm[t, "mlp"]]) for t in tasks])
    row = next(line for line in text.splitlines() if line.startswith("| fups | mlp |"))
    assert numbers(row.split("|")[3])[0] == pytest.approx(hand, abs=1e-3)
    assert "Table 3a gives each method's SND" in text  # the paper's SND beside ours, per method
    assert table_row(text, "dispersion-4", "mlp").endswith("| 6.3e-04 ± 2.0e-05 |")
    assert table_row(text, "dispersion-4", "fups").endswith("| 2.4e-04 ± 1.1e-04 |")
    assert "num_envs=16" in text and "abc123: 16 runs" in text
    assert "python ippo_hyper_vmas.py --hypernet mlp --seed 3" in text


def test_at_leaves_out_runs_that_did_not_reach_the_budget(tmp_path):
    evals = make_grid(tmp_path, budgets_reached={("dispersion-4", "mlp", 2): 100, ("dispersion-4", "mlp", 4): 100})
    out = tmp_path / "out"
    done = cli(tmp_path / "grids", "--out", out, "--reps", 50, "--at", 100, 200)
    assert done.returncode == 0, done.stderr
    text = (out / "figure2-ippo.md").read_text()
    cells = table_row(text, "dispersion-4", "mlp").split("|")
    assert cells[4].strip() == "4"  # every run reached 100
    assert cells[7].strip() == "2 of 4 (2 did not reach 200)"
    kept = np.array([np.mean([np.mean(evals["dispersion-4", "mlp", s][t]) for t in (100, 200)]) for s in (1, 3)])
    assert numbers(cells[6]) == pytest.approx([kept.mean(), kept.std()], abs=1e-3)
    # the default budget is the last step every run reached: 100 here
    runs = [aggregate.load_run(p) for p in sorted((tmp_path / "grids").rglob("summary.json"))]
    assert aggregate.Grid("figure2-ippo", runs, Opts).budgets == [100]


def test_a_run_trained_to_a_budget_reached_it_though_whole_iterations_stop_short(tmp_path):
    """A 500,000-step run of 2,048-step iterations ends at 499,712: it counts at --at 500000, a run
    trained to 400,000 does not."""
    write_summary(tmp_path, "figure2-ippo", "dispersion-4", "mlp", 1, {499_712: [0.5]}, total_timesteps=500_000)
    write_summary(tmp_path, "figure2-ippo", "dispersion-4", "mlp", 2, {399_360: [0.1]}, total_timesteps=400_000)
    # a run continued to 2M: its 500k evaluation is the first past 500,000 (a straight run's schedule)
    write_summary(tmp_path, "figure2-ippo", "dispersion-4", "mlp", 3, {401_408: [0.2], 501_760: [0.3], 1_998_848: [0.9]},
                  total_timesteps=2_000_000)
    runs = [aggregate.load_run(p) for p in sorted(tmp_path.rglob("summary.json"))]
    assert [aggregate.score(run, 500_000) for run in runs] == [0.5, None, 0.3]
    assert [aggregate.score(run, 2_000_000) for run in runs] == [None, None, 0.9]
    assert [aggregate.score(run, 400_000) for run in runs] == [0.5, 0.1, 0.2]  # final (trained to 400k), first past


def test_a_score_averages_the_window_that_ends_at_the_budget(tmp_path):
    """--window 0.1 --min-evaluations 3 at 1M of a run evaluated every 100k: its last three evaluations up
    to the budget, none after it (the run went on to 2M); a wider fraction takes more."""
    returns = {step: [step / 1e6] for step in range(100_352, 2_000_000, 100_352)}  # the first past each 100k
    write_summary(tmp_path, "figure2-ippo", "dispersion-4", "mlp", 1, returns,
                  total_timesteps=2_000_000)
    run = aggregate.load_run(next(tmp_path.rglob("summary.json")))
    steps = sorted(returns)
    at_1m = steps.index(1_003_520)  # the first evaluation at or after 1M
    assert aggregate.score(run, 1_000_000, fraction=0.1, at_least=3) == pytest.approx(
        np.mean([returns[s][0] for s in steps[at_1m - 2: at_1m + 1]]))
    assert aggregate.score(run, 1_000_000, fraction=0.5, at_least=3) == pytest.approx(
        np.mean([returns[s][0] for s in steps if 500_000 <= s <= 1_003_520]))
    assert aggregate.score(run, 1_000_000) == pytest.approx(1.00352)  # one evaluation: fraction 0, at least 1
    assert [s for s, _ in aggregate.window(run, 300_000, 0.1, 3)] == steps[:3]  # as many as there are


def test_runs_of_one_method_with_other_flags_after_the_double_dash_are_another_method(tmp_path):
    """Two launches of figure17-ippo's mlp, one with `-- --hypernet-separate-embeddings`: one table, two
    methods (the one with the flag named by it), and their probability of improvement; the same run
    twice with the same flags is still refused."""
    budget = ["--total-timesteps", "200"]
    for seed, (a, b) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.3, 0.7)], start=1):
        base = ["--hypernet", "mlp", "--seed", str(seed), *budget]
        write_summary(tmp_path / "shared", "figure17-ippo", "dispersion-4", "mlp", seed, {200: [a]}, argv=base)
        write_summary(tmp_path / "separate", "figure17-ippo", "dispersion-4", "mlp", seed, {200: [b]},
                      argv=base + ["--hypernet-separate-embeddings"])
    done = cli(tmp_path / "shared", tmp_path / "separate", "--out", tmp_path / "out", "--reps", 20, "--window", 0)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "figure17-ippo.md").read_text()
    assert numbers(table_row(text, "dispersion-4", "mlp").split("|")[3]) == pytest.approx([0.2, np.std([0.1, 0.2, 0.3])], abs=1e-3)
    separate = table_row(text, "dispersion-4", "mlp --hypernet-separate-embeddings").split("|")
    assert numbers(separate[3]) == pytest.approx([0.6, np.std([0.5, 0.6, 0.7])], abs=1e-3)
    assert "| mlp | mlp --hypernet-separate-embeddings | 0.000 [0.000, 0.000] |" in text
    shutil.copytree(tmp_path / "shared", tmp_path / "copy")
    again = cli(tmp_path / "shared", tmp_path / "copy", "--out", tmp_path / "again")
    assert again.returncode == 2 and "are the same run figure17-ippo/dispersion-4/mlp/1" in again.stderr


def test_table4_grid_shows_the_papers_numbers_and_the_runs_settings(tmp_path):
    for method, clip in (("mlp", "0.0375"), ("nops", "0.05")):
        for seed in (1, 2):
            write_summary(tmp_path / "grids", "table4", "Humanoid-17x1", method, seed, {100: [float(seed)]}, env="mamujoco",
                          config={"num_envs": "1", "num_steps": "32", "eval_episodes": "2", "clip_coef": clip, "seed": str(seed)})
    done = cli(tmp_path / "grids", "--out", tmp_path / "out", "--reps", 20)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "table4.md").read_text()
    # the paper's Table 4, Humanoid-v2 17x1 row, beside ours
    assert "6,544.10 (3,868.00, 6,664.89)" in table_row(text, "Humanoid-17x1", "mlp")
    assert "6,188.46 (5,006.13, 6,851.74)" in table_row(text, "Humanoid-17x1", "nops")
    header = text.split("## Humanoid-17x1")[0]
    assert "eval_episodes=2, num_envs=1, num_steps=32" in header
    assert "- by method, clip_coef: nops 0.05, mlp 0.0375" in header
    assert "- differ between runs of a method: seed" in header


def test_matrix_grid_tables_2_and_6(tmp_path):
    for method in ("nops", "fups"):
        for seed in (1, 2, 3):
            value = 1.0 if method == "nops" else [0.5, 1.0, 1.0][seed - 1]
            write_summary(tmp_path / "grids", "table2-6", "specialisation-n4", method, seed, env="matrix",
                          evals={1000: {"return": [value], "return_sampled": [value - 0.01]}})
    done = cli(tmp_path / "grids", "--out", tmp_path / "out", "--reps", 20)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "table2-6.md").read_text()
    table2 = text.split("## Table 2")[1].split("## Table 6")[0]
    table6 = text.split("## Table 6")[1]
    fups = np.array([0.5, 1.0, 1.0])
    # in brackets, the paper's values: Table 2's FuPS+ID and Table 6's NoPS, Specialisation with 4 agents
    assert f"| FuPS+ID | {fups.mean():.2f} ± {fups.std():.2f} (0.95 ± 0.10) (n=3) |" in table2
    assert f"| NoPS | {0.99:.4f} ± 0.0000 (0.9988 ± 0.0007)" in table6


def without(field):
    return lambda summary: json.dumps({k: v for k, v in summary.items() if k != field})


def changed(**fields):
    return lambda summary: json.dumps({**summary, **fields})


def first_evaluation(**metrics):
    def change(summary):
        summary["marl_eval"]["vmas"]["navigation-2-same"]["mlp"]["seed_1"]["step_0"].update(metrics)
        return json.dumps(summary)
    return change


# A summary.json aggregate.py cannot read: what its one line says (after "malformed summary.json (")
MALFORMED = {
    "bad-json": (lambda summary: "{not json", "JSONDecodeError"),
    "no-marl-eval": (without("marl_eval"), "KeyError: 'marl_eval')"),
    "no-grid": (without("grid"), "grid: missing; expected a grid name such as figure2-ippo)"),
    "grid-a-path": (changed(grid="../escaped"), "grid: got '../escaped'; expected a grid name such as figure2-ippo "
                                                "(letters, digits, - _ .))"),  # it would write out/../escaped.md
    "seed-text": (changed(seed="1"), "seed: got '1'; expected a whole number)"),
    "budget-text": (changed(total_timesteps="100k"), "total_timesteps: got '100k'; expected a number of steps or null)"),
    "snd-text": (changed(final_snd="high"), "final_snd: got 'high'; expected a number or null)"),
    "gradient-a-list": (changed(gradient=[1.0]), "gradient: got [1.0]; expected an object of numbers or null)"),
    "config-a-list": (changed(config=["--seed"]), "config: got ['--seed']; expected an object of flags)"),
    "argv-a-number": (changed(argv=5), "argv: got 5; expected a list of flags)"),
    "step-text": (first_evaluation(step_count="100"), "marl_eval step_0: expected an object with a step_count (a whole number))"),
    "returns-text": (first_evaluation(**{"return": ["1.0"]}),
                     "marl_eval step_0 return: expected a list of finite numbers or nulls, got ['1.0'])"),
}


@pytest.mark.parametrize("make, argv, message", [
    (None, ["--at", "0"], "error: --at: must be at least 1, got 0"),
    (None, ["--window", "1.5"], "error: --window: must be a fraction from 0 to 1, got 1.5"),
    (None, ["--min-evaluations", "0"], "error: --min-evaluations: must be at least 1, got 0"),
    (None, ["--seed", "4294967296"], "error: --seed: must be between 0 and 4294967295, got 4294967296"),  # numpy's
    (None, [], "error: PATH: no summary.json in"),
    *[(name, [], "malformed summary.json (" + message) for name, (_, message) in MALFORMED.items()],
], ids=["--at 0", "--window 1.5", "--min-evaluations 0", "--seed 2**32", "no summary", *MALFORMED])
def test_aggregate_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, make, argv, message, monkeypatch, capsys):
    grids = tmp_path / "grids"
    grids.mkdir()
    bad = None
    if make:
        bad = write_summary(grids, "figure4", "navigation-2-same", "mlp", 1, {100: [1.0]})
        bad.write_text(MALFORMED[make][0](json.loads(bad.read_text())))
    code, out, err = run_tool("aggregate.py", [grids, "--out", tmp_path / "out", *argv], tmp_path, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert bad is None or str(bad) in lines[0]  # names the file
    assert out == "" and os.listdir(tmp_path) == ["grids"]  # no out/, nor anything beside it
    if argv == ["--at", "0"]:  # once as the command itself: the exit status a shell sees, no traceback
        done = cli(grids, "--out", tmp_path / "out", *argv)
        assert done.returncode == 2 and done.stderr.strip() == lines[0] and os.listdir(tmp_path) == ["grids"]


# ===== The other tools: bad flags are one line, exit status 2, no file; outputs never a committed file =====
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
    ("compare_videos.py", ["--checkpoints", __file__, "--labels", "A", "--out", "/proc/x.gif"], "--out: '/proc' is not writable"),
    ("first_update.py", ["--seeds", "-1"], "--seeds: must be between 0 and 4294957295, got -1"),
    ("first_update.py", ["--seeds"], "--seeds: expected at least one argument"),
    ("first_update.py", ["--script", "mappo_hyper_mamujoco"], "--script: invalid choice: 'mappo_hyper_mamujoco'"),
    ("repeated_key.py", ["--budget", "0"], "--budget: must be at least 1, got 0"),
    ("repeated_key.py", ["--seeds", "-1"], "--seeds: must be between 0 and 4294957295, got -1"),
    ("repeated_key.py", ["--seeds", "1", "1"], "--seeds: each seed once, got 1 1"),
    ("init_scale.py", ["--n-agents", str(2**70)], "--n-agents: must be at most 2**53"),  # as the scripts
    ("init_scale.py", ["--n-agents", "100000000"], "--n-agents 100000000, --num-envs 16, --num-steps 128: the run "
     "needs at least"),  # the script's memory check, before the output folder
    ("sps.py", ["--only", "envs", "--env-counts", str(10**12)], "--env-counts: 1000000000000: --num-envs"),
    ("compare_videos.py", ["--checkpoints", __file__, "--labels", "A", "--scale", "41"],
     "--scale: must be between 1 and 40, got 41"),  # past 40 the label's font size is 0
    ("repeated_key.py", ["--hypernet", "dico", "--budget", "100"],  # the script's own check, before any training
     "--budget: must be at least num_envs * num_steps = 2048, got 100"),
    ("repeated_key.py", ["--hypernet", "bogus"], "--hypernet: invalid choice: 'bogus' (choose from 'mlp', 'linear', "
     "'fups', 'nops', 'dico')"),
]


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CASES])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, script, argv, message, monkeypatch, capsys):
    out = tmp_path / "result.md"
    # without --out a tool writes into a new folder of runs/: not yet (compare_videos.py needs --out)
    for out_flag in [["--out", out]] + ([] if script == "compare_videos.py" else [[]]):
        code, _, err = run_tool(script, [*out_flag, *argv], tmp_path, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err  # not "error: argument --x"
        assert os.listdir(tmp_path) == []


FIRST_CASES = [case for k, case in enumerate(CASES) if case[0] not in [s for s, _, _ in CASES[:k]]]


@pytest.mark.parametrize("script, argv, message", FIRST_CASES, ids=[s for s, _, _ in FIRST_CASES])
def test_a_bad_flag_given_to_the_command_is_one_line_exit_2(tmp_path, script, argv, message):
    """The command itself, in a Python of its own: the exit status a shell sees, no traceback."""
    out = ["--out", tmp_path / "out.gif"] if script == "compare_videos.py" else []  # it needs one
    result = run_command(script, [*out, *argv], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [(["--rounds", "0"], "--rounds: must be at least 1, got 0"),
                                           (["--scenario", "football"], "--scenario: invalid choice: 'football' (choose from 'dispersion', 'navigation')")])
def test_distributions_cost_bad_flag_is_one_line_exit_2(tmp_path, argv, message):
    result = run_python([os.path.join(ROOT, "benchmark", "distributions_cost.py")] + argv, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {message}"], result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("out", [True, False], ids=["--out", "default folder"])
def test_sps_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, out):
    argv = ["--only", "envs", "--device", "cuda"] + (["--out", str(tmp_path / "result.md")] if out else [])
    result = run_python([os.path.join(ROOT, "benchmark", "sps.py")] + argv, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == ["error: --device: cuda is not available on this machine"], result.stderr
    assert result.stdout == "" and os.listdir(tmp_path) == []  # neither result.md nor runs/sps_<time>


def test_compare_videos_a_checkpoint_its_script_refuses_is_one_error_line(tmp_path):
    """The script's own "error: ..." line, passed on inside compare_videos' one line, not as a second "error:"."""
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    result = run_python([os.path.join(ROOT, "benchmark", "compare_videos.py"), "--checkpoints", foreign, "--labels", "A",
                         "--out", tmp_path / "cmp.gif"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --checkpoints: {foreign}: --checkpoint: '{foreign}' is not a ") and lines[0].count("error") == 1
    assert os.listdir(tmp_path) == ["foreign.pt"]


# ----- same_numbers.py: --compare's files, --only, --repo, --out -----
def same_numbers(argv, cwd):
    return run_python([os.path.join(ROOT, "benchmark", "same_numbers.py")] + argv, cwd=cwd)


SAME_NUMBERS_BAD = [
    (["--compare", "missing.json", "good.json"], "--compare: cannot read 'missing.json' ([Errno 2] No such file or directory"),
    (["--compare", "cut.json", "good.json"], "--compare: cannot read 'cut.json' (Expecting "),
    (["--compare", "good.json", "list.json"],
     "--compare: 'list.json' is not a file of same_numbers.py's ({config: {tag: [[step, value], ...]}})"),
    (["--only", "ippo_nosuch"], "--only: unknown configs ['ippo_nosuch']; --list shows them"),
    (["--only", "matrix_mlp", "--repo", "nowhere"],
     "--repo: 'nowhere' has no reinforce_matrix_games.py (a checkout of this repository, its root)"),
    (["--only", "matrix_mlp", "--out", "/proc/x/same.json"], "--out: '/proc' is not writable"),  # checked before the runs
    (["--only", "matrix_mlp", "--out", "folder"], "--out: 'folder' is a folder; give the name of the file to write"),
    (["--ignore", "diversity/snd"], "--ignore: only with --compare"),
]


@pytest.mark.parametrize("argv, message", SAME_NUMBERS_BAD, ids=[" ".join(a) for a, _ in SAME_NUMBERS_BAD])
def test_same_numbers_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, argv, message):
    (tmp_path / "good.json").write_text(json.dumps({"matrix_mlp": {"eval/episodic_return": [[10, 1.0]]}}))
    (tmp_path / "cut.json").write_text('{"matrix_mlp": {"eval/episodic_return": [[10, 1.')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "folder").mkdir()
    before = sorted(os.listdir(tmp_path))
    result = same_numbers(argv, tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert result.stdout == "" and sorted(os.listdir(tmp_path)) == before


def test_same_numbers_compare_reports_a_failed_config(tmp_path):
    """A config that failed holds {"error": why}, no numbers: reported as such, not a traceback."""
    (tmp_path / "a.json").write_text(json.dumps({"ippo_mlp": {"losses/value_loss": [[32, 0.5]]},
                                                 "matrix_mlp": {"error": "exit 1: boom"}}))
    (tmp_path / "b.json").write_text(json.dumps({"ippo_mlp": {"losses/value_loss": [[32, 0.5]]},
                                                 "matrix_mlp": {"eval/episodic_return": [[10, 1.0]]}}))
    result = same_numbers(["--compare", "a.json", "b.json"], tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and result.stderr == "" and len(lines) == 3, result.stdout + result.stderr
    assert lines[0].startswith("ippo_mlp ") and " identical (1 values, " in lines[0]
    assert lines[1].split() == ["matrix_mlp", "FAILED", "in", "a.json"] and lines[2] == "1 identical, 1 different"


def test_same_numbers_compare_leaves_out_the_ignored_tags_only(tmp_path):
    """A change meant to move one metric (SND computed in float64) is checked against everything else."""
    (tmp_path / "a.json").write_text(json.dumps({"ippo_mlp": {"losses/value_loss": [[32, 0.5]], "diversity/snd": [[32, 0.1]]}}))
    (tmp_path / "b.json").write_text(json.dumps({"ippo_mlp": {"losses/value_loss": [[32, 0.5]], "diversity/snd": [[32, 0.2]]}}))
    (tmp_path / "c.json").write_text(json.dumps({"ippo_mlp": {"losses/value_loss": [[32, 0.6]], "diversity/snd": [[32, 0.2]]}}))
    assert same_numbers(["--compare", "a.json", "b.json"], tmp_path).returncode == 1
    ignored = same_numbers(["--compare", "a.json", "b.json", "--ignore", "diversity/snd"], tmp_path)
    assert ignored.returncode == 0 and ignored.stdout.splitlines()[-1] == "1 identical, 0 different", ignored.stdout
    other = same_numbers(["--compare", "a.json", "c.json", "--ignore", "diversity/snd"], tmp_path)
    assert other.returncode == 1 and "DIFFERENT: first at tag losses/value_loss" in other.stdout, other.stdout


# ----- outputs: never a committed file by default, and a bad --out fails before any work -----
def run_command(script, argv, cwd):
    return run_python([os.path.join(ROOT, "benchmark", script)] + argv, cwd=cwd)


BAD_OUTS = {"a folder": lambda tmp: str(tmp), "inside a file": lambda tmp: str(tmp / "notes.txt" / "result.md"),
            "not writable": lambda tmp: "/proc/sys/x/result.md"}


@pytest.mark.parametrize("script", ["sps.py", "init_scale.py", "update_step.py", "first_update.py", "repeated_key.py"])
@pytest.mark.parametrize("where", sorted(BAD_OUTS))
def test_bad_out_fails_at_once_with_one_line(tmp_path, script, where, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    code, out, err = run_tool(script, ["--out", BAD_OUTS[where](tmp_path)], tmp_path, monkeypatch, capsys)  # at once
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --out: "), err
    assert out == "" and os.listdir(tmp_path) == ["notes.txt"]


def test_check_writable_refuses_a_folder_that_takes_no_new_entry(tmp_path, capsys):
    """os.access says yes to root everywhere, /proc included: sps, init_scale, update_step, launch, aggregate
    and matrix_games would then fail after their work. The check makes a folder there and removes it."""
    import sps

    with pytest.raises(SystemExit) as exit_:
        sps.check_writable(sps.OneLineParser(), "--out", "/proc/x/result.md")
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: --out: '/proc' is not writable\n"
    sps.check_writable(sps.OneLineParser(), "--out", str(tmp_path / "new" / "result.md"))
    assert os.listdir(tmp_path) == []  # nothing left of the check


@pytest.mark.parametrize("script, argv", [
    ("aggregate.py", ["grids", "--out", "/proc/x"]),
    ("matrix_games.py", ["--out", "/proc/x", "--games", "specialisation", "--n-agents", "2", "--hypernets", "nops",
                         "--num-trials", "10"]),
    ("memory_estimate.py", ["--out", "/proc/x"]),
])
def test_out_in_proc_is_one_line_before_any_work(tmp_path, script, argv):
    write_summary(tmp_path / "grids", "figure2-ippo", "dispersion-4", "mlp", 1, {100: [1.0]})
    result = run_command(script, argv, tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --out: '/proc' is not writable\n", result.stderr
    assert result.stdout == "" and os.listdir(tmp_path) == ["grids"]


def test_default_output_folders_are_new_even_within_one_second(tmp_path, monkeypatch):
    import sps

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sps.time, "strftime", lambda *_: "20260101-000000")
    first, second = sps.new_output_folder("sps"), sps.new_output_folder("sps")
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert sorted(os.listdir(tmp_path / "runs")) == ["sps_20260101-000000", "sps_20260101-000000_1"]


def test_init_scale_benchmark_writes_a_new_folder_in_runs_not_the_committed_results(tmp_path):
    before = committed_results()
    result = run_command("init_scale.py", ["--seeds", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert committed_results() == before and os.listdir(tmp_path) == ["runs"]
    (folder,) = os.listdir(tmp_path / "runs")  # a new one each time: test_default_output_folders_are_new_...
    assert folder.startswith("init_scale_") and os.listdir(tmp_path / "runs" / folder) == ["init_scale.md"]
    out = tmp_path / "runs" / folder / "init_scale.md"
    text = out.read_text()
    assert text.count("| critic 3 |") == 4 and text.count("| actor 1 |") == 4  # both scripts, both scenarios
    assert "| matched | 0% | 0% |" in text  # largest miss of the target scale, over every layer: none for matched
    bad = run_python([os.path.join(ROOT, "benchmark", "init_scale.py"), "--seeds", "0", "--out", str(out) + "2"],
                     cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --seeds: must be at least 1, got 0"
    assert not os.path.exists(str(out) + "2")


@pytest.mark.parametrize("argv, message", [
    (["--checkpoints", "missing.pt"], "--checkpoints: no such file 'missing.pt'"),
    (["--checkpoints", "x.pt", "--episodes", "0"], "--episodes: must be at least 1, got 0"),
    (["--checkpoints", "x.pt", "--samples", "many"], "error: --samples: invalid int value: 'many'"),
    (["--checkpoints", "FOREIGN"], "--checkpoints:"),
    (["--checkpoints", "FOREIGN", "--out", "NOSUFFIX"], "--out: must be an .npz file name"),  # numpy would add .npz
    (["--checkpoints", "FOREIGN", "--out", "NODIR"], "--out: no such folder"),  # checked before the rollouts
    (["--checkpoints", "FOREIGN", "--out", "/proc/x.npz"], "--out: '/proc' is not writable"),  # root too
    (["--checkpoints", "FOREIGN", "--seed", "-1"], "--seed: must be between 0 and 4294967295, got -1"),
    (["--checkpoints", "FOREIGN", "--seed", str(2**64)], f"--seed: must be between 0 and 4294967295, got {2**64}"),
])
def test_snd_dataset_bad_flags_are_one_line_exit_2(tmp_path, argv, message, monkeypatch, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    out = tmp_path / "snd.npz"
    names = {"FOREIGN": foreign, "NOSUFFIX": tmp_path / "snd", "NODIR": tmp_path / "missing" / "snd.npz"}
    argv = [str(names.get(a, a)) for a in argv]
    code, _, err = run_tool("snd_dataset.py", ["--out", out, *argv], tmp_path, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["foreign.pt"]


def load_snd_dataset():
    spec = importlib.util.spec_from_file_location("snd_dataset", os.path.join(ROOT, "benchmark", "snd_dataset.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def test_snd_dataset_holds_its_recipe_and_replaces_its_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """launch.py's table3a reuses a dataset by the recipe it holds (what it was built from), so a file
    under --out is whole: a write cut short (a full disk) leaves the previous one as it was."""
    import ippo_hyper_vmas

    assert ippo_hyper_vmas.main(tiny_args(tmp_path / "runs", "--save-model")) == 0
    (run,) = os.listdir(tmp_path / "runs")
    checkpoint = str(tmp_path / "runs" / run / "checkpoint.pt")
    out = tmp_path / "snd.npz"
    argv = ["--checkpoints", checkpoint, "--episodes", "2", "--samples", "16", "--seed", "3", "--out", str(out)]
    builder = load_snd_dataset()
    assert builder.main(argv) == 0
    with open(checkpoint, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    recipe = json.loads(str(np.load(out)["recipe"]))
    assert recipe == {"script": "ippo_hyper_vmas", "episodes": 2, "samples": 16, "seed": 3,
                      "checkpoints": [{"path": checkpoint, "sha256": sha256}]}
    before = out.read_bytes()

    def full_disk(file, **arrays):
        (open(file, "wb") if isinstance(file, (str, os.PathLike)) else file).write(b"PK\x03\x04 cut short")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match="No space left"):
        builder.main(argv)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["runs", "snd.npz"]  # no temporary file


def test_snd_dataset_refuses_a_checkpoint_with_nan_weights(tmp_path):
    import ippo_hyper_vmas

    assert ippo_hyper_vmas.main(tiny_args(tmp_path / "runs", "--save-model")) == 0
    (run,) = os.listdir(tmp_path / "runs")
    state = torch.load(tmp_path / "runs" / run / "checkpoint.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "snd.npz"
    result = run_python([os.path.join(ROOT, "benchmark", "snd_dataset.py"), "--out", out, "--checkpoints",
                         tmp_path / "nan.pt", "--episodes", "2"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"holds NaN or inf (in model/{name})" in result.stderr and not out.exists()


def test_snd_dataset_records_what_the_policy_saw_in_the_running_episodes():
    """benchmark/snd_dataset.py's record_observations (evaluate() keeps no observations): at each step
    of an evaluation, the observations the policy acted on, of the episodes not yet ended."""
    builder = load_snd_dataset()
    import ippo_hyper_vmas as script

    args = read_args(script, ["--n-agents", 2, "--n-food", 1, "--food-radius", 0.6, "--max-steps", 40,
                              "--no-eval-deterministic", "--eval-episodes", 9, "--snd-samples", 1,
                              "--actor-hidden-dims", 16, "--critic-hidden-dims", 16])
    env, agent = vmas_agent(script, args, num_envs=9)
    inputs, ended = [], []
    policy, step = agent.policy, env.step
    agent.policy = lambda x, weights: inputs.append(x.clone()) or policy(x, weights)

    def recorded_step(actions):
        result = step(actions)
        ended.append(result[2] | result[3])
        return result

    env.step = recorded_step
    seen = builder.record_observations(env)
    script.evaluate(agent, env, args, 5)
    assert len(seen) == len(ended) and len(inputs) == len(ended) + 1  # the last policy call: SND's
    running = torch.ones(9, dtype=torch.bool)
    for t, observations in enumerate(seen):
        assert torch.equal(observations, inputs[t][:, running]), t
        running &= ~ended[t]
    assert len({observations.shape[1] for observations in seen}) > 2  # episodes ended at different steps


# ===== benchmark/memory_estimate.py: the memory check's estimate is a lower bound =====
@pytest.mark.parametrize("name, flags", [("reinforce_matrix_games", "--n-agents 128 --hypernet fups --num-trials 50"),
                                         ("ippo_hyper_vmas", "--n-agents 8 --hypernet nops --total-timesteps 2048")])
def test_a_run_uses_at_least_the_memory_its_check_estimates(name, flags, tmp_path):
    import memory_estimate

    result = memory_estimate.measure(name, flags, str(tmp_path))
    assert result["code"] == 0 and result["used"] >= result["estimate"] > 0, result


# ===== first_update.py =====
def test_first_update_measures_one_configuration(one_thread):
    """One iteration of the script's main(): the initial policy's entropy in (0, ln 9] (9 discrete actions),
    the first update's approx_kl and clipfrac finite, in range, and the update moved the policy; seed 1 of
    the committed first_update.md's row (mlp, flax) to the digits it prints."""
    import first_update
    import ippo_hyper_vmas

    update = ippo_hyper_vmas.ppo_update
    result = first_update.first_update(ippo_hyper_vmas, "mlp", "flax", 1)
    assert ippo_hyper_vmas.ppo_update is update  # put back
    assert set(result) == {"entropy", "approx_kl", "clipfrac"} and all(map(np.isfinite, result.values()))
    assert 0 < result["entropy"] <= np.log(9) + 1e-6
    assert result["approx_kl"] > 0 and 0 <= result["clipfrac"] <= 1
    table = open(os.path.join(ROOT, "benchmark", "results", "first_update.md")).read()
    (row,) = [line for line in table.splitlines() if line.startswith("| mlp | flax |")]
    per_seed = [float(cell.split()[0]) for cell in row.strip("|").split("|")[5:8]]  # seed 1 of each
    assert [result[key] for key in ("entropy", "approx_kl", "clipfrac")] == pytest.approx(per_seed, abs=2e-3)


# ===== repeated_key.py =====
def test_repeated_noise_replays_a_rollouts_first_draw_at_its_other_steps():
    """The authors' unsplit key: within a rollout of num_steps calls every step gets the first step's noise
    (so equal logits give equal actions, per environment and agent), the next rollout draws anew; it is
    the script's own rule (Gumbel-max, mean + std * noise) with that noise."""
    import ippo_hyper_vmas
    import repeated_key

    torch.manual_seed(0)
    sample = repeated_key.repeated_noise(num_steps=3)
    logits = torch.zeros(4, 64, 9)  # (agents, environments, actions): uniform, so the noise alone decides
    first = [sample(logits, True) for _ in range(3)]
    second = [sample(logits, True) for _ in range(3)]
    assert all(torch.equal(first[0], a) for a in first[1:]) and all(torch.equal(second[0], a) for a in second[1:])
    assert not torch.equal(first[0], second[0]) and len(first[0].unique()) > 1  # new noise; not one action for all
    torch.manual_seed(1)
    ours = [ippo_hyper_vmas.sample_action(logits, True) for _ in range(3)]
    assert not torch.equal(ours[0], ours[1])  # the script draws at every step
    mean, std = torch.zeros(4, 64, 2), torch.full((4, 64, 2), 0.5)
    gauss = repeated_key.repeated_noise(num_steps=2)
    a, b, c = (gauss((mean, std), False) for _ in range(3))
    assert torch.equal(a, b) and not torch.equal(b, c) and a.std() == pytest.approx(0.5, rel=0.2)


def test_smax_tables_give_the_win_rate_over_the_same_windows(tmp_path):
    """figure6's summaries hold each evaluation episode's win beside its return: the table adds a win-rate
    column, the mean over runs of each run's windowed share of episodes won."""
    wins = {1: ([0.0, 1.0], [1.0, 1.0]), 2: ([0.0, 0.0], [0.0, 1.0])}  # seed: (first evaluation's, second's)
    for seed, (first, second) in wins.items():
        write_summary(tmp_path, "figure6", "2s3z", "ippo-mlp", seed, env="smax",
                      evals={100: {"return": [1.0, 2.0], "snd": [0.1], "win": first},
                             200: {"return": [1.5, 2.0], "snd": [0.1], "win": second}})
    done = cli(tmp_path, "--out", tmp_path / "out", "--reps", 20, "--window", 0.5, "--min-evaluations", 2)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "figure6.md").read_text()
    assert "| win rate |" in text and "Win rate: the share of evaluation episodes won" in text
    row = table_row(text, "2s3z", "ippo-mlp").split("|")
    assert numbers(row[4]) == pytest.approx([np.mean([np.mean([0, 1, 1, 1]), np.mean([0, 0, 0, 1])])])
