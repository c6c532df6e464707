"""mappo_hyper_mamujoco.py against HARL's own code (PKU-MARL/HARL), whose MaMuJoCo numbers the
paper follows, and the paper's appendix D.1.1: action rescaling, MLPBase's LayerNorms, one
centralised critic, HAPPO's actors, rollout and evaluation sizes, and the v5-vs-v2 caveat."""

import os

import numpy as np
import pytest
import torch

import mappo_hyper_mamujoco as mj
from conftest import HANG, ROOT, parsed
from conftest import run_mamujoco as run_main, tiny_mamujoco_args as tiny_argv

FAMILIES = ["mlp", "linear", "fups", "nops"]


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
    args = parsed(mj, task="Humanoid-17x1", algo=algo, **extra)
    env = mj.MaMuJoCoEnv("Humanoid-17x1")
    actor = mj.GaussianActor(args, env.n_agents, env.actor_obs_dim, env.act_dim, env.act_mask)
    inputs = mj.ObsNormalizer(env, enabled=False)
    flat, _ = env.reset(seed=0)
    controls = []
    with torch.no_grad():
        params = actor.generate()
        for t in range(300):
            x = torch.as_tensor(inputs(flat[None])[0])
            flat, _, terminated, truncated, _ = env.step(actor(x, params).sample()[:, 0].numpy())
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


@pytest.mark.parametrize("family", FAMILIES)
def test_every_actor_family_is_harls_mlp_base(family):
    torch.manual_seed(1)
    args = parsed(mj, hypernet=family, actor_hidden_dims=[16, 8])
    net = mj.GaussianActor(args, 3, 7, 2, np.ones((3, 2), bool)).net
    with torch.no_grad():  # LayerNorm gains and biases away from their identity init
        for p in list(net.norm_weights) + list(net.norm_biases):
            p.add_(0.3 * torch.randn_like(p))
    assert len(net.norm_weights) == 3  # input, and each of the two hidden layers
    # one set per agent for independent actors, one shared set for FuPS and the hypernetworks
    assert net.norm_weights[0].shape[0] == (3 if family == "nops" else 1)
    x = 5 * torch.randn(3, 11, 7) + 2
    params = net.generate()
    out = net(x, params)
    for i in range(3):
        norms = [(w[i % w.shape[0]], b[i % b.shape[0]]) for w, b in zip(net.norm_weights, net.norm_biases)]
        expected = harl_mlp_base(x[i], [(w[i], b[i]) for w, b in params.layers], norms)
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    # the input LayerNorm: a per-sample shift and scale of the input changes nothing
    torch.testing.assert_close(net(3 * x - 1, params), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("critic,n_critics", [("shared", 1), ("per-agent", 3)])
def test_critic_is_harls_v_net(critic, n_critics):
    torch.manual_seed(2)
    args = parsed(mj, critic=critic, critic_hidden_dims=[16, 8])
    critics = mj.CentralCritics(args, n_critics, 9)
    state = 4 * torch.randn(13, 9) - 3
    values = critics(state)
    assert values.shape == (n_critics, 13)
    net = critics.net
    for c in range(n_critics):
        norms = [(w[c], b[c]) for w, b in zip(net.norm_weights, net.norm_biases)]
        expected = harl_mlp_base(state, [(w[c], b[c]) for w, b in net.generate().layers], norms)
        torch.testing.assert_close(values[c], expected[:, 0], rtol=1e-4, atol=1e-5)


# ----- 3. one centralised critic and one ValueNorm, for MAPPO and HAPPO -----
@pytest.mark.parametrize("algo", ["mappo", "happo"])
def test_one_centralised_critic_by_default(tmp_path, algo):
    code, out, err = run_main(tiny_argv(tmp_path, "--save-model", hypernet="nops", algo=algo, task="Ant-4x2"))
    assert code == 0, err
    assert "agents=4" in out and "critics=1" in out
    path = [ln.split()[1] for ln in out.splitlines() if ln.startswith("checkpoint: ")][0]
    state = torch.load(path, weights_only=True)
    assert state["args"]["critic"] == "shared"
    assert all(t.shape[0] == 1 for t in state["critics"].values())
    assert state["value_norm"]["running_mean"].shape == (1,)


# ----- 4. HAPPO: independent actors only -----
def test_happo_defaults_to_independent_actors():
    assert parsed(mj, algo="happo").hypernet == "nops"
    assert parsed(mj).hypernet == "mlp"


@pytest.mark.parametrize("family", ["mlp", "linear", "fups"])
def test_happo_refuses_actors_with_shared_weights(tmp_path, family):
    runs = tmp_path / "runs"
    code, _, err = run_main(tiny_argv(runs, hypernet=family, algo="happo"))  # tiny: a run if it were accepted
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --hypernet:") and "happo" in lines[0], err
    assert not runs.exists()


# ----- 5. rollout and evaluation sizes; the running normaliser is ours, off by default -----
def test_defaults_follow_harl_tuned_configs_and_appendix_d11():
    args = parsed(mj)
    # HARL tuned_configs/mamujoco/<task>/happo/config.json: n_rollout_threads 20, episode_length 200
    assert (args.num_envs, args.num_steps) == (20, 200)
    assert args.eval_episodes == 40  # appendix D.1.1 ("over 40 episodes"); HARL's eval_episodes
    assert args.eval_interval == 25 * 20 * 200  # D.1.1: every 25 training episodes (HARL's rollouts)
    assert args.norm_obs is False and args.norm_value is True  # HARL: LayerNorm on inputs, ValueNorm


@pytest.mark.parametrize("task, decays", [("HalfCheetah-2x3", False), ("Walker2d-2x3", True), ("Ant-4x2", False),
                                          ("Humanoid-17x1", True), ("Humanoid-9|8", True)])
def test_the_learning_rates_decay_where_harls_tuned_configs_decay_them(task, decays):
    """HARL tuned_configs/mamujoco/<task>/{happo,mappo}/config.json, train.use_linear_lr_decay (Tables 17-20
    leave that block out); Humanoid-9|8 takes Humanoid-17x1's values."""
    assert parsed(mj, task=task).anneal_lr is decays
    assert parsed(mj, task=task, anneal_lr=not decays).anneal_lr is not decays  # a flag given wins


# ----- 6. MuJoCo v5 here, v2 in the paper: said next to every MaMuJoCo result -----
def test_every_mamujoco_result_says_returns_are_not_comparable_to_table_4():
    results = os.path.join(ROOT, "benchmark", "results")
    reports = [os.path.join(results, f) for f in sorted(os.listdir(results))
               if f.startswith("mamujoco") and f.endswith(".md")]  # none committed now; any added must say so
    for path in reports:
        head = open(path).read()[:3000]
        assert "v5" in head and "v2" in head, path
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### Multi-Agent MuJoCo")[1].split("\n## ")[0]
    assert "v5" in section and "v2" in section and "Table 4" in section


# ----- review: CUDA resume of independent actors; the results summary's header -----
def test_per_agent_adam_steps_on_its_parameters_device_after_loading_a_cpu_checkpoint():
    """Checkpoints load with map_location="cpu", and torch's load_state_dict leaves a state's "step"
    where it was saved: on CUDA, PerAgentAdam (independent actors, HAPPO's default) then mixed CPU and
    CUDA tensors at the first step after --resume. The meta device stands in for CUDA here."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    saved = mj.PerAgentAdam([p], 3, lr=1e-3)
    p.grad = torch.randn(3, 4)
    saved.step()
    q = torch.nn.Parameter(torch.empty(3, 4, device="meta"))
    resumed = mj.PerAgentAdam([q], 3, lr=1e-3)
    resumed.load_state_dict(saved.state_dict())
    q.grad = torch.empty(3, 4, device="meta")
    resumed.step()  # MAPPO: every agent
    resumed.step(torch.tensor([1], device="meta"))  # HAPPO: one agent
    assert all(t.device == q.device for t in resumed.state[q].values())


def test_mamujoco_summary_reports_the_runs_own_settings(tmp_path):
    """benchmark/aggregate.py's table header gives the environments, steps, evaluation episodes and
    clip the runs logged (launch.py's summary "config", read from the run's TensorBoard), not the
    settings of the first evidence."""
    import subprocess
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import launch

    for family in ("mlp", "nops"):
        runs = tmp_path / "grid" / family
        assert run_main(tiny_argv(runs, "--eval-interval", "32", hypernet=family))[0] == 0
        run = launch.Run("table4", "mamujoco", "HalfCheetah-2x3", family, 1, "mappo_hyper_mamujoco.py", [], 64)
        launch.write_summary(run, launch.run_folder(str(runs)), argv=[], extra=[])
    script = os.path.join(ROOT, "benchmark", "aggregate.py")
    done = subprocess.run([sys.executable, script, str(tmp_path / "grid"), "--out", str(tmp_path), "--reps", "20"],
                          capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    header = (tmp_path / "table4.md").read_text().split("## HalfCheetah-2x3")[0]
    for setting in ("num_envs=1", "num_steps=32", "eval_interval=32", "eval_episodes=2"):
        assert setting in header
    assert "clip_coef: nops 0.05, mlp 0.0375" in header  # Table 20, Table 21
    assert "v5" in header and "v2" in header and "500" not in header


@pytest.mark.parametrize("flags,needle", [
    (["--critic", "auto"], "--critic"),  # the old default: tyro's message names the flag and the choices
    (["--critic", "centralised"], "--critic"),
    (["--algo", "happo", "--hypernet", "fups", "--critic", "per-agent"], "error: --hypernet:"),  # one line, ours
    (["--norm-obs", "yes"], "yes"),  # a toggle takes no value
])
def test_bad_critic_and_norm_obs_values_exit_2(tmp_path, flags, needle):
    runs = tmp_path / "runs"
    code, out, err = run_main(["--runs-dir", str(runs)] + flags)
    assert code == 2 and needle in err, err
    assert not needle.startswith("error: ") or (err.startswith(needle) and err.count("\n") == 1), err
    assert not runs.exists() and not out


@pytest.mark.parametrize("task,obs_mode", [("Ant-4x2", "global"), ("Humanoid-9|8", "local")])
def test_evaluation_snd_is_drawn_from_every_agents_inputs_of_the_episodes(task, obs_mode):
    """40 evaluation episodes: the SND pool keeps the raw observations (global mode: one state per
    joint state, not n_agents inputs; 1 GB on Humanoid-17x1 otherwise) and builds the inputs of its
    sample only. Same SND as keeping every agent's input of every step and sampling from those."""
    torch.manual_seed(0)
    args = parsed(mj, task=task, obs_mode=obs_mode, hypernet="fups", eval_episodes=3, max_episode_steps=20,
                  snd_samples=30, actor_hidden_dims=[16], norm_obs=True)
    evaluator = mj.Evaluator(args, torch.device("cpu"))
    env = evaluator.envs[0]
    actor = mj.GaussianActor(args, env.n_agents, env.actor_obs_dim, env.act_dim, env.act_mask)
    obs_norm = mj.ObsNormalizer(env, True)
    obs_norm(np.random.default_rng(0).standard_normal((5, env.observation_space.shape[0])), update=True)
    eval_return, snd, _ = evaluator(actor, obs_norm)
    # reference: every agent's input of every step of every episode, then the same draw
    envs, inputs, returns = evaluator.envs, [], np.zeros(3)
    flats = [e.reset(seed=args.seed + 10_000 + k)[0] for k, e in enumerate(envs)]
    active = np.ones(3, dtype=bool)
    with torch.no_grad():
        while active.any():
            live = np.nonzero(active)[0]
            x = torch.as_tensor(obs_norm(np.stack([flats[k] for k in live]))[0])
            inputs.append(x)
            actions = actor(x, actor.generate()).mean.numpy().transpose(1, 0, 2)
            for j, k in enumerate(live):
                flats[k], reward, terminated, truncated, _ = envs[k].step(actions[j])
                returns[k] += reward
                active[k] = not (terminated or truncated)
        pool = torch.cat(inputs, 1)
        pool = pool[:, torch.randperm(pool.shape[1], generator=torch.Generator().manual_seed(args.seed))[:30]]
        dist = actor(pool, actor.generate())
        expected = mj.system_neural_diversity(dist.mean, dist.stddev, actor.act_mask, args.snd_gaussian_samples,
                                              torch.Generator().manual_seed(args.seed))
    assert eval_return == returns.mean() and snd == expected and snd > 0
    evaluator.close()


def _orthogonal_with_gain(weight, gain):
    """weight (fan_in, fan_out), as the networks store it: orthogonal rows or columns times gain."""
    m = weight.T if weight.shape[1] <= weight.shape[0] else weight
    torch.testing.assert_close(m @ m.T, gain**2 * torch.eye(m.shape[0]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["nops", "fups"])
def test_harl_init_of_the_networks_that_are_not_generated(family):
    """HARL (Tables 17-20): orthogonal_ init with gain calculate_gain("relu") in MLPBase, gain 0.01 on
    the Gaussian's mean layer and 1 on the value head, zero biases, LayerNorms at (1, 0), log_std = x."""
    torch.manual_seed(4)
    args = parsed(mj, hypernet=family, actor_hidden_dims=[32, 16], critic_hidden_dims=[32, 16])
    actor_ = mj.GaussianActor(args, 3, 40, 5, np.ones((3, 5), bool))
    critic = mj.CentralCritics(args, 1, 40)
    for net, gains in ((actor_.net, [2**0.5, 2**0.5, 0.01]), (critic.net, [2**0.5, 2**0.5, 1.0])):
        for (weight, bias), gain in zip(net.generate().layers, gains):
            for i in range(weight.shape[0]):
                _orthogonal_with_gain(weight[i].detach(), gain)
            assert torch.all(bias == 0)
        assert all(torch.all(w == 1) for w in net.norm_weights) and all(torch.all(b == 0) for b in net.norm_biases)
    assert torch.all(actor_.log_std == args.std_x_coef)
