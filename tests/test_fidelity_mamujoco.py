"""mappo_hyper_mamujoco.py against HARL's own code (PKU-MARL/HARL), whose MaMuJoCo numbers the
paper follows, and the paper's appendix D.1.1: action rescaling, MLPBase's LayerNorms, one
centralised critic, HAPPO's actors, rollout and evaluation sizes, and the v5-vs-v2 caveat."""

import os

import numpy as np
import pytest
import torch

import mappo_hyper_mamujoco as mj
from conftest import ROOT
from test_mamujoco import run_main, tiny_argv


# ----- 1. actions in [-1, 1], rescaled to the joints' ranges (HARL's NormalizedActions) -----
def test_env_maps_minus_one_one_to_every_joints_range():
    env = mj.MaMuJoCoEnv("Humanoid-17x1")
    env.reset(seed=0)
    ctrl = env.base.unwrapped.data.ctrl
    for a, expected in ((1.0, env.action_high), (-1.0, env.action_low), (0.0, (env.action_low + env.action_high) / 2)):
        env.step(np.full(env.act_mask.shape, a, np.float32))
        np.testing.assert_allclose(ctrl, env.local_to_global_action(expected), atol=1e-7)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    env.close()


@pytest.mark.parametrize("algo,extra", [("mappo", dict(hypernet_hidden_dims=[8])), ("happo", {})])
def test_humanoid_actions_at_initialisation_rarely_saturate(algo, extra):
    """HARL: under 1% of the controls an initial policy sends sit at Humanoid's +-0.4 limits (std
    sigmoid(1) / 2 = 0.37 in [-1, 1] units). Sent unscaled, 27% of them would."""
    torch.manual_seed(0)
    args = mj.resolve_args(mj.Args(task="Humanoid-17x1", algo=algo, **extra))
    env = mj.MaMuJoCoEnv("Humanoid-17x1")
    actor = mj.GaussianActor(args, env.n_agents, mj.actor_obs_dim(args, env), env.act_dim, env.act_mask)
    flat, _ = env.reset(seed=0)
    controls = []
    with torch.no_grad():
        params = actor.generate()
        for t in range(300):
            x = torch.as_tensor(mj.actor_inputs(None, env.split(flat[None])[1], env.n_agents))
            mean, std = actor(x, params)
            flat, _, terminated, truncated, _ = env.step((mean + std * torch.randn_like(mean))[:, 0].numpy())
            controls.append(env.base.unwrapped.data.ctrl.copy())
            if terminated or truncated:
                flat, _ = env.reset(seed=t)
    saturated = np.mean(np.abs(np.array(controls)) >= 0.4)
    assert saturated < 0.01, saturated
    env.close()


# ----- 2. HARL's MLPBase: LayerNorm on the input and after every hidden activation -----
def harl_mlp_base(x, layers, norms):
    """HARL's MLPBase + output layer, built from torch.nn for one agent: LayerNorm(in), then
    (Linear, ReLU, LayerNorm) per hidden layer, then the output Linear."""
    def ln(h, weight, bias):
        module = torch.nn.LayerNorm(h.shape[-1])
        with torch.no_grad():
            module.weight.copy_(weight.reshape(-1))
            module.bias.copy_(bias.reshape(-1))
        return module(h)

    h = ln(x, *norms[0])
    for k, (weight, bias) in enumerate(layers):
        linear = torch.nn.Linear(*weight.shape)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            linear.bias.copy_(bias.reshape(-1))
        h = linear(h)
        if k < len(layers) - 1:
            h = ln(torch.relu(h), *norms[k + 1])
    return h


@pytest.mark.parametrize("actor", list(mj.ACTORS))
def test_every_actor_family_is_harls_mlp_base(actor):
    torch.manual_seed(1)
    args = mj.resolve_args(mj.Args(actor=actor, actor_hidden_dims=[16, 8]))
    net = mj.GaussianActor(args, 3, 7, 2, np.ones((3, 2), bool)).net
    with torch.no_grad():  # LayerNorm gains and biases away from their identity init
        for p in list(net.norm_weights) + list(net.norm_biases):
            p.add_(0.3 * torch.randn_like(p))
    assert len(net.norm_weights) == 3  # input, and each of the two hidden layers
    # one set per agent for independent actors, one shared set for FuPS and the hypernetworks
    assert net.norm_weights[0].shape[0] == (3 if actor == "ind" else 1)
    x = 5 * torch.randn(3, 11, 7) + 2
    params = net.generate()
    out = net(x, params)
    for i in range(3):
        norms = [(w[i % w.shape[0]], b[i % b.shape[0]]) for w, b in zip(net.norm_weights, net.norm_biases)]
        expected = harl_mlp_base(x[i], [(w[i], b[i]) for w, b in params], norms)
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    # the input LayerNorm: a per-sample shift and scale of the input changes nothing
    torch.testing.assert_close(net(3 * x - 1, params), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("critic,n_critics", [("shared", 1), ("per-agent", 3)])
def test_critic_is_harls_v_net(critic, n_critics):
    torch.manual_seed(2)
    args = mj.resolve_args(mj.Args(critic=critic, critic_hidden_dims=[16, 8]))
    critics = mj.CentralCritics(args, n_critics, 9)
    state = 4 * torch.randn(13, 9) - 3
    values = critics(state)
    assert values.shape == (n_critics, 13)
    net = critics.net
    for c in range(n_critics):
        norms = [(w[c], b[c]) for w, b in zip(net.norm_weights, net.norm_biases)]
        expected = harl_mlp_base(state, [(w[c], b[c]) for w, b in net.generate()], norms)
        torch.testing.assert_close(values[c], expected[:, 0], rtol=1e-4, atol=1e-5)


# ----- 3. one centralised critic and one ValueNorm, for MAPPO and HAPPO -----
@pytest.mark.parametrize("algo", ["mappo", "happo"])
def test_one_centralised_critic_by_default(tmp_path, algo):
    code, out, err = run_main(tiny_argv(tmp_path, "--save-model", actor="ind", algo=algo, task="Ant-4x2"))
    assert code == 0, err
    assert "agents=4" in out and "critics=1" in out
    path = [ln.split()[1] for ln in out.splitlines() if ln.startswith("checkpoint: ")][0]
    state = torch.load(path, weights_only=True)
    assert state["args"]["critic"] == "shared"
    assert all(t.shape[0] == 1 for t in state["critics"].values())
    assert state["value_norm"]["running_mean"].shape == (1,)


# ----- 4. HAPPO: independent actors only -----
def test_happo_defaults_to_independent_actors():
    assert mj.resolve_args(mj.Args(algo="happo")).actor == "ind"
    assert mj.resolve_args(mj.Args()).actor == "mlp"


@pytest.mark.parametrize("actor", ["mlp", "linear", "fups"])
def test_happo_refuses_actors_with_shared_weights(tmp_path, actor):
    runs = tmp_path / "runs"
    code, _, err = run_main(tiny_argv(runs, actor=actor, algo="happo"))  # tiny: a run if it were accepted
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --actor:") and "happo" in lines[0], err
    assert not runs.exists()


# ----- 5. rollout and evaluation sizes; the running normaliser is ours, off by default -----
def test_defaults_follow_harl_tuned_configs_and_appendix_d11():
    args = mj.resolve_args(mj.Args())
    # HARL tuned_configs/mamujoco/<task>/happo/config.json: n_rollout_threads 20, episode_length 200
    assert (args.num_envs, args.num_steps) == (20, 200)
    assert args.eval_episodes == 40  # appendix D.1.1 ("over 40 episodes"); HARL's eval_episodes
    assert args.eval_interval == 25 * 20 * 200  # D.1.1: every 25 training episodes (HARL's rollouts)
    assert args.norm_obs is False and args.norm_value is True  # HARL: LayerNorm on inputs, ValueNorm


# ----- 6. MuJoCo v5 here, v2 in the paper: said next to every MaMuJoCo result -----
def test_every_mamujoco_result_says_returns_are_not_comparable_to_table_4():
    results = os.path.join(ROOT, "benchmark", "results")
    reports = [os.path.join(results, f) for f in sorted(os.listdir(results))
               if f.startswith("mamujoco") and f.endswith(".md")]
    assert reports
    for path in reports:
        head = open(path).read()[:3000]
        assert "v5" in head and "v2" in head, path
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### Multi-Agent MuJoCo")[1].split("\n## ")[0]
    assert "v5" in section and "v2" in section and "Table 4" in section
