"""The plumbing around training, on the VMAS scripts: the command line and its checks (one line, exit
status 2, nothing written), checkpoints (refused when foreign, corrupt or incompatible), --resume bit for
bit, Ctrl-C and SIGTERM, --eval-only and SND datasets, run folders, progress lines, --help, videos, and
a script copied alone without hypermarl_extras.py."""

import dataclasses
import importlib.util
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

import hypermarl_extras as extras
from conftest import (HANG, ROOT, eval_args, load_checkpoint, load_script, only_the_first_save_succeeds, read_args,
                      run_alone, run_dirs, run_main, run_python, scalar_tags, tiny_args, tiny_or_eval_args, vmas_agent)
from conftest import tiny_mamujoco_args as tiny_argv

# ===== The command line: a bad flag is one line, exit status 2, nothing written =====
BAD_INPUT = [
    (["--n-agents", 0], "--n-agents"),
    (["--num-envs", -1], "--num-envs"),
    (["--total-timesteps", 0], "--total-timesteps"),
    (["--learning-rate", 0], "--learning-rate"),
    pytest.param(["--num-minibatches", 3], "--num-minibatches", marks=pytest.mark.smoke),
    (["--hypernet", "fups", "--hypernet-init", "flax"], "--hypernet-init"),
    (["--hypernet", "nops", "--hypernet-embedding-dim", 8], "--hypernet-embedding-dim"),
    (["--hypernet", "linear", "--hypernet-hidden-dims", 32], "--hypernet-hidden-dims"),
    (["--hypernet", "linear", "--hypernet-separate-embeddings"], "--hypernet-separate-embeddings"),
    (["--hypernet-embedding", "onehot", "--hypernet-embedding-dim", 8], "--hypernet-embedding-dim"),  # an ID has no size
    (["--hypernet-embedding", "onehot", "--hypernet-separate-embeddings"], "--hypernet-separate-embeddings"),
    (["--hypernet", "mlp", "--dico-snd-des", 1.0], "--dico-snd-des"),
    (["--gamma", 1.5], "--gamma"),
    (["--n-food", 2, "--scenario", "navigation"], "--n-food"),
    (["--collisions"], "--collisions"),
    (["--eval-only"], "--eval-only"),
    (["--resume", "/no/such/checkpoint.pt"], "--resume"),
    (["--seed", -1], "--seed"),
    (["--seed", 2**32], "--seed"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--ent-coef", "nan"], "--ent-coef"),
    (["--exp-name", "../../x"], "--exp-name"),
    (["--resume", "/"], "--resume"),  # a folder
    (["--eval-only", "--checkpoint", "/"], "--checkpoint"),
    (["--save-interval", 32], "--save-interval"),  # only with --save-model
    (["--hypernet", "nops", "--num-minibatches", 32], "--num-minibatches: with --hypernet nops"),  # a std of 1 sample
    (["--hypernet", "nops", "--interference-samples", 1], "--interference-samples: with --hypernet nops"),
    (["--n-agents", 100_000], "--n-agents 100000"),  # more memory than any machine: refused at once, not a hang
    (["--num-envs", 100_000_000, "--total-timesteps", 800_000_000], "--num-envs 100000000"),
]


NAVIGATION_BAD_INPUT = [
    (["--agents-with-same-goal", 5, "--n-agents", 4], "--agents-with-same-goal"),
    (["--split-goals", "--n-agents", 3], "--split-goals"),
    (["--agents-with-same-goal", 2, "--collisions"], "--collisions"),
    (["--lidar-range", 0.5], "--lidar-range"),  # agents carry a LIDAR only with --collisions
    (["--penalise-by-time"], None),  # the default value of a dispersion flag is harmless
    (["--no-penalise-by-time"], "--no-penalise-by-time"),  # named as written
]


@pytest.mark.parametrize("extra,flag", BAD_INPUT + [(["--scenario", "navigation"] + e, f) for e, f in NAVIGATION_BAD_INPUT
                                                    if f is not None])
def test_bad_input_is_one_line_exit_2_nothing_written(script, extra, flag, tmp_path, capsys):
    code, out, err = run_main(script, tiny_or_eval_args(tmp_path / "runs", *extra), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_a_run_larger_than_the_machine_is_refused_with_its_estimate_unless_told_to_try(script, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(script.extras, "machine_memory", lambda cuda: 2**20)  # a machine with 1 MiB
    code, out, err = run_main(script, tiny_args(tmp_path / "runs"), capsys)
    assert code == 2 and err.count("\n") == 1 and not os.path.exists(tmp_path / "runs")
    assert err.startswith("error: --") and ": the run needs at least 0.0 GiB (rollout 0.0, " in err and \
        "more than this machine's 0.0 GiB; use smaller values, or --no-memory-check to try anyway" in err, err
    assert run_main(script, tiny_args(tmp_path / "runs", "--no-memory-check"), capsys)[0] == 0


@pytest.mark.parametrize("extra, flags", [
    (["--num-envs", 10**8, "--total-timesteps", 8 * 10**8], "--n-agents 4, --num-envs 100000000, --num-steps 8:"),
    (["--continuous-actions", "--snd-gaussian-samples", 10**10], "--snd-gaussian-samples 10000000000, --snd-samples 40"),
    (["--hypernet-embedding-dim", 10**11], "--n-agents 4, --actor-hidden-dims [16, 16], "),
])
def test_the_memory_check_names_the_flags_of_the_largest_part(script, extra, flags, tmp_path, capsys):
    """Not the rollout's flags when SND's draws or the networks are what the machine cannot hold."""
    code, out, err = run_main(script, tiny_args(tmp_path / "runs", *extra), capsys)
    assert code == 2 and err.startswith(f"error: {flags}") and "the run needs at least" in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_the_memory_estimate_grows_with_what_the_run_holds(script):
    """A lower bound (benchmark/memory_estimate.py measures it against runs): it grows with every size."""
    base = script.Args(n_agents=4)
    total = sum(script.memory_needed(base).values())
    assert 2**20 < total < 2**30
    for bigger in (dict(n_agents=8, n_food=8), dict(num_envs=32), dict(num_steps=256), dict(eval_episodes=64),
                   dict(actor_hidden_dims=[128, 128]), dict(hypernet_input="agent+obs"), dict(hypernet_hidden_dims=[128]),
                   dict(hypernet_embedding_dim=64), dict(continuous_actions=True)):
        assert sum(script.memory_needed(dataclasses.replace(base, **bigger)).values()) > total, bigger
    gaussian = dataclasses.replace(base, continuous_actions=True)  # SND's Monte Carlo draws
    for bigger in (dict(snd_gaussian_samples=128), dict(snd_samples=2000)):
        assert sum(script.memory_needed(dataclasses.replace(gaussian, **bigger)).values()) > \
            sum(script.memory_needed(gaussian).values()), bigger


# Values of the wrong type or outside a flag's choices: tyro's own message (naming the flag, with its
# "did you mean" hint for a misspelt flag), exit status 2, nothing written.
@pytest.mark.parametrize("extra,flag", [
    (["--scenario", "football"], "--scenario"),
    (["--hypernet", "transformer"], "--hypernet"),
    (["--hypernet-embedding", "random"], "--hypernet-embedding"),
    (["--activation", "gelu"], "--activation"),
    (["--n-agents", "four"], "--n-agents"),
    (["--no-such-flag", 1], "--no-such-flag"),
])
def test_bad_values_are_refused_by_the_parser(script, extra, flag, tmp_path, capsys):
    code, out, err = run_main(script, tiny_args(tmp_path / "runs", *extra), capsys)
    assert code == 2 and flag in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_a_misspelt_flag_gets_a_suggestion(script, capsys):
    code, out, err = run_main(script, ["--n-agent", "3"], capsys)
    assert code == 2 and "--n-agent" in err and "--n-agents" in err.replace("--n-agent ", ""), err


def test_bad_input_exit_status_from_the_command_line(script, tmp_path):
    result = run_python([f"{script.__name__}.py", "--num-minibatches", "3", "--runs-dir", tmp_path / "runs"], cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--num-minibatches" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("argv, message", [
    (["ippo_hyper_vmas.py", "--hypernet", "linear", "--hypernet-init", "matched"],
     "error: --hypernet-init: matched is for --hypernet mlp, got --hypernet linear"),
    (["mappo_hyper_mamujoco.py", "--hypernet", "linear", "--hypernet-init", "matched"],
     "error: --hypernet-init: matched is for --hypernet mlp, got --hypernet linear"),
    # integers past 2**53: a traceback in VMAS, or at the first log, before they were refused
    (["ippo_hyper_vmas.py", "--n-food", str(2**80)], "error: --n-food: must be at most 2**53 = 9,007,199,254,740,992"),
    (["mappo_hyper_vmas.py", "--max-steps", str(2**70)], "error: --max-steps: must be at most 2**53 = 9,007,199,254,740,992"),
    (["ippo_hyper_vmas.py", "--actor-hidden-dims", "64", str(2**70)],
     "error: --actor-hidden-dims: must be at most 2**53 = 9,007,199,254,740,992"),
    (["mappo_hyper_mamujoco.py", "--total-timesteps", str(2**67)],
     "error: --total-timesteps: must be at most 2**53 = 9,007,199,254,740,992"),
])
def test_bad_hypernet_init_or_a_huge_integer_is_one_line_exit_2(tmp_path, argv, message):
    result = run_python([os.path.join(ROOT, argv[0]), "--runs-dir", tmp_path / "runs"] + argv[1:], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == message, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["mappo_hyper_vmas.py", "mappo_hyper_mamujoco.py"])
def test_an_unknown_hypernet_init_is_refused_by_the_parser(tmp_path, script):
    result = run_python([os.path.join(ROOT, script), "--runs-dir", tmp_path / "runs", "--hypernet-init", "orthogonl"],
                        cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--hypernet-init" in result.stderr and "'scaled', 'matched', 'flax', 'pytorch'" in result.stderr.replace("\n", "")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["file", "inside-file", "read-only", "empty", "broken-link", "not-utf-8"])
def test_runs_dir_that_cannot_hold_runs_is_refused_before_anything_is_written(script, where, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    # /proc/sys is read-only even for root (in containers, where tests run as root, chmod would not do)
    runs_dir = {"file": blocker, "inside-file": blocker / "runs", "read-only": "/proc/sys/hypermarl-runs",
                "empty": "", "broken-link": tmp_path / "link",
                "not-utf-8": os.path.join(tmp_path, os.fsdecode(b"runs-\xff"))}[where]  # a byte Linux takes
    code, out, err = run_main(script, tiny_args(runs_dir), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --runs-dir: "), err
    assert sorted(os.listdir(tmp_path)) == ["blocker", "link"]


def test_help_shows_each_default_once(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a narrow terminal would wrap "(default: None)"
    with pytest.raises(SystemExit):
        script.read_command_line(["--help"])
    text = capsys.readouterr().out
    assert "Adam learning rate (default: 0.0005)" in text and "parallel VMAS environments (default: 16)" in text
    # only the flags whose default really is None say so
    assert text.count("(default: None)") == 4, text
    # a scenario's help shows its own defaults (Table 12), and Table 15's for its family and goal setting
    with pytest.raises(SystemExit):
        script.read_command_line(["--scenario", "navigation", "--n-agents", "8", "--hypernet", "nops", "--help"])
    text = capsys.readouterr().out
    assert "(default: 600)" in text and "(default: 5e-05)" in text and "(default: navigation)" in text
    assert "surrogate clipping coefficient (default: 0.2)" in text  # nops, 8 agents, one goal each


# ===== Checkpoints and --resume =====
def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(script, tmp_path, capsys):
    full = tiny_args(tmp_path / "full", "--save-model", "--total-timesteps", 96, "--exp-name", "full")
    assert run_main(script, full, capsys)[0] == 0
    first = tiny_args(tmp_path / "part", "--save-model", "--total-timesteps", 64, "--exp-name", "part")
    assert run_main(script, first, capsys)[0] == 0
    (part_dir,) = run_dirs(tmp_path / "part")
    checkpoint = os.path.join(part_dir, "checkpoint.pt")
    assert load_checkpoint(checkpoint)["global_step"] == 64
    resumed = tiny_args(tmp_path / "part", "--save-model", "--total-timesteps", 96, "--exp-name", "part",
                        "--resume", checkpoint)
    code, out, err = run_main(script, resumed, capsys)
    assert code == 0, err
    (full_dir,) = run_dirs(tmp_path / "full")
    a, b = load_checkpoint(os.path.join(full_dir, "checkpoint.pt")), load_checkpoint(checkpoint)
    assert a["global_step"] == b["global_step"] == 96
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["env"]["tensors"]:
        assert torch.equal(a["env"]["tensors"][key], b["env"]["tensors"][key]), key
    assert scalar_tags(full_dir)["eval/episodic_return"][-1] == scalar_tags(part_dir)["eval/episodic_return"][-1]


def test_dico_resume_is_bit_exact_with_the_running_estimate(script, tmp_path, capsys):
    common = ["--hypernet", "dico", "--n-agents", 2, "--save-model"]

    def train(name, steps, *extra):
        argv = tiny_args(tmp_path / name, *common, "--total-timesteps", steps, "--exp-name", name, *extra,
                         scenario="navigation")
        assert script.main(argv) == 0, capsys.readouterr().err

    train("full", 96)
    train("part", 64)
    (part_dir,) = run_dirs(tmp_path / "part")
    checkpoint = os.path.join(part_dir, "checkpoint.pt")
    train("part", 96, "--resume", checkpoint)
    # --eval-only without --scenario: the checkpoint's run decides the evaluation protocol (D.1.1's sampled
    # actions for Navigation; the run's 3 episodes), unless given
    args, _, _ = script.read_command_line(["--eval-only", "--checkpoint", checkpoint])
    assert (args.scenario, args.eval_episodes, args.eval_deterministic, args.dico_snd_des) == ("navigation", 3, False, 1.2)
    args, _, _ = script.read_command_line(["--eval-only", "--checkpoint", checkpoint, "--eval-episodes", "200"])
    assert (args.eval_episodes, args.eval_deterministic) == (200, False)
    (full_dir,) = run_dirs(tmp_path / "full")
    a = torch.load(os.path.join(full_dir, "checkpoint.pt"), weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    assert not torch.isnan(a["model"]["actor.snd_hat"])
    assert set(a) == set(script.CHECKPOINT_KEYS) and "action_optimizer" not in a  # its moments: the model's
    for key in a["model"]:
        if key != "_extra_state":
            assert torch.equal(a["model"][key], b["model"][key]), key
    # DiCo's own Adam (the action-space loss): its moments are the agent's extra state, restored too
    moments, resumed = (m["model"]["_extra_state"]["action_optimizer"]["state"] for m in (a, b))
    assert moments and moments.keys() == resumed.keys()
    for k in moments:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(moments[k][name]), torch.as_tensor(resumed[k][name])), (k, name)


def test_checkpoint_is_refused_when_incompatible_foreign_or_corrupt(script, tmp_path, capsys):
    assert run_main(script, tiny_args(tmp_path / "train", "--save-model"), capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    cases = {
        "n_agents": (checkpoint, ["--n-agents", 3]),
        "hypernet": (checkpoint, ["--hypernet", "nops"]),
        "scenario": (checkpoint, ["--scenario", "navigation"]),
    }
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(checkpoint, "rb").read()[:500])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "x", "payload": subprocess.Popen}, hostile)  # not loadable with weights_only
    older = tmp_path / "older.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save(state | {"format": state["format"].split("/")[0] + "/2"}, older)
    cases.update(corrupt=(str(corrupt), []), foreign=(str(foreign), []), hostile=(str(hostile), []),
                 older=(str(older), []))
    for name, (path, extra) in cases.items():
        argv = eval_args(tmp_path / "eval", path, *extra)
        code, out, err = run_main(script, argv, capsys)
        assert code == 2, name
        assert err.count("\n") == 1, (name, err)
        if name in ("n_agents", "hypernet", "scenario"):  # the model's flags come from the checkpoint
            assert err.startswith(f"error: --{name.replace('_', '-')}: the checkpoint's run has"), (name, err)
        else:
            assert err.startswith("error: --checkpoint"), (name, err)
            assert "weights_only" not in err  # never relay torch's advice to load unsafely
    assert "written by an older version" in err, err  # the last case: a format this script no longer reads
    assert not os.path.exists(tmp_path / "eval")


@pytest.mark.parametrize("kind", ["torchscript", "pickle", "text", "binary"])
def test_foreign_formats_are_refused_in_one_line(script, kind, tmp_path, capsys):
    """Torch's unpickler meets arbitrary bytes with whatever error they lead it to (a KeyError for a line of
    text): each is one line."""
    import pickle

    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_bytes(b"junk\n")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "torchscript":
        with warnings.catch_warnings():  # torch.jit.save is deprecated, and still what such files come from
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    else:
        path.write_bytes(pickle.dumps({"format": "x"}, protocol=4))
    code, out, err = run_main(script, tiny_args(tmp_path / "runs", "--resume", path), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --resume: "), err
    assert "weights_only" not in err and not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("flag", ["--resume", "--checkpoint"])
def test_empty_checkpoint_file_is_one_line(script, flag, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    extra = ["--resume", empty] if flag == "--resume" else ["--eval-only", "--checkpoint", empty]
    code, out, err = run_main(script, tiny_or_eval_args(tmp_path / "runs", *extra), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag}: "), err
    assert not os.path.exists(tmp_path / "runs")


@pytest.fixture(scope="module")
def finished_runs() -> dict:
    """Each script's finished run, trained once for the module: {script name: run folder}."""
    return {}


@pytest.fixture
def saved_run(script, finished_runs, tmp_path_factory, tmp_path, capsys):
    """A finished 64-step run with a checkpoint, this test's own copy: (run folder, checkpoint path)."""
    if script.__name__ not in finished_runs:
        runs = tmp_path_factory.mktemp("finished")
        argv = tiny_args(runs, "--save-model", "--seed", 3, "--print-interval", 1, "--no-cuda")
        assert run_main(script, argv, capsys)[0] == 0
        (finished_runs[script.__name__],) = run_dirs(runs)
    run_dir = str(tmp_path / "runs" / os.path.basename(finished_runs[script.__name__]))
    shutil.copytree(finished_runs[script.__name__], run_dir)
    return run_dir, os.path.join(run_dir, "checkpoint.pt")


@pytest.mark.parametrize("extra,flag", [
    (["--learning-rate", 1e-3], "--learning-rate"), (["--num-envs", 8], "--num-envs"),
    (["--num-steps", 4, "--num-minibatches", 2], "--num-steps"), (["--seed", 4], "--seed"),
    (["--seed", 1], "--seed"),  # given with the default value: still not the run's seed
    (["--lidar-range", 0.35], "--lidar-range"),  # a Navigation flag, for the checkpoint's Dispersion run
    (["--total-timesteps", 32], "--total-timesteps"),  # less than the run has already done
    (["--total-timesteps", 16], "--total-timesteps"),  # below one batch: the same reason (next test)
    (["--total-timesteps", 80], "--total-timesteps"),  # more, but not one more 32-step iteration
    ([], "--total-timesteps"),  # the run is complete: nothing to do is not a silent success
])
def test_resume_refuses_flags_that_would_change_the_run(script, saved_run, extra, flag, capsys):
    run_dir, checkpoint = saved_run
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    code, out, err = run_main(script, ["--resume", checkpoint, *map(str, extra)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag}: "), err
    assert {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)} == before


def test_a_given_flag_that_breaks_a_saved_one_is_the_command_lines_conflict_not_the_files(script, saved_run, capsys):
    """8 -> 100 steps would break the saved --total-timesteps 64 (less than a batch): the file is intact."""
    code, _, err = run_main(script, ["--resume", saved_run[1], "--num-steps", "100"], capsys)
    assert code == 2 and err.startswith("error: --num-steps: the checkpoint's run has 8, not 100"), err


def test_resume_with_a_budget_below_what_the_run_did_says_so(script, saved_run, capsys):
    """Not "must be at least one batch": the reason is the steps the run has already trained."""
    code, _, err = run_main(script, ["--resume", saved_run[1], "--total-timesteps", "16"], capsys)
    assert code == 2 and err.startswith("error: --total-timesteps: the run already trained 64 steps"), err


def test_resume_takes_the_run_from_the_checkpoint_and_reports_what_changed(script, saved_run, capsys):
    run_dir, checkpoint = saved_run
    argv = ["--resume", checkpoint, "--total-timesteps", "96", "--print-interval", "10", "--cuda", "--save-interval", "32"]
    code, out, err = run_main(script, argv, capsys)
    assert code == 0, err
    # flags given with their default value still count; --save-interval needs the run's --save-model
    changed = out.split("changed: ")[1].splitlines()[0].split(", ")
    assert sorted(changed) == ["--cuda False -> True", "--print-interval 1 -> 10", "--total-timesteps 64 -> 96"]
    state = load_checkpoint(checkpoint)
    assert state["global_step"] == 96 and state["args"]["seed"] == 3 and state["args"]["num_envs"] == 4
    assert scalar_tags(run_dir)["losses/value_loss"]  # the same run folder continues
    assert run_dirs(os.path.dirname(run_dir)) == [run_dir]


def test_nan_loss_stops_with_the_update_number_and_keeps_the_checkpoint(script, tmp_path, capsys, monkeypatch):
    updates = {"n": 0}
    original_update, original_loss = script.ppo_update, script.ppo_loss

    def counted_update(*args, **kwargs):
        updates["n"] += 1
        return original_update(*args, **kwargs)

    def poisoned(*args, **kwargs):  # the second update's loss becomes NaN
        loss, per_agent, stats = original_loss(*args, **kwargs)
        return (loss * float("nan") if updates["n"] >= 2 else loss), per_agent, stats

    monkeypatch.setattr(script, "ppo_update", counted_update)
    monkeypatch.setattr(script, "ppo_loss", poisoned)
    argv = tiny_args(tmp_path, "--save-model", "--save-interval", 32, "--total-timesteps", 96)
    code, out, err = run_main(script, argv, capsys)
    assert code == 1
    assert "update 2" in err
    (run_dir,) = run_dirs(tmp_path)
    state = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    assert state["global_step"] == 32 and all(torch.isfinite(v).all() for v in state["model"].values())


# ===== Ctrl-C and SIGTERM =====
@pytest.mark.parametrize("name, signum", [("ippo_hyper_vmas", signal.SIGTERM), ("mappo_hyper_vmas", signal.SIGINT)])
def test_signal_to_the_process_group_saves_a_checkpoint_that_resumes(name, signum, tmp_path, capsys):
    """Each signal end to end on one script: one handler takes both (test_ctrl_c_and_sigterm_both_ask_for_a_save)."""
    script = load_script(name)
    # a budget out of reach: the signal always finds the run going, however slow the machine
    argv = [sys.executable, "-u", f"{script.__name__}.py"] + tiny_args(tmp_path, "--total-timesteps", 32 * 10**6,
                                                                     "--print-interval", 1, "--eval-interval", 10**9)
    # its own process group, signalled as a whole: what a terminal's Ctrl-C, Slurm or timeout do
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    for line in process.stdout:  # the first progress line: the loop runs, its handler is in place
        if line.startswith("global_step="):
            break
    os.killpg(process.pid, signum)
    out, err = process.communicate(timeout=HANG)
    assert process.returncode == 0, err
    assert "--resume" in out
    (run_dir,) = run_dirs(tmp_path)
    state = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    assert 32 <= state["global_step"] < 32 * 10**6 and state["iteration"] == state["global_step"] // 32 + 1
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    # and it resumes: one more iteration, in the same run folder, from the saved step
    budget = state["global_step"] + 32
    code, out, err = run_main(script, ["--resume", os.path.join(run_dir, "checkpoint.pt"), "--total-timesteps", budget,
                                       "--print-interval", 1, "--save-model"], capsys)
    assert code == 0, err
    assert f"at step {state['global_step']}" in out and f"global_step={budget} " in out, out
    assert run_dirs(tmp_path) == [run_dir] and load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["global_step"] == budget


def test_ctrl_c_after_the_reader_of_its_output_is_gone_still_saves(script, tmp_path):
    """`python ... | tee log`: a Ctrl-C stops tee too, and the next progress line meets a closed pipe. The run
    still saves its checkpoint and exits 0 (its lines go nowhere), instead of taking the pipe for its folder."""
    argv = [sys.executable, "-u", f"{script.__name__}.py"] + tiny_args(tmp_path, "--total-timesteps", 32 * 10**6,
                                                                     "--print-interval", 1, "--eval-interval", 10**9)
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    for line in process.stdout:
        if line.startswith("global_step="):
            break
    process.stdout.close()  # the reader goes away, then the Ctrl-C
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=HANG) == 0, process.stderr.read()
    (run_dir,) = run_dirs(tmp_path)
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["global_step"] >= 32
    process.stderr.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_both_ask_for_a_save(signum, capsys):
    """Either signal asks for a checkpoint and a stop; the next one stops at once; restore() gives the
    process its handlers back."""
    extras = load_script("hypermarl_extras")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = extras.StopOnSignal()
    try:
        os.kill(os.getpid(), signum)  # the handler runs before os.kill returns (the main thread signals itself)
        assert stop.requested == signum and f"signal {int(signum)}: saving a checkpoint" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_signal_during_a_save_waits_for_it(tmp_path, monkeypatch):
    """A second Ctrl-C (stop at once) while torch.save writes the checkpoint of the first: the file is written
    whole and renamed into place, and only then does the interrupt take effect."""
    extras = load_script("hypermarl_extras")
    save = torch.save

    def interrupted_save(state, f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here, in the middle of the save
        save(state, f)

    monkeypatch.setattr(torch, "save", interrupted_save)
    path, stop = str(tmp_path / "checkpoint.pt"), extras.StopOnSignal()
    stop.requested = signal.SIGINT  # the first signal: the run is saving its checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            extras.save_checkpoint(path, {"weights": torch.arange(5)})
    finally:
        stop.restore()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(5))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_failed_save_leaves_no_interrupt_pending_and_a_save_clears_what_a_killed_one_left(tmp_path, monkeypatch):
    """A second signal during a save that then fails (a full disk) does not surface at the next save; the file
    a save killed mid-write left (its process gone) is removed by the next one; the data reach the disk."""
    extras = load_script("hypermarl_extras")
    save, path = torch.save, str(tmp_path / "checkpoint.pt")

    def failing_save(state, f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        raise OSError(28, "No space left on device")

    stop = extras.StopOnSignal()
    stop.requested = signal.SIGINT
    try:
        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(OSError):
            extras.save_checkpoint(path, {"step": 1})
        monkeypatch.setattr(torch, "save", save)
        (tmp_path / "checkpoint.pt.999999999.tmp").write_bytes(b"half a checkpoint")  # no such process
        synced = []
        monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
        extras.save_checkpoint(path, {"step": 2})  # no KeyboardInterrupt left over
    finally:
        stop.restore()
    assert torch.load(path, weights_only=True) == {"step": 2} and os.listdir(tmp_path) == ["checkpoint.pt"]
    assert len(synced) == 2  # the file, then its folder (the rename)


def test_cuda_random_states_of_more_devices_than_this_machine_sees_restore_the_ones_it_has(monkeypatch):
    """A checkpoint written where 8 GPUs were visible resumes where one is (a Slurm job's CUDA_VISIBLE_DEVICES)."""
    extras = load_script("hypermarl_extras")
    state, restored = extras.rng_state(), []
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    extras.set_rng_state(state)
    assert restored == [(0, 0)]


def test_the_memory_rule_puts_host_parts_in_ram_and_the_rest_on_the_gpu(monkeypatch):
    """With --cuda on a GPU, tensors count against the GPU and simulators on the CPU against RAM; without one,
    everything against RAM. The message names the largest part's flags with their values."""
    GiB, sizes = 2**30, {}
    monkeypatch.setattr(extras, "machine_memory", lambda cuda: sizes["gpu" if cuda else "ram"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    need, flags = dict(environments=3 * GiB, rollout=1 * GiB), dict(environments=("num_envs",), rollout=("num_steps",))
    args = types.SimpleNamespace(cuda=True, num_envs=7, num_steps=9)
    sizes.update(ram=4 * GiB, gpu=2 * GiB)
    assert extras.memory_rule(args, need, flags, host_parts=("environments",))[0] is False
    sizes.update(ram=2 * GiB)  # the environments alone do not fit in RAM
    broken, message = extras.memory_rule(args, need, flags, host_parts=("environments",))
    assert broken and message == ("--num-envs 7: the run needs at least 4.0 GiB (environments 3.0, rollout 1.0), "
                                  "more than this machine's 2.0 GiB and GPU 2.0 GiB; use smaller values, or "
                                  "--no-memory-check to try anyway"), message
    sizes.update(ram=4 * GiB, gpu=0.5 * GiB)  # the rollout does not fit on the GPU
    assert extras.memory_rule(args, need, flags, host_parts=("environments",))[0] is True
    args.cuda = False  # everything in RAM: 4 GiB fit in 4, not in 3.5
    assert extras.memory_rule(args, need, flags, host_parts=("environments",))[0] is False
    sizes.update(ram=3.5 * GiB)
    assert extras.memory_rule(args, need, flags, host_parts=("environments",))[0] is True


def test_the_memory_limit_is_the_smallest_of_the_process_cgroup_and_its_parents(tmp_path):
    """cgroup v2 (a Slurm job's limit sits on its own cgroup, not the root's) and v1's memory controller."""
    extras = load_script("hypermarl_extras")
    root = tmp_path / "cgroup"
    for folder, name, value in (("", "memory.max", "max"), ("system.slice/job_7", "memory.max", "4000000"),
                                ("system.slice", "memory.max", "9000000"), ("memory/slurm/uid_0/job_7",
                                "memory.limit_in_bytes", "3000000"), ("memory", "memory.limit_in_bytes",
                                "9223372036854771712")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(value + "\n")
    proc = tmp_path / "cgroup.txt"
    proc.write_text("0::/system.slice/job_7\n")
    assert extras.cgroup_memory_limit(str(proc), str(root)) == 4_000_000
    proc.write_text("7:memory:/slurm/uid_0/job_7\n5:cpu,cpuacct:/slurm/uid_0/job_7\n")
    assert extras.cgroup_memory_limit(str(proc), str(root)) == 3_000_000
    proc.write_text("0::/\n")
    assert extras.cgroup_memory_limit(str(proc), str(root)) is None  # "max" everywhere: no limit
    assert extras.cgroup_memory_limit(str(tmp_path / "absent"), str(tmp_path / "none")) is None


# ===== --eval-only, and SND on a shared dataset (appendix D.1.2) =====
def test_eval_only_reports_return_and_snd_and_writes_nothing(script, tmp_path, capsys):
    """It scores what the run's last evaluation scored: the run's seed (not given here) picks the episodes."""
    assert run_main(script, tiny_args(tmp_path / "train", "--save-model", "--seed", 3), capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    before = sorted(os.listdir(run_dir))
    code, out, err = run_main(script, eval_args(tmp_path / "eval", checkpoint), capsys)
    assert code == 0, err
    assert "eval/episodic_return=" in out and "diversity/snd=" in out
    ret, snd = (float(out.split(f"{tag}=")[1].split()[0]) for tag in ("eval/episodic_return", "diversity/snd"))
    assert ret == pytest.approx(scalar_tags(run_dir)["eval/episodic_return"][-1], abs=1e-4)
    assert snd == pytest.approx(scalar_tags(run_dir)["diversity/snd"][-1], abs=1e-5)
    assert not os.path.exists(tmp_path / "eval") and sorted(os.listdir(run_dir)) == before


def test_eval_only_takes_the_model_flags_from_the_checkpoint(script, saved_run, tmp_path, capsys):
    _, checkpoint = saved_run  # trained with 16-unit layers: the default 64 64 would not load
    argv = ["--eval-only", "--checkpoint", checkpoint, "--eval-episodes", "2", "--no-cuda", "--no-memory-check"]
    code, out, err = run_main(script, argv, capsys)  # where it runs: an evaluation's flags too
    assert code == 0 and "eval/episodic_return=" in out, err


def test_snd_on_an_observation_file_and_the_dataset_builder(script, tmp_path, capsys):
    assert script.main(tiny_args(tmp_path / "train", "--save-model", "--hypernet", "nops")) == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    capsys.readouterr()
    out = tmp_path / "snd.npz"
    spec = importlib.util.spec_from_file_location("snd_dataset", os.path.join(ROOT, "benchmark", "snd_dataset.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    argv = ["--script", script.__name__, "--checkpoints", checkpoint, checkpoint, "--episodes", 5,
            "--samples", 120, "--out", out]
    assert builder.main([str(a) for a in argv]) == 0
    obs = np.load(out)["obs"]
    assert obs.shape == (30, 4, 16)  # 120 // 4 rows of every agent's observation
    code = script.main(eval_args(tmp_path / "eval", checkpoint, "--snd-obs-file", out, "--hypernet", "nops"))
    printed = capsys.readouterr().out
    assert code == 0
    snd = float(printed.split("diversity/snd=")[1].split()[0])
    args = read_args(script, ["--hypernet", "nops", "--actor-hidden-dims", 16, 16, "--critic-hidden-dims", 16, 16,
                              "--max-steps", 6])
    _, agent = vmas_agent(script, args)
    agent.load_state_dict(load_checkpoint(checkpoint)["model"])
    with torch.no_grad():
        same = torch.from_numpy(obs.reshape(-1, 16)).expand(4, -1, -1)  # every agent on every observation
        expected = script.system_neural_diversity(agent.policy(same, agent.generate(same)), True)
    assert snd == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("extra, message", [
    (["--snd-obs-file", "x.npz"], "--snd-obs-file: only with --eval-only"),
    (["--eval-only", "--checkpoint", "CKPT", "--snd-obs-file", "missing.npz"], "--snd-obs-file: no such file"),
    (["--eval-only", "--checkpoint", "CKPT", "--snd-obs-file", "BAD"], "--snd-obs-file:"),
])
def test_bad_snd_obs_file_is_one_line_exit_2(script, tmp_path, capsys, extra, message):
    assert script.main(tiny_args(tmp_path / "train", "--save-model")) == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    bad = tmp_path / "bad.npz"
    np.savez(bad, obs=np.zeros((5, 7), dtype=np.float32))  # wrong observation size
    extra = [str(bad) if e == "BAD" else os.path.join(run_dir, "checkpoint.pt") if e == "CKPT" else e for e in extra]
    capsys.readouterr()
    assert script.main(tiny_or_eval_args(tmp_path / "eval", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not os.path.exists(tmp_path / "eval")


def test_snd_obs_files_that_are_not_datasets_are_refused(script, tmp_path, capsys):
    files = {"array.npy": lambda p: np.save(p, np.zeros((5, 16), np.float32)),  # .npy, not .npz
             "empty.npz": lambda p: open(p, "wb").close(),
             "nan.npz": lambda p: np.savez(p, obs=np.full((5, 16), np.nan, np.float32)),
             "object.npz": lambda p: np.savez(p, obs=np.array([{}], dtype=object)),  # pickled: refused
             # values that are not real numbers (cast, they would be silently), and one float32 cannot hold
             "bool.npz": lambda p: np.savez(p, obs=np.ones((5, 16), bool)),
             "complex.npz": lambda p: np.savez(p, obs=np.ones((5, 16), np.complex64)),
             "strings.npz": lambda p: np.savez(p, obs=np.full((5, 16), "1.5")),
             "dates.npz": lambda p: np.savez(p, obs=np.zeros((5, 16), "datetime64[s]")),
             "huge.npz": lambda p: np.savez(p, obs=np.full((5, 16), 1e300))}
    for name, write in files.items():
        write(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one line, no warning before it
            with pytest.raises(ValueError, match="--snd-obs-file: "):
                extras.load_snd_obs(str(tmp_path / name), 16)
    np.savez(tmp_path / "ok.npz", obs=np.ones((5, 4, 16), np.float32))
    assert extras.load_snd_obs(str(tmp_path / "ok.npz"), 16).shape == (20, 16)
    assert script.main(tiny_args(tmp_path / "train", "--save-model")) == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    capsys.readouterr()
    argv = ["--eval-only", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--snd-obs-file", tmp_path / "array.npy"]
    assert script.main(tiny_or_eval_args(tmp_path / "eval", *argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --snd-obs-file: "), err


# ===== Run folders and progress lines =====
def test_runs_started_in_the_same_second_get_their_own_folders(script, tmp_path, capsys, monkeypatch):
    clock = iter(range(10**6))
    monkeypatch.setattr(extras.time, "time", lambda: 1_800_000_000 + next(clock) * 1e-4)  # never a new second
    for _ in range(2):
        assert run_main(script, tiny_args(tmp_path, "--save-model"), capsys)[0] == 0
    folders = run_dirs(tmp_path)
    assert len(folders) == 2 and all(os.path.isfile(os.path.join(f, "checkpoint.pt")) for f in folders)


def test_resume_from_another_folder_continues_in_the_checkpoints_run_folder(script, tmp_path, capsys, monkeypatch):
    """A relative --runs-dir (the default, runs) is the checkpoint's run, not a new runs/ where resume starts."""
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert run_main(script, tiny_args("runs", "--save-model", "--total-timesteps", 32), capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "first" / "runs")
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "runs").write_text("")  # the saved --runs-dir, unusable here, is not the run's folder
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    code, out, err = run_main(script, ["--resume", checkpoint, "--total-timesteps", 64], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "elsewhere") == ["runs"] and f"run: {run_dir}" in out
    assert load_checkpoint(checkpoint)["global_step"] == 64 and len(scalar_tags(run_dir)["losses/value_loss"]) == 2


def test_ippo_and_mappo_runs_of_one_grid_have_distinct_folders(tmp_path, capsys):
    """A grid gives its runs one --exp-name: the algorithm is in the folder's name too."""
    for name in ("ippo_hyper_vmas", "mappo_hyper_vmas"):
        assert run_main(load_script(name), tiny_args(tmp_path, "--exp-name", "grid"), capsys)[0] == 0
    names = sorted(os.path.basename(folder) for folder in run_dirs(tmp_path))
    assert [name.split("__")[2] for name in names] == ["ippo_mlp", "mappo_mlp"], names


def test_a_run_folder_that_becomes_unwritable_stops_in_one_line_and_keeps_the_checkpoint(script, tmp_path, capsys,
                                                                                         monkeypatch):
    """Made read-only (or full) during the run: the second checkpoint cannot be written. (As root, chmod does not
    stop writes: the refusal is the one a read-only folder gives.)"""
    saved = only_the_first_save_succeeds(monkeypatch)
    argv = tiny_args(tmp_path, "--save-model", "--save-interval", 32, "--total-timesteps", 96)
    code, out, err = run_main(script, argv, capsys)
    (run_dir,) = run_dirs(tmp_path)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: cannot write "), err
    assert "Permission denied" in err and f"Last good checkpoint: {checkpoint}" in err
    assert saved == [32] and load_checkpoint(checkpoint)["global_step"] == 32


def test_progress_lines_give_the_plan_elapsed_time_and_eta(script, tmp_path, capsys):
    # 8-step rollouts of 100-step episodes: the first iterations end no episode
    code, out, err = run_main(script, tiny_args(tmp_path, "--max-steps", 100, "--print-interval", 1), capsys)
    assert code == 0, err
    assert "plan: 2 iterations of 32 steps (4 envs x 8) up to step 64" in out
    lines = [line for line in out.splitlines() if line.startswith("global_step=")]
    assert lines[0].startswith("global_step=32 iteration=1/2 ")
    assert all(" elapsed=" in line and " eta=" in line for line in lines)
    assert "episodic_return=no_episode_ended" in lines[0] and "nan" not in out


# ===== Evaluation videos (--capture-video) =====
def test_capture_video_writes_non_blank_episodes_and_changes_no_number(tmp_path, capsys):
    script = load_script("ippo_hyper_vmas")  # evaluate() is the same in both scripts (test_shared_code)
    import imageio.v2 as imageio
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, extra in (("plain", []), ("video", ["--capture-video"])):
        assert run_main(script, tiny_args(tmp_path / name, "--max-steps", 20, *extra), capsys)[0] == 0
    (plain,), (video,) = run_dirs(tmp_path / "plain"), run_dirs(tmp_path / "video")
    assert sorted(os.listdir(os.path.join(video, "videos"))) == ["eval_32.mp4", "eval_64.mp4"]
    frames = [np.asarray(f) for f in imageio.get_reader(os.path.join(video, "videos", "eval_64.mp4"))]
    assert len(frames) >= 10 and frames[0].ndim == 3
    assert all(f.std() > 3 for f in frames)  # not blank: the arena, agents and food are drawn
    assert (np.abs(frames[0].astype(int) - frames[-1].astype(int)).max(-1) > 30).sum() > 50  # agents moved
    accumulator = EventAccumulator(video, size_guidance={"images": 0})
    accumulator.Reload()
    (summary, _) = accumulator.Images("eval/video")
    assert summary.encoded_image_string[:3] == b"GIF" and summary.step == 32
    timing = ("perf/", "charts/SPS")
    plain_tags, video_tags = scalar_tags(plain), scalar_tags(video)
    assert {t: v for t, v in plain_tags.items() if not t.startswith(timing)} == \
        {t: v for t, v in video_tags.items() if not t.startswith(timing)}


def test_capture_video_without_a_renderer_fails_at_once(tmp_path, capsys, monkeypatch):
    script = load_script("ippo_hyper_vmas")
    monkeypatch.setenv("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent/egl.json")  # no EGL in the probe
    monkeypatch.delenv("DISPLAY", raising=False)
    code, out, err = run_main(script, tiny_args(tmp_path / "runs", "--capture-video"), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --capture-video: ") and "install" in err
    assert not os.path.exists(tmp_path / "runs")


# ===== A script copied alone (no hypermarl_extras.py beside it) trains; what needs the helper is refused =====
TINY = {
    "ippo_hyper_vmas": tiny_args("runs"),
    "mappo_hyper_vmas": tiny_args("runs"),
    "reinforce_matrix_games": ["--num-trials", "40", "--eval-interval", "20"],
    "mappo_hyper_mamujoco": tiny_argv("runs"),
}


@pytest.mark.parametrize("name", ["ippo_hyper_vmas", "reinforce_matrix_games"])
def test_a_script_copied_alone_trains(name, tmp_path):
    code, out, err = run_alone(name, tmp_path, *TINY[name])
    assert code == 0, err
    assert "eval" in out and "Traceback" not in err
    assert os.listdir(tmp_path / "runs")  # its TensorBoard run


@pytest.mark.parametrize("name, flag", [pytest.param("ippo_hyper_vmas", "--save-model", marks=pytest.mark.smoke),
                                        ("mappo_hyper_vmas", "--eval-only"),
                                        ("mappo_hyper_mamujoco", "--save-model"),
                                        ("mappo_hyper_mamujoco", "--capture-video"),
                                        ("reinforce_matrix_games", "--save-model")])
def test_what_needs_the_helper_is_refused_in_one_line(name, flag, tmp_path):
    code, out, err = run_alone(name, tmp_path, *TINY[name], flag)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {flag}: needs hypermarl_extras.py beside this script"], err
    assert sorted(os.listdir(tmp_path)) == [f"{name}.py"]  # no run folder, no checkpoint


@pytest.mark.parametrize("flags, message", [
    (["--num-minibatches", "3"], "--num-minibatches: must divide num_envs * num_steps = 32, got 3"),
    (["--hypernet", "dico"], "--hypernet dico: needs dico.py beside this script"),
    (["--runs-dir", "blocker/runs"], "--runs-dir: cannot create a run folder in 'blocker/runs' (Not a directory)"),
])
def test_a_script_copied_alone_checks_its_flags(tmp_path, flags, message):
    """The checks of ranges and combinations are the script's own: no VMAS assertion, no quiet fix, no traceback."""
    (tmp_path / "blocker").write_text("")
    code, out, err = run_alone("ippo_hyper_vmas", tmp_path, *TINY["ippo_hyper_vmas"], *flags)
    assert code == 2 and err.strip().splitlines() == [f"error: {message}"], err
    assert sorted(os.listdir(tmp_path)) == ["blocker", "ippo_hyper_vmas.py"]


@pytest.mark.parametrize("name", ["reinforce_matrix_games", "mappo_hyper_mamujoco", "ippo_hyper_vmas"])
def test_a_script_copied_alone_refuses_an_empty_runs_dir(name, tmp_path):
    """With the library --runs-dir '' is refused; alone, the script's own rule says the same (not: runs here).
    So is a folder name that is not UTF-8 (a byte Linux allows): TensorBoard would fail after making it."""
    code, out, err = run_alone(name, tmp_path, *TINY[name], "--runs-dir", "")
    assert code == 2 and err.strip().splitlines() == ["error: --runs-dir: must name a folder, got ''"], err
    code, out, err = run_alone(name, tmp_path, *TINY[name], "--runs-dir", os.fsdecode(b"runs-\xff"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --runs-dir: ") and "UTF-8 text" in err, err
    assert os.listdir(tmp_path) == [f"{name}.py"]


def test_without_the_helper_every_flag_that_needs_it_is_refused(script, monkeypatch):
    """Every flag of NEEDS_EXTRAS, named; the other flags are still read and checked."""
    monkeypatch.setattr(script, "extras", None)
    values = {"resume": ["x.pt"], "checkpoint": ["x.pt"], "snd_obs_file": ["x.npz"]}
    assert set(values) < set(script.NEEDS_EXTRAS)
    for name in script.NEEDS_EXTRAS:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ValueError) as error:
            script.read_command_line([flag, *values.get(name, [])])
        assert str(error.value) == f"{flag}: needs hypermarl_extras.py beside this script"
    with pytest.raises(ValueError, match="^--num-minibatches: must divide"):
        script.read_command_line(["--num-minibatches", "3"])
    with pytest.raises(ValueError, match="^--runs-dir: must name a folder, got ''$"):  # not the current folder
        script.read_command_line(["--runs-dir", ""])
    args, loaded, changes = script.read_command_line(["--scenario", "navigation"])
    assert (args.num_envs, loaded, changes) == (600, None, [])  # the paper's values (Table 12)


# ===== Damaged checkpoints and impossible files: one line, exit status 2, nothing written =====
def tampered(checkpoint, change):
    """The checkpoint rewritten in place with change(state) applied (a file edited or damaged by hand)."""
    state = load_checkpoint(checkpoint)
    change(state)
    torch.save(state, checkpoint)
    return checkpoint


def folder_state(folder):
    """What a run wrote into folder: its files and their times of change (none if it does not exist)."""
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)} if os.path.isdir(folder) else None


def assert_refused_and_nothing_written(script, argv, capsys, start, *folders):
    """One line starting with start, exit status 2, and no file of folders created or changed."""
    before = [folder_state(str(folder)) for folder in folders]
    code, out, err = run_main(script, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(start), err
    assert "Traceback" not in err and [folder_state(str(folder)) for folder in folders] == before
    return err


def first_weight(state):
    return next(key for key, value in state["model"].items() if value.is_floating_point() and value.dim() == 2)


def set_first(value):
    def change(state):
        state["model"][first_weight(state)].view(-1)[0] = value
    return change


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_nan_or_inf_weights_is_refused(script, saved_run, value, tmp_path, capsys):
    run_dir, checkpoint = saved_run
    tampered(checkpoint, set_first(value))
    for argv, flag in ((["--resume", checkpoint, "--total-timesteps", 96], "--resume"),
                       (["--eval-only", "--checkpoint", checkpoint, "--runs-dir", tmp_path / "eval"], "--checkpoint")):
        err = assert_refused_and_nothing_written(script, argv, capsys, f"error: {flag}: {checkpoint!r} holds NaN or inf",
                                                 run_dir, tmp_path / "eval")
        assert "model/" in err  # where


def test_a_nan_that_the_model_itself_holds_is_no_damage(script, tmp_path, capsys):
    """DiCo's SND estimate is NaN until it is first measured (never, unconstrained): such checkpoints resume."""
    argv = tiny_args(tmp_path, "--hypernet", "dico", "--n-agents", 2, "--save-model", "--total-timesteps", 32)
    assert run_main(script, argv, capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    assert torch.isnan(load_checkpoint(checkpoint)["model"]["actor.snd_hat"])
    code, out, err = run_main(script, ["--resume", checkpoint, "--total-timesteps", 64], capsys)
    assert code == 0, err
    tampered(checkpoint, lambda state: state["model"]["actor.snd_hat"].fill_(float("inf")))  # but never inf
    assert_refused_and_nothing_written(script, ["--resume", checkpoint, "--total-timesteps", 96], capsys,
                                       f"error: --resume: {checkpoint!r} holds NaN or inf", run_dir)


MISFITS = {
    "missing key": lambda state: state["model"].pop(first_weight(state)),
    "extra key": lambda state: state["model"].__setitem__("bogus.weight", torch.zeros(2)),
    "wrong shape": lambda state: state["model"].__setitem__(first_weight(state), torch.zeros(3, 3)),
    "optimizer of another model": lambda state: next(iter(state["optimizer"]["state"].values())).__setitem__(
        "exp_avg", torch.zeros(3, 3)),
    "environment of another run": lambda state: state["env"].__setitem__("obs", state["env"]["obs"][:, :, :1]),
}


@pytest.mark.parametrize("damage", sorted(MISFITS))
def test_a_checkpoint_that_does_not_fit_the_model_is_refused_before_anything_is_written(script, saved_run, damage,
                                                                                        tmp_path, capsys):
    run_dir, checkpoint = saved_run
    tampered(checkpoint, MISFITS[damage])
    resume = ["--resume", checkpoint, "--total-timesteps", 96]
    assert_refused_and_nothing_written(script, resume, capsys, f"error: --resume: {checkpoint!r} does not fit this "
                                       "script's model (", run_dir)
    if damage in ("missing key", "extra key", "wrong shape"):  # --eval-only reads the model only
        evaluate = ["--eval-only", "--checkpoint", checkpoint, "--runs-dir", tmp_path / "eval"]
        assert_refused_and_nothing_written(script, evaluate, capsys, f"error: --checkpoint: {checkpoint!r} does not "
                                           "fit this script's model (", tmp_path / "eval")


@pytest.mark.parametrize("name, value, message", [
    ("num_steps", 0, "--num-steps: must be positive, got 0"),
    ("num_envs", -4, "--num-envs: must be positive, got -4"),
    ("num_steps", "8", "--num-steps: must be an int, got '8'"),
    ("learning_rate", None, "--learning-rate: must be a float, got None"),
])
def test_a_checkpoint_with_an_impossible_saved_flag_names_the_file_and_the_flag(script, saved_run, name, value,
                                                                               message, capsys):
    run_dir, checkpoint = saved_run
    tampered(checkpoint, lambda state: state["args"].__setitem__(name, value))
    assert_refused_and_nothing_written(script, ["--resume", checkpoint, "--total-timesteps", 96], capsys,
                                       f"error: --resume: {checkpoint!r} holds an invalid flag: {message}", run_dir)


def test_an_impossible_saved_model_flag_is_the_checkpoints_for_eval_only(script, saved_run, tmp_path, capsys):
    _, checkpoint = saved_run
    tampered(checkpoint, lambda state: state["args"].__setitem__("n_agents", 1))
    argv = ["--eval-only", "--checkpoint", checkpoint, "--runs-dir", tmp_path / "eval"]
    assert_refused_and_nothing_written(script, argv, capsys, f"error: --checkpoint: {checkpoint!r} holds an invalid "
                                       "flag: --n-agents: must be at least 2, got 1", tmp_path / "eval")


@pytest.mark.parametrize("where", ["proc", "long-name", "long-path", "long-exp-name"])
def test_runs_dir_the_system_cannot_create_is_one_line(script, where, tmp_path, capsys):
    runs_dir = {"proc": "/proc/hypermarl-runs", "long-name": tmp_path / ("r" * 300),
                "long-path": tmp_path.joinpath(*["d" * 250] * 20)}.get(where, tmp_path / "runs")
    extra = ["--exp-name", "e" * 250] if where == "long-exp-name" else []  # the run folder's name would be too long
    flag = "--exp-name" if extra else "--runs-dir"
    assert_refused_and_nothing_written(script, tiny_args(runs_dir, *extra), capsys, f"error: {flag}: ", tmp_path)


def test_an_snd_obs_file_of_python_objects_is_refused_for_safety(script, saved_run, tmp_path, capsys):
    _, checkpoint = saved_run
    objects = tmp_path / "objects.npz"
    np.savez(objects, obs=np.array([{}], dtype=object))
    argv = ["--eval-only", "--checkpoint", checkpoint, "--snd-obs-file", objects]
    err = assert_refused_and_nothing_written(script, argv, capsys, f"error: --snd-obs-file: {str(objects)!r} holds "
                                             "Python objects", tmp_path)
    assert "allow_pickle" not in err and "refused" in err


def test_long_reasons_are_cut_at_a_word_with_an_ellipsis(script, tmp_path, capsys, monkeypatch):
    reason = " ".join(f"word{i}" for i in range(60))  # 400 characters
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"x")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(reason)))
    err = assert_refused_and_nothing_written(script, ["--resume", bad], capsys, "error: --resume: ", tmp_path)
    shown = err.split("(", 1)[1].rsplit(")", 1)[0]
    assert shown.endswith("...") and reason.startswith(shown[:-3]) and reason[len(shown) - 3] == " ", shown
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(ValueError(reason)))
    with pytest.raises(ValueError) as error:
        extras.load_snd_obs(str(bad), 16)
    shown = str(error.value).split("(", 1)[1].rsplit(")", 1)[0]
    assert shown.endswith("...") and reason.startswith(shown[:-3]) and reason[len(shown) - 3] == " ", shown
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(ValueError("short reason")))
    with pytest.raises(ValueError, match=r"\(short reason\)$"):
        extras.load_snd_obs(str(bad), 16)


def test_eval_only_refuses_the_flags_of_training(script, saved_run, tmp_path, capsys):
    """They would be silently ignored: --eval-only trains nothing, writes no run, no checkpoint, no log."""
    _, checkpoint = saved_run
    for extra in (["--save-model"], ["--no-save-model"], ["--track"], ["--compile"], ["--print-interval", 5],
                  ["--exp-name", "named"], ["--wandb-entity", "team"], ["--wandb-project-name", "project"],
                  ["--learning-rate", 1e-3], ["--num-envs", 8], ["--anneal-lr"], ["--eval-interval", 64],
                  ["--interference-samples", 8]):
        argv = ["--eval-only", "--checkpoint", checkpoint, "--runs-dir", tmp_path / "eval", *extra]
        err = assert_refused_and_nothing_written(script, argv, capsys, f"error: {extra[0]}: ", tmp_path)
        assert "only for training, not with --eval-only" in err and "--capture-video video" in err, (extra, err)


FURTHER_DAMAGE = {  # a change to the checkpoint, and the start of what --resume says about it
    "run name that climbs out": (lambda s: s.__setitem__("run_name", "../../escape"), "holds an invalid run name"),
    "flags not a dict": (lambda s: s.__setitem__("args", [1, 2]), "holds no flags of a run"),
    "iteration 0": (lambda s: s.__setitem__("iteration", 0), "holds an impossible position"),
    "model not a dict": (lambda s: s.__setitem__("model", torch.zeros(3)), "does not fit this script's model"),
    "random state cut": (lambda s: s["rng"].__setitem__("torch", torch.zeros(5, dtype=torch.uint8)),
                         "does not fit this script's model"),
    "learning rate NaN": (lambda s: s["optimizer"]["param_groups"][0].__setitem__("lr", float("nan")),
                          "holds NaN or inf (in optimizer/param_groups[0]/lr)"),
    "observation NaN": (lambda s: s["env"]["obs"].view(-1).__setitem__(0, float("nan")), "holds NaN or inf (in env/obs)"),
    "unknown scenario": (lambda s: s["args"].__setitem__("scenario", "football"),
                         "holds an invalid flag: --scenario: must be one of 'dispersion', 'navigation', got 'football'"),
    "complex weights holding NaN": (lambda s: s["model"].__setitem__(first_weight(s), torch.full(
        s["model"][first_weight(s)].shape, complex(float("nan"), 0))), "does not fit this script's model (model/"),
    "half-precision weights": (lambda s: s["model"].__setitem__(first_weight(s), s["model"][first_weight(s)].half()),
                               "does not fit this script's model (model/"),  # load_state_dict would cast them
    "sparse weights": (lambda s: s["model"].__setitem__(first_weight(s), s["model"][first_weight(s)].to_sparse()),
                       "holds a tensor that is not plain dense data (checkpoint/model/"),
    "numpy's position past its keys": (lambda s: s["rng"]["numpy_rest"].__setitem__(0, 10**6),  # a crash at a draw
                                       "does not fit this script's model (rng: NumPy's is not a Mersenne Twister state)"),
    "a step per entry of a moment": (lambda s: s["optimizer"]["state"][0].__setitem__(
        "step", torch.zeros(s["optimizer"]["state"][0]["exp_avg"].shape[:1])), "does not fit this script's model "
        "(optimizer's step"),
    "a run name of 400 bytes": (lambda s: s.__setitem__("run_name", "é" * 200), "holds an invalid run name"),
    "a flag past 2**53": (lambda s: s["args"].__setitem__("food_radius", 10**400),
                          "holds an invalid flag: --food-radius: must be at most 2**53"),
    "python random state out of range": (lambda s: s["rng"]["python"][1].__setitem__(0, 2**70),
                                         "does not fit this script's model"),
    "a flag missing": (lambda s: s["args"].pop("max_steps"), "holds no flag '--max-steps': refused"),
    "an unknown flag": (lambda s: s["args"].__setitem__("max_speed", 1.0), "holds an unknown flag '--max-speed'"),
    "optimizer's betas cut": (lambda s: s["optimizer"]["param_groups"][0].__setitem__("betas", [0.9]),
                              "does not fit this script's model (optimizer's betas [0.9], not the run's (0.9, 0.999))"),
    "optimizer's eps changed": (lambda s: s["optimizer"]["param_groups"][0].__setitem__("eps", 0.1),
                                "does not fit this script's model (optimizer's eps 0.1, not the run's 1e-05)"),
    "a tensor VMAS does not keep": (lambda s: s["env"]["tensors"].__setitem__("world/_dt", torch.zeros(1)),
                                    "does not fit this script's model (env/tensors/world/_dt: (1,), not a tensor"),
    "a key no run saves": (lambda s: s.__setitem__("note", "edited"), "holds 'note', which no run of this script "
                           "saves: refused"),
    "moments in float64": (lambda s: s["optimizer"]["state"][0].__setitem__(  # load_state_dict would cast them
        "exp_avg", s["optimizer"]["state"][0]["exp_avg"].double()), "does not fit this script's model (optimizer's "
        "exp_avg "),
    "a negative mean of squares": (lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].view(-1).__setitem__(0, -1.0),
                                   "does not fit this script's model (optimizer's exp_avg_sq holds -1, which Adam "
                                   "cannot reach)"),  # its square root: NaN at the first step
    "a negative step": (lambda s: s["optimizer"]["state"][0].__setitem__("step", torch.tensor(-3.0)),
                        "does not fit this script's model (optimizer's step holds -3, which Adam cannot reach)"),
    "a step of 2.5": (lambda s: s["optimizer"]["state"][0].__setitem__("step", torch.tensor(2.5)),
                      "does not fit this script's model (optimizer's step holds 2.5, which Adam cannot reach)"),
    "state of a parameter it does not hold": (lambda s: s["optimizer"]["state"].__setitem__(
        999, s["optimizer"]["state"][0]), "does not fit this script's model (optimizer's state for parameter 999, "
        "which it does not hold)"),
    "optimizer's state emptied after updates": (lambda s: s["optimizer"]["state"].clear(), "does not fit this "
                                                "script's model (optimizer's state is empty, yet the run has made updates)"),
}


@pytest.mark.parametrize("damage", sorted(FURTHER_DAMAGE))
def test_further_damage_to_a_checkpoint_is_one_line_and_writes_nothing(script, saved_run, damage, tmp_path, capsys):
    run_dir, checkpoint = saved_run
    change, message = FURTHER_DAMAGE[damage]
    tampered(checkpoint, change)
    argv = ["--resume", checkpoint, "--total-timesteps", 96, "--runs-dir", tmp_path / "moved"]  # a run name is a path
    assert_refused_and_nothing_written(script, argv, capsys, f"error: --resume: {checkpoint!r} {message}", run_dir,
                                       tmp_path)
    if damage == "run name that climbs out":  # --eval-only --capture-video names its folder after the run too
        argv = ["--eval-only", "--checkpoint", checkpoint, "--capture-video", "--runs-dir", tmp_path / "videos"]
        assert_refused_and_nothing_written(script, argv, capsys, f"error: --checkpoint: {checkpoint!r} {message}",
                                           tmp_path)


def test_a_flipped_bit_in_a_tensor_is_refused_not_loaded(script, saved_run, tmp_path, capsys):
    """torch does not check its records' CRC-32: a byte flipped inside a weight would load as another number."""
    run_dir, checkpoint = saved_run
    with zipfile.ZipFile(checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # a tensor's bytes, stored uncompressed
    with open(checkpoint, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0x10]))
    argv = ["--resume", checkpoint, "--total-timesteps", 96]
    assert_refused_and_nothing_written(script, argv, capsys, f"error: --resume: {checkpoint!r} is damaged (", run_dir,
                                       tmp_path)


def test_eval_only_refuses_evaluation_flags_of_a_damaged_checkpoint(script, saved_run, tmp_path, capsys):
    """--eval-only takes the run's --seed and evaluation sizes: from an edited file, checked like the model's."""
    _, checkpoint = saved_run
    tampered(checkpoint, lambda s: s["args"].__setitem__("seed", "1"))
    argv = ["--eval-only", "--checkpoint", checkpoint, "--runs-dir", tmp_path / "eval"]
    assert_refused_and_nothing_written(script, argv, capsys, f"error: --checkpoint: {checkpoint!r} holds an invalid "
                                       "flag: --seed: must be an int, got '1'", tmp_path)


def test_a_resume_checks_the_folder_it_will_write_into(script, saved_run, tmp_path, capsys, monkeypatch):
    """The run goes on in its checkpoint's folder (not --runs-dir's): that folder is the one checked, before
    anything is written (root may write where a test could make it read-only, so the check fails here)."""
    run_dir, checkpoint = saved_run
    check = script.extras.check_output_folder

    def refusing(flag, path):
        if os.path.abspath(path) == os.path.abspath(run_dir):
            raise script.extras.ArgError(f"{flag}: {path!r} is not writable")
        check(flag, path)

    monkeypatch.setattr(script.extras, "check_output_folder", refusing)
    argv = ["--resume", checkpoint, "--total-timesteps", 96]
    assert_refused_and_nothing_written(script, argv, capsys, f"error: --resume: {os.path.abspath(run_dir)!r} is not "
                                       "writable", run_dir)
    # --runs-dir elsewhere moves the run there (a read-only archive of checkpoints, a scratch disk): accepted
    code, _, err = run_main(script, argv + ["--runs-dir", tmp_path / "scratch"], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "scratch") == [os.path.basename(run_dir)]


def test_a_resume_whose_evaluation_log_is_not_a_file_is_refused(script, saved_run, capsys):
    """The run appends to evaluations.jsonl at its first evaluation: a folder in its place is found before
    anything is written, not after an iteration of training."""
    run_dir, checkpoint = saved_run
    log = os.path.join(run_dir, "evaluations.jsonl")
    os.remove(log)
    os.mkdir(log)
    assert_refused_and_nothing_written(script, ["--resume", checkpoint, "--total-timesteps", 96], capsys,
                                       f"error: --resume: {log!r} is not a file the run can append to", run_dir)


def test_a_checkpoint_copied_out_of_its_run_folder_goes_on_only_in_a_new_one(script, saved_run, tmp_path, capsys):
    """Two copies side by side would both write the folder's checkpoint.pt and mix their logs: a copy is
    resumed only with --runs-dir, into <runs-dir>/<run>, a folder that must not exist yet."""
    run_dir, checkpoint = saved_run
    (tmp_path / "kept").mkdir()
    copy = shutil.copy(checkpoint, str(tmp_path / "kept" / "seed3.pt"))
    argv = ["--resume", copy, "--total-timesteps", 96]
    err = assert_refused_and_nothing_written(script, argv, capsys, f"error: --resume: {copy!r} is not its run "
                                             "folder's checkpoint.pt", tmp_path / "kept")
    assert "--runs-dir" in err
    code, out, err = run_main(script, argv + ["--runs-dir", tmp_path / "scratch"], capsys)
    assert code == 0, err
    moved = tmp_path / "scratch" / os.path.basename(run_dir)
    assert load_checkpoint(moved / "checkpoint.pt")["global_step"] == 96 and os.listdir(tmp_path / "kept") == ["seed3.pt"]
    assert_refused_and_nothing_written(script, argv + ["--runs-dir", tmp_path / "scratch"], capsys,
                                       f"error: --runs-dir: {str(moved)!r} exists already", tmp_path / "scratch", moved)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / os.path.basename(run_dir)).write_text("")  # a file where the run's folder would go
    assert_refused_and_nothing_written(script, argv + ["--runs-dir", tmp_path / "blocked"], capsys,
                                       "error: --runs-dir: ", tmp_path / "blocked")


def test_a_relative_runs_dir_given_to_resume_is_the_one_of_the_folder_it_starts_in(script, tmp_path, capsys,
                                                                                     monkeypatch):
    """--runs-dir runs, the saved run's own text, names another folder from elsewhere: given, the run goes there."""
    for folder in ("first", "elsewhere"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert run_main(script, tiny_args("runs", "--save-model", "--total-timesteps", 32), capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "first" / "runs")
    copy = shutil.copy(os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "at32.pt"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_main(script, ["--resume", copy, "--total-timesteps", 64, "--runs-dir", "runs"], capsys)
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "runs" / os.path.basename(run_dir)
    assert load_checkpoint(moved / "checkpoint.pt")["global_step"] == 64
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["global_step"] == 32


def test_the_optimizer_learning_rate_is_the_flags_not_the_files(script):
    """A saved optimizer's settings must be the run's; its lr is set from the flags (--anneal-lr sets it anew
    before every iteration, and without it the file's can only be the flags'), so an edited one changes nothing."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    saved = torch.optim.Adam([parameter], lr=7.0, eps=1e-5).state_dict()
    optimizer = torch.optim.Adam([parameter], lr=1e-3, eps=1e-5)
    script.extras.load_optimizer(optimizer, saved)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    saved["param_groups"][0]["betas"] = [0.9, 0.999]  # a tuple may come back as a list: the same setting
    script.extras.load_optimizer(optimizer, saved)
    saved["param_groups"][0]["amsgrad"] = 1  # not the run's (a bool)
    with pytest.raises(ValueError, match="^optimizer's amsgrad 1, not the run's False$"):
        script.extras.load_optimizer(optimizer, saved)
    saved["param_groups"][0] |= {"amsgrad": False, "momentum": 0.9}  # a setting Adam has not
    with pytest.raises(ValueError, match="^optimizer's setting 'momentum' is not one of the run's$"):
        script.extras.load_optimizer(optimizer, saved)


def test_checkpoints_of_other_scripts_and_files_that_are_not_files_are_named(script, tmp_path, capsys):
    other = tmp_path / "other.pt"
    fmt = script.CHECKPOINT_FORMAT.replace("vmas", "mamujoco")
    torch.save({"format": fmt, "args": {}}, other)
    for path, message in ((other, f"{str(other)!r} is a {fmt} checkpoint, another script's; this one reads "
                                  f"{script.CHECKPOINT_FORMAT}"), ("/dev/null", "'/dev/null' is not a regular file")):
        argv = ["--eval-only", "--checkpoint", path, "--runs-dir", tmp_path / "eval"]
        assert_refused_and_nothing_written(script, argv, capsys, f"error: --checkpoint: {message}", tmp_path)


@pytest.mark.parametrize("name, argv", [("ippo_hyper_vmas", ["--continuous-actions"]), ("mappo_hyper_vmas", ["--continuous-actions"]),
                                        ("mappo_hyper_mamujoco", []), ("ippo_hyper_smax", ["--map", "2s3z"]),
                                        ("mappo_hyper_smax", ["--map", "3s5z"])])
def test_every_part_of_the_memory_estimate_names_flags_of_the_script(name, argv):
    """The memory check's message names the largest part's flags (MEMORY_FLAGS): a part without them, or a
    flag the script does not have, would end a refusal in a traceback instead of one line."""
    script = load_script(name)
    need = script.memory_needed(read_args(script, argv))
    fields = {f.name for f in dataclasses.fields(script.Args)}
    assert set(script.MEMORY_FLAGS) == set(need), (name, set(need) ^ set(script.MEMORY_FLAGS))  # SND's part too
    assert all(flags and set(flags) <= fields for flags in script.MEMORY_FLAGS.values()), name
