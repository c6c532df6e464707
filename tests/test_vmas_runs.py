"""End-to-end tests of the VMAS scripts: every family, metrics, checkpoints, bad input."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_dirs, scalar_tags, tiny_args

FAMILIES = ["mlp", "linear", "fups", "nops", "dico"]
REQUIRED_TAGS = {"charts/episodic_return", "charts/SPS", "losses/policy_loss", "losses/value_loss",
                 "losses/entropy", "losses/approx_kl", "losses/clipfrac", "grad/actor_var", "grad/actor_norm",
                 "grad/interference", "diversity/snd", "eval/episodic_return"}


def run(script, argv, capsys):
    code = script.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scenario", ["dispersion", "navigation"])
def test_every_family_runs_and_logs_the_metrics(script, family, scenario, tmp_path, capsys):
    code, out, err = run(script, tiny_args(tmp_path, "--hypernet", family, "--n-agents", 3, scenario=scenario), capsys)
    assert code == 0, err
    (run_dir,) = run_dirs(tmp_path)
    tags = scalar_tags(run_dir)
    assert REQUIRED_TAGS <= set(tags), REQUIRED_TAGS - set(tags)
    assert {f"charts/episodic_return_agent{i}" for i in range(3)} <= set(tags)
    assert all(0.0 <= v <= 1.0 for v in tags["diversity/snd"])
    assert all(v > 0 for v in tags["grad/actor_var"])
    if family == "nops":
        assert all(v == 0.0 for v in tags["grad/interference"])  # disjoint parameters: no interference
    assert "eval_return=" in out and "SPS=" in out


@pytest.mark.parametrize("ablation", [["--hypernet-embedding", "onehot"], ["--hypernet-init", "default"],
                                      ["--hypernet-input", "agent+obs"]])
def test_ablations_run(script, ablation, tmp_path, capsys):
    code, _, err = run(script, tiny_args(tmp_path, "--hypernet", "mlp", *ablation), capsys)
    assert code == 0, err


def test_linear_agent_plus_obs_ablation_runs_continuous(script, tmp_path, capsys):
    argv = tiny_args(tmp_path, "--hypernet", "linear", "--hypernet-input", "agent+obs", scenario="navigation")
    code, _, err = run(script, argv, capsys)
    assert code == 0, err


def test_same_seed_same_numbers(script, tmp_path, capsys):
    for name in ("a", "b"):
        assert run(script, tiny_args(tmp_path / name, "--exp-name", name), capsys)[0] == 0
    (a,), (b,) = run_dirs(tmp_path / "a"), run_dirs(tmp_path / "b")
    tags_a, tags_b = scalar_tags(a), scalar_tags(b)
    for tag in ("losses/value_loss", "losses/policy_loss", "grad/actor_var", "eval/episodic_return", "diversity/snd"):
        assert tags_a[tag] == tags_b[tag], tag


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(script, tmp_path, capsys):
    full = tiny_args(tmp_path / "full", "--save-model", "--total-timesteps", 96, "--exp-name", "full")
    assert run(script, full, capsys)[0] == 0
    first = tiny_args(tmp_path / "part", "--save-model", "--total-timesteps", 64, "--exp-name", "part")
    assert run(script, first, capsys)[0] == 0
    (part_dir,) = run_dirs(tmp_path / "part")
    checkpoint = os.path.join(part_dir, "checkpoint.pt")
    assert load(checkpoint)["global_step"] == 64
    resumed = tiny_args(tmp_path / "part", "--save-model", "--total-timesteps", 96, "--exp-name", "part",
                        "--resume", checkpoint)
    code, out, err = run(script, resumed, capsys)
    assert code == 0, err
    (full_dir,) = run_dirs(tmp_path / "full")
    a, b = load(os.path.join(full_dir, "checkpoint.pt")), load(checkpoint)
    assert a["global_step"] == b["global_step"] == 96
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["env"]["tensors"]:
        assert torch.equal(a["env"]["tensors"][key], b["env"]["tensors"][key]), key
    assert scalar_tags(full_dir)["eval/episodic_return"][-1] == scalar_tags(part_dir)["eval/episodic_return"][-1]


def test_eval_only_reports_return_and_snd_and_writes_nothing(script, tmp_path, capsys):
    assert run(script, tiny_args(tmp_path / "train", "--save-model"), capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    before = sorted(os.listdir(run_dir))
    code, out, err = run(script, tiny_args(tmp_path / "eval", "--eval-only", "--checkpoint", checkpoint), capsys)
    assert code == 0, err
    assert "eval/episodic_return=" in out and "diversity/snd=" in out
    ret = float(out.split("eval/episodic_return=")[1].split()[0])
    assert ret == pytest.approx(scalar_tags(run_dir)["eval/episodic_return"][-1], abs=1e-4)
    assert not os.path.exists(tmp_path / "eval") and sorted(os.listdir(run_dir)) == before


def test_checkpoint_is_refused_when_incompatible_foreign_or_corrupt(script, tmp_path, capsys):
    assert run(script, tiny_args(tmp_path / "train", "--save-model"), capsys)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    cases = {
        "n_agents": (checkpoint, ["--n-agents", 3]),
        "hypernet": (checkpoint, ["--hypernet", "nops"]),
        "scenario": (checkpoint, ["--scenario", "navigation"]),  # the last --scenario wins
    }
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(checkpoint, "rb").read()[:500])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "x", "payload": subprocess.Popen}, hostile)  # not loadable with weights_only
    cases.update(corrupt=(str(corrupt), []), foreign=(str(foreign), []), hostile=(str(hostile), []))
    for name, (path, extra) in cases.items():
        argv = tiny_args(tmp_path / "eval", "--eval-only", "--checkpoint", path, *extra)
        code, out, err = run(script, argv, capsys)
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("error: --checkpoint"), (name, err)
        if name in ("n_agents", "hypernet", "scenario"):
            assert name in err
    assert not os.path.exists(tmp_path / "eval")


BAD_INPUT = [
    (["--n-agents", 0], "--n-agents"),
    (["--num-envs", -1], "--num-envs"),
    (["--total-timesteps", 0], "--total-timesteps"),
    (["--learning-rate", 0], "--learning-rate"),
    (["--num-minibatches", 3], "--num-minibatches"),
    (["--scenario", "football"], "--scenario"),
    (["--hypernet", "transformer"], "--hypernet"),
    (["--hypernet", "fups", "--hypernet-init", "default"], "--hypernet-init"),
    (["--hypernet", "nops", "--hypernet-embedding-dim", 8], "--hypernet-embedding-dim"),
    (["--hypernet", "linear", "--hypernet-hidden-dims", 32], "--hypernet-hidden-dims"),
    (["--hypernet", "mlp", "--dico-snd-des", 1.0], "--dico-snd-des"),
    (["--hypernet-embedding", "random"], "--hypernet-embedding"),
    (["--gamma", 1.5], "--gamma"),
    (["--n-food", 2, "--scenario", "navigation"], "--n-food"),
    (["--collisions"], "--collisions"),
    (["--eval-only"], "--eval-only"),
    (["--resume", "/no/such/checkpoint.pt"], "--resume"),
    (["--n-agents", "four"], "--n-agents"),
    (["--no-such-flag", 1], "--no-such-flag"),
]
NAVIGATION_BAD_INPUT = [
    (["--agents-with-same-goal", 5, "--n-agents", 4], "--agents-with-same-goal"),
    (["--split-goals", "--n-agents", 3], "--split-goals"),
    (["--agents-with-same-goal", 2, "--collisions"], "--collisions"),
    (["--penalise-by-time"], None),  # the default value of a dispersion flag is harmless
    (["--no-penalise-by-time"], "--penalise-by-time"),
]


@pytest.mark.parametrize("extra,flag", BAD_INPUT + [(["--scenario", "navigation"] + e, f) for e, f in NAVIGATION_BAD_INPUT
                                                    if f is not None])
def test_bad_input_is_one_line_exit_2_nothing_written(script, extra, flag, tmp_path, capsys):
    code, out, err = run(script, tiny_args(tmp_path / "runs", *extra), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_bad_input_exit_status_from_the_command_line(script, tmp_path):
    result = subprocess.run([sys.executable, f"{script.__name__}.py", "--num-minibatches", "3",
                             "--runs-dir", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--num-minibatches" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "runs")


def test_unknown_scenario_kwarg_is_an_error_not_a_warning(script, monkeypatch):
    args = script.resolve_args(script.Args(total_timesteps=4096))
    original = script.scenario_kwargs
    monkeypatch.setattr(script, "scenario_kwargs", lambda a: original(a) | {"shared_reward": True})
    with pytest.raises(script.ArgError, match="shared_reward"):
        script.VmasEnv(args, 2, 0, torch.device("cpu"))


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
    code, out, err = run(script, argv, capsys)
    assert code == 1
    assert "update 2" in err
    (run_dir,) = run_dirs(tmp_path)
    state = load(os.path.join(run_dir, "checkpoint.pt"))
    assert state["global_step"] == 32 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigterm_saves_a_checkpoint_that_resumes(script, tmp_path):
    argv = [sys.executable, "-u", f"{script.__name__}.py"] + tiny_args(tmp_path, "--total-timesteps", 32 * 2000,
                                                                     "--print-interval", 1, "--eval-interval", 10**9)
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in process.stdout:
        if line.startswith("global_step=") or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "--resume" in out
    (run_dir,) = run_dirs(tmp_path)
    state = load(os.path.join(run_dir, "checkpoint.pt"))
    assert 32 <= state["global_step"] < 32 * 2000 and state["iteration"] == state["global_step"] // 32 + 1
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
