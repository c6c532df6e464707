"""What several test files share: the repository on sys.path, the two VMAS scripts as a fixture, tiny
runs and their logs, the command line as the scripts read it, one thread, the `smoke` tier.

Test files, by what they test:
    test_algorithm.py        hypernetworks, families, sampling, PPO pieces, GAE, SND, gradient metrics (no environment)
    test_vmas.py             the VMAS wrapper, training runs on VMAS, fidelity to the paper and to DiCo's code, learning
    test_plumbing.py         command-line checks, checkpoints, resume, signals, --eval-only, videos, scripts copied alone
    test_design.py           the copies shared between scripts, and the scripts' design rules
    test_launch.py           benchmark/launch.py: the paper's grids on every backend, stopped and resumed
    test_benchmark_tools.py  benchmark/'s other tools: aggregate.py by hand, the others' outputs and bad flags
    test_mamujoco.py, test_fidelity_mamujoco.py, test_smax.py, test_matrix_games.py, test_fidelity_matrix.py: those scripts

The README runs them on two workers (pytest-xdist, `-n 2 --dist worksteal`), each computing on one thread:
no test depends on the order of the others, on another worker or on the machine's load. The `long` tests
start first, half on each worker (pytest_collection_modifyitems).
`python -m pytest -q -m smoke tests` runs the smoke tier: imports, one tiny training run per VMAS script,
a few algorithm units, a bad flag, a script copied alone refusing a flag (well under 2 minutes on 2 cores).
"""

import contextlib
import importlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import hypermarl_extras as extras  # noqa: E402

# The two VMAS scripts share their flags, families, metrics and checkpoints: the same tests run on both.
VMAS_SCRIPTS = ["ippo_hyper_vmas", "mappo_hyper_vmas"]

# Seconds after which a child process or a wait is taken for hung. A guard against a hang only, never a
# measure of speed: no test passes or fails by how loaded the machine is.
HANG = 1800


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: a fast, representative test for newcomers (python -m pytest -m smoke tests)")
    config.addinivalue_line("markers", "long: a minute or more; started first, half of them on each of two workers")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of -n N: N workers, not N x cores threads, share the cores
        torch.set_num_threads(1)
    elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # SMAX's programs compiled once for the session: the
        # workers and the scripts the tests start inherit the folder (the same executables: the same numbers)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config.jax_cache = tempfile.mkdtemp(prefix="hypermarl-tests-jax-")


def pytest_unconfigure(config):
    if getattr(config, "jax_cache", None):
        shutil.rmtree(config.jax_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The `long` tests first in each half of the run, alternately: -n 2 --dist worksteal gives each worker one
    half, and the short tests, stolen by whichever worker is free, then even out the end. In collection order,
    the learning tests (test_vmas.py, the last file) would start last, both on one worker."""
    long = [item for item in items if item.get_closest_marker("long")]
    rest = [item for item in items if not item.get_closest_marker("long")]
    cut = max(len(items) // 2 - len(long[0::2]), 0)
    items[:] = long[0::2] + rest[:cut] + long[1::2] + rest[cut:]


def load_script(name):
    return importlib.import_module(name)


@pytest.fixture(params=VMAS_SCRIPTS)
def script(request):
    return load_script(request.param)


@pytest.fixture
def one_thread():
    """One thread, restored afterwards: float reductions (and so RL trajectories) depend on the thread
    count, and on a busy machine two threads only contend over small matrices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny VMAS run's sizes: 4 environments x 8 steps (32 per iteration), 6-step episodes, small networks
TINY_VMAS = ["--num-envs", "4", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "2",
             "--eval-episodes", "3", "--snd-samples", "40", "--actor-hidden-dims", "16", "16",
             "--critic-hidden-dims", "16", "16", "--max-steps", "6"]


def tiny_args(runs_dir, *extra, scenario="dispersion"):
    """A few seconds of training: TINY_VMAS, 2 iterations, an evaluation after each."""
    args = ["--scenario", scenario, "--runs-dir", str(runs_dir), "--total-timesteps", "64", "--eval-interval", "32"]
    return args + TINY_VMAS + [str(x) for x in extra]


def tiny_or_eval_args(runs_dir, *extra):
    """tiny_args, or with --eval-only only the folder and extra: the model's flags are the checkpoint's, and the
    flags of training are refused."""
    return ["--runs-dir", str(runs_dir), *map(str, extra)] if "--eval-only" in extra else tiny_args(runs_dir, *extra)


def eval_args(runs_dir, checkpoint, *extra):
    """--eval-only of a tiny run's checkpoint: the model's flags are the checkpoint's, training's are refused."""
    return ["--eval-only", "--checkpoint", str(checkpoint), "--runs-dir", str(runs_dir), *(str(x) for x in extra)]


def run_main(script, argv, capsys):
    """script.main(argv) in this process: (exit status, stdout, stderr)."""
    code = script.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_python(argv, cwd=None, env=None):
    """python argv... in a child process, its output captured."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=HANG)


def run_alone(name, folder, *argv):
    """The script <name>.py copied alone into folder and run there, nothing of the repository importable:
    (exit status, stdout, stderr)."""
    shutil.copy(os.path.join(ROOT, f"{name}.py"), folder)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = run_python([f"{name}.py", *argv], cwd=folder, env=env)
    return result.returncode, result.stdout, result.stderr


def run_tool(name, argv, cwd, monkeypatch, capsys):
    """benchmark/<name> as its command line runs it (sys.argv, the current folder), in this process: (exit
    status, stdout, stderr). A child process per bad flag would cost seconds of Python start; each tool's
    first case also runs as a command (test_benchmark_tools.py)."""
    path = os.path.join(ROOT, "benchmark", name)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [path, *map(str, argv)])
    spec = importlib.util.spec_from_file_location(f"benchmark_{name[:-3]}", path)
    tool, threads = importlib.util.module_from_spec(spec), torch.get_num_threads()
    try:
        spec.loader.exec_module(tool)
        code = tool.main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        torch.set_num_threads(threads)  # a tool sets its own, once its flags are read
    out = capsys.readouterr()
    return code, out.out, out.err


def matrix_args(**overrides):
    """reinforce_matrix_games.Args with these flags, checked as its command line checks them."""
    mg = load_script("reinforce_matrix_games")
    args = mg.Args(**overrides)
    mg.check_args(args, set(overrides))
    return args


# ----- child processes (Linux /proc): a run's environment workers, a launcher's scripts -----
def alive(pid) -> bool:
    """Whether process pid runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid) -> list[int]:
    """The live processes whose parent is pid."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def state_and_ticks(pid) -> tuple[str, int]:
    """A process's state (R, S, T, ...) and the CPU time (user and system, in clock ticks) of all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat


def pending_signals(pid) -> set[int]:
    """The signals sent to pid and not yet delivered (a stopped process holds them until SIGCONT)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    mask = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def wait_until_blocked(pid, quiet=0.5) -> None:
    """Returns once pid has slept (state S, not runnable) with its CPU clock still for quiet seconds on end:
    it waits on something, such as a stopped process. A busy process is runnable (R) however loaded the
    machine, so no speed is assumed; HANG seconds without it fail."""
    deadline = time.time() + HANG
    while True:
        start, (_, ticks) = time.time(), state_and_ticks(pid)
        while time.time() - start < quiet:
            if state_and_ticks(pid) != ("S", ticks):
                break
            time.sleep(0.02)
        else:
            return
        assert time.time() < deadline, f"process {pid} never blocked"
        time.sleep(0.02)


def gone(pids, wait=HANG) -> bool:
    """Whether every process of pids has exited within wait seconds (HANG: a hang, not a speed)."""
    deadline = time.time() + wait
    while any(map(alive, pids)):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def committed_results() -> dict:
    """Name -> bytes of every file under benchmark/results (the committed results)."""
    results = os.path.join(ROOT, "benchmark", "results")
    return {os.path.join(folder, name): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(results) if "__pycache__" not in folder for name in names}


def only_the_first_save_succeeds(monkeypatch) -> list:
    """Checkpoints after the first fail as in a folder made read-only (or full) during the run: PermissionError.
    (As root, chmod would not stop the writes.) Returns the list of the steps saved."""
    real, saved = extras.save_checkpoint, []

    def save_once(path, state):
        if saved:
            raise PermissionError(13, "Permission denied", path + ".tmp")
        saved.append(state["global_step"])
        real(path, state)

    monkeypatch.setattr(extras, "save_checkpoint", save_once)
    return saved


def run_dirs(runs_dir):
    return sorted(os.path.join(runs_dir, d) for d in os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []


def scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_flag_changes_the_run(script, runs_dir, base, extra, scenario="dispersion"):
    """tiny_args runs with base flags, then with base + extra, same seed: both finish and their value
    losses differ (runs are deterministic, so a flag that never reached the run would change nothing).
    The base run's losses are computed once per worker (by script, flags and thread count)."""
    key = (script.__name__, tuple(map(str, base)), scenario, torch.get_num_threads())
    if key not in BASE_LOSSES:
        BASE_LOSSES[key] = value_losses(script, os.path.join(runs_dir, "base"), base, scenario)
    assert BASE_LOSSES[key] != value_losses(script, os.path.join(runs_dir, "changed"), base + extra, scenario)


BASE_LOSSES = {}


def value_losses(script, runs_dir, flags, scenario):
    assert script.main(tiny_args(runs_dir, *flags, scenario=scenario)) == 0
    (run_dir,) = run_dirs(runs_dir)
    return scalar_tags(run_dir)["losses/value_loss"]


def read_args(script, argv):
    """The Args the script's command line makes of argv: the paper's values, then every check."""
    return script.read_command_line([str(a) for a in argv])[0]


def parsed(script, **flags):
    """read_args of flags given as keywords (lists as several values, booleans as --x / --no-x)."""
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag] + [str(v) for v in (value if isinstance(value, list) else [value])]
    return read_args(script, argv)


def vmas_agent(script, args, num_envs=2, seed=0):
    """(the environment, the agent of args' family, built after torch.manual_seed(seed))."""
    env = script.VmasEnv(args, num_envs, 0, torch.device("cpu"))
    torch.manual_seed(seed)
    return env, script.make_agent(args, env.obs_dim, env.act_dim, env.discrete)


# A tiny MaMuJoCo run's sizes: 32 steps per iteration in one environment, 40-step episodes, small networks
TINY_MAMUJOCO = ["--no-cuda", "--num-envs", "1", "--num-steps", "32", "--update-epochs", "2", "--critic-epochs", "2",
                 "--actor-hidden-dims", "16", "16", "--critic-hidden-dims", "16", "16", "--eval-episodes", "2",
                 "--max-episode-steps", "40", "--snd-samples", "20", "--snd-gaussian-samples", "8",
                 "--interference-samples", "16"]


def tiny_mamujoco_args(runs_dir, *extra, task="HalfCheetah-2x3", hypernet="mlp", algo="mappo"):
    """MaMuJoCo: TINY_MAMUJOCO, two updates."""
    argv = ["--task", task, "--hypernet", hypernet, "--algo", algo, "--runs-dir", str(runs_dir),
            "--total-timesteps", "64", *TINY_MAMUJOCO]
    if hypernet == "mlp":
        argv += ["--hypernet-hidden-dims", "8", "--hypernet-embedding-dim", "4"]
    return argv + [str(x) for x in extra]


def run_mamujoco(argv):
    """(exit status, stdout, stderr) of mappo_hyper_mamujoco.main(argv); tyro's own errors exit through SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module("mappo_hyper_mamujoco").main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()
