"""The paper's experiment grids, one command each, on a laptop, a GPU box, a Slurm cluster or a Ray cluster.

    python benchmark/launch.py figure2-ippo --dry-run                  # the runs and their cost, nothing started
    python benchmark/launch.py figure2-ippo --budget 2000000 --jobs 2  # here: 2 runs at a time
    python benchmark/launch.py figure4 --backend slurm --slurm-partition gpu --timeout-min 240
    python benchmark/launch.py table4 --backend ray --ray-address auto --gpus-per-run 0.25
    python benchmark/aggregate.py runs/grids/figure2-ippo             # plots and tables, rliable

A grid expands to (script, flags, seed) runs with the paper's seeds, budgets and evaluation
protocol (each script's paper defaults); --budget, --seeds, --only and extra script flags after
`--` override them. Every run lives in OUT/<grid>/<run_id>/ (the script's --runs-dir; log.txt
holds its output) and checkpoints (--save-model) as it goes. When a run exits cleanly the
launcher writes summary.json next to its TensorBoard log (configuration, git commit, every
evaluation's episode returns in marl-eval's layout, final SND, gradient statistics, SPS). The
same command again skips finished runs and resumes interrupted ones from their checkpoint
(--resume): the scripts save one on Ctrl-C and SIGTERM, so a preempted Slurm job (requeued by
submitit) or a killed Ray task (retried) continues where it stopped. Ctrl-C (SIGTERM, SIGHUP) of the
launcher starts no further run and has every running script save its checkpoint and exit; with the
local backend a second one stops them at once (on Ray and submitit the scripts are the workers', which
passed the first on: they finish their iteration and save whatever follows). On Linux a script
outlives no launcher: if its launcher or Ray worker is killed, it gets a SIGTERM, saves and exits, and
holds its run's lock until then, so no retry starts the run twice.

Backends, all existing engines: local (a pool of subprocesses; --runs-per-gpu runs share each GPU),
slurm (submitit job arrays; --backend submitit-local runs the same code path on this machine),
ray (--ray-address of a running cluster, else a local one; fractional --gpus-per-run).
Figure 10 is a parameter count, not a training grid: `launch.py figure10` writes its table and plot.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import importlib.util
import json
import re
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
from sps import OneLineParser, at_least, check_writable, write_report  # noqa: E402  (bad input: one line, exit 2)

PAPER_SEEDS = [30, 1, 42, 72858, 2300658]  # Table 9; the paper runs 5 seeds everywhere (appendix D)
MATRIX_SEEDS = [1, 2, 3, 4, 5]  # Table 8: 5 seeds (benchmark/matrix_games.py's)
FAMILIES = ["mlp", "linear", "nops", "fups"]
# Figure 7 / Figure 17: HyperMARL (MLP) and its ablations (section 6)
ABLATIONS = {"mlp": [], "mlp-S": ["--hypernet-hidden-dims", "32"], "mlp-onehot": ["--hypernet-embedding", "onehot"],
             "mlp-noRF": ["--hypernet-init", "flax"], "mlp-noGD": ["--hypernet-input", "agent+obs"]}
MAMUJOCO_TASKS = ["Humanoid-17x1", "Walker2d-2x3", "HalfCheetah-2x3", "Ant-4x2"]  # Table 4
# Table 4's columns: HAPPO, FuPS, independent actors (MAPPO), HyperMARL (MLP)
MAMUJOCO_METHODS = {"happo": ["--algo", "happo", "--hypernet", "nops"], "fups": ["--hypernet", "fups"],
                    "nops": ["--hypernet", "nops"], "mlp": ["--hypernet", "mlp"]}
SMAX_MAPS = ["2s3z", "3s5z", "smacv2_10_units", "smacv2_20_units"]  # Figure 6


@dataclasses.dataclass
class Run:
    grid: str
    env: str  # vmas | mamujoco | smax | matrix
    task: str
    method: str
    seed: int
    script: str
    flags: list  # the script's flags, the seed and budget excluded
    budget: int  # environment steps (matrix games: trials)
    keep: tuple = ()  # fractions of the budget at which a copy of the checkpoint is kept (Table 3a's dataset)

    @property
    def run_id(self) -> str:
        algo = self.script.split("_")[0]
        method = self.method.removeprefix(f"{algo}-")  # figure6's methods name their algorithm: said once
        return f"{algo}-{self.task}-{method}-s{self.seed}".replace("|", "_")

    def argv(self) -> list[str]:
        budget_flag = "--num-trials" if self.env == "matrix" else "--total-timesteps"
        return [*self.flags, "--seed", str(self.seed), budget_flag, str(self.budget)]


# ===== The grids =====
def dispersion(grid: str, script: str, methods: dict) -> list[Run]:
    """Figure 2 / Figure 17: Dispersion, 4 agents (Table 11), 20M steps (Table 9). Figure 2's IPPO NoPS and
    FuPS runs also keep their checkpoint at 5M (a quarter of the budget): Table 3a's SND dataset
    (appendix D.1.2) rolls out these policies at 5M and 20M."""
    return [Run(grid, "vmas", "dispersion-4", method, seed, script, ["--scenario", "dispersion", "--n-agents", "4", *flags],
                20_000_000, (0.25,) if grid == "figure2-ippo" and method in ("nops", "fups") else ())
            for method, flags in methods.items() for seed in PAPER_SEEDS]


def navigation(grid: str) -> list[Run]:
    """Figure 4 / Figure 16: Navigation with 2, 4, 8 agents, one goal for all ("same"), one goal each
    ("different") or half the agents on one goal and the others one goal each ("half", n > 2: Figure 16's
    "Two Goals" / "Four Goals", read as the README's deviations say). 10M steps: appendix D.1.1 says 10 million,
    "consistent with the baselines", and DiCo's own experiment config (het_control_experiment.yaml in
    proroklab/ControllingBehavioralDiversity) has max_n_frames 10_000_000 with the same evaluation (every 120,000
    frames, 200 episodes); Table 12's 10^6 disagrees with both. The script applies Table 15's clip and learning
    rate and Table 14's DiCo SND_des for each setting."""
    runs = []
    for n in (2, 4, 8):
        goals = {"same": n, "different": 1, **({"half": n // 2} if n > 2 else {})}
        for goal, same in goals.items():
            for method in ["fups", "nops", "mlp", "linear", "dico"]:
                runs += [Run(grid, "vmas", f"navigation-{n}-{goal}", method, seed, "ippo_hyper_vmas.py",
                             ["--scenario", "navigation", "--n-agents", str(n), "--agents-with-same-goal", str(same),
                              "--hypernet", method], 10_000_000) for seed in PAPER_SEEDS]
    return runs


def mamujoco(grid: str, tasks: list[str], methods: dict) -> list[Run]:
    """Table 4, Figures 5 and 7: MAPPO variants on MaMuJoCo, 10M steps (appendix D, Tables 17-21)."""
    return [Run(grid, "mamujoco", task, method, seed, "mappo_hyper_mamujoco.py", ["--task", task, *flags], 10_000_000)
            for task in tasks for method, flags in methods.items() for seed in PAPER_SEEDS]


def matrix_games(grid: str) -> list[Run]:
    """Tables 2 and 6: REINFORCE on both games with 2, 4, 8 agents, 10,000 trials (Table 8)."""
    return [Run(grid, "matrix", f"{game}-n{n}", method, seed, "reinforce_matrix_games.py",
                ["--game", game, "--n-agents", str(n), "--hypernet", method], 10_000)
            for game in ("specialisation", "synchronisation") for n in (2, 4, 8)
            for method in ["nops", "fups-noid", "fups", "linear", "mlp"] for seed in MATRIX_SEEDS]


def smax(grid: str) -> list[Run]:
    """Figure 6: recurrent IPPO and MAPPO, JaxMARL's FuPS and HyperMARL (MLP), on the four SMAX maps, 10M steps
    (Table 22); each map's learning rate and hypernetwork sizes are the scripts' per-map defaults (Table 23)."""
    return [Run(grid, "smax", map_name, f"{algo}-{family}", seed, f"{algo}_hyper_smax.py",
                ["--map", map_name, "--hypernet", family], 10_000_000)
            for algo in ("ippo", "mappo") for map_name in SMAX_MAPS for family in ("fups", "mlp") for seed in PAPER_SEEDS]


def hypernet_flags(methods) -> dict:
    return {method: ["--hypernet", method] for method in methods}


GRIDS = {
    "figure2-ippo": lambda: dispersion("figure2-ippo", "ippo_hyper_vmas.py", hypernet_flags(FAMILIES)),
    "figure2-mappo": lambda: dispersion("figure2-mappo", "mappo_hyper_vmas.py", hypernet_flags(FAMILIES)),
    "figure4": lambda: navigation("figure4"),
    "table4": lambda: mamujoco("table4", MAMUJOCO_TASKS, MAMUJOCO_METHODS),
    # Figure 5 plots Table 4's Humanoid runs: the same runs, in table4's folder (launching either one finishes both)
    "figure5": lambda: [r for r in mamujoco("table4", MAMUJOCO_TASKS, MAMUJOCO_METHODS) if r.task == "Humanoid-17x1"],
    "figure7": lambda: mamujoco("figure7", ["Humanoid-17x1"], {k: ["--hypernet", "mlp", *v] for k, v in ABLATIONS.items()}),
    "figure17-ippo": lambda: dispersion("figure17-ippo", "ippo_hyper_vmas.py",
                                        {k: ["--hypernet", "mlp", *v] for k, v in ABLATIONS.items()}),
    "figure17-mappo": lambda: dispersion("figure17-mappo", "mappo_hyper_vmas.py",
                                         {k: ["--hypernet", "mlp", *v] for k, v in ABLATIONS.items()}),
    "table2-6": lambda: matrix_games("table2-6"),
    "figure6": lambda: smax("figure6"),
}
# Training steps per second of one run per setting (evaluations excluded), measured on a 2-core x86
# CPU (torch 2.13, one thread, beside two other training runs) by `launch.py GRID --measure K` (K in the
# docs/reproducing.md, "What a grid costs"): the cost estimates of --dry-run.
CPU_SPS = {
    ('ippo_hyper_vmas.py', 'dispersion-4', 'fups'): 4204,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'linear'): 2576,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'mlp'): 2425,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'mlp-S'): 2346,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'mlp-noGD'): 335,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'mlp-noRF'): 2611,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'mlp-onehot'): 2456,
    ('ippo_hyper_vmas.py', 'dispersion-4', 'nops'): 4566,
    ('ippo_hyper_vmas.py', 'navigation-2', 'fups'): 475,
    ('ippo_hyper_vmas.py', 'navigation-2', 'mlp'): 297,
    ('ippo_hyper_vmas.py', 'navigation-2', 'nops'): 577,
    ('ippo_hyper_vmas.py', 'navigation-4', 'mlp'): 188,
    ('ippo_hyper_vmas.py', 'navigation-8', 'mlp'): 123,
    ('mappo_hyper_mamujoco.py', 'Ant-4x2', 'fups'): 1131,
    ('mappo_hyper_mamujoco.py', 'Ant-4x2', 'happo'): 1539,
    ('mappo_hyper_mamujoco.py', 'Ant-4x2', 'mlp'): 913,
    ('mappo_hyper_mamujoco.py', 'Ant-4x2', 'nops'): 1116,
    ('mappo_hyper_mamujoco.py', 'HalfCheetah-2x3', 'fups'): 1300,
    ('mappo_hyper_mamujoco.py', 'HalfCheetah-2x3', 'happo'): 1393,
    ('mappo_hyper_mamujoco.py', 'HalfCheetah-2x3', 'mlp'): 1527,
    ('mappo_hyper_mamujoco.py', 'HalfCheetah-2x3', 'nops'): 1528,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'fups'): 398,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'happo'): 560,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'mlp'): 267,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'mlp-S'): 264,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'mlp-noGD'): 8,  # iteration 2 of 3: 4,000 steps in 488 s
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'mlp-noRF'): 268,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'mlp-onehot'): 252,
    ('mappo_hyper_mamujoco.py', 'Humanoid-17x1', 'nops'): 416,
    ('mappo_hyper_mamujoco.py', 'Walker2d-2x3', 'fups'): 2096,
    ('mappo_hyper_mamujoco.py', 'Walker2d-2x3', 'happo'): 1280,
    ('mappo_hyper_mamujoco.py', 'Walker2d-2x3', 'mlp'): 1911,
    ('mappo_hyper_mamujoco.py', 'Walker2d-2x3', 'nops'): 1862,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'fups'): 2448,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'linear'): 2335,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'mlp'): 3074,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'mlp-S'): 2527,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'mlp-noGD'): 324,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'mlp-noRF'): 3781,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'mlp-onehot'): 2613,
    ('mappo_hyper_vmas.py', 'dispersion-4', 'nops'): 2063,
    # SMAX 2s3z: each run's last charts/SPS, averaged over figure6's three seeds (benchmark/results/figure6-2s3z),
    # one thread per run beside ONE other run (the other rows: beside two)
    ('ippo_hyper_smax.py', '2s3z', 'ippo-fups'): 1549,
    ('ippo_hyper_smax.py', '2s3z', 'ippo-mlp'): 1508,
    ('mappo_hyper_smax.py', '2s3z', 'mappo-fups'): 972,
    ('mappo_hyper_smax.py', '2s3z', 'mappo-mlp'): 963,
    ('reinforce_matrix_games.py', 'specialisation-n2', 'fups'): 1641,
    ('reinforce_matrix_games.py', 'specialisation-n2', 'fups-noid'): 1884,
    ('reinforce_matrix_games.py', 'specialisation-n2', 'linear'): 1609,
    ('reinforce_matrix_games.py', 'specialisation-n2', 'mlp'): 1717,
    ('reinforce_matrix_games.py', 'specialisation-n2', 'nops'): 2117,
    ('reinforce_matrix_games.py', 'specialisation-n4', 'fups'): 2027,
    ('reinforce_matrix_games.py', 'specialisation-n4', 'fups-noid'): 2177,
    ('reinforce_matrix_games.py', 'specialisation-n4', 'linear'): 1773,
    ('reinforce_matrix_games.py', 'specialisation-n4', 'mlp'): 1724,
    ('reinforce_matrix_games.py', 'specialisation-n4', 'nops'): 1748,
    ('reinforce_matrix_games.py', 'specialisation-n8', 'fups'): 2232,
    ('reinforce_matrix_games.py', 'specialisation-n8', 'fups-noid'): 2165,
    ('reinforce_matrix_games.py', 'specialisation-n8', 'linear'): 2080,
    ('reinforce_matrix_games.py', 'specialisation-n8', 'mlp'): 1699,
    ('reinforce_matrix_games.py', 'specialisation-n8', 'nops'): 2080,
    ('reinforce_matrix_games.py', 'synchronisation-n2', 'fups'): 2237,
    ('reinforce_matrix_games.py', 'synchronisation-n2', 'fups-noid'): 2195,
    ('reinforce_matrix_games.py', 'synchronisation-n2', 'linear'): 2081,
    ('reinforce_matrix_games.py', 'synchronisation-n2', 'mlp'): 1582,
    ('reinforce_matrix_games.py', 'synchronisation-n2', 'nops'): 2038,
    ('reinforce_matrix_games.py', 'synchronisation-n4', 'fups'): 2012,
    ('reinforce_matrix_games.py', 'synchronisation-n4', 'fups-noid'): 1766,
    ('reinforce_matrix_games.py', 'synchronisation-n4', 'linear'): 1850,
    ('reinforce_matrix_games.py', 'synchronisation-n4', 'mlp'): 1627,
    ('reinforce_matrix_games.py', 'synchronisation-n4', 'nops'): 2144,
    ('reinforce_matrix_games.py', 'synchronisation-n8', 'fups'): 1941,
    ('reinforce_matrix_games.py', 'synchronisation-n8', 'fups-noid'): 1853,
    ('reinforce_matrix_games.py', 'synchronisation-n8', 'linear'): 1664,
    ('reinforce_matrix_games.py', 'synchronisation-n8', 'mlp'): 1541,
    ('reinforce_matrix_games.py', 'synchronisation-n8', 'nops'): 1904,
}


# ===== One run: start or resume it, then write its summary =====
def run_folder(run_dir: str):
    """The script's own run folder inside run_dir (it names it run_name), or None before it exists."""
    if not os.path.isdir(run_dir):
        return None
    folders = [f for f in sorted(os.listdir(run_dir)) if os.path.isdir(os.path.join(run_dir, f))]
    return os.path.join(run_dir, folders[-1]) if folders else None


def command(run: Run, run_dir: str, extra: list) -> list[str]:
    """The script's command line: --resume from the run's checkpoint if there is one, else a fresh start."""
    folder = run_folder(run_dir)
    if folder and not os.path.isfile(os.path.join(folder, "checkpoint.pt")):
        shutil.rmtree(folder)  # interrupted before its first checkpoint (or a matrix game: seconds): start again
    return [sys.executable, *script_argv(run, run_dir, extra)]


def script_argv(run: Run, run_dir: str, extra: list) -> list[str]:
    """The script and its flags as command() starts it now (--dry-run prints them; nothing changes)."""
    folder = run_folder(run_dir)
    checkpoint = folder and os.path.join(folder, "checkpoint.pt")
    if checkpoint and os.path.isfile(checkpoint):  # its flags come from the checkpoint; the budget may grow;
        # the flags after -- again, for those a checkpoint does not keep (--no-cuda, --print-interval, ...)
        return [os.path.join(ROOT, run.script), "--resume", checkpoint, "--total-timesteps", str(run.budget), *extra]
    save = [] if run.env == "matrix" else ["--save-model"]
    return [os.path.join(ROOT, run.script), *run.argv(), *extra, *save, "--runs-dir", run_dir, "--exp-name", run.grid]


CHILDREN = set()  # the scripts running in this process, for stop_children
# The signals that asked for a stop (Ctrl-C, SIGTERM, SIGHUP): start no new run. A list, not a
# threading.Event: Ray and submitit pickle run_one with the globals it reads, and a lock does not pickle.
STOP = []


def completed(run: Run, folder: str) -> bool:
    """Whether the run reached its budget: a script stopped by a signal exits 0 too, after saving its
    checkpoint, so its state says how far it got (matrix games have no checkpoint: exit 0 is the end).
    Compared with run.budget, not the checkpoint's: a larger --budget makes a finished run unfinished."""
    if run.env == "matrix":
        return True
    import torch

    try:
        state = torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)
        batch = state["args"]["num_envs"] * state["args"]["num_steps"]
        return state["global_step"] + batch > run.budget  # no whole iteration left to train
    except Exception:  # damaged, or not this grid's: unfinished, and its --resume says why in the run's log.txt
        return False


def run_one(run: Run, grid_dir: str, extra: list, threads: int = 1, gpu=None) -> str:
    """Start or resume one run and wait for it: 'finished', 'stopped' (checkpointed before its budget),
    'skipped' (finished before), 'not started' (a stop came first) or 'failed (...)'."""
    run_dir = os.path.join(grid_dir, run.run_id)
    if STOP:
        return "skipped" if state(run_dir, run.budget) == "finished" else "not started"
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "a+") as lock:  # "a+": the holder's name stays readable
        if not take_lock(lock):  # two launchers on one grid (a Slurm array submitted twice): one run, one process
            return "failed (another launcher is running it now)"
        return run_locked(run, run_dir, extra, threads, gpu, lock)


def take_lock(lock) -> bool:
    """The run's lock, or False while another launcher runs the run. One killed on this machine (or its
    Ray worker) left the lock to its script, which saves and exits on its parent-death signal: that is
    waited for, so that Ray's retry of the task, or the same command again, resumes the run."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        host, _, pid = lock.read().partition(" ")
        sys.path.insert(0, ROOT)  # also in a Ray or submitit worker
        from hypermarl_extras import process_alive

        if sys.platform != "linux" or host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid)):
            return False
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.truncate(0)
    lock.write(f"{socket.gethostname()} {os.getpid()}")
    lock.flush()
    return True


def run_locked(run: Run, run_dir: str, extra: list, threads: int, gpu, lock) -> str:
    now = state(run_dir, run.budget)
    if now == "finished":
        return "skipped"
    if STOP:
        return "not started"
    if now == "interrupted" and completed(run, run_folder(run_dir)):
        # it trained its budget but the launcher was gone before the summary (killed): the script would
        # refuse a --resume with nothing left to train, so only the summary is missing
        write_summary(run, run_folder(run_dir), last_command(run_dir), extra)
        return "finished"
    for step in snapshots_due(run, run_dir, extra):  # on the way to the budget: stop there, keep a copy, go on
        result, _ = train(dataclasses.replace(run, budget=step), run_dir, extra, threads, gpu, lock)
        if result != "finished":
            return result
        keep_snapshot(run_folder(run_dir), step)
    result, argv = train(run, run_dir, extra, threads, gpu, lock)
    if result == "finished":
        write_summary(run, run_folder(run_dir), argv, extra)
    return result


def train(run: Run, run_dir: str, extra: list, threads: int, gpu, lock) -> tuple:
    """Start or resume the script to run.budget and wait: ('finished' | 'stopped' | 'failed (...)', argv).
    The thread that calls it waits for the script: the script's parent-death signal follows that thread."""
    argv = command(run, run_dir, extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    start = time.time()
    log_path = os.path.join(run_dir, "log.txt")
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        child = start_script(argv, log, env, lock)
        CHILDREN.add(child)
        try:
            if STOP:  # the stop came while it started: stop_children may not have seen it
                stop_child(child, again=False)
            code = wait(child)
        except BaseException:  # Ray's cancel (KeyboardInterrupt), submitit's requeue (SystemExit): the run
            stop_child(child, again=False)  # saves its checkpoint before this task ends
            child.wait()
            raise
        finally:
            CHILDREN.discard(child)
            log.write(f"# wall_seconds {time.time() - start:.1f}\n")  # a resumed run's: the sum over its starts
    if code != 0:
        if STOP:  # killed by the stop before it installed its handler: nothing to save yet
            return "stopped", argv
        return f"failed (exit {code}: {last_line(log_path)}; see {log_path})", argv
    return ("finished" if completed(run, run_folder(run_dir)) else "stopped"), argv


def start_script(argv: list, log, env: dict, lock) -> subprocess.Popen:
    """The script in its own session: a Ctrl-C in the terminal reaches the launcher only, which passes
    exactly one SIGTERM on (the scripts checkpoint on the first signal and stop at once on a second).
    It shares the run's lock (a flock lasts while any process holds its file open), so a launcher or
    Ray worker killed before it leaves the run taken until the script has saved and exited: no retry
    removes its folder or trains it twice."""
    prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None  # resolved before the fork
    parent = os.getpid()

    def in_the_child():
        # Slurm sends SIGUSR2 to every process of the job before its time limit, and its default action
        # kills; the launcher's checkpoint() passes a SIGTERM on instead. An ignored signal stays ignored
        # across exec, and Python leaves it so.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if prctl is not None:  # Linux: SIGTERM (save and exit) when the thread that started it ends
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the launcher died before the line above
                os.kill(os.getpid(), signal.SIGTERM)

    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                            pass_fds=(lock.fileno(),), preexec_fn=in_the_child)


def snapshot_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"checkpoint_{step}.pt")


def snapshots_due(run: Run, run_dir: str, extra: list) -> list[int]:
    """The steps of run.keep still to be kept: not yet copied, not passed (a run trained past one before
    it was asked for cannot go back: its checkpoint at the step itself is kept if it is there), and at
    least one iteration (a smaller budget is refused by the scripts)."""
    if not run.keep:
        return []
    sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmark")]  # also in a Ray or submitit worker, which unpickles this
    from sps import script_args

    args = script_args(__import__(run.script[:-3]), run.argv() + extra)
    due, folder = [], run_folder(run_dir)
    steps = {int(f * run.budget) for f in run.keep}
    for step in sorted(s for s in steps if args.num_envs * args.num_steps <= s < run.budget):
        if folder and os.path.isfile(snapshot_path(folder, step)):
            continue
        if folder and os.path.isfile(os.path.join(folder, "checkpoint.pt")) and completed(dataclasses.replace(run, budget=step), folder):
            if checkpoint_step(folder) <= step:  # stopped at the step, not yet copied (the launcher was killed)
                keep_snapshot(folder, step)
            continue
        due.append(step)
    return due


def checkpoint_step(folder: str) -> int:
    import torch

    return torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)["global_step"]


def keep_snapshot(folder: str, step: int) -> None:
    """checkpoint.pt, copied atomically to checkpoint_<step>.pt."""
    shutil.copyfile(os.path.join(folder, "checkpoint.pt"), snapshot_path(folder, step) + ".tmp")
    os.replace(snapshot_path(folder, step) + ".tmp", snapshot_path(folder, step))


def wait(child) -> int:
    """child.wait() in a helper thread: Popen.wait holds a lock while it blocks, so a signal handler
    in the waiting thread that waits for the child too (submitit's checkpoint()) would wait forever."""
    waiter = threading.Thread(target=child.wait, daemon=True)
    waiter.start()
    while waiter.is_alive():  # a signal interrupts the join, runs its handler, and the join goes on;
        waiter.join(1.0)  # Ray's cancel raises KeyboardInterrupt in this thread, seen between joins only
    return child.returncode


def stop_child(child, again=True) -> None:
    """SIGTERM: the script finishes its iteration, saves a checkpoint and exits 0; a second SIGTERM
    (again, e.g. a second Ctrl-C) stops it at once, with its last periodic checkpoint."""
    if child.poll() is None and (again or not getattr(child, "stopped", False)):
        child.stopped = True
        child.send_signal(signal.SIGTERM)


def stop_children() -> None:
    """Pass a stop on to the running scripts (they checkpoint and exit) and wait for them. Forgets
    them too: submitit pickles checkpoint()'s task with the globals run_one reads, CHILDREN included,
    and a Popen does not pickle."""
    for child in list(CHILDREN):
        stop_child(child)
    for child in list(CHILDREN):
        child.wait()
        CHILDREN.discard(child)


def last_line(path: str) -> str:
    """The last line of a log (a script's error is one line), shortened."""
    lines = [line.strip(" │╭╰─") for line in open(path, errors="replace").read().splitlines()]  # tyro's box
    lines = [line for line in lines if line and not line.startswith("# wall_seconds ")]  # the launcher's own
    return (lines[-1][:200] if lines else "no output")


def wall_seconds(run_dir: str):
    """The run's time over all its starts, from log.txt (a start whose launcher was killed is missing)."""
    path = os.path.join(run_dir, "log.txt")
    lines = [line for line in open(path) if line.startswith("# wall_seconds ")] if os.path.isfile(path) else []
    return round(sum(float(line.split()[-1]) for line in lines), 1) if lines else None


def last_command(run_dir: str) -> list:
    """The command of the run's last start, from its log.txt ('$ ' lines)."""
    lines = [line for line in open(os.path.join(run_dir, "log.txt")) if line.startswith("$ ")]
    return lines[-1][2:].split() if lines else []


# ===== summary.json =====
def read_events(folder: str):
    """The run's TensorBoard scalars {tag: [(step, value)]} and its flags {name: value as text}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    config = {}
    if "hyperparameters/text_summary" in acc.Tags()["tensors"]:
        # the last start's: a resumed run logs its flags again, and --resume may change some (the budget)
        text = acc.Tensors("hyperparameters/text_summary")[-1].tensor_proto.string_val[0].decode()
        config = dict(row.strip("|").split("|", 1) for row in text.splitlines()[2:] if row.count("|") >= 3)
    return scalars, config


def evaluations(folder: str, scalars: dict, interval: int = 0) -> list[dict]:
    """Every evaluation, in step order: the episodes' returns from evaluations.jsonl (VMAS, MaMuJoCo; SMAX's
    wins too; the last line of a step wins, as a run resumed after a hard kill repeats evaluations), or the
    TensorBoard values (matrix games: the argmax and sampled evaluations' rewards, no episodes). With the run's
    eval interval, an evaluation off its schedule (a script evaluates at its budget's end, so a run
    continued to a larger --budget has one at each former end) is left out, the last one kept: every
    run's step_k is then the same evaluation as a straight run's."""
    path = os.path.join(folder, "evaluations.jsonl")
    if os.path.isfile(path):
        by_step = {}
        for number, line in enumerate(open(path, errors="replace"), 1):
            try:
                entry = json.loads(line)
                by_step[entry["step"]] = {"step_count": entry["step"], "return": entry["episode_returns"],
                                          "snd": [entry["snd"]], **({"win": entry["wins"]} if "wins" in entry else {})}
            except (ValueError, KeyError, TypeError) as error:  # a line cut short (a full disk): its
                # evaluation is left out, not the run's summary; a resumed run has repeated it
                print(f"note: {path} line {number} is unreadable ({type(error).__name__}: {str(error)[:100]}); "
                      "left out of the summary", file=sys.stderr, flush=True)
        steps = sorted(by_step)
        if interval > 0:  # on schedule: the first evaluation at or past a multiple of the interval
            steps = [s for k, s in enumerate(steps)
                     if k == 0 or k == len(steps) - 1 or s // interval > steps[k - 1] // interval]
        return [by_step[step] for step in steps]
    sampled = dict(scalars.get("eval/episodic_return_sampled", []))
    snd = dict(scalars.get("diversity/snd", []))
    return [{"step_count": step, "return": [value], "return_sampled": [sampled.get(step)], "snd": [snd.get(step)]}
            for step, value in scalars.get("eval/episodic_return", [])]


def git_commit(script: str):
    """(HEAD's commit, whether the script or its helper differ from it: the code that ran is not the commit's)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", script, "hypermarl_extras.py"],
                               cwd=ROOT).returncode != 0
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def mean_of(scalars: dict, tag: str):
    values = [value for _, value in scalars.get(tag, []) if math.isfinite(value)]
    return sum(values) / len(values) if values else None


def trained_steps(run: Run, folder: str) -> int:
    """The steps the run's checkpoint has trained (a run stopped past a smaller --budget is labelled with
    them, not with the budget its evaluations went beyond); 0 without a checkpoint (the matrix games keep none)."""
    path = os.path.join(folder, "checkpoint.pt")
    if run.env == "matrix" or not os.path.isfile(path):
        return 0
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def write_summary(run: Run, folder: str, argv: list, extra: list) -> dict:
    scalars, config = read_events(folder)
    evals = evaluations(folder, scalars, int(config.get("eval_interval", 0)))
    steps = {f"step_{k}": e for k, e in enumerate(evals)}
    absolute = {key: value for key, value in evals[-1].items() if key != "step_count"} if evals else {}
    commit, dirty = git_commit(run.script)
    sps = scalars.get("charts/SPS", [])
    summary = dict(
        format="hypermarl-summary/1", grid=run.grid, run_id=run.run_id, env=run.env, task=run.task,
        method=run.method, seed=run.seed, script=run.script, argv=run.argv() + extra, command=argv[1:], config=config,
        git_commit=commit, git_dirty=dirty, total_timesteps=max(run.budget, trained_steps(run, folder)),
        wall_seconds=wall_seconds(os.path.dirname(folder)),
        sps=sps[-1][1] if sps else None,
        final_return=sum(evals[-1]["return"]) / len(evals[-1]["return"]) if evals else None,
        final_snd=evals[-1]["snd"][0] if evals else None,
        gradient={f"{key}_mean": mean_of(scalars, f"grad/{key}") for key in ("actor_var", "actor_norm", "interference")},
        marl_eval={run.env: {run.task: {run.method: {f"seed_{run.seed}": {**steps, "absolute_metrics": absolute}}}}},
    )
    tmp = os.path.join(folder, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(folder, "summary.json"))  # "finished" means a whole summary
    return summary


# ===== Backends =====
def launch_local(runs, grid_dir, extra, opts) -> list[str]:
    """--jobs runs at a time, each a subprocess; with GPUs, job slot k uses GPU k % GPUs, so
    --runs-per-gpu runs share each GPU whatever order the runs end in."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    gpus = gpu_count()
    slots = queue.Queue()
    jobs = max(1, min(opts.jobs, len(runs)))  # a slot per run at most: --jobs 10**20 is every run at once
    for k in range(jobs):
        slots.put(k % gpus if gpus else None)

    def start(run):
        gpu = slots.get()
        try:
            return run_one(run, grid_dir, extra, opts.threads, gpu)
        finally:
            slots.put(gpu)

    with ThreadPoolExecutor(jobs) as pool:  # a thread per slot, each waiting on its script
        return list(pool.map(start, runs))  # after a stop, the runs not started return at once


class RunTask:
    """A submitit job: one run. On preemption or time-out submitit calls checkpoint() (USR2) in the
    job's main thread: the script saves its checkpoint and exits, and submitit requeues this task,
    which resumes the run from that checkpoint (submitit's Checkpointable protocol)."""

    def __call__(self, run, grid_dir, extra, threads):
        return run_one(run, grid_dir, extra, threads)

    def checkpoint(self, run, grid_dir, extra, threads):
        import submitit

        stop_children()  # waits: the requeued task must not start while the script still writes
        return submitit.helpers.DelayedSubmission(RunTask(), run, grid_dir, extra, threads)


def launch_submitit(runs, grid_dir, extra, opts) -> list[str]:
    """A Slurm job array (or submitit's local executor: every run at once), one task per run."""
    import submitit

    cluster = "local" if opts.backend == "submitit-local" else "slurm"
    # submitit requeues a timed-out task only 3 times by default: a 10M-step Navigation run needs more
    executor = submitit.AutoExecutor(folder=os.path.join(grid_dir, "submitit", "%j"), cluster=cluster,
                                     slurm_max_num_timeout=1000)
    gpus = math.ceil(opts.gpus_per_run) or None  # None: no --gpus-per-node=0, which clusters without GPUs refuse
    params = dict(timeout_min=opts.timeout_min, cpus_per_task=opts.threads, gpus_per_node=gpus,
                  slurm_array_parallelism=opts.jobs, name=os.path.basename(grid_dir))
    if cluster == "slurm":
        params.update(slurm_partition=opts.slurm_partition, slurm_additional_parameters=dict(requeue=True),
                      slurm_signal_delay_s=opts.signal_delay_s)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    n = len(runs)
    jobs = executor.map_array(RunTask(), runs, [grid_dir] * n, [extra] * n, [opts.threads] * n)
    print(f"submitted {n} runs: job array {jobs[0].job_id.split('_')[0]} (logs in {grid_dir}/submitit)", flush=True)
    if cluster == "slurm" and not opts.wait:
        return ["submitted"] * n
    while not STOP and not all(job.done() for job in jobs):
        time.sleep(1)
    if STOP:
        if cluster == "slurm":  # the jobs are the cluster's: stop waiting only
            print("stopped waiting; the jobs go on (scancel stops them: their runs checkpoint)", file=sys.stderr)
            return ["submitted" if not job.done() else job_result(job) for job in jobs]
        for job in jobs:  # SIGINT: the task's run_one passes a SIGTERM on to its script, which checkpoints
            job.cancel(check=False)
        while not all(job.done() for job in jobs):
            time.sleep(0.5)
        return ["stopped" if result.startswith("failed") else result for result in map(job_result, jobs)]
    return [job_result(job) for job in jobs]


def job_result(job) -> str:
    """The run's state, or one line naming the job's log for a job that raised."""
    try:
        return job.result()
    except Exception as error:  # submitit re-raises the job's error with its whole traceback
        return f"failed (job {job.job_id}: {str(error).strip().splitlines()[-1][:200]}; see {job.paths.stderr})"


def launch_ray(runs, grid_dir, extra, opts) -> list[str]:
    """One Ray task per run; --gpus-per-run below 1 packs several runs on one GPU. Without
    --ray-address a local cluster of --jobs x --threads CPUs runs --jobs runs at a time. A cluster's
    nodes must see this repository and --out at the same paths (a shared file system). A task whose
    worker dies is retried and resumes from the run's checkpoint once the dead worker's script has saved
    (a retry on another node cannot tell that script from a live launcher's: it fails, and the same
    command resumes the run); a stop cancels the tasks (each passes a SIGTERM on to its script, which
    checkpoints)."""
    import ray

    cpus = {} if opts.ray_address else dict(num_cpus=opts.jobs * opts.threads)
    ray.init(address=opts.ray_address, include_dashboard=False, log_to_driver=False, **cpus)
    install_stop_handlers()  # ray.init installs its own SIGTERM handler
    try:
        task = ray.remote(num_cpus=opts.threads, num_gpus=opts.gpus_per_run, max_retries=3)(run_one)
        refs = [task.remote(run, grid_dir, extra, opts.threads) for run in runs]
        pending = list(refs)
        while pending and not STOP:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in the task: run_one stops its script with a checkpoint
        results = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.TaskCancelledError:
                results.append("stopped")
            except ray.exceptions.RayError as error:
                results.append(f"failed (ray: {str(error).strip().splitlines()[0][:200]})")
        return results
    finally:
        ray.shutdown()


BACKENDS = {"local": launch_local, "slurm": launch_submitit, "submitit-local": launch_submitit, "ray": launch_ray}


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


# ===== Figure 10: parameters against agents =====
def figure10(out: str) -> None:
    """Actor parameters of IPPO's families on Dispersion for 4 .. 1024 agents, with as many food as
    agents (the observation grows with n) and with 4 food (it does not: the agents' own cost alone)."""
    import torch

    sys.path.insert(0, ROOT)
    import ippo_hyper_vmas as script

    counts = {"n_food = n_agents": {}, "n_food = 4": {}}
    for setting, per_method in counts.items():
        for n in (4, 8, 16, 32, 64, 128, 256, 512, 1024):
            n_food = n if setting == "n_food = n_agents" else 4
            obs_dim = 4 + 3 * n_food  # Dispersion (VMAS 1.5): position, velocity, then 3 numbers per food
            for method in FAMILIES:
                args = script.paper_defaults(script.Args(n_agents=n, n_food=n_food, hypernet=method),
                                             {"n_agents", "n_food", "hypernet"})
                with torch.device("meta"):  # shapes only: 200M parameters at 1024 agents, never allocated
                    agent = script.Agent(args, obs_dim, 9, True)  # 9 discrete actions
                per_method.setdefault(method, {})[n] = sum(p.numel() for p in agent.actor.parameters())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "figure10.json"), "w") as f:
        json.dump(counts, f, indent=1)
    lines = ["# Figure 10: actor parameters against agents (IPPO, Dispersion)\n",
             f"Command: `python benchmark/launch.py figure10 --out {os.path.relpath(os.path.dirname(out), ROOT)}` "
             "(trainable parameters of each family's actor at the paper's settings, counted on PyTorch's "
             "meta device).\n"]
    for setting, per_method in counts.items():
        lines += [f"\n## {setting}\n", "| agents | " + " | ".join(FAMILIES) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{per_method[m][n]:,}" for m in FAMILIES) + " |" for n in per_method["mlp"]]
    open(os.path.join(out, "figure10.md"), "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (setting, per_method) in zip(axes, counts.items()):
        for method in FAMILIES:
            ax.plot(list(per_method[method]), list(per_method[method].values()), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="agents", title=f"Figure 10, {setting}")
    axes[0].set_ylabel("actor parameters")
    axes[0].legend()
    fig.savefig(os.path.join(out, "figure10.png"), dpi=120, bbox_inches="tight")
    print(f"wrote {out}/figure10.md, .json, .png")


def table3a(opts) -> int:
    """Table 3a (appendix D.1.2): every method's SND on one shared dataset. The dataset pools rollouts of
    IPPO-NoPS and IPPO-FuPS (figure2-ippo's first seed) at a quarter of the budget and at its end (the
    paper: 5M and 20M steps), --snd-episodes each, and samples --snd-samples observations
    (benchmark/snd_dataset.py); each finished figure2-ippo and figure2-mappo run's final checkpoint is
    then evaluated on it (--eval-only --snd-obs-file). Writes OUT/table3a/: the dataset, table3a.md and
    table3a.json. The dataset is reused only if built from these very checkpoints and flags (its recipe)."""
    import snd_dataset

    ippo = select(GRIDS["figure2-ippo"](), opts)
    sources = table3a_sources(opts)
    if isinstance(sources, str):
        print(f"error: table3a: {sources}", file=sys.stderr)
        return 2
    out = os.path.join(opts.out, "table3a")
    dataset = os.path.join(out, "snd_dataset.npz")
    seed = 0  # snd_dataset.py's default, named so that the recipe holds it
    if snd_dataset.built_from(dataset) != snd_dataset.recipe(sources, opts.snd_episodes, opts.snd_samples, seed):
        os.makedirs(out, exist_ok=True)
        built = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "snd_dataset.py"), "--checkpoints",
                                *sources, "--episodes", str(opts.snd_episodes), "--samples", str(opts.snd_samples),
                                "--seed", str(seed), "--out", dataset])
        if built.returncode != 0:
            print(f"error: table3a: benchmark/snd_dataset.py failed (exit {built.returncode}; its message is above)",
                  file=sys.stderr)
            return 1
    snd, trained = shared_dataset_snd(opts, dataset)
    write_report(os.path.join(out, "table3a.json"), json.dumps(
        {"sources": [os.path.relpath(p, opts.out) for p in sources], "snd": snd,
         "steps": {grid: sorted(steps) for grid, steps in trained.items()}}, indent=1))
    write_report(os.path.join(out, "table3a.md"), table3a_text(opts, ippo[0], snd, trained))
    print(f"wrote {out}/table3a.md and table3a.json")
    return 0


def table3a_source_runs(opts) -> list[Run]:
    """The runs whose policies make the dataset: the selection's figure2-ippo NoPS and FuPS, of its first seed."""
    ippo = select(GRIDS["figure2-ippo"](), opts)
    return [r for r in ippo if r.keep and r.seed == ippo[0].seed]


def table3a_sources(opts) -> list | str:
    """The dataset's checkpoints (NoPS and FuPS, first seed: the kept snapshots and the final one), or why not."""
    sources = []
    for run in table3a_source_runs(opts):
        folder = run_folder(os.path.join(opts.out, run.grid, run.run_id))
        if not folder or state(os.path.dirname(folder), run.budget) != "finished":
            return (f"{run.run_id} is not finished; first: python benchmark/launch.py figure2-ippo"
                    f"{' --budget ' + str(run.budget) if opts.budget else ''}")
        sources += [snapshot_path(folder, int(f * run.budget)) for f in run.keep] + [os.path.join(folder, "checkpoint.pt")]
    missing = [p for p in sources if not os.path.isfile(p)]
    if missing:
        return f"{missing[0]} is missing (the run passed that step before it kept a copy); run it again in a new --out"
    return sources


def shared_dataset_snd(opts, dataset: str) -> tuple[dict, dict]:
    """{grid: {method: {seed: SND}}} of every finished Figure 2 run on the dataset, {grid: the steps they trained}."""
    snd, trained = {}, {}
    for grid in ("figure2-ippo", "figure2-mappo"):
        for run in select(GRIDS[grid](), opts):
            folder = run_folder(os.path.join(opts.out, grid, run.run_id))
            if not folder or state(os.path.dirname(folder), run.budget) != "finished":
                continue  # not run (yet): its row says how many runs it has
            line = subprocess.run([sys.executable, os.path.join(ROOT, run.script), "--eval-only", "--checkpoint",
                                   os.path.join(folder, "checkpoint.pt"), "--snd-obs-file", dataset],
                                  capture_output=True, text=True, check=True, cwd=ROOT).stdout
            snd.setdefault(grid, {}).setdefault(run.method, {})[run.seed] = float(re.search(r"diversity/snd=(\S+)", line)[1])
            trained.setdefault(grid, set()).add(int(summary_steps(os.path.join(folder, "summary.json"))))
            print(f"{grid} {run.run_id}: SND {snd[grid][run.method][run.seed]:.4f}", flush=True)
    return snd, trained


def table3a_text(opts, first: Run, snd: dict, trained: dict) -> str:
    import numpy as np
    from aggregate import PAPER_SND

    lines = ["# Table 3a: SND on Dispersion, on appendix D.1.2's shared dataset", "",
             f"Command: `python benchmark/launch.py table3a --out {opts.out}"
             + (f" --budget {opts.budget}" if opts.budget else "") + (f" --seeds {' '.join(map(str, opts.seeds))}" if opts.seeds else "")
             + f" --snd-episodes {opts.snd_episodes} --snd-samples {opts.snd_samples}`. Dataset: IPPO-NoPS and IPPO-FuPS "
             f"(seed {first.seed}) at {int(0.25 * first.budget):,} and {first.budget:,} steps, {opts.snd_episodes:,} evaluation "
             f"episodes each, {opts.snd_samples:,} observations sampled; each finished run's final checkpoint "
             "evaluated on it (the steps column: what its runs trained). Mean ± std (ddof 0) over seeds; the paper's values (20M steps) are about 1,000 times "
             "below Eq. (9) as written (docs/implementation.md, detail 12): compare the ordering.", "",
             "| algorithm | method | steps | SND, mean ± std | seeds | paper (Table 3a) |", "|---|---|---|---|---|---|"]
    for grid, per_method in snd.items():
        for method, per_seed in per_method.items():
            v, paper = np.array(list(per_seed.values())), PAPER_SND[grid].get(method)
            lines.append(f"| {grid.split('-')[1].upper()} | {method} | {' / '.join(f'{t:,}' for t in sorted(trained[grid]))} | "
                         f"{v.mean():.4f} ± {v.std():.4f} | {len(v)} | "
                         + (f"{paper[0]:.1e} ± {paper[1]:.1e}" if paper else "not in the paper") + " |")
    return "\n".join(lines) + "\n"


# ===== --measure: the cost of a grid, from a short run of each setting =====
def iteration_steps(run: Run, extra: list) -> int:
    """Environment steps of one iteration of this run (the paper's settings and the flags after --)."""
    sys.path.insert(0, ROOT)
    script = __import__(run.script[:-3])
    argv = run.argv() + extra
    args = script.parse_args(argv, script.flags_given(argv))  # the paper's values for the flags not given
    return args.num_envs * args.num_steps


def cost_key(run: Run) -> tuple:
    """(script, task, method), Navigation's goal setting left out: it changes no shape, so no cost."""
    return run.script, re.sub(r"-(same|different|half)$", "", run.task), run.method


def measure(runs: list[Run], extra: list, iterations: int, threads: int) -> dict:
    """Steps per second of training (rollout + update; the evaluations excluded) of one run per
    setting (cost_key), over `iterations` iterations (the first left out when there are more), in a
    temporary folder. Returns {cost_key: sps}."""
    import tempfile

    settings = {}
    for run in runs:
        settings.setdefault(cost_key(run), run)
    sps = {}
    for key, run in settings.items():
        with tempfile.TemporaryDirectory() as tmp:
            timed = slice(1 if iterations > 1 else 0, None)  # the first iteration also warms up
            if run.env == "matrix":  # the whole run takes seconds: time it
                start, argv = time.time(), run.argv()
            else:
                steps = iteration_steps(run, extra)
                argv = dataclasses.replace(run, budget=steps * iterations).argv() + ["--eval-interval", str(10**12)]
            # no pipes: a MaMuJoCo run's environment workers would hold them open after a failure
            code = subprocess.call([sys.executable, os.path.join(ROOT, run.script), *argv, *extra, "--runs-dir", tmp],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            if code != 0:
                print(f"  {' '.join(key)}: failed (exit {code}; run it alone to see why)", flush=True)
                continue
            if run.env == "matrix":
                sps[key] = run.budget / (time.time() - start)  # start-up included: it is most of the run
            else:
                scalars, _ = read_events(run_folder(tmp))
                seconds = sum(v for _, v in scalars["perf/rollout_seconds"][timed] + scalars["perf/update_seconds"][timed])
                sps[key] = steps * len(scalars["perf/rollout_seconds"][timed]) / seconds
        print(f"  {' '.join(key)}: {sps[key]:,.0f} steps/s", flush=True)
    return sps


# ===== Command line =====
def select(runs: list[Run], opts) -> list[Run]:
    if opts.seeds:
        runs = [dataclasses.replace(r, seed=s) for r in runs if r.seed == runs[0].seed for s in opts.seeds]
    if opts.budget:
        runs = [dataclasses.replace(r, budget=opts.budget) for r in runs]
    if opts.methods:
        runs = [r for r in runs if r.method in opts.methods]
    if opts.only:
        runs = [r for r in runs if any(pattern in r.run_id for pattern in opts.only)]
    seeds = list(dict.fromkeys(r.seed for r in runs))
    return sorted(runs, key=lambda r: seeds.index(r.seed))  # seed by seed: a grid stopped early has every method


def cost_hours(runs: list[Run], sps: dict = None) -> float:
    """CPU-hours of the runs at sps {(script, task): steps per second} (default: CPU_SPS's measurements)."""
    sps = sps or CPU_SPS
    return sum(run.budget / speed(sps, run) for run in runs) / 3600


def speed(sps: dict, run: Run):
    """The run's measured steps per second, else (a method not measured) the mlp method's on its task."""
    key = cost_key(run)
    return sps.get(key) or sps.get((*key[:2], "mlp"))


def cost_line(runs: list[Run]) -> str:
    if all(speed(CPU_SPS, r) for r in runs):
        guessed = " (the mlp method's speed for methods not measured)" * any(cost_key(r) not in CPU_SPS for r in runs)
        return f"about {cost_hours(runs):,.0f} CPU-hours at one thread per run (measured on a 2-core CPU: CPU_SPS){guessed}"
    return "cost not measured here: --measure 1 measures it"


def cost_table(runs: list[Run], sps: dict) -> str:
    lines = ["| script | task | method | steps/s (one run) | runs | steps per run | CPU-hours |",
             "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys(cost_key(r) for r in runs):
        group = [r for r in runs if cost_key(r) == key]
        if key not in sps:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | failed | {len(group)} | {group[0].budget:,} | - |")
            continue
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {sps[key]:,.0f} | {len(group)} | {group[0].budget:,} | "
                     f"{cost_hours(group, sps):,.1f} |")
    measured = [r for r in runs if cost_key(r) in sps]
    lines.append(f"| all{' measured' if len(measured) < len(runs) else ''} | | | | {len(measured)} | | "
                 f"{cost_hours(measured, sps):,.1f} |")
    return "\n".join(lines)


def parse(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = OneLineParser(description=__doc__.split("\n")[0], epilog="Flags after -- go to every run's script.")
    parser.add_argument("grid", choices=[*GRIDS, "figure10", "table3a"], help="the figure or table to reproduce")
    parser.add_argument("--out", default="runs/grids", help="grids live in OUT/<grid>/ (default: runs/grids)")
    parser.add_argument("--budget", type=at_least(1), help="steps per run (matrix games: trials) instead of the paper's")
    parser.add_argument("--seeds", type=int, nargs="+", help="these seeds instead of the paper's five")
    parser.add_argument("--methods", nargs="+", help="only these methods (e.g. mlp nops; --dry-run lists them)")
    parser.add_argument("--only", nargs="+", help="only runs whose id contains one of these (e.g. navigation-8 s30)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their state and cost; start nothing")
    parser.add_argument("--measure", type=at_least(1), metavar="ITERATIONS",
                        help="time this many iterations of one run per setting here, print the grid's cost; start nothing")
    parser.add_argument("--snd-episodes", type=at_least(1), default=10_000, help="[table3a] episodes per policy of the dataset")
    parser.add_argument("--snd-samples", type=at_least(1), default=1_000_000, help="[table3a] observations in the dataset")
    parser.add_argument("--backend", choices=list(BACKENDS), default="local")
    parser.add_argument("--jobs", type=at_least(1),
                        help="runs at a time (default: GPUs x --runs-per-gpu, else CPU cores; slurm: no limit)")
    parser.add_argument("--runs-per-gpu", type=at_least(1), default=4, help="[local] runs sharing one GPU")
    parser.add_argument("--threads", type=at_least(1), default=1, help="CPU threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="[ray, slurm] GPUs per run; below 1 shares a GPU (ray)")
    parser.add_argument("--ray-address", help="[ray] a running cluster (e.g. auto); default: start a local one")
    parser.add_argument("--slurm-partition", help="[slurm] partition")
    parser.add_argument("--timeout-min", type=at_least(1), default=240, help="[slurm] minutes per job before it is requeued")
    parser.add_argument("--signal-delay-s", type=at_least(1),
                        help="[slurm] seconds before --timeout-min that a run is asked to finish its iteration and save: "
                             "more than one iteration (Navigation's takes minutes on a CPU; default 600, at most half "
                             "the job; submitit's own is 90)")
    parser.add_argument("--wait", action="store_true", help="[slurm] wait for the array and print each run's state")
    opts = parser.parse_args(argv)
    if not 0 <= opts.gpus_per_run < math.inf:
        parser.error(f"--gpus-per-run: must be a number of at least 0, got {opts.gpus_per_run}")
    if opts.signal_delay_s is None:
        opts.signal_delay_s = min(600, 30 * opts.timeout_min)
    elif opts.signal_delay_s >= 60 * opts.timeout_min:
        parser.error(f"--signal-delay-s: must be less than --timeout-min in seconds ({60 * opts.timeout_min}), "
                     f"got {opts.signal_delay_s}")
    if opts.grid in ("figure10", "table3a"):  # neither starts a run: a flag about runs would be silently ignored
        ignored = ({"--budget": opts.budget, "--seeds": opts.seeds, "--methods": opts.methods, "--only": opts.only}
                   if opts.grid == "figure10" else {}) | {"--dry-run": opts.dry_run, "--measure": opts.measure,
                                                          "flags after --": extra}
        if given := [flag for flag, value in ignored.items() if value]:
            parser.error(f"{given[0]}: not with {opts.grid}, which " + ("counts parameters and trains nothing"
                         if opts.grid == "figure10" else "evaluates figure2's finished runs and trains nothing"))
    if opts.seeds and (len(set(opts.seeds)) < len(opts.seeds) or min(opts.seeds) < 0):
        parser.error(f"--seeds: must be distinct and at least 0, got {' '.join(map(str, opts.seeds))}")
    opts.out = os.path.abspath(opts.out)  # table3a's evaluations run in the repository's folder
    check_writable(parser, "--out", grid_folder(opts))  # now, before any folder is made
    if opts.grid == "table3a":
        check_selection(parser, opts, GRIDS["figure2-ippo"]() + GRIDS["figure2-mappo"]())
        if not table3a_source_runs(opts):
            parser.error(f"{'--only' if opts.only else '--methods'}: table3a builds its dataset from figure2-ippo's "
                         "nops and fups runs of the first seed; the selection leaves them out")
    elif opts.grid != "figure10":
        check_selection(parser, opts, GRIDS[opts.grid]())
    check_backend(parser, opts)
    if opts.jobs is None and opts.backend != "slurm":  # on Slurm: the array's parallelism, the cluster's to limit
        opts.jobs = gpu_count() * opts.runs_per_gpu or max(1, (os.cpu_count() or 1) // opts.threads)
    return opts, extra


def check_backend(parser, opts) -> None:
    """A backend this machine cannot serve fails now in one line, not with a traceback or a wait forever."""
    engine = {"slurm": "submitit", "submitit-local": "submitit", "ray": "ray"}.get(opts.backend)
    if engine and importlib.util.find_spec(engine) is None:  # requirements-dev.txt's, not requirements.txt's
        parser.error(f"--backend: {opts.backend} needs {engine}, which is not installed "
                     "(pip install -r requirements-dev.txt)")
    if opts.backend == "slurm" and not shutil.which("sbatch"):
        parser.error("--backend: slurm needs Slurm's sbatch on PATH, and there is none here "
                     "(--backend submitit-local runs the same code path on this machine)")
    if opts.backend != "ray":
        return
    if opts.ray_address == "auto":
        check_reachable(parser, running_ray_cluster(parser))
    elif opts.ray_address:
        check_reachable(parser, opts.ray_address)
    elif opts.gpus_per_run > 0 and gpu_count() == 0:  # its tasks would wait for a GPU forever
        parser.error(f"--gpus-per-run: this machine has no GPU for the local Ray cluster, got {opts.gpus_per_run} "
                     "(leave it out, or name a cluster with GPUs: --ray-address)")


def running_ray_cluster(parser) -> str:
    """The address --ray-address auto finds, as ray.init looks it up: RAY_ADDRESS, else a cluster started here."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError:
        parser.error("--ray-address: auto finds no running Ray cluster here (start one with `ray start --head`, "
                     "or leave --ray-address out for a local one)")


def check_selection(parser, opts, grid: list[Run]) -> None:
    """A --methods or --only pattern that picks no run is a typo: say so instead of skipping it."""
    methods = list(dict.fromkeys(r.method for r in grid))
    unknown = [m for m in opts.methods or [] if m not in methods]
    if unknown:
        parser.error(f"--methods: {opts.grid} has no method {' '.join(unknown)} (its methods: {' '.join(methods)})")
    candidates = select(grid, argparse.Namespace(**{**vars(opts), "only": None}))
    unmatched = [p for p in opts.only or [] if not any(p in r.run_id for r in candidates)]
    if unmatched:
        parser.error(f"--only: no run of {opts.grid} matches {' '.join(unmatched)} (--dry-run lists the run ids)")


def refused_flags(runs: list[Run], extra: list):
    """The first script's refusal of the flags after -- (one line), checked on one run per setting
    before anything starts; None if every script takes them. A flag the grid sets itself is refused
    too: given twice, the later would win and, say, turn an ablation back into HyperMARL. Compared as
    the script reads flags (its flags_given: --x_y is --x-y, --no-x is --x, --x=v is --x), not as text."""
    sys.path.insert(0, ROOT)
    for run in runs:
        flags_given = __import__(run.script[:-3]).flags_given
        clash = sorted(flags_given(extra) & flags_given(run.argv()))
        if clash:
            return (f"--{clash[0].replace('_', '-')}: the grid sets it for {run.run_id} (--budget, --seeds and "
                    f"--methods choose budgets, seeds and runs; leave the flag out)")
    # one run per setting, of the largest seed (the scripts bound seeds from above: NumPy's take less than 2**32)
    for run in {(r.script, r.task, r.method): r for r in sorted(runs, key=lambda r: r.seed)}.values():
        script, argv = __import__(run.script[:-3]), run.argv() + extra
        program, sys.argv[0] = sys.argv[0], run.script  # tyro's hints name the script, not the launcher
        try:
            if hasattr(script, "parse_args"):  # the paper's values for the flags not given, then the checks
                given = script.flags_given(argv)
                script.check_args(script.parse_args(argv, given), given)
            else:  # the matrix games: tyro, then the script's own checks
                script.check_args(script.tyro.cli(script.Args, args=argv), script.flags_given(argv))
        except ValueError as error:
            return f"{run.script}: {error}"
        except SystemExit:  # tyro printed its message (a bad value, an unknown flag) or --help
            return f"{run.script} refused them (its message is above)"
        finally:
            sys.argv[0] = program
    return None


def grid_folder(opts) -> str:
    """OUT/<grid>, or the folder of the grid whose runs it reuses (figure5: table4's)."""
    runs = GRIDS[opts.grid]() if opts.grid in GRIDS else []
    return os.path.abspath(os.path.join(opts.out, runs[0].grid if runs else opts.grid))


def refused_on_resume(runs: list[Run], grid_dir: str, extra: list):
    """A resumed run takes its flags from its checkpoint, which may refuse the flags after -- (another
    --num-envs) or the budget (below what it trained): the script's refusal (one line) for the first run to
    resume of each setting, checked before anything starts; None if every one takes them."""
    sys.path.insert(0, ROOT)
    checked = set()
    for run in runs:
        run_dir = os.path.join(grid_dir, run.run_id)
        if (run.script, run.task, run.method) in checked or state(run_dir, run.budget) != "interrupted" or \
                completed(run, run_folder(run_dir)):
            continue
        checked.add((run.script, run.task, run.method))
        try:
            __import__(run.script[:-3]).read_command_line(script_argv(run, run_dir, extra)[1:])
        except ValueError as error:
            return f"{run.script}: {error}"
        except SystemExit:  # tyro printed its message
            return f"{run.script} refused them (its message is above)"
    return None


def starting_afresh(runs: list[Run], grid_dir: str) -> list[Run]:
    """The runs without a checkpoint to resume: they start with run.argv()."""
    return [r for r in runs if "--resume" not in script_argv(r, os.path.join(grid_dir, r.run_id), [])]


def check_reachable(parser, address: str) -> None:
    """ray.init retries an unreachable address for a long while: a TCP connection fails at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        parser.error(f"--ray-address: cannot reach {address!r} (host:port or auto; {error})")


def request_stop(signum, frame) -> None:
    """Ctrl-C, SIGTERM, SIGHUP: start no new run and pass one SIGTERM on to each running script (it
    saves a checkpoint and exits: the same command resumes it); a second signal stops this process's
    scripts at once (the local backend's: Ray's and submitit's are their workers', already told).
    The handler only signals: the backends' waits notice the stop and wind down."""
    STOP.append(signum)
    children = list(CHILDREN)
    for child in children:
        stop_child(child)
    again = "they stop at once" if children else "the running scripts finish their iteration and save all the same"
    with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) refuses the line: the scripts were told first
        print(f"\nsignal {signum}: the running scripts save a checkpoint and stop; the same command resumes them"
              + (f" (again: {again})" if len(STOP) > 1 else ""), file=sys.stderr, flush=True)


def install_stop_handlers() -> dict:
    return {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def main(argv=None) -> int:
    opts, extra = parse(sys.argv[1:] if argv is None else list(argv))
    grid_dir = grid_folder(opts)
    if opts.grid == "figure10":
        figure10(grid_dir)
        return 0
    if opts.grid == "table3a":  # after figure2-ippo and figure2-mappo: their checkpoints on one dataset
        return table3a(opts)
    runs = select(GRIDS[opts.grid](), opts)
    # the scripts check the flags after -- and the values of --budget and --seeds now (a budget below one
    # iteration, a seed past NumPy's), not in every run; a resumed run takes its other flags from its checkpoint
    refused = (extra and refused_flags(runs, extra)) or (
        (opts.budget or opts.seeds) and refused_flags(starting_afresh(runs, grid_dir), extra)) or (
        (extra or opts.budget) and refused_on_resume(runs, grid_dir, extra))
    if refused:
        budget = opts.budget and re.search(r": --(total-timesteps|num-trials):", refused)  # names the script's flag
        flag = "--seeds" if ": --seed:" in refused else "--budget" if budget else "flags after --"
        print(f"error: {flag}: {refused}", file=sys.stderr)
        raise SystemExit(2)
    states = {r.run_id: state(os.path.join(grid_dir, r.run_id), r.budget, note=True) for r in runs}
    print(f"{opts.grid}: {len(runs)} runs in {grid_dir} ({sum(s == 'finished' for s in states.values())} finished, "
          f"{sum(s == 'interrupted' for s in states.values())} to resume); " + cost_line(runs), flush=True)
    if opts.measure:
        print(cost_table(runs, measure(runs, extra, opts.measure, opts.threads)))
        return 0
    if opts.dry_run:
        for run in runs:
            flags = script_argv(run, os.path.join(grid_dir, run.run_id), extra)[1:]
            print(f"  [{states[run.run_id]}] {run.run_id}: python {run.script} {' '.join(flags)}")
        return 0
    pending = [r for r in runs if states[r.run_id] != "finished"]
    previous = install_stop_handlers()
    try:
        results = BACKENDS[opts.backend](pending, grid_dir, extra, opts)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failed = [f"{r.run_id}: {res}" for r, res in zip(pending, results) if res.startswith("failed")]
    count = {res: results.count(res) for res in ("finished", "stopped", "not started", "submitted")}
    print(f"{opts.grid}: {len(runs) - len(pending) + results.count('skipped')} skipped (finished before), "
          f"{count['finished']} finished, {count['stopped'] + count['not started']} stopped or not started "
          f"(the same command resumes them), {len(failed)} failed"
          + (f", {count['submitted']} submitted" if count["submitted"] else "")
          + "".join(f"\n  {line}" for line in failed))
    print(f"next: python benchmark/aggregate.py {grid_dir}")
    if STOP:
        return 128 + STOP[0]  # the shell's convention for a process stopped by a signal
    return 1 if failed else 0


def state(run_dir: str, budget: int, note: bool = False) -> str:
    """new | started (no checkpoint yet) | interrupted (a checkpoint to resume) | finished (a summary at
    this budget or a larger one: a larger --budget later resumes finished runs from their checkpoints)."""
    folder = run_folder(run_dir)
    if folder is None:
        return "new"
    steps = summary_steps(os.path.join(folder, "summary.json"), note)
    if steps is not None and steps >= budget:
        return "finished"
    return "interrupted" if os.path.isfile(os.path.join(folder, "checkpoint.pt")) else "started"


def summary_steps(path: str, note: bool = False):
    """The steps a run's summary.json says it trained, or None: no summary, or one the launcher cannot read
    (cut short by a full disk, edited by hand), which leaves the run unfinished: it resumes or starts
    again, and a new summary replaces that one. note: say so, in one line (main's listing only)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        steps = summary.get("total_timesteps") if isinstance(summary, dict) else None
        if type(steps) not in (int, float):  # JSON's true is no number of steps
            raise ValueError("no total_timesteps, the number of steps it trained")
        return steps
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON, or not text; nested too deep
        if note:
            print(f"note: {path} is unreadable ({str(error)[:200]}); the run counts as unfinished (resumed or rerun)",
                  file=sys.stderr, flush=True)
        return None


if __name__ == "__main__":
    sys.exit(main())
