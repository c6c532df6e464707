"""benchmark/launch.py: the paper's grids (Table 9's seeds, appendix D's budgets) run end to end on
every backend (local, submitit's local executor, a local Ray cluster), finished runs are skipped,
stopped and preempted runs resume from their checkpoint with the numbers of an uninterrupted run, and
bad input is one line, exit 2, nothing written. Every training here is a few hundred steps with tiny
networks."""

import errno
import fcntl
import glob
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import (HANG, ROOT, TINY_MAMUJOCO, TINY_VMAS, alive, children, load_checkpoint, load_script,
                      pending_signals, read_args, run_main, run_python)

LAUNCH = os.path.join(ROOT, "benchmark", "launch.py")

# A budget no run reaches while a test waits for it: the signal always finds the run going.
OUT_OF_REACH = 32 * 10**6


def launch(argv, cwd):
    return run_python([LAUNCH, *argv], cwd=cwd)


def load_launch():
    """launch.py as a module (for RunTask, main and the grids), without running its command line."""
    spec = importlib.util.spec_from_file_location("launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_folder(grid_dir, run_id):
    (folder,) = [f for f in glob.glob(os.path.join(grid_dir, run_id, "*")) if os.path.isdir(f)]
    return folder


def summary(grid_dir, run_id):
    return json.load(open(os.path.join(run_folder(grid_dir, run_id), "summary.json")))


def log(grid_dir, run_id):
    return open(os.path.join(grid_dir, run_id, "log.txt")).read()


def starts(grid_dir, run_id):
    """The commands the launcher started for a run (log.txt's '$ ' lines)."""
    return [line for line in log(grid_dir, run_id).splitlines() if line.startswith("$ ")]


def seed_entry(s):
    return s["marl_eval"][s["env"]][s["task"]][s["method"]][f"seed_{s['seed']}"]


def wait_for(predicate, what, process=None):
    """Polls predicate until it holds; fails at once if process (a Popen) ends first, and after HANG seconds
    (a hang: no test waits on how fast the machine is)."""
    end = time.time() + HANG
    while not predicate():
        assert process is None or process.poll() is None, f"the process ended before {what}: {process.returncode}"
        assert time.time() < end, f"hung waiting for {what}"
        time.sleep(0.1)


def check_vmas_summary(s, grid, method, budget):
    """The fields of grid_spec.md, and every evaluation's episodes as evaluations.jsonl has them."""
    assert s["format"] == "hypermarl-summary/1" and s["grid"] == grid and s["env"] == "vmas"
    assert s["task"] == "dispersion-4" and s["method"] == method and s["seed"] == 1 and s["total_timesteps"] == budget
    assert s["argv"][s["argv"].index("--seed") + 1] == "1"
    assert s["config"]["hypernet"] == method and s["config"]["num_envs"] == "4"  # TensorBoard's hyperparameters
    assert s["git_commit"] is None or len(s["git_commit"]) == 40
    assert s["sps"] > 0 and s["wall_seconds"] > 0
    assert all(isinstance(v, float) and math.isfinite(v) for v in s["gradient"].values()), s["gradient"]
    folder = os.path.dirname(s["_path"])
    lines = [json.loads(line) for line in open(os.path.join(folder, "evaluations.jsonl"))]
    entry = seed_entry(s)
    steps = [entry[f"step_{k}"] for k in range(len(entry) - 1)]
    assert [e["step_count"] for e in steps] == sorted({line["step"] for line in lines})
    by_step = {line["step"]: line for line in lines}
    assert all(e["return"] == by_step[e["step_count"]]["episode_returns"] for e in steps)
    assert all(e["snd"] == [by_step[e["step_count"]]["snd"]] for e in steps)
    assert entry["absolute_metrics"] == {"return": steps[-1]["return"], "snd": steps[-1]["snd"]}
    assert s["final_return"] == pytest.approx(sum(steps[-1]["return"]) / len(steps[-1]["return"]))
    assert s["final_snd"] == steps[-1]["snd"][0] and steps[-1]["step_count"] == budget


def summaries(grid_dir):
    out = {}
    for path in glob.glob(os.path.join(grid_dir, "*", "*", "summary.json")):
        out[os.path.basename(os.path.dirname(os.path.dirname(path)))] = {**json.load(open(path)), "_path": path}
    return out


# ----- local backend -----
@pytest.mark.long
def test_local_grid_writes_summaries_skips_finished_runs_and_grows_with_a_larger_budget(tmp_path, capsys):
    argv = ["figure2-ippo", "--out", str(tmp_path), "--methods", "fups", "mlp", "--seeds", "1", "--jobs", "2"]
    tiny = ["--", *TINY_VMAS, "--eval-interval", "32"]
    result = launch(argv + ["--budget", "64"] + tiny, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    grid_dir = str(tmp_path / "figure2-ippo")
    found = summaries(grid_dir)
    assert sorted(found) == ["ippo-dispersion-4-fups-s1", "ippo-dispersion-4-mlp-s1"]
    for method in ("fups", "mlp"):
        check_vmas_summary(found[f"ippo-dispersion-4-{method}-s1"], "figure2-ippo", method, 64)

    logs = {run_id: log(grid_dir, run_id) for run_id in found}
    again = launch(argv + ["--budget", "64"] + tiny, tmp_path)  # nothing left to do: no script starts
    assert again.returncode == 0 and "2 skipped (finished before), 0 finished" in again.stdout, again.stdout
    assert {run_id: log(grid_dir, run_id) for run_id in found} == logs
    assert load_launch().main(argv + ["--budget", "96", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("[interrupted]") == 2 and "0 finished, 2 to resume" in listed, listed  # a larger budget
    assert listed.count("--total-timesteps 96") == 2 and listed.count(" --resume ") == 2, listed  # as it will start

    clash = launch(argv + ["--budget", "96"] + tiny + ["--num-envs", "8"], tmp_path)  # a fresh run would take it
    assert clash.returncode == 2 and clash.stderr.strip().splitlines() == [  # the checkpoints' runs do not
        "error: flags after --: ippo_hyper_vmas.py: --num-envs: the checkpoint's run has 4, not 8; --resume takes it "
        "from the checkpoint (leave the flag out)"], clash.stderr
    assert {run_id: log(grid_dir, run_id) for run_id in found} == logs  # refused before anything started

    grown = launch(argv + ["--budget", "96"] + tiny, tmp_path)  # resumes both from their final checkpoints
    assert grown.returncode == 0, grown.stdout + grown.stderr
    for run_id, before in found.items():
        # the flags after -- again (a checkpoint does not keep them all); the script accepts its own values
        assert starts(grid_dir, run_id)[1].endswith(f"--resume {run_folder(grid_dir, run_id)}/checkpoint.pt "
                                                    f"--total-timesteps 96 {' '.join(tiny[1:])}")
        after = summaries(grid_dir)[run_id]
        check_vmas_summary(after, "figure2-ippo", before["method"], 96)
        entry, old = seed_entry(after), seed_entry(before)
        assert [entry["step_0"], entry["step_1"]] == [old["step_0"], old["step_1"]]
        assert entry["step_2"]["step_count"] == 96
        assert after["wall_seconds"] > before["wall_seconds"]  # both starts

    # a run trained past a smaller budget (its summary lost) is labelled with the steps it trained, which its
    # final evaluation is at, not with that budget
    os.remove(os.path.join(run_folder(grid_dir, "ippo-dispersion-4-fups-s1"), "summary.json"))
    assert launch(argv + ["--budget", "64"] + tiny, tmp_path).returncode == 0
    relabelled = summaries(grid_dir)["ippo-dispersion-4-fups-s1"]
    assert relabelled["total_timesteps"] == 96 == seed_entry(relabelled)["step_2"]["step_count"]


@pytest.mark.long
def test_table3a_measures_each_run_on_one_dataset_of_ippo_nops_and_fups_at_a_quarter_and_the_end(tmp_path, monkeypatch,
                                                                                                 capsys, one_thread):
    """figure2-ippo's NoPS and FuPS runs stop at a quarter of the budget, keep a copy of that checkpoint and go
    on (the same weights as a straight run); table3a rolls out those four policies into one dataset
    (appendix D.1.2) and evaluates every finished run's final checkpoint on it. Launched again, it reuses
    the dataset only if built from the same checkpoints, episodes and samples."""
    import numpy as np
    import torch

    ippo, tiny = load_script("ippo_hyper_vmas"), [*TINY_VMAS, "--eval-interval", "32"]
    select = ["--methods", "nops", "fups", "mlp", "--seeds", "1", "--budget", "128"]
    result = launch(["figure2-ippo", "--out", str(tmp_path), *select, "--jobs", "2", "--", *tiny], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    grid_dir = str(tmp_path / "figure2-ippo")
    for method in ("nops", "fups"):
        run_id = f"ippo-dispersion-4-{method}-s1"
        assert [" --total-timesteps 32 " in line or "--total-timesteps 128" in line for line in starts(grid_dir, run_id)] == [True, True]
        folder = run_folder(grid_dir, run_id)
        assert torch.load(os.path.join(folder, "checkpoint_32.pt"), weights_only=True)["global_step"] == 32
        code, _, err = run_main(ippo, ["--scenario", "dispersion", "--n-agents", "4", "--hypernet", method, "--seed", "1",
                                       "--total-timesteps", "128", *tiny, "--save-model",
                                       "--runs-dir", tmp_path / "straight" / method], capsys)  # one thread, as launch's
        assert code == 0, err
        (other,) = glob.glob(str(tmp_path / "straight" / method / "*" / "checkpoint.pt"))
        a, b = (torch.load(p, weights_only=True)["model"] for p in (os.path.join(folder, "checkpoint.pt"), other))
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert glob.glob(os.path.join(run_folder(grid_dir, "ippo-dispersion-4-mlp-s1"), "checkpoint_*.pt")) == []

    made = launch(["table3a", "--out", str(tmp_path), *select, "--snd-episodes", "2", "--snd-samples", "64"], tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    table = json.load(open(tmp_path / "table3a" / "table3a.json"))
    assert table["sources"] == [f"figure2-ippo/ippo-dispersion-4-{m}-s1/{os.path.basename(run_folder(grid_dir, f'ippo-dispersion-4-{m}-s1'))}/{c}"
                                for m in ("nops", "fups") for c in ("checkpoint_32.pt", "checkpoint.pt")]
    obs = np.load(tmp_path / "table3a" / "snd_dataset.npz")["obs"]
    assert obs.shape[:2] == (16, 4)  # 64 observations: 16 time steps of 4 agents
    assert sorted(table["snd"]) == ["figure2-ippo"] and sorted(table["snd"]["figure2-ippo"]) == ["fups", "mlp", "nops"]
    for method, per_seed in table["snd"]["figure2-ippo"].items():
        line = run_main(ippo, ["--eval-only", "--checkpoint",
                               os.path.join(run_folder(grid_dir, f"ippo-dispersion-4-{method}-s1"), "checkpoint.pt"),
                               "--snd-obs-file", tmp_path / "table3a" / "snd_dataset.npz"], capsys)[1]
        assert f"diversity/snd={per_seed['1']:.6f}" in line and 0 <= per_seed["1"] <= 1
    text = (tmp_path / "table3a" / "table3a.md").read_text()
    assert text.count("| IPPO | ") == 3
    assert "| 1 | 6.3e-04 ± 2.0e-05 |" in text and "| 1 | 2.4e-04 ± 1.1e-04 |" in text  # the paper's beside ours

    dataset = tmp_path / "table3a" / "snd_dataset.npz"
    recipe = json.loads(str(np.load(dataset)["recipe"]))
    assert [c["path"] for c in recipe["checkpoints"]] == [str(tmp_path / p) for p in table["sources"]]
    assert (recipe["episodes"], recipe["samples"], recipe["seed"]) == (2, 64, 0)
    launch_module, built = load_launch(), os.stat(dataset)
    monkeypatch.setattr(launch_module, "shared_dataset_snd", lambda opts, dataset: ({}, {}))  # the dataset only
    again = ["table3a", "--out", str(tmp_path), *select, "--snd-episodes", "2"]
    assert launch_module.main([*again, "--snd-samples", "64"]) == 0
    assert (os.stat(dataset).st_ino, os.stat(dataset).st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # reused
    assert launch_module.main([*again, "--snd-samples", "32"]) == 0
    assert np.load(dataset)["obs"].shape[:2] == (8, 4)  # built again: 32 observations


@pytest.mark.long
def test_a_stopped_grid_resumes_with_the_numbers_of_an_uninterrupted_run(tmp_path):
    """Ctrl-C (SIGINT to the launcher alone, as its scripts run in their own session) stops the
    running script after a checkpoint and starts no further run; the same command resumes it. The
    first budget is out of reach, so that the Ctrl-C always finds the run going however slow the
    machine; the grid resumes with a budget two iterations past the checkpoint, which an uninterrupted
    run trains too: the same numbers."""
    tiny = ["--", *TINY_VMAS, "--eval-interval", "320", "--print-interval", "1"]
    grid = ["figure2-ippo", "--seeds", "1"]
    grid_dir = str(tmp_path / "a" / "figure2-ippo")
    first = subprocess.Popen([sys.executable, LAUNCH, *grid, "--methods", "mlp", "fups", "--budget", str(OUT_OF_REACH),
                              "--jobs", "1", "--out", str(tmp_path / "a"), *tiny],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mlp = "ippo-dispersion-4-mlp-s1"
    log_path = os.path.join(grid_dir, mlp, "log.txt")
    wait_for(lambda: os.path.isfile(log_path) and "global_step=" in open(log_path).read(), "a first iteration", first)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=HANG)[0]
    assert first.returncode == 130, output
    assert "0 finished, 2 stopped or not started" in output, output
    assert "signal 15: saving a checkpoint" in log(grid_dir, mlp)
    checkpoint = os.path.join(run_folder(grid_dir, mlp), "checkpoint.pt")
    assert os.path.isfile(checkpoint) and summaries(grid_dir) == {}
    assert not os.path.exists(os.path.join(grid_dir, "ippo-dispersion-4-fups-s1"))  # never started

    budget = load_checkpoint(checkpoint)["global_step"] + 2 * 32
    reference = subprocess.Popen([sys.executable, LAUNCH, *grid, "--methods", "mlp", "--budget", str(budget),
                                  "--out", str(tmp_path / "b"), *tiny],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    again = launch([*grid, "--methods", "mlp", "fups", "--budget", str(budget), "--jobs", "2",
                    "--out", str(tmp_path / "a"), *tiny], tmp_path)
    assert again.returncode == 0 and "2 finished" in again.stdout, again.stdout + again.stderr
    assert [" --resume " in line for line in starts(grid_dir, mlp)] == [False, True]
    assert reference.wait(timeout=HANG) == 0, reference.stdout.read()
    resumed, uninterrupted = summaries(grid_dir)[mlp], summaries(str(tmp_path / "b" / "figure2-ippo"))[mlp]
    evaluated = set(range(320, budget + 1, 320)) | {budget}  # every --eval-interval, and the end
    assert seed_entry(resumed) == seed_entry(uninterrupted) and len(seed_entry(resumed)) == len(evaluated) + 1
    for key in ("final_return", "final_snd", "total_timesteps"):
        assert resumed[key] == uninterrupted[key], key


def test_a_killed_launchers_script_holds_the_runs_lock_then_saves_and_exits(tmp_path):
    """SIGKILL of the launcher (or of the Ray worker that runs it): its script, in a session of its own,
    gets a SIGTERM (its parent-death signal), saves a checkpoint and exits, and holds the run's lock until
    then, so that no retry removes its folder or trains it too; the same command, started meanwhile, waits
    for it and resumes the run. The script is stopped (SIGSTOP) across the kill: it is alive, whatever the
    machine's speed, when the lock is tried."""
    argv = [sys.executable, LAUNCH, "figure2-ippo", "--seeds", "1", "--methods", "mlp", "--budget", str(OUT_OF_REACH),
            "--jobs", "1", "--out", str(tmp_path), "--", *TINY_VMAS, "--eval-interval", "320", "--print-interval", "1"]
    launcher = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    grid_dir, run_id = str(tmp_path / "figure2-ippo"), "ippo-dispersion-4-mlp-s1"
    log_path = os.path.join(grid_dir, run_id, "log.txt")
    wait_for(lambda: os.path.isfile(log_path) and "global_step=" in open(log_path).read(), "a first iteration", launcher)
    (script,) = [p for p in children(launcher.pid) if b"ippo_hyper_vmas" in open(f"/proc/{p}/cmdline", "rb").read()]
    again = None
    try:
        os.kill(script, signal.SIGSTOP)
        launcher.kill()
        launcher.wait(timeout=HANG)
        with open(os.path.join(grid_dir, run_id, ".lock")) as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the script's: the launcher's copy died with it
        again = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        waiting = re.compile(rf"-> FLOCK +ADVISORY +WRITE +{again.pid} ")
        wait_for(lambda: waiting.search(open("/proc/locks").read()), "the second launcher's wait for the lock", again)
        os.kill(script, signal.SIGCONT)
        wait_for(lambda: not alive(script), "the script's exit")
        wait_for(lambda: len(starts(grid_dir, run_id)) == 2, "the run's resumption", again)
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=HANG) == 130, again.stdout.read()
    finally:
        for process in [p for p in (again, launcher) if p and p.poll() is None]:  # only when the test failed
            process.kill()
        if alive(script):
            os.kill(script, signal.SIGKILL)
    first, resumed = log(grid_dir, run_id).split("\n$ ")  # the killed launcher's start, then the second's
    assert "signal 15: saving a checkpoint" in first and resumed.split("\n")[0].count(" --resume ") == 1


def test_a_script_the_launcher_starts_ignores_slurms_usr2(tmp_path, monkeypatch):
    """Slurm sends SIGUSR2 to every process of a job before its time limit; the scripts do not handle it, and
    its default action kills. A script started as the launcher starts it survives it (the launcher itself
    passes a SIGTERM on)."""
    launch_module = load_launch()
    run = launch_module.GRIDS["table2-6"]()[0]  # a matrix game: no checkpoint to read once it exits 0
    survives = "import os, signal; os.kill(os.getpid(), signal.SIGUSR2); print('survived')"
    monkeypatch.setattr(launch_module, "command", lambda run, run_dir, extra: [sys.executable, "-c", survives])
    monkeypatch.setattr(launch_module, "write_summary", lambda *args: None)
    assert launch_module.run_one(run, str(tmp_path), []) == "finished"
    assert "survived" in log(str(tmp_path), run.run_id)


class FakeScript:
    """A running script as stop_child sees it: it records the signals it is sent."""

    def __init__(self):
        self.signals = []

    def poll(self):
        return None

    def send_signal(self, signum):
        self.signals.append(signum)


class HungUpTerminal:
    def write(self, text):
        raise OSError(errno.EIO, "Input/output error")

    flush = write


def test_a_stop_reaches_the_scripts_when_the_terminal_has_hung_up(monkeypatch):
    """SIGHUP: the terminal is gone and a line to it fails (EIO); the scripts are told to save all the same."""
    launch_module, script = load_launch(), FakeScript()
    launch_module.CHILDREN.add(script)
    monkeypatch.setattr(sys, "stderr", HungUpTerminal())
    launch_module.request_stop(signal.SIGHUP, None)
    launch_module.request_stop(signal.SIGHUP, None)  # a second stop: at once
    assert script.signals == [signal.SIGTERM, signal.SIGTERM] and launch_module.STOP == [signal.SIGHUP] * 2


def test_a_second_stop_promises_no_more_than_it_does(capsys):
    """On Ray and submitit the launcher has no script of its own to stop at once (the workers have them, told
    at the first stop): its second line says so."""
    launch_module = load_launch()
    launch_module.request_stop(signal.SIGINT, None)
    launch_module.request_stop(signal.SIGINT, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].endswith("(again: the running scripts finish their iteration and save all the same)"), lines


def test_matrix_grid_and_a_failing_run_names_its_log(tmp_path, monkeypatch, capsys):
    argv = ["table2-6", "--out", str(tmp_path), "--only", "specialisation-n2", "--methods", "mlp", "fups-noid",
            "--seeds", "1", "--jobs", "2"]
    result = launch(argv + ["--budget", "20"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    found = summaries(str(tmp_path / "table2-6"))
    assert sorted(found) == ["reinforce-specialisation-n2-fups-noid-s1", "reinforce-specialisation-n2-mlp-s1"]
    for s in found.values():
        assert s["env"] == "matrix" and s["task"] == "specialisation-n2" and s["config"]["num_trials"] == "20"
        last = seed_entry(s)["absolute_metrics"]
        assert set(last) == {"return", "return_sampled", "snd"} and 0 < last["return"][0] <= 1
        assert s["final_return"] == last["return"][0] and s["final_snd"] == last["snd"][0]
        assert s["gradient"]["actor_var_mean"] > 0

    # a run that fails: a budget below a batch of 10, which the launcher's own check (refused_flags) would
    # refuse before any run starts, let through to stand for a failure no check foresees
    launch_module = load_launch()
    monkeypatch.setattr(launch_module, "refused_flags", lambda runs, extra: None)
    capsys.readouterr()
    assert launch_module.main(argv + ["--budget", "5", "--methods", "mlp", "--seeds", "2"]) == 1
    out = capsys.readouterr().out
    log_path = os.path.join(tmp_path, "table2-6", "reinforce-specialisation-n2-mlp-s2", "log.txt")
    assert "1 failed" in out and (f"reinforce-specialisation-n2-mlp-s2: failed (exit 2: error: --num-trials: must be "
                                  f"at least --batch-size = 10, got 5; see {log_path})") in out, out


# ----- submitit (local executor) and Ray -----
def test_submitit_local_runs_mamujoco_runs_end_to_end(tmp_path):
    argv = ["table4", "--backend", "submitit-local", "--out", str(tmp_path), "--only", "HalfCheetah-2x3",
            "--methods", "mlp", "nops", "--seeds", "1", "--budget", "64", "--", *TINY_MAMUJOCO, "--no-async-envs"]
    result = launch(argv, tmp_path)
    assert result.returncode == 0 and "2 finished" in result.stdout, result.stdout + result.stderr
    found = summaries(str(tmp_path / "table4"))
    assert sorted(found) == ["mappo-HalfCheetah-2x3-mlp-s1", "mappo-HalfCheetah-2x3-nops-s1"]
    for s in found.values():
        assert s["env"] == "mamujoco" and s["task"] == "HalfCheetah-2x3" and s["config"]["hypernet"] == s["method"]
        assert seed_entry(s)["step_0"]["step_count"] == 64 and len(seed_entry(s)["step_0"]["return"]) == 2
        assert math.isfinite(s["final_snd"]) and s["sps"] > 0
    assert os.path.isdir(tmp_path / "table4" / "submitit")  # the jobs' own logs


@pytest.mark.long
def test_submitit_preemption_checkpoints_the_run_and_the_requeued_task_resumes_it(tmp_path):
    """submitit's local executor sends the job USR2 (what Slurm sends before a preemption or the time
    limit): RunTask.checkpoint stops the script with a checkpoint, the job is requeued, and the new
    task resumes the run (--resume) to its end."""
    import submitit  # requirements-dev.txt: never skipped
    launch_module = load_launch()  # not in sys.modules: pickled by value, as from `python launch.py` (__main__)
    (run,) = [r for r in launch_module.GRIDS["figure2-ippo"]() if r.method == "mlp" and r.seed == 30]
    # 200 iterations (about 10 s idle): the script is stopped after the first, as soon as the test sees it;
    # the requeued task must then train the rest (a budget out of reach would never finish)
    run = launch_module.dataclasses.replace(run, seed=1, budget=32 * 200)
    grid_dir = str(tmp_path / "figure2-ippo")
    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    executor.update_parameters(timeout_min=HANG // 60)
    job = executor.submit(launch_module.RunTask(), run, grid_dir, [*TINY_VMAS, "--print-interval", "1"], 1)
    log_path = os.path.join(grid_dir, run.run_id, "log.txt")
    wait_for(lambda: os.path.isfile(log_path) and "global_step=" in open(log_path).read(), "a first iteration")
    # USR2 to the job's task, as Slurm signals it (LocalJob._interrupt signals the local controller,
    # which does not pass USR2 on in submitit 1.5.4: it dies, and the task runs on unsignalled). The
    # script is stopped (SIGSTOP) until the task's SIGTERM waits for it: mid-run, however fast the machine.
    (task_pid,) = children(job._process.pid)
    (script_pid,) = children(task_pid)
    try:  # bounded: a checkpoint() that waits for the script forever (a Popen.wait deadlock) hangs here
        os.kill(script_pid, signal.SIGSTOP)
        assert "iteration=200/200" not in open(log_path).read()  # the run is stopped before its end
        os.kill(task_pid, signal.SIGUSR2)
        wait_for(lambda: signal.SIGTERM in pending_signals(script_pid), "the task's SIGTERM to its script")
        os.kill(script_pid, signal.SIGCONT)
        wait_for(job.done, "the requeued job")
    finally:
        for pid in children(job._process.pid):
            os.kill(pid, signal.SIGKILL)  # only left when the test failed
    assert job.result() == "finished"
    assert "signal 15: saving a checkpoint" in log(grid_dir, run.run_id)
    assert [" --resume " in line for line in starts(grid_dir, run.run_id)] == [False, True]
    s = summaries(grid_dir)[run.run_id]
    assert s["total_timesteps"] == 32 * 200 and seed_entry(s)["absolute_metrics"]["return"]


@pytest.mark.long
def test_ray_local_cluster_runs_a_grid_stops_it_and_resumes_it(tmp_path):
    """A Ctrl-C of the launcher cancels the Ray tasks: each passes a SIGTERM on to its script, which
    saves a checkpoint; the same command resumes both runs to their summaries. The first budget is out
    of reach (neither run may end before the other starts, however slow the machine); the resumed grid's
    is two iterations past the later checkpoint."""
    assert importlib.util.find_spec("ray"), "requirements-dev.txt installs Ray"  # a failure, never a skip

    def argv(budget):
        return [LAUNCH, "figure2-mappo", "--backend", "ray", "--out", str(tmp_path), "--methods", "linear", "nops",
                "--seeds", "1", "--jobs", "2", "--budget", str(budget), "--", *TINY_VMAS, "--eval-interval", "1280",
                "--print-interval", "1"]

    grid_dir = str(tmp_path / "figure2-mappo")
    run_ids = ["mappo-dispersion-4-linear-s1", "mappo-dispersion-4-nops-s1"]
    first = subprocess.Popen([sys.executable, *argv(OUT_OF_REACH)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    logs = [os.path.join(grid_dir, run_id, "log.txt") for run_id in run_ids]
    wait_for(lambda: all(os.path.isfile(p) and "global_step=" in open(p).read() for p in logs), "both runs", first)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=HANG)[0]
    assert first.returncode == 130 and "0 finished, 2 stopped" in output, output
    stopped_at = []
    for run_id in run_ids:
        assert "signal 15: saving a checkpoint" in log(grid_dir, run_id)
        checkpoint = os.path.join(run_folder(grid_dir, run_id), "checkpoint.pt")
        assert os.path.isfile(checkpoint)
        stopped_at.append(load_checkpoint(checkpoint)["global_step"])

    budget = max(stopped_at) + 2 * 32
    again = run_python(argv(budget), cwd=tmp_path)
    assert again.returncode == 0 and "2 finished" in again.stdout, again.stdout + again.stderr
    found = summaries(grid_dir)
    assert sorted(found) == run_ids
    for run_id, s in found.items():
        check_vmas_summary(s, "figure2-mappo", s["method"], budget)
        assert s["script"] == "mappo_hyper_vmas.py"
        assert [" --resume " in line for line in starts(grid_dir, run_id)] == [False, True]
        times = [float(line.split()[-1]) for line in log(grid_dir, run_id).splitlines() if line.startswith("# wall_seconds")]
        assert len(times) == 2 and s["wall_seconds"] == pytest.approx(sum(times), abs=0.1)  # both starts


def test_evaluations_off_schedule_are_left_out(tmp_path):
    """A run grown from budget 250 to 350 (interval 100) evaluated at its first end too (250): its
    step_k must be a straight run's, so that one goes; the final evaluation stays."""
    steps = [100, 200, 250, 300, 350]
    with open(tmp_path / "evaluations.jsonl", "w") as f:
        for step in steps + [300]:  # a resume after a hard kill repeats an evaluation: the last line wins
            f.write(json.dumps({"step": step, "episode_returns": [step / 1000, 1.0], "snd": step}) + "\n")
    launch_module = load_launch()
    kept = launch_module.evaluations(str(tmp_path), {}, 100)
    assert [e["step_count"] for e in kept] == [100, 200, 300, 350] and kept[2]["return"] == [0.3, 1.0]
    assert [e["step_count"] for e in launch_module.evaluations(str(tmp_path), {})] == steps


def test_grids_use_the_papers_seeds_budgets_and_settings():
    """benchmark/launch.py: Table 9's seeds, appendix D's budgets (20M Dispersion, 10M Navigation
    and MaMuJoCo), Table 11's Dispersion and Table 16's goal settings for 2, 4, 8 agents."""
    launch = load_launch()
    figure2 = launch.GRIDS["figure2-ippo"]()
    assert sorted({r.seed for r in figure2}) == sorted([30, 1, 42, 72858, 2300658])
    assert {r.budget for r in figure2} == {20_000_000} and len(figure2) == 4 * 5
    assert {r.method for r in figure2} == {"mlp", "linear", "nops", "fups"}
    figure4 = launch.GRIDS["figure4"]()
    assert {r.budget for r in figure4} == {10_000_000}
    assert sorted({r.task for r in figure4}) == sorted(
        ["navigation-2-same", "navigation-2-different"] + [f"navigation-{n}-{g}" for n in (4, 8)
                                                            for g in ("same", "different", "half")])
    run = next(r for r in figure4 if r.task == "navigation-8-half" and r.method == "dico")
    import ippo_hyper_vmas as script

    args = read_args(script, run.argv())  # Table 15's DiCo row for 8 agents, half the agents on one goal
    assert (args.agents_with_same_goal, args.clip_coef, args.learning_rate, args.dico_snd_des) == (4, 0.1, 2.5e-4, -1.0)
    assert {r.budget for r in launch.GRIDS["table4"]()} == {10_000_000}
    figure6 = launch.GRIDS["figure6"]()  # both algorithms, four maps, FuPS and HyperMARL, 10M steps (Table 22)
    assert len(figure6) == 2 * 4 * 2 * 5 and {r.budget for r in figure6} == {10_000_000}
    assert {(r.script, r.task, r.method, r.run_id.removesuffix("-s30")) for r in figure6 if r.seed == 30} == {
        (f"{algo}_hyper_smax.py", task, f"{algo}-{family}", f"{algo}-{task}-{family}") for algo in ("ippo", "mappo")
        for task in ("2s3z", "3s5z", "smacv2_10_units", "smacv2_20_units") for family in ("fups", "mlp")}


@pytest.mark.long
def test_figure6_runs_smax_and_its_summary_holds_every_episodes_win(tmp_path):
    """The SMAX grid end to end (one tiny run): summary.json holds each evaluation's returns and wins, as
    evaluations.jsonl; the map's Table 23 values reach the script (its learning rate)."""
    assert importlib.util.find_spec("jaxmarl"), "requirements-dev.txt installs jaxmarl"  # a failure, never a skip
    argv = ["figure6", "--out", str(tmp_path), "--only", "mappo-3s5z-mlp", "--seeds", "1", "--budget", "64", "--",
            "--num-envs", "4", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1",
            "--eval-episodes", "4", "--eval-interval", "32", "--fc-dim", "16", "--gru-hidden-dim", "16"]
    result = launch(argv, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (s,) = summaries(str(tmp_path / "figure6")).values()
    assert (s["env"], s["task"], s["method"], s["config"]["learning_rate"]) == ("smax", "3s5z", "mappo-mlp", "0.0003")
    lines = [json.loads(line) for line in open(os.path.join(os.path.dirname(s["_path"]), "evaluations.jsonl"))]
    entry = seed_entry(s)
    assert [entry[f"step_{k}"]["win"] for k in range(len(lines))] == [line["wins"] for line in lines]
    assert all(len(line["wins"]) == 4 and set(line["wins"]) <= {0.0, 1.0} for line in lines)


def test_figure5_is_table4s_humanoid_runs_in_table4s_folder(tmp_path, monkeypatch, capsys):
    """Figure 5 plots Table 4's Humanoid-17x1 runs: launching figure5 runs those very runs (ids, flags,
    folder), so a finished figure5 counts as finished in table4 and is not trained twice."""
    launch = load_launch()
    humanoid = [r for r in launch.GRIDS["table4"]() if r.task == "Humanoid-17x1"]
    assert launch.GRIDS["figure5"]() == humanoid and len(humanoid) == 4 * 5
    monkeypatch.chdir(tmp_path)
    assert launch.main(["figure5", "--out", "grids", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"figure5: 20 runs in {tmp_path / 'grids' / 'table4'} ")
    assert f"--runs-dir {tmp_path / 'grids' / 'table4' / 'mappo-Humanoid-17x1-mlp-s30'} --exp-name table4" in out


# ----- bad input, --dry-run, figure 10 -----
BAD = [
    (["nogrid"], "grid: invalid choice: 'nogrid'"),
    (["figure2-ippo", "--budget", "0"], "--budget: must be at least 1, got 0"),
    (["figure2-ippo", "--jobs", "0"], "--jobs: must be at least 1, got 0"),
    (["figure2-ippo", "--gpus-per-run", "-1"], "--gpus-per-run: must be a number of at least 0, got -1.0"),
    (["figure2-ippo", "--gpus-per-run", "nan"], "--gpus-per-run: must be a number of at least 0, got nan"),
    (["figure2-ippo", "--seeds", "1", "1"], "--seeds: must be distinct and at least 0, got 1 1"),
    (["figure2-ippo", "--seeds", "-5"], "--seeds: must be distinct and at least 0, got -5"),
    (["figure2-ippo", "--methods", "dico"],
     "--methods: figure2-ippo has no method dico (its methods: mlp linear nops fups)"),
    (["figure2-ippo", "--methods", "mlp", "nosp"], "--methods: figure2-ippo has no method nosp"),
    (["figure4", "--only", "navigation-16"], "--only: no run of figure4 matches navigation-16"),
    (["figure2-ippo", "--out", "notes.txt"], "--out: "),
    (["figure2-ippo", "--out", "/proc/sys/x"], "--out: '/proc/sys' is not writable"),
    (["figure10", "--out", "/proc/sys/x"], "--out: '/proc/sys' is not writable"),
    (["figure2-ippo", "--backend", "ray", "--ray-address", "127.0.0.1:1"], "--ray-address: cannot reach '127.0.0.1:1'"),
    (["figure2-ippo", "--", "--lidar-range", "0.3"],
     "flags after --: ippo_hyper_vmas.py: --lidar-range: is a navigation option, not for --scenario dispersion"),
    (["figure17-ippo", "--", "--hypernet-init", "matched"],  # would turn the w/o RF ablation back into mlp
     "flags after --: --hypernet-init: the grid sets it for ippo-dispersion-4-mlp-noRF-s30"),
    (["figure17-ippo", "--", "--hypernet_init", "scaled"],  # tyro takes underscores too
     "flags after --: --hypernet-init: the grid sets it for ippo-dispersion-4-mlp-noRF-s30"),
    (["figure2-ippo", "--", "--total-timesteps=5"], "flags after --: --total-timesteps: the grid sets it for"),
    (["figure2-ippo", "--", "--total_timesteps=5"], "flags after --: --total-timesteps: the grid sets it for"),
    (["table3a", "--methods", "dico"], "--methods: table3a has no method dico (its methods: mlp linear nops fups)"),
    (["table3a", "--only", "navigation"], "--only: no run of table3a matches navigation"),
    # its dataset is made of figure2-ippo's nops and fups runs: a selection without them has no dataset
    (["table3a", "--methods", "mlp"], "--methods: table3a builds its dataset from figure2-ippo's nops and fups runs"),
    (["table3a", "--only", "mappo"], "--only: table3a builds its dataset from figure2-ippo's nops and fups runs"),
    (["table2-6", "--methods", "mlp", "--", "--hypernet-hidden-dims", "0"],
     "flags after --: reinforce_matrix_games.py: --hypernet-hidden-dims: must be one or more positive sizes"),
    # --budget and --seeds the scripts refuse: before any run starts, not once per run
    (["figure2-ippo", "--budget", "1"],
     "--budget: ippo_hyper_vmas.py: --total-timesteps: must be at least num_envs * num_steps = 2048, got 1"),
    (["table2-6", "--budget", "1", "--seeds", "1"],
     "--budget: reinforce_matrix_games.py: --num-trials: must be at least --batch-size = 10, got 1"),
    (["table2-6", "--seeds", "4294967296", "--methods", "mlp"],
     "--seeds: reinforce_matrix_games.py: --seed: must be between 0 and 4294957295, got 4294967296"),
    (["figure2-ippo", "--seeds", "4294967296", "1", "--", "--print-interval", "1"],  # the largest seed, not the last
     "--seeds: ippo_hyper_vmas.py: --seed: must be between 0 and 4294957295, got 4294967296"),
    (["figure2-ippo", "--out", "/proc/x"], "--out: '/proc' is not writable"),
    (["figure10", "--dry-run"], "--dry-run: not with figure10, which counts parameters and trains nothing"),
    (["table3a", "--measure", "3"], "--measure: not with table3a, which evaluates figure2's finished runs"),
    (["table2-6", "--out", os.fsdecode(b"g\xff")], "--out: "),  # not UTF-8: refused before any folder  # root too: /proc takes no new folder
    (["figure2-ippo", "--backend", "slurm", "--timeout-min", "5", "--signal-delay-s", "300"],
     "--signal-delay-s: must be less than --timeout-min in seconds (300), got 300"),
]


def assert_refused(launch_module, argv, message, tmp_path, monkeypatch, capsys):
    """main(argv): one line `error: MESSAGE...`, exit 2, nothing on stdout, nothing written, no backend started."""
    for backend in launch_module.BACKENDS:  # a check that lets bad input through must not start a grid here
        monkeypatch.setitem(launch_module.BACKENDS, backend, lambda *_: pytest.fail("bad input reached a backend"))
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        launch_module.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), captured.err
    assert captured.out == "" and os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_launch_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    assert_refused(load_launch(), argv, message, tmp_path, monkeypatch, capsys)


# A backend this machine cannot serve: a traceback (no sbatch; `auto` without a cluster) or a wait forever
# (a GPU asked of a local Ray cluster without one), before; here, with no Slurm, no Ray cluster and no GPU.
UNSERVED = [
    (["figure2-ippo", "--backend", "slurm"], "--backend: slurm needs Slurm's sbatch on PATH"),
    (["figure2-ippo", "--backend", "ray", "--ray-address", "auto"], "--ray-address: auto finds no running Ray cluster"),
    (["figure2-ippo", "--backend", "ray", "--gpus-per-run", "0.25"],
     "--gpus-per-run: this machine has no GPU for the local Ray cluster, got 0.25"),
]


@pytest.mark.parametrize("argv, message", UNSERVED, ids=[" ".join(a[1:]) for a, _ in UNSERVED])
def test_a_backend_this_machine_cannot_serve_is_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    import ray._private.services as services  # Ray's own cluster lookup: a move of it fails here
    launch_module = load_launch()
    monkeypatch.setattr(launch_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])  # not another test's local cluster either
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setattr(launch_module, "gpu_count", lambda: 0)
    assert_refused(launch_module, argv, message, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("backend, engine", [("slurm", "submitit"), ("submitit-local", "submitit"), ("ray", "ray")])
def test_a_backend_whose_engine_is_not_installed_is_one_line_exit_2(tmp_path, monkeypatch, capsys, backend, engine):
    """submitit and Ray are requirements-dev.txt's: without them, one line instead of an ImportError's traceback."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == engine else find_spec(name, *a))
    assert_refused(load_launch(), ["figure2-ippo", "--backend", backend], f"--backend: {backend} needs {engine}, which "
                   "is not installed", tmp_path, monkeypatch, capsys)


def slurm_parameters(launch_module, tmp_path, monkeypatch, flags) -> dict:
    """What launch_submitit asks of Slurm for a grid with these flags (a recording executor: nothing submitted)."""
    import submitit  # requirements-dev.txt: never skipped
    seen = {}

    class Executor:  # records what launch.py asks of Slurm; submits nothing
        def __init__(self, folder, cluster, **kwargs):
            seen.update(cluster=cluster, **kwargs)

        def update_parameters(self, **params):
            seen.update(params)

        def map_array(self, task, runs, *rest):
            return [type("Job", (), {"job_id": "7_0"})()]

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    monkeypatch.setattr(launch_module.shutil, "which", lambda name: f"/usr/bin/{name}")  # as on a cluster
    opts, extra = launch_module.parse(["figure2-ippo", "--backend", "slurm", "--out", str(tmp_path), *flags])
    runs = launch_module.select(launch_module.GRIDS[opts.grid](), opts)[:1]
    launch_module.launch_submitit(runs, str(tmp_path / "grid"), extra, opts)
    return seen


@pytest.mark.parametrize("flags, delay", [([], 600), (["--timeout-min", "10"], 300), (["--signal-delay-s", "900"], 900)])
def test_slurm_asks_a_run_to_save_long_enough_before_its_time_limit(tmp_path, monkeypatch, flags, delay):
    """submitit signals a job 90 s before its limit unless told otherwise: less than one Navigation
    iteration on a CPU, so the run would die before its save. The array gets --signal-delay-s."""
    seen = slurm_parameters(load_launch(), tmp_path, monkeypatch, flags)
    assert seen["cluster"] == "slurm" and seen["slurm_signal_delay_s"] == delay
    assert seen["slurm_additional_parameters"] == dict(requeue=True)


@pytest.mark.parametrize("flags, parallelism", [([], None), (["--jobs", "50"], 50)])
def test_slurm_runs_as_many_tasks_at_once_as_the_cluster_lets_it_unless_told(tmp_path, monkeypatch, flags, parallelism):
    """The submitting host's CPU count says nothing of the cluster's: only --jobs limits the array."""
    seen = slurm_parameters(load_launch(), tmp_path, monkeypatch, flags)
    assert seen.get("slurm_array_parallelism") == parallelism


CORRUPT_SUMMARIES = {"cut short": '{"format": "hypermarl-summary/1", "total_timesteps": 2', "a list": "[1, 2]",
                     "no total_timesteps": '{"format": "hypermarl-summary/1"}', "a text budget": '{"total_timesteps": "20M"}',
                     "not text": b"\xff\xfe"}


@pytest.mark.parametrize("content", CORRUPT_SUMMARIES.values(), ids=list(CORRUPT_SUMMARIES))
def test_an_unreadable_summary_is_an_unfinished_run_and_one_note(tmp_path, capsys, content):
    folder = tmp_path / "figure2-ippo" / "ippo-dispersion-4-mlp-s1" / "run"
    folder.mkdir(parents=True)
    path = folder / "summary.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert load_launch().main(["figure2-ippo", "--out", str(tmp_path), "--methods", "mlp", "--seeds", "1", "--dry-run"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: {path} is unreadable (") and \
        lines[0].endswith("; the run counts as unfinished (resumed or rerun)"), captured.err
    assert "(0 finished, 0 to resume)" in captured.out and "  [started] ippo-dispersion-4-mlp-s1: " in captured.out


def test_a_run_with_an_unreadable_summary_runs_again(tmp_path):
    """A matrix game (no checkpoint, seconds) whose summary was cut short: the launcher reruns it and
    writes a whole summary, with one note and no traceback."""
    run_id = "reinforce-specialisation-n2-nops-s1"
    old = tmp_path / "table2-6" / run_id / "old"
    old.mkdir(parents=True)
    (old / "summary.json").write_text('{"total_timesteps": 10')
    result = launch(["table2-6", "--out", str(tmp_path), "--methods", "nops", "--only", "specialisation-n2",
                     "--seeds", "1", "--budget", "10"], tmp_path)
    assert result.returncode == 0 and "0 skipped (finished before), 1 finished" in result.stdout, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"note: {old}/summary.json is unreadable (Expecting ',' delimiter: line 1 "
                                          "column 23 (char 22)); the run counts as unfinished (resumed or rerun)"]
    s = summary(str(tmp_path / "table2-6"), run_id)
    assert s["total_timesteps"] == 10 and seed_entry(s)["step_0"]["return"] and not old.exists()


def test_an_unreadable_evaluations_line_is_left_out_of_the_summary(tmp_path, capsys):
    """A line cut short (a full disk), then the evaluations a resumed run appended: one note, no traceback."""
    with open(tmp_path / "evaluations.jsonl", "w") as f:
        f.write(json.dumps({"step": 100, "episode_returns": [0.1], "snd": 1.0}) + "\n")
        f.write('{"step": 200, "episode_ret\n')
        f.write(json.dumps({"step": 200, "episode_returns": [0.2], "snd": 2.0}) + "\n")
        f.write("[]\n")  # JSON, but not an evaluation
    kept = load_launch().evaluations(str(tmp_path), {})
    assert [(e["step_count"], e["return"]) for e in kept] == [(100, [0.1]), (200, [0.2])]
    lines = capsys.readouterr().err.splitlines()
    path = tmp_path / "evaluations.jsonl"
    assert len(lines) == 2 and lines[0].startswith(f"note: {path} line 2 is unreadable (JSONDecodeError: ")
    assert lines[1].startswith(f"note: {path} line 4 is unreadable (TypeError: ") and lines[1].endswith("left out of the summary")


def test_launch_bad_input_from_the_command_line(tmp_path):
    result = launch(["figure2-ippo", "--jobs", "0"], tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --jobs: must be at least 1, got 0\n"
    assert result.stdout == "" and os.listdir(tmp_path) == []


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_launch().main(["figure4", "--out", "grids", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # Navigation: n = 2 (same, different), 4 and 8 (same, different, half) x 5 methods x 5 seeds
    assert out.startswith("figure4: 200 runs in ") and out.count("  [new] ") == 200, out[:500]
    assert "[new] ippo-navigation-8-half-dico-s2300658: python ippo_hyper_vmas.py --scenario navigation" in out
    assert out.count(" --save-model --runs-dir ") == 200  # the command as the launcher will start it
    assert os.listdir(tmp_path) == []


def test_figure10_counts_are_the_scripts_actor_parameters(tmp_path, monkeypatch):
    launch_module = load_launch()
    assert launch_module.main(["figure10", "--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path / "figure10")) == ["figure10.json", "figure10.md", "figure10.png"]
    counts = json.load(open(tmp_path / "figure10" / "figure10.json"))
    import ippo_hyper_vmas as script

    n = 8
    for setting, n_food in (("n_food = n_agents", n), ("n_food = 4", 4)):
        obs_dim = 4 + 3 * n_food  # Dispersion: position, velocity, 3 numbers per food
        for method in ("mlp", "linear", "nops", "fups"):
            args = script.paper_defaults(script.Args(n_agents=n, n_food=n_food, hypernet=method),
                                         {"n_agents", "n_food", "hypernet"})
            agent = script.Agent(args, obs_dim, 9, True)  # real tensors this time
            assert counts[setting][method][str(n)] == sum(p.numel() for p in agent.actor.parameters()), method
    table = open(tmp_path / "figure10" / "figure10.md").read()
    assert f"| 8 | {counts['n_food = n_agents']['mlp']['8']:,} |" in table
    assert f"| 8 | {counts['n_food = 4']['mlp']['8']:,} |" in table


def test_measure_times_each_setting_and_multiplies_out(tmp_path, monkeypatch, capsys):
    """--measure: one short run per (script, task, method), training seconds from the run's own
    perf/* logs, then each setting's runs x budget / steps per second; nothing left behind."""
    monkeypatch.chdir(tmp_path)
    launch_module = load_launch()
    argv = ["figure2-ippo", "--measure", "3", "--methods", "fups", "--budget", "3600000", "--", *TINY_VMAS]
    assert launch_module.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[2]: line.strip("|").split(" | ") for line in out.splitlines()
            if line.startswith("| ippo_hyper_vmas.py | dispersion-4 |")}
    (row,) = rows.values()
    sps, runs, hours = float(row[3].replace(",", "")), int(row[4]), float(row[6])
    assert runs == 5 and sps > 0  # Table 9's five seeds: 5 x 3.6M steps / sps = 5,000 / sps hours
    assert hours == pytest.approx(5_000 / sps, rel=0.01, abs=0.05), row  # the table rounds both
    assert os.listdir(tmp_path) == []


def test_a_run_another_launcher_holds_is_not_started_twice(tmp_path):
    """Two launchers on one grid (a Slurm array submitted again while it runs): the second finds the
    run's lock taken by a launcher alive (this process) and starts nothing in its folder, at once."""
    launch_module = load_launch()
    run = launch_module.GRIDS["figure2-ippo"]()[0]
    run_dir = tmp_path / run.run_id
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{socket.gethostname()} {os.getpid()}")  # as a launcher names itself
        held.flush()
        assert launch_module.run_one(run, str(tmp_path), TINY_VMAS) == "failed (another launcher is running it now)"
    assert os.listdir(run_dir) == [".lock"]  # no log, no run folder


def test_the_ablation_grids_run_w_o_rf_as_the_authors_code_without_the_scaling():
    """Figure 7 and Figure 17: w/o RF is --hypernet-init flax (Flax's default heads), not PyTorch's init."""
    launch = load_launch()
    for grid in ("figure7", "figure17-ippo", "figure17-mappo"):
        runs = [r for r in launch.GRIDS[grid]() if r.method == "mlp-noRF"]
        assert runs and all(r.flags[r.flags.index("--hypernet-init") + 1] == "flax" for r in runs), grid
        others = [r for r in launch.GRIDS[grid]() if r.method != "mlp-noRF"]
        assert all("--hypernet-init" not in r.flags for r in others), grid


def test_more_jobs_than_runs_start_every_run_at_once(monkeypatch):
    """A slot per run at most: --jobs 2**70 used to fill a queue of 2**70 slots, growing without end."""
    launch_module = load_launch()
    monkeypatch.setattr(launch_module, "run_one", lambda run, *_: f"finished {run}")
    monkeypatch.setattr(launch_module, "gpu_count", lambda: 0)
    opts = launch_module.argparse.Namespace(jobs=2**70, threads=1)
    assert launch_module.launch_local(["a", "b"], "grid", [], opts) == ["finished a", "finished b"]


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_a_checkpoint_the_launcher_cannot_read_leaves_its_run_unfinished(tmp_path, content):
    """A damaged checkpoint.pt, or another script's (the matrix games' model.pt has no num_envs), is no
    traceback: the run counts as unfinished, and its --resume says why in its log.txt."""
    import torch

    launch_module = load_launch()
    run = launch_module.GRIDS["figure2-ippo"]()[0]
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"args": {"hidden_size": 8}, "seed": 1, "model": {}}, path)
    else:
        path.write_bytes(content)
    assert launch_module.completed(run, str(tmp_path)) is False
