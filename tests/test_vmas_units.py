"""Unit tests of the pieces both VMAS scripts share: hypernetworks, families, SND, GAE, metrics."""

import math

import numpy as np
import pytest
import torch

from conftest import parsed
from scipy import integrate
from scipy.spatial.distance import jensenshannon

SIZES = [6, 16, 16, 5]
GAINS = [math.sqrt(2), math.sqrt(2), 0.01]


def per_agent_reference(x, weights, biases, activation=torch.relu):
    """Agent i's network applied to its own rows with a plain Python loop."""
    outputs = []
    for i in range(x.shape[0]):
        h = x[i]
        for k, (w, b) in enumerate(zip(weights, biases)):
            h = h @ w[i] + b[i]
            if k < len(weights) - 1:
                h = activation(h)
        outputs.append(h)
    return torch.stack(outputs)


def test_linear_hypernet_without_shared_bias_is_independent_networks(script):
    torch.manual_seed(0)
    n = 3
    hyper = script.LinearHypernet(n, SIZES, GAINS, init="scaled", shared_bias=False)
    x = torch.randn(n, 7, SIZES[0])
    out = script.batched_mlp(x, hyper(), torch.relu)
    # Independent networks holding exactly the weights the hypernetwork generates for each agent
    generated = hyper()
    weights = [w.detach().clone().requires_grad_() for w, _ in generated]
    biases = [b.detach().clone().requires_grad_() for _, b in generated]
    reference = per_agent_reference(x, weights, biases)
    torch.testing.assert_close(out, reference)
    # Same gradients: the hypernetwork row of agent i receives exactly agent i's network gradient
    target = torch.randn_like(out)
    (out * target).sum().backward()
    (reference * target).sum().backward()
    flat_reference = torch.stack([torch.cat([t.grad[i].flatten() for pair in zip(weights, biases) for t in pair])
                                  for i in range(n)])  # (n_agents, m), in the hypernetwork's layout
    torch.testing.assert_close(hyper.head.weight.grad.T, flat_reference)
    # ... and an agent's loss never reaches another agent's row
    hyper.zero_grad()
    script.batched_mlp(x, hyper(), torch.relu)[0].sum().backward()
    assert hyper.head.weight.grad[:, 0].abs().sum() > 0
    assert torch.all(hyper.head.weight.grad[:, 1:] == 0)


def test_batched_nops_equals_per_agent_loop(script):
    torch.manual_seed(1)
    nets = script.IndependentNets(4, SIZES, GAINS)
    x = torch.randn(4, 9, SIZES[0])
    out = script.batched_mlp(x, nets(), torch.tanh)
    reference = per_agent_reference(x, list(nets.weights), list(nets.biases), torch.tanh)
    torch.testing.assert_close(out, reference)
    # and each agent's slice is a separately initialised orthogonal matrix with its layer's gain
    assert not torch.allclose(nets.weights[0][0], nets.weights[0][1])
    for weight, gain in zip(nets.weights, GAINS):
        singular_values = torch.linalg.svdvals(weight.detach())  # (n_agents, min(fan_in, fan_out))
        torch.testing.assert_close(singular_values, torch.full_like(singular_values, gain), rtol=1e-4, atol=1e-6)


def test_fups_one_hot_as_bias_equals_concatenated_input(script):
    torch.manual_seed(2)
    n = 3
    shared = script.SharedNet(n, SIZES, GAINS, use_id=True)
    x = torch.randn(n, 5, SIZES[0])
    ids = torch.eye(n).unsqueeze(1).expand(n, 5, n)
    h = torch.cat([x, ids], -1)
    for k, layer in enumerate(shared.layers):
        h = layer(h)
        if k < len(shared.layers) - 1:
            h = torch.relu(h)
    torch.testing.assert_close(script.batched_mlp(x, shared(), torch.relu), h)


def weight_scales(params):
    return [w.flatten(1).norm(dim=1) for w, _ in params]  # per agent Frobenius norm of each layer


def target_scales():
    return [gain * math.sqrt(min(fan_in, fan_out)) for (fan_in, fan_out), gain in zip(zip(SIZES[:-1], SIZES[1:]), GAINS)]


def test_linear_hypernet_init_is_exactly_orthogonal(script):
    torch.manual_seed(3)
    hyper = script.LinearHypernet(4, SIZES, GAINS, init="scaled")
    with torch.no_grad():
        for (w, b), gain in zip(hyper(), GAINS):
            singular_values = torch.linalg.svdvals(w)  # (n_agents, min(fan_in, fan_out))
            torch.testing.assert_close(singular_values, torch.full_like(singular_values, gain), rtol=1e-4, atol=1e-6)
            assert torch.all(b == 0)
    default = script.LinearHypernet(4, SIZES, GAINS, init="default")
    with torch.no_grad():
        singular_values = torch.linalg.svdvals(default()[-1][0])
    assert not torch.allclose(singular_values, torch.full_like(singular_values, GAINS[-1]), rtol=0.1)


@pytest.mark.parametrize("embedding", ["learned", "onehot"])
def test_mlp_hypernet_init_matches_target_scale(script, embedding):
    """Our --hypernet-init matched; every layer of actor and critic: tests/test_fidelity_hypernet.py."""
    torch.manual_seed(4)
    sizes, gains = [16, 64, 64, 9], [math.sqrt(2), math.sqrt(2), 0.01]
    hyper = script.MLPHypernet(4, sizes, gains, embedding_dim=4, hidden_dims=[64], embedding=embedding, init="matched")
    default = script.MLPHypernet(4, sizes, gains, embedding_dim=4, hidden_dims=[64], embedding=embedding, init="default")
    targets = [g * math.sqrt(min(i, o)) for (i, o), g in zip(zip(sizes[:-1], sizes[1:]), gains)]
    with torch.no_grad():
        for scales, target in zip(weight_scales(hyper()), targets):
            assert torch.all((scales / target - 1).abs() < 0.10), (scales, target)
        assert all(torch.all(b == 0) for _, b in hyper())
        ratios = [scales / target for scales, target in zip(weight_scales(default()), targets)]
    assert any(torch.any((r - 1).abs() > 0.10) for r in ratios)


def test_agent_input_weights_do_not_depend_on_observations(script):
    torch.manual_seed(5)
    args = script.Args(hypernet_embedding_dim=4, hypernet_hidden_dims=[32], hypernet_embedding="learned",
                       hypernet_init="scaled", hypernet_input="agent")
    net = script.PerAgentMLP(args, "mlp", 3, SIZES, GAINS, torch.relu)
    x1, x2 = torch.randn(3, 5, SIZES[0]), torch.randn(3, 8, SIZES[0]) * 10
    generated = net.generate()
    assert all(w.dim() == 3 for w, _ in generated)  # (n_agents, fan_in, fan_out): one set per agent
    out_a = net(x1)
    out_b = net(torch.cat([x1, x2[:, :3]], 1))[:, :5]  # other samples in the batch change nothing
    torch.testing.assert_close(out_a, out_b)
    # the ablation without gradient decoupling generates weights per sample, from the observation
    args.hypernet_input = "agent+obs"
    ablation = script.PerAgentMLP(args, "mlp", 3, SIZES, GAINS, torch.relu)
    assert ablation.generate() is None
    weights = ablation.weight_net(x1)[0][0]
    assert weights.shape == (3, 5, SIZES[0], SIZES[1])
    assert not torch.allclose(weights[:, 0], weights[:, 1])


def random_distributions(rng, shape):
    p = rng.random(shape) ** 3
    return p / p.sum(-1, keepdims=True)


def test_snd_categorical(script):
    rng = np.random.default_rng(0)
    p, q = random_distributions(rng, (50, 9)), random_distributions(rng, (50, 9))
    ours = script.js_distance_categorical(torch.tensor(p), torch.tensor(q)).numpy()
    np.testing.assert_allclose(ours, [jensenshannon(a, b, base=2) for a, b in zip(p, q)], atol=1e-6)
    disjoint = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert script.js_distance_categorical(disjoint[:1], disjoint[1:]).item() == pytest.approx(1.0)
    logits = torch.randn(1, 30, 9).expand(4, 30, 9)
    assert script.system_neural_diversity(logits, discrete=True) == pytest.approx(0.0, abs=1e-6)
    one_hot_logits = torch.full((2, 10, 4), -1e4)
    one_hot_logits[0, :, 0] = one_hot_logits[1, :, 1] = 0.0
    assert script.system_neural_diversity(one_hot_logits, discrete=True) == pytest.approx(1.0, abs=1e-6)
    # Eq. (9): the mean over pairs; with three agents, two identical, one disjoint: (0 + 1 + 1) / 3
    three = torch.cat([one_hot_logits[:1], one_hot_logits[:1], one_hot_logits[1:]])
    assert script.system_neural_diversity(three, discrete=True) == pytest.approx(2 / 3, abs=1e-6)


def reference_js_gaussian_1d(mu1, s1, mu2, s2):
    """High-precision quadrature of the JS divergence (base 2) between two 1-D Gaussians."""
    from scipy.stats import norm

    def integrand(x, mu, s):
        p, q = norm.pdf(x, mu1, s1), norm.pdf(x, mu2, s2)
        f = norm.pdf(x, mu, s)
        m = 0.5 * (p + q)
        return 0.0 if f == 0 else f * (np.log2(f) - np.log2(m))

    lo, hi = min(mu1 - 12 * s1, mu2 - 12 * s2), max(mu1 + 12 * s1, mu2 + 12 * s2)
    a = integrate.quad(integrand, lo, hi, args=(mu1, s1), limit=500, epsabs=1e-12)[0]
    b = integrate.quad(integrand, lo, hi, args=(mu2, s2), limit=500, epsabs=1e-12)[0]
    return math.sqrt(max(0.5 * a + 0.5 * b, 0.0))


@pytest.mark.parametrize("mu1,s1,mu2,s2", [(0.0, 1.0, 0.0, 1.0), (0.0, 1.0, 1.0, 1.0), (0.0, 0.5, 2.0, 1.5),
                                           (0.3, 0.2, 0.0, 1.0), (0.0, 1.0, 8.0, 1.0)])
def test_snd_gaussian_estimator_agrees_with_quadrature(script, mu1, s1, mu2, s2):
    generator = torch.Generator().manual_seed(0)
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    ours = script.js_distance_gaussian(t(mu1), t(s1), t(mu2), t(s2), n_samples=200_000, generator=generator).item()
    assert ours == pytest.approx(reference_js_gaussian_1d(mu1, s1, mu2, s2), abs=5e-3)


def test_snd_gaussian_in_two_dimensions_matches_product_rule(script):
    # Identical second dimensions leave the distance of the first unchanged.
    generator = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.tensor([[0.0, 0.4]], dtype=torch.float64), torch.tensor([[1.0, 0.4]], dtype=torch.float64)
    std = torch.tensor([[1.0, 0.3]], dtype=torch.float64)
    ours = script.js_distance_gaussian(mu1, std, mu2, std, n_samples=200_000, generator=generator).item()
    assert ours == pytest.approx(reference_js_gaussian_1d(0.0, 1.0, 1.0, 1.0), abs=5e-3)


def test_fups_without_id_has_zero_snd(script):
    torch.manual_seed(6)
    shared = script.SharedNet(4, SIZES, GAINS, use_id=False)
    x = torch.randn(20, SIZES[0]).expand(4, -1, -1)
    logits = script.batched_mlp(x, shared(), torch.relu) * 100
    assert script.system_neural_diversity(logits, discrete=True) == pytest.approx(0.0, abs=1e-6)
    std = torch.ones_like(logits)
    assert script.system_neural_diversity((logits, std), discrete=False) == pytest.approx(0.0, abs=1e-6)
    with_id = script.SharedNet(4, SIZES, GAINS, use_id=True)
    with torch.no_grad():
        with_id.layers[0].weight[:, SIZES[0]:] += torch.randn(SIZES[1], 4)  # make the IDs matter
        logits = script.batched_mlp(x, with_id(), torch.relu) * 100
    assert script.system_neural_diversity(logits, discrete=True) > 0.01


def gae_reference(rewards, values, final_values, next_value, terminated, truncated, gamma, lam):
    """One environment, one agent, plain Python: bootstraps a time limit, not a termination."""
    T = len(rewards)
    advantages = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        if terminated[t]:
            next_v, carry = 0.0, 0.0
        elif truncated[t]:
            next_v, carry = final_values[t], 0.0
        else:
            next_v, carry = (values[t + 1] if t + 1 < T else next_value), 1.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * carry * last
        advantages[t] = last
    return advantages


def test_gae_matches_reference_with_truncation_bootstrap(script):
    rng = np.random.default_rng(0)
    T, n, E = 12, 2, 3
    rewards, values = rng.normal(size=(T, n, E)), rng.normal(size=(T, n, E))
    final_values, next_value = rng.normal(size=(T, n, E)), rng.normal(size=(n, E))
    terminated = np.zeros((T, E), bool)
    truncated = np.zeros((T, E), bool)
    terminated[3, 0] = terminated[7, 2] = True
    truncated[5, 0] = truncated[5, 1] = truncated[11, 2] = True
    dones = terminated | truncated
    next_values = np.concatenate([values[1:], next_value[None]])
    next_values = np.where(dones[:, None], np.where(truncated[:, None], final_values, 0.0), next_values)
    tt = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    advantages, returns = script.compute_gae(tt(rewards), tt(values), tt(next_values),
                                             tt(terminated[:, None].astype(float)), tt(dones[:, None].astype(float)),
                                             0.97, 0.9)
    for i in range(n):
        for e in range(E):
            expected = gae_reference(rewards[:, i, e], values[:, i, e], final_values[:, i, e], next_value[i, e],
                                     terminated[:, e], truncated[:, e], 0.97, 0.9)
            np.testing.assert_allclose(advantages[:, i, e].numpy(), expected, atol=1e-10)
    torch.testing.assert_close(returns, advantages + tt(values))
    # a truncated step bootstraps: its advantage changes with V(final state); a terminated one does not
    bumped = next_values.copy()
    bumped[5, :, 0] += 1.0
    bumped[3, :, 0] += 1.0  # terminated: multiplied by zero
    advantages2, _ = script.compute_gae(tt(rewards), tt(values), tt(bumped), tt(terminated[:, None].astype(float)),
                                        tt(dones[:, None].astype(float)), 0.97, 0.9)
    assert advantages2[5, 0, 0] - advantages[5, 0, 0] == pytest.approx(0.97)
    assert advantages2[3, 0, 0] == advantages[3, 0, 0]


def small_agent(script, family, n=3, discrete=True):
    args = parsed(script, hypernet=family, n_agents=n, actor_hidden_dims=[8], critic_hidden_dims=[8],
                                           total_timesteps=4096)
    critic_in = script.critic_input(torch.zeros(n, 1, 6)).shape[-1]
    return args, script.Agent(args, 6, 4, discrete, critic_in)


def per_agent_actor_loss(script, agent, n, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, 32, 6)
    action = torch.randint(0, 4, (n, 32))
    advantages = torch.randn(n, 32)
    _, logprob, _, _ = agent.get_action_and_value(x, action)
    return -(advantages * logprob).mean(1)


def test_interference_is_zero_for_nops_and_not_for_fups(script):
    _, nops = small_agent(script, "nops")
    assert script.gradient_interference(per_agent_actor_loss(script, nops, 3), nops.actor_parameters()) == 0.0
    _, fups = small_agent(script, "fups")
    assert abs(script.gradient_interference(per_agent_actor_loss(script, fups, 3), fups.actor_parameters())) > 1e-3


def test_interference_matches_separate_backward_passes(script):
    _, agent = small_agent(script, "mlp")
    losses = per_agent_actor_loss(script, agent, 3)
    params = agent.actor_parameters()
    grads = []
    for i in range(3):
        g = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([x.flatten() for x in g if x is not None]))
    g = torch.nn.functional.normalize(torch.stack(grads), dim=1)
    cosine = g @ g.T
    expected = (cosine.sum() - cosine.trace()) / 6
    assert script.gradient_interference(losses, params) == pytest.approx(expected.item(), abs=1e-5)


def test_gradient_variance_is_variance_over_all_actor_entries(script):
    _, agent = small_agent(script, "fups")
    per_agent_actor_loss(script, agent, 3).mean().backward()
    flat = torch.cat([p.grad.flatten() for p in agent.actor_parameters()])
    assert flat.numel() == sum(p.numel() for p in agent.actor_parameters())
    grads = [p.grad for p in agent.actor_parameters()]
    variance, norm = script.gradient_variance_and_norm(grads)
    assert variance.item() == pytest.approx(flat.var().item(), rel=1e-3)
    assert norm.item() == pytest.approx(flat.norm().item(), rel=1e-5)


def test_log_prob_and_entropy_match_torch_distributions(script):
    torch.manual_seed(7)
    logits = torch.randn(3, 10, 5)
    action = torch.randint(0, 5, (3, 10))
    logprob, entropy = script.log_prob_entropy(logits, action, discrete=True)
    reference = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logprob, reference.log_prob(action))
    torch.testing.assert_close(entropy, reference.entropy())
    mean, std = torch.randn(3, 10, 2), torch.rand(3, 10, 2) + 0.1
    action = torch.randn(3, 10, 2)
    logprob, entropy = script.log_prob_entropy((mean, std), action, discrete=False)
    normal = torch.distributions.Normal(mean, std)
    torch.testing.assert_close(logprob, normal.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, normal.entropy().sum(-1))
    # Gumbel-max sampling follows the softmax probabilities
    torch.manual_seed(8)
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(1, 20000, 3)
    counts = torch.bincount(script.sample_action(logits, True).flatten(), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), atol=0.015, rtol=0)


def test_dico_log_probs_are_a_tanh_normal_s(script):
    torch.manual_seed(7)
    args = parsed(script, scenario="navigation", hypernet="dico", n_agents=3, actor_hidden_dims=[8],
                  critic_hidden_dims=[8])
    agent = script.Agent(args, 6, 2, False, script.critic_input(torch.zeros(3, 1, 6)).shape[-1])
    obs = torch.randn(3, 10, 6)
    u, logprob, _, _ = agent.get_action_and_value(obs)
    mean, std = agent.policy(obs)
    tanh_normal = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, std),
                                                              torch.distributions.transforms.TanhTransform())
    # the stored action is the Gaussian sample u; its log-probability is that of tanh(u) under TanhNormal
    torch.testing.assert_close(logprob, tanh_normal.log_prob(torch.tanh(u)).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(agent.env_action(u), torch.tanh(u))


def dispersion_env(script, num_envs=3, **overrides):
    args = parsed(script, n_agents=2, max_steps=5, total_timesteps=4096, **overrides)
    env = script.VmasEnv(args, num_envs, 0, torch.device("cpu"))
    return args, env


def test_env_truncation_resets_in_place_and_returns_final_observations(script):
    args, env = dispersion_env(script)
    obs = env.reset()
    assert obs.shape == (2, 3, env.obs_dim)
    stay = torch.zeros(2, 3, dtype=torch.long)  # action 0: no-op
    env.env.steps[0] = args.max_steps - 2  # environment 0 reaches its time limit one step early
    obs, reward, terminated, truncated, final_obs = env.step(stay)
    assert truncated.tolist() == [False, False, False] and env.take_ended_episodes() is None
    obs, reward, terminated, truncated, final_obs = env.step(stay)
    assert truncated.tolist() == [True, False, False] and not terminated.any()
    returns, length = env.take_ended_episodes()
    assert len(returns) == 2 and length == 2 and env.take_ended_episodes() is None
    assert env.env.steps.tolist() == [0, 2, 2]  # only the ended environment was reset
    # the next action of environment 0 sees its fresh observation; its final one is kept apart
    fresh = torch.stack(env.env.get_from_scenario(get_observations=True, get_rewards=False, get_infos=False,
                                                  get_dones=False)[0])
    torch.testing.assert_close(obs, fresh)
    assert not torch.allclose(obs[:, 0], final_obs[:, 0])
    torch.testing.assert_close(obs[:, 1:], final_obs[:, 1:])


def per_env_state(env):
    """Every per-environment tensor of the simulator, by name."""
    return {f"{name}/{key}": value.clone() for name, holder in env._state_holders().items()
            for key, value in vars(holder).items() if isinstance(value, torch.Tensor) and value.shape[:1] == (env.num_envs,)}


def test_ended_environments_reset_in_one_batched_call_and_the_others_go_on_untouched(script, monkeypatch):
    _, env = dispersion_env(script, num_envs=6)
    _, twin = dispersion_env(script, num_envs=6)  # the same environments, where nothing ends early
    env.reset()
    twin.reset()
    calls = []
    monkeypatch.setattr(env.env, "reset_at", lambda *a, **k: calls.append("reset_at"))
    original_reset = env.env.reset
    monkeypatch.setattr(env.env, "reset", lambda *a, **k: calls.append("reset") or original_reset(*a, **k))
    env.env.steps[[1, 3, 4]] = 3  # three environments reach the 5-step limit at the second step
    action = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        env.step(action)
        twin.step(action)
    assert calls == ["reset"]  # one batched reset for the three ended environments, no loop over them
    ours, theirs = per_env_state(env), per_env_state(twin)
    going_on = torch.tensor([True, False, True, False, False, True])
    for name in ours:  # the environments that go on were not touched
        assert torch.equal(ours[name][going_on], theirs[name][going_on]), name
    assert env.env.steps.tolist() == [2, 0, 2, 0, 0, 2]
    positions = torch.stack([food.state.pos for food in env.env.world.landmarks])
    assert not torch.equal(positions[:, ~going_on], torch.stack([food.state.pos for food in twin.env.world.landmarks])[:, ~going_on])


def test_ended_environments_get_fresh_independent_states_from_vmas_distribution(script):
    """Initial food positions (agents start at the origin) after the batched reset: distinct across environments and resets,
    and the same distribution as VMAS's own reset (two-sample Kolmogorov-Smirnov on each axis)."""
    from scipy.stats import ks_2samp

    _, env = dispersion_env(script, num_envs=40)
    env.reset()
    env.env.steps[:] = torch.arange(40) % 5  # every step, 8 of the 40 environments reach the time limit
    stay = torch.zeros(2, 40, dtype=torch.long)
    starts = []
    for _ in range(25):
        _, _, _, truncated, _ = env.step(stay)
        assert truncated.sum() == 8
        starts.append(torch.stack([food.state.pos for food in env.env.world.landmarks])[:, truncated].flatten(0, 1))
    ours = torch.cat(starts)  # 25 resets x 8 environments x 2 food items
    assert len(torch.unique(ours, dim=0)) == len(ours)
    _, reference_env = dispersion_env(script, num_envs=400)
    reference_env.reset()
    reference = torch.stack([food.state.pos for food in reference_env.env.world.landmarks]).flatten(0, 1)
    for axis in range(2):
        assert ks_2samp(ours[:, axis].numpy(), reference[:, axis].numpy()).pvalue > 1e-3


def test_env_termination_is_not_truncation(script):
    # Food so large that every agent sits on every food item at once: all food eaten, episode over.
    args, env = dispersion_env(script, food_radius=5.0)
    env.reset()
    _, reward, terminated, truncated, _ = env.step(torch.zeros(2, 3, dtype=torch.long))
    assert terminated.all() and not truncated.any()
    returns, length = env.take_ended_episodes()
    assert (reward > 0).all() and length == 1
    torch.testing.assert_close(torch.tensor(returns), reward.mean(1))


def test_continuous_actions_outside_the_box_are_clipped_to_it(script):
    """VMAS alone would assert on an action outside its box: the wrapper sends the box's edge instead."""
    args = parsed(script, scenario="navigation", n_agents=2, total_timesteps=60000)
    outside, edge = (script.VmasEnv(args, 2, 0, torch.device("cpu")) for _ in range(2))
    outside.reset()
    edge.reset()
    for _ in range(2):
        a = outside.step(torch.full((2, 2, 2), 7.5))
        b = edge.step(edge.act_high.expand(2, 2, 2))
        torch.testing.assert_close(a[0], b[0])  # the same observations
        torch.testing.assert_close(a[1], b[1])  # and rewards


def test_evaluation_does_not_disturb_the_training_environment(script):
    """Evaluations between training steps change neither the training environment's random stream
    nor torch's global one, from which the training actions are drawn."""
    runs = []
    for evaluate_in_between in (False, True):
        args, env = dispersion_env(script)
        _, eval_env = dispersion_env(script)
        agent = script.Agent(args, env.obs_dim, env.act_dim, True,
                             script.critic_input(torch.zeros(2, 1, env.obs_dim)).shape[-1])
        torch.manual_seed(0)
        env.reset()
        steps = []
        for t in range(12):
            steps.append(env.step(torch.randint(0, env.act_dim, (2, 3)))[:2])  # (observations, rewards)
            if evaluate_in_between and t % 4 == 0:
                script.evaluate(agent, eval_env, args, seed=7)
        runs.append(steps)
    for (obs_a, reward_a), (obs_b, reward_b) in zip(*runs):
        assert torch.equal(obs_a, obs_b) and torch.equal(reward_a, reward_b)
