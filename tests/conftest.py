import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The two VMAS scripts share their flags, families, metrics and checkpoints: the same tests run on both.
VMAS_SCRIPTS = ["ippo_hyper_vmas", "mappo_hyper_vmas"]


def load_script(name):
    return importlib.import_module(name)


@pytest.fixture(params=VMAS_SCRIPTS)
def script(request):
    return load_script(request.param)


def tiny_args(runs_dir, *extra, scenario="dispersion"):
    """A few seconds of training: 4 environments x 8 steps, 2 iterations, small networks."""
    args = ["--scenario", scenario, "--runs-dir", str(runs_dir), "--num-envs", "4", "--num-steps", "8",
            "--num-minibatches", "2", "--update-epochs", "2", "--total-timesteps", "64",
            "--eval-episodes", "3", "--eval-interval", "32", "--snd-samples", "40",
            "--actor-hidden-dims", "16", "16", "--critic-hidden-dims", "16", "16", "--max-steps", "6"]
    return args + [str(x) for x in extra]


def run_dirs(runs_dir):
    return sorted(os.path.join(runs_dir, d) for d in os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []


def scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_flag_changes_the_run(script, runs_dir, base, extra, scenario="dispersion"):
    """tiny_args runs with base flags, then with base + extra, same seed: both finish and their value
    losses differ (runs are deterministic, so a flag that never reached the run would change nothing)."""
    losses = []
    for name, flags in (("base", base), ("changed", base + extra)):
        assert script.main(tiny_args(os.path.join(runs_dir, name), *flags, scenario=scenario)) == 0
        (run_dir,) = run_dirs(os.path.join(runs_dir, name))
        losses.append(scalar_tags(run_dir)["losses/value_loss"])
    assert losses[0] != losses[1]


def parsed(script, **flags):
    """script.parse_args of flags given as keywords (lists as several values, booleans as --x / --no-x)."""
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag] + [str(v) for v in (value if isinstance(value, list) else [value])]
    return script.parse_args(argv)
