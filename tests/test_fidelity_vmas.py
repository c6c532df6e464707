"""Fidelity of the VMAS scripts to the paper and to its baselines' own code: DiCo as its authors run
it, the evaluation mode of appendix D.1.1, the SND protocol of appendix D.1.2 and Table 15's tuning."""

import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import hypermarl_extras as extras
from conftest import ROOT, run_dirs, tiny_args


def build(script, *argv):
    args = script.parse_args([str(a) for a in argv])
    env = script.VmasEnv(args, 2, 0, torch.device("cpu"))
    critic_in = script.critic_input(torch.zeros(args.n_agents, 1, env.obs_dim)).shape[-1]
    torch.manual_seed(0)
    return args, env, script.Agent(args, env.obs_dim, env.act_dim, env.discrete, critic_in)


NAV_DICO = ["--scenario", "navigation", "--n-agents", 3, "--hypernet", "dico", "--dico-snd-des", 1.2,
            "--actor-hidden-dims", 16, 16, "--critic-hidden-dims", 16, 16]


# ----- DiCo (proroklab/ControllingBehavioralDiversity) -----
def test_dico_snd_hat_is_a_soft_updated_running_estimate(script):
    _, env, agent = build(script, *NAV_DICO)
    actor = agent.actor
    assert torch.isnan(actor.snd_hat) and "actor.snd_hat" in agent.state_dict()  # goes into checkpoints
    x1, x2 = torch.randn(3, 50, env.obs_dim), torch.randn(3, 50, env.obs_dim)
    deviation = actor.deviation()
    actor(x1)  # first training pass: the measured value (bootstrap_from_desired_snd: False)
    first = float(actor.deviation_snd(x1, deviation).detach())
    assert float(actor.snd_hat) == pytest.approx(first, rel=1e-6)
    actor(x2)  # then a soft update with their tau = 0.01
    expected = 0.99 * first + 0.01 * float(actor.deviation_snd(x2, deviation).detach())
    assert float(actor.snd_hat) == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():  # rollouts and evaluation read the estimate, never move it
        mean, _ = actor(x1)
    assert float(actor.snd_hat) == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        shared_mean = torch.tanh(script.batched_mlp(x1, actor.shared(), actor.activation).chunk(2, -1)[0])
        deviation_out = script.batched_mlp(x1, deviation, actor.activation)
    torch.testing.assert_close(mean, shared_mean + 1.2 / expected * deviation_out, rtol=1e-5, atol=1e-6)


def test_dico_critic_std_and_squashing_follow_their_code(script):
    _, env, agent = build(script, *NAV_DICO)
    # IPPO: one critic per agent (their ippo.yaml: share_param_critic False); MAPPO: one shared critic.
    expected = script.IndependentNets if script.__name__.startswith("ippo") else script.SharedNet
    assert isinstance(agent.critic.weight_net, expected)
    assert not hasattr(agent, "actor_logstd")  # the std comes from the shared network
    assert env.act_low.tolist() == [-1.0, -1.0] and env.act_high.tolist() == [1.0, 1.0]  # the box tanh maps to
    with torch.no_grad():
        for layer in agent.actor.shared.layers[-1:]:
            layer.weight.zero_()
            layer.bias.zero_()
        for weight in agent.actor.deviation.weights:
            weight.mul_(100.0)  # deviations far outside the box
    x = torch.randn(3, 40, env.obs_dim)
    with torch.no_grad():
        mean, std = agent.policy(x)
    torch.testing.assert_close(std, torch.ones_like(std))  # biased_softplus_1.0 at 0 is 1
    assert agent.actor.shared.layers[-1].out_features == 2 * env.act_dim
    # TanhNormal: log-prob of the squashed action, and tanh(u) goes to the environment.
    u = torch.randn(3, 40, env.act_dim) * 2
    with torch.no_grad():  # the same SND_hat (none yet: ratio 1) as the pass above
        _, logprob, _, _ = agent.get_action_and_value(x, u)
    base = torch.distributions.Normal(mean, std)
    tanh_normal = torch.distributions.TransformedDistribution(base, [torch.distributions.TanhTransform()])
    torch.testing.assert_close(logprob, tanh_normal.log_prob(torch.tanh(u)).sum(-1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(agent.env_action(u), torch.tanh(u))
    # Their action-space loss: the largest (over agents) squared overflow of the mean outside [-1, 1].
    with torch.no_grad():
        loss = script.dico_action_space_loss(agent, x)
    assert float(loss) > 0  # this actor's means leave the box (by hand below)


def test_dico_action_space_loss_by_hand(script):
    """The squared largest (over agents) overflow of the mean outside [-1, 1], averaged over samples:
    sample 0 has agent 0's mean at (1.5, 0) (overflow 0.5) and agent 1's at (0, -1.2) (0.2); sample 1
    is inside the box. Loss = (0.5^2 + 0) / 2."""
    loc = torch.tensor([[[1.5, 0.0], [0.3, 0.3]], [[0.0, -1.2], [-0.9, 1.0]]])  # (n_agents, batch, act_dim)
    agent = types.SimpleNamespace(actor=lambda obs, update_estimate: (loc, None))
    assert float(script.dico_action_space_loss(agent, torch.zeros(2, 2, 4))) == pytest.approx(0.125)


def test_dico_resume_is_bit_exact_with_the_running_estimate(script, tmp_path, capsys):
    common = ["--hypernet", "dico", "--n-agents", 2, "--save-model"]

    def run(name, steps, *extra):
        argv = tiny_args(tmp_path / name, *common, "--total-timesteps", steps, "--exp-name", name, *extra,
                         scenario="navigation")
        assert script.main(argv) == 0, capsys.readouterr().err

    run("full", 96)
    run("part", 64)
    (part_dir,) = run_dirs(tmp_path / "part")
    checkpoint = os.path.join(part_dir, "checkpoint.pt")
    run("part", 96, "--resume", checkpoint)
    # --eval-only without --scenario: the checkpoint's scenario decides the evaluation protocol (D.1.1)
    args, _, _ = script.read_command_line(["--eval-only", "--checkpoint", checkpoint])
    assert (args.scenario, args.eval_episodes, args.eval_deterministic, args.dico_snd_des) == ("navigation", 200, False, 1.2)
    (full_dir,) = run_dirs(tmp_path / "full")
    a = torch.load(os.path.join(full_dir, "checkpoint.pt"), weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    assert not torch.isnan(a["model"]["actor.snd_hat"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    moments = a["action_optimizer"]["state"]
    assert moments and all(torch.equal(moments[k]["exp_avg"], b["action_optimizer"]["state"][k]["exp_avg"])
                           for k in moments)


# ----- Evaluation mode (appendix D.1.1) -----
def test_evaluation_mode_defaults_follow_d11_per_scenario(script, tmp_path):
    assert script.parse_args([]).eval_deterministic is True
    assert script.parse_args(["--scenario", "navigation"]).eval_deterministic is False
    argv = ["--scenario", "navigation", "--eval-deterministic"]
    assert script.parse_args(argv).eval_deterministic is True


def test_sampled_evaluation_is_reproducible_and_leaves_the_training_rng_alone(script):
    args, env, agent = build(script, "--scenario", "navigation", "--n-agents", 2, "--hypernet", "nops",
                             "--eval-episodes", 2, "--max-steps", 5, "--actor-hidden-dims", 8,
                             "--critic-hidden-dims", 8)
    with torch.no_grad():
        agent.actor_logstd.fill_(0.5)
    torch.manual_seed(123)
    sampled = [script.evaluate(agent, env, args, 7)[0] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
    assert sampled[0] == sampled[1]
    args.eval_deterministic = True
    assert script.evaluate(agent, env, args, 7)[0] != sampled[0]


# ----- SND on a shared dataset (appendix D.1.2) -----
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
    code = script.main(tiny_args(tmp_path / "eval", "--eval-only", "--checkpoint", checkpoint,
                                 "--snd-obs-file", out, "--hypernet", "nops"))
    printed = capsys.readouterr().out
    assert code == 0
    snd = float(printed.split("diversity/snd=")[1].split()[0])
    args, env, agent = build(script, "--hypernet", "nops", "--actor-hidden-dims", 16, 16,
                             "--critic-hidden-dims", 16, 16, "--max-steps", 6)
    agent.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    with torch.no_grad():
        flat = torch.from_numpy(obs.reshape(-1, 16))
        expected = script.system_neural_diversity(agent.policy(flat.expand(4, -1, -1)), True)
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
    assert script.main(tiny_args(tmp_path / "eval", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not os.path.exists(tmp_path / "eval")


def test_snd_obs_files_that_are_not_datasets_are_refused(script, tmp_path, capsys):
    files = {"array.npy": lambda p: np.save(p, np.zeros((5, 16), np.float32)),  # .npy, not .npz
             "empty.npz": lambda p: open(p, "wb").close(),
             "nan.npz": lambda p: np.savez(p, obs=np.full((5, 16), np.nan, np.float32)),
             "object.npz": lambda p: np.savez(p, obs=np.array([{}], dtype=object))}  # pickled: refused
    for name, write in files.items():
        write(tmp_path / name)
        with pytest.raises(ValueError, match="--snd-obs-file: "):
            extras.load_snd_obs(str(tmp_path / name), 16)
    np.savez(tmp_path / "ok.npz", obs=np.ones((5, 4, 16), np.float32))
    assert extras.load_snd_obs(str(tmp_path / "ok.npz"), 16).shape == (20, 16)
    assert script.main(tiny_args(tmp_path / "train", "--save-model")) == 0
    (run_dir,) = run_dirs(tmp_path / "train")
    capsys.readouterr()
    argv = ["--eval-only", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--snd-obs-file", tmp_path / "array.npy"]
    assert script.main(tiny_args(tmp_path / "eval", *argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --snd-obs-file: "), err


# ----- Table 15 (Navigation tuning) and Table 9's seeds -----
@pytest.mark.parametrize("family, n, same, clip, lr", [
    ("mlp", 4, 4, 0.1, 5e-5), ("fups", 8, 8, 0.2, 5e-5), ("nops", 4, 1, 0.2, 5e-5), ("nops", 8, 4, 0.1, 5e-5),
    ("dico", 4, 1, 0.1, 2.5e-4), ("dico", 4, 2, 0.1, 5e-4), ("linear", 8, 1, 0.1, 5e-5),
    ("mlp", 2, 1, 0.2, 5e-5),  # 2 agents: not in Table 15, Table 12's values
])
def test_navigation_defaults_follow_table_15(script, family, n, same, clip, lr):
    argv = ["--scenario", "navigation", "--hypernet", family, "--n-agents", str(n), "--agents-with-same-goal", str(same)]
    args = script.parse_args(argv)
    assert (args.clip_coef, args.learning_rate) == (clip, lr)
    args = script.parse_args(argv + ["--clip-coef", "0.3", "--learning-rate", "1e-3"])
    assert (args.clip_coef, args.learning_rate) == (0.3, 1e-3)  # explicit flags win


def test_grids_use_the_papers_seeds_budgets_and_settings():
    """benchmark/launch.py: Table 9's seeds, appendix D's budgets (20M Dispersion, 10M Navigation
    and MaMuJoCo), Table 11's Dispersion and Table 16's goal settings for 2, 4, 8 agents."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import launch

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

    args = script.parse_args(run.argv())  # Table 15's DiCo row for 8 agents, half the agents on one goal
    assert (args.agents_with_same_goal, args.clip_coef, args.learning_rate, args.dico_snd_des) == (4, 0.1, 2.5e-4, -1.0)
    assert {r.budget for r in launch.GRIDS["table4"]()} == {10_000_000}


@pytest.mark.parametrize("argv, message", [
    (["--checkpoints", "missing.pt"], "--checkpoints: no such file 'missing.pt'"),
    (["--checkpoints", "x.pt", "--episodes", "0"], "--episodes: must be at least 1, got 0"),
    (["--checkpoints", "x.pt", "--samples", "many"], "error: --samples: invalid int value: 'many'"),
    (["--checkpoints", "FOREIGN"], "--checkpoints:"),
    (["--checkpoints", "FOREIGN", "--out", "NOSUFFIX"], "--out: must be an .npz file name"),  # numpy would add .npz
    (["--checkpoints", "FOREIGN", "--out", "NODIR"], "--out: no such folder"),  # checked before the rollouts
])
def test_snd_dataset_bad_flags_are_one_line_exit_2(tmp_path, argv, message):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    out = tmp_path / "snd.npz"
    names = {"FOREIGN": foreign, "NOSUFFIX": tmp_path / "snd", "NODIR": tmp_path / "missing" / "snd.npz"}
    argv = [str(names.get(a, a)) for a in argv]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "snd_dataset.py"), "--out", str(out)] + argv,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["foreign.pt"]


def test_dico_interference_metric_does_not_move_the_running_estimate(script):
    args, env, agent = build(script, *NAV_DICO, "--update-epochs", 1, "--num-minibatches", 1,
                             "--interference-samples", 8)
    n, batch_size = args.n_agents, 40
    obs = torch.randn(n, batch_size, env.obs_dim)
    with torch.no_grad():
        action, logprob, _, value = agent.get_action_and_value(obs)
        measured = float(agent.actor.deviation_snd(obs, agent.actor.deviation()))
    batch = dict(obs=obs, actions=action, logprobs=logprob, advantages=torch.randn(n, batch_size),
                 returns=torch.randn(n, batch_size), values=value)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-4)
    script.ppo_update(agent, optimizer, batch, args)
    # One training minibatch: the estimate is its measured value; the metric's extra forward pass on
    # the first 8 samples would have moved it by tau toward their (different) measure.
    assert float(agent.actor.snd_hat) == pytest.approx(measured, rel=1e-5)
