"""The algorithm, without an environment: the hypernetworks (Eq. 5, Eq. 6 as the authors build it, the
initialisation of section 4.3), the families, sampling and log-probabilities, GAE, SND (Eq. 9) and the
gradient metrics, on both VMAS scripts (one copy each: tests/test_design.py keeps them identical)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, parsed
from scipy import integrate
from scipy.spatial.distance import jensenshannon

SIZES = [6, 16, 16, 5]
GAINS = [math.sqrt(2), math.sqrt(2), 0.01]

# Building 256-256 targets is hundreds of small QRs: two threads on a busy machine only contend.
pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.smoke
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
    default = script.LinearHypernet(4, SIZES, GAINS, init="pytorch")
    with torch.no_grad():
        singular_values = torch.linalg.svdvals(default()[-1][0])
    assert not torch.allclose(singular_values, torch.full_like(singular_values, GAINS[-1]), rtol=0.1)


@pytest.mark.parametrize("embedding", ["learned", "onehot"])
def test_mlp_hypernet_init_matches_target_scale(script, embedding):
    """Our --hypernet-init matched; every layer of actor and critic: tests/test_vmas.py."""
    torch.manual_seed(4)
    sizes, gains = [16, 64, 64, 9], [math.sqrt(2), math.sqrt(2), 0.01]
    hyper = script.MLPHypernet(4, sizes, gains, embedding_dim=4, hidden_dims=[64], embedding=embedding, init="matched")
    default = script.MLPHypernet(4, sizes, gains, embedding_dim=4, hidden_dims=[64], embedding=embedding, init="pytorch")
    targets = [g * math.sqrt(min(i, o)) for (i, o), g in zip(zip(sizes[:-1], sizes[1:]), gains)]
    with torch.no_grad():
        for scales, target in zip(weight_scales(hyper()), targets):
            assert torch.all((scales / target - 1).abs() < 1e-4), (scales, target)  # exact, up to float32
        assert all(torch.all(b == 0) for _, b in hyper())
        ratios = [scales / target for scales, target in zip(weight_scales(default()), targets)]
    assert any(torch.any((r - 1).abs() > 0.10) for r in ratios)


# ----- The MLP hypernetwork as the authors build it (Eq. 6), and its initialisation (section 4.3) -----
def manual_forward(hyper, normalise):
    """theta for every generated tensor: its own MLP g, then its own linear head f."""
    out = []
    for trunk, head in zip(hyper.trunks, hyper.heads):
        features = trunk(hyper.embedding)
        out.append(head(F.normalize(features, dim=-1) if normalise else features))
    return out


@pytest.mark.parametrize("init", ["scaled", "matched", "flax", "pytorch"])
def test_one_sub_network_per_weight_and_per_bias_and_no_normalisation_unless_matched(script, init):
    torch.manual_seed(0)
    hyper = script.MLPHypernet(4, SIZES, GAINS, embedding_dim=4, hidden_dims=[16, 8], init=init)
    shapes = list(zip(SIZES[:-1], SIZES[1:]))
    assert len(hyper.trunks) == len(hyper.heads) == 2 * len(shapes)
    assert [h.out_features for h in hyper.heads] == [n for i, o in shapes for n in (i * o, o)]
    assert all(len([m for m in t if isinstance(m, torch.nn.Linear)]) == 2 for t in hyper.trunks)
    with torch.no_grad():
        generated = hyper()
        expected = manual_forward(hyper, normalise=init == "matched")
        for k, ((weight, bias), (fan_in, fan_out)) in enumerate(zip(generated, shapes)):
            torch.testing.assert_close(weight, expected[2 * k].unflatten(-1, (fan_in, fan_out)))
            torch.testing.assert_close(bias, expected[2 * k + 1].unsqueeze(-2))


def test_the_faithful_hypernetwork_does_not_normalise(script):
    """Eq. (6) has no normalisation: the scaled init is positively homogeneous in the embedding
    (zero trunk biases, ReLU), so a 3x larger embedding generates 3x larger weights; our
    matched variant normalises g's output and does not move."""
    torch.manual_seed(1)
    for init, factor in (("scaled", 3.0), ("matched", 1.0)):
        hyper = script.MLPHypernet(4, SIZES, GAINS, embedding_dim=4, hidden_dims=[16], init=init)
        with torch.no_grad():
            before = [w.clone() for w, _ in hyper()]
            hyper.embedding.mul_(3.0)
            after = [w for w, _ in hyper()]
        for b, a in zip(before, after):
            torch.testing.assert_close(a, factor * b)


def test_scaled_init_is_the_authors_scheme(script):
    torch.manual_seed(2)
    hyper = script.MLPHypernet(4, SIZES, GAINS, embedding_dim=4, hidden_dims=[256, 256], init="scaled")
    # learned embeddings: orthogonal with gain sqrt(2), as in their code
    torch.testing.assert_close(hyper.embedding @ hyper.embedding.T, 2 * torch.eye(4), atol=1e-5, rtol=0)
    # g: Flax's default init, LeCun normal (a normal truncated at 2 std, variance 1 / fan_in), zero bias
    for trunk in hyper.trunks:
        for layer in (m for m in trunk if isinstance(m, torch.nn.Linear)):
            assert torch.all(layer.bias == 0)
            bound = 2 * layer.in_features ** -0.5 / 0.8796256610342398
            assert layer.weight.abs().max() <= bound + 1e-6
    big = hyper.trunks[0][2].weight  # 256 x 256 samples
    assert abs(big.std().item() * math.sqrt(256) - 1) < 0.03
    # f: each weight head's column is a flattened orthogonal matrix with the layer's gain; bias heads are zero
    for k, ((fan_in, fan_out), gain) in enumerate(zip(zip(SIZES[:-1], SIZES[1:]), GAINS)):
        weight_head, bias_head = hyper.heads[2 * k], hyper.heads[2 * k + 1]
        columns = weight_head.weight.detach().T.reshape(-1, fan_in, fan_out)
        singular_values = torch.linalg.svdvals(columns)
        torch.testing.assert_close(singular_values, torch.full_like(singular_values, gain), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(columns[0], columns[1])  # one orthogonal matrix per hidden unit
        assert torch.all(weight_head.bias == 0) and torch.all(bias_head.weight == 0) and torch.all(bias_head.bias == 0)
    assert all(torch.all(b == 0) for _, b in hyper())


def test_flax_init_is_the_authors_code_without_the_scaling(script):
    """w/o RF (section 6) as the authors' code leaves it: every Dense, heads included, at Flax's default,
    LeCun normal (a normal truncated at 2 std, variance 1 / fan_in) and zero bias; the embedding stays."""
    torch.manual_seed(4)
    hyper = script.MLPHypernet(4, [64, 64, 9], GAINS[1:], embedding_dim=4, hidden_dims=[256], init="flax")
    for layer in [m for t in hyper.trunks for m in t if isinstance(m, torch.nn.Linear)] + list(hyper.heads):
        assert torch.all(layer.bias == 0)
        assert layer.weight.abs().max() <= 2 * layer.in_features ** -0.5 / 0.8796256610342398 + 1e-6
    big = hyper.heads[0].weight  # 4096 x 256 samples of the first weight head
    assert abs(big.std().item() * math.sqrt(256) - 1) < 0.01
    assert abs(hyper.heads[1].weight.std().item() * math.sqrt(256) - 1) < 0.15  # the bias head: not zero
    torch.testing.assert_close(hyper.embedding @ hyper.embedding.T, 2 * torch.eye(4), atol=1e-5, rtol=0)
    # the linear hypernetwork (Eq. 5): its one Dense head at Flax's default over the one-hot input
    linear = script.LinearHypernet(4, [64, 64, 9], GAINS[1:], init="flax")
    assert torch.all(linear.head.bias == 0)
    assert abs(linear.head.weight.std().item() * math.sqrt(4) - 1) < 0.01


def test_pytorch_init_removes_all_of_section_4_3(script):
    """PyTorch's init in every layer of every sub-network (no orthogonal columns, no zero bias heads, no
    normalisation: see above); the embedding stays orthogonal (section 4.2)."""
    torch.manual_seed(3)
    hyper = script.MLPHypernet(4, SIZES, GAINS, embedding_dim=4, hidden_dims=[16], init="pytorch")
    layers = [m for t in hyper.trunks for m in t if isinstance(m, torch.nn.Linear)] + list(hyper.heads)
    for layer in layers:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = layer.in_features ** -0.5
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        assert layer.bias.abs().max() > 0
    assert all(torch.all(b != 0) for _, b in hyper())
    torch.testing.assert_close(hyper.embedding @ hyper.embedding.T, 2 * torch.eye(4), atol=1e-5, rtol=0)


def test_agent_input_weights_do_not_depend_on_observations(script):
    torch.manual_seed(5)
    args = parsed(script, n_agents=3, hypernet="mlp", hypernet_hidden_dims=[32], actor_hidden_dims=[16, 16],
                  critic_hidden_dims=[16, 16])
    net = script.family_net(args, "mlp", 3, SIZES, GAINS)
    generated = net()
    assert all(w.dim() == 3 for w, _ in generated)  # (n_agents, fan_in, fan_out): one set per agent
    agent = script.Agent(args, SIZES[0], SIZES[-1], True)
    x1, x2 = torch.randn(3, 5, SIZES[0]), torch.randn(3, 8, SIZES[0]) * 10
    assert not agent.per_sample
    for a, b in zip(agent.generate(x1), agent.generate(x2)):  # actor and critic: the same weights for any obs
        assert all(torch.equal(wa, wb) and torch.equal(ba, bb) for (wa, ba), (wb, bb) in zip(a, b))
    both = torch.cat([x1, x2[:, :3]], 1)
    out_a = agent.policy(x1, agent.generate(x1))
    out_b = agent.policy(both, agent.generate(both))[:, :5]  # other samples in the batch change nothing
    torch.testing.assert_close(out_a, out_b)
    # the ablation without gradient decoupling generates weights per sample, from the observation
    args.hypernet_input = "agent+obs"
    ablation = script.family_net(args, "mlp", 3, SIZES, GAINS)
    weights = ablation(x1)[0][0]
    assert weights.shape == (3, 5, SIZES[0], SIZES[1])
    assert not torch.allclose(weights[:, 0], weights[:, 1])
    agent = script.Agent(args, SIZES[0], SIZES[-1], True)
    assert agent.per_sample
    actor, critic = agent.generate(x1)
    assert actor[0][0].shape == (3, 5, SIZES[0], 16) and critic[0][0].shape[:2] == (3, 5)
    assert not torch.allclose(actor[0][0][:, 0], actor[0][0][:, 1])


def embedding_agent(script, seed=0, **flags):
    torch.manual_seed(seed)
    args = parsed(script, n_agents=3, hypernet="mlp", hypernet_hidden_dims=[8], actor_hidden_dims=[8],
                  critic_hidden_dims=[8], **flags)
    return script.Agent(args, SIZES[0], 4, True)

def critic_loss_gradients(agent):
    """The gradient of a loss on the critic alone, per parameter of the agent (None: untouched)."""
    x = torch.randn(3, 5, SIZES[0])
    agent.zero_grad()
    agent.get_value(x, agent.generate(x)).square().mean().backward()
    return agent.actor.embedding.grad, agent.critic.embedding.grad

@pytest.mark.parametrize("w_o_gd", [False, True])
def test_actor_and_critic_share_one_agent_embedding_table(script, w_o_gd):
    """The authors' ActorCritic holds one agent_embeddings parameter for both hypernetworks: one tensor in
    the state_dict and the optimizer, in the actor's parameters, moved by the critic's loss too."""
    agent = embedding_agent(script, hypernet_input="agent+obs" if w_o_gd else "agent")
    assert agent.critic.embedding is agent.actor.embedding
    assert [key for key in agent.state_dict() if "embedding" in key] == ["actor.embedding"]
    optimizer = torch.optim.Adam(agent.parameters())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is agent.actor.embedding for p in params) == 1
    assert any(p is agent.actor.embedding for p in agent.actor_parameters())
    actor_grad, _ = critic_loss_gradients(agent)
    assert actor_grad is not None and actor_grad.abs().sum() > 0  # the critic's loss moves the actor's embedding

def test_separate_embeddings_give_one_table_per_network_and_leave_the_actor_as_it_was(script):
    """--hypernet-separate-embeddings: two tables, the critic's loss leaves the actor's alone. The actor is
    built first and draws its table first: sharing changes only the critic's initial numbers."""
    shared, separate = embedding_agent(script), embedding_agent(script, hypernet_separate_embeddings=True)
    assert separate.critic.embedding is not separate.actor.embedding
    assert [key for key in separate.state_dict() if "embedding" in key] == ["actor.embedding", "critic.embedding"]
    assert len(list(separate.parameters())) == len(list(shared.parameters())) + 1
    actor_grad, critic_grad = critic_loss_gradients(separate)
    assert actor_grad is None and critic_grad.abs().sum() > 0
    for key, value in shared.actor.state_dict().items():
        assert torch.equal(value, separate.actor.state_dict()[key]), key

def test_onehot_embeddings_stay_a_buffer_per_network(script):
    agent = embedding_agent(script, hypernet_embedding="onehot")
    assert [key for key, _ in agent.named_buffers() if "embedding" in key] == ["actor.embedding", "critic.embedding"]
    assert not any("embedding" in key for key, _ in agent.named_parameters())
    x = torch.randn(3, 5, SIZES[0])
    assert agent.get_value(x, agent.generate(x)).shape == (3, 5)


def random_distributions(rng, shape):
    p = rng.random(shape) ** 3
    return p / p.sum(-1, keepdims=True)


@pytest.mark.smoke
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


def test_snd_of_near_equal_policies_keeps_its_digits(script):
    """Agents that barely differ (early training, FuPS): SND is a square root of a second-order difference, which
    float32 loses (an error of percents, moved by the last bit of any rounding); computed in float64 from the same
    float32 policies it agrees with a float64 reference to 1e-9."""
    torch.manual_seed(0)
    logits = torch.randn(1, 500, 9).repeat(3, 1, 1)
    logits[1:] += 1e-3 * torch.randn(2, 500, 9)
    probs = torch.softmax(logits.double(), -1).numpy()
    reference = np.mean([jensenshannon(probs[a, k], probs[b, k], base=2) for a, b in ((0, 1), (0, 2), (1, 2))
                         for k in range(500)])
    assert script.system_neural_diversity(logits, discrete=True) == pytest.approx(reference, rel=1e-9, abs=0)
    mean, std = logits[..., :2], torch.full((3, 500, 2), 0.5)
    z = torch.randn((32, 3, 500, 2), generator=torch.Generator().manual_seed(7)).double()  # the estimator's draws
    mu, sd = mean.double(), std.double()

    def log_density(x, m, s):
        return (-0.5 * ((x - m) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def half_term(a, b):  # E_{x ~ a}[log a - log m], in float64 on the same draws
        x = torch.cat([z, -z]) * sd[a] + mu[a]  # pair k's draws z[:, k]
        d = log_density(x, mu[b], sd[b]) - log_density(x, mu[a], sd[a])
        return -torch.log1p(torch.expm1(d) / 2).mean(0)

    pairs = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    expected = ((0.5 * half_term(*pairs) + 0.5 * half_term(*pairs[::-1])) / math.log(2.0)).clamp(0, 1).sqrt().mean()
    ours = script.js_distance_gaussian(mean[pairs[0]], std[pairs[0]], mean[pairs[1]], std[pairs[1]], 64,
                                       torch.Generator().manual_seed(7)).mean()
    assert float(ours) == pytest.approx(float(expected), rel=1e-9, abs=0)


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


@pytest.mark.smoke
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


def test_bootstrap_values_are_the_critics_at_time_limits_only(script):
    """V(final observation) where an episode was truncated, 0 elsewhere; the critic sees what it sees in
    the rollout (MAPPO: every agent's observation of that step)."""
    _, agent = small_agent(script, "mlp")
    T, n, E = 5, 3, 4
    final_obs = torch.randn(T, n, E, 6)
    truncated = torch.zeros(T, 1, E)
    truncated[1, 0, 2] = truncated[4, 0, 0] = truncated[4, 0, 3] = 1
    with torch.no_grad():
        values = script.bootstrap_values(agent, final_obs, truncated)
        assert values.shape == (T, n, E)
        for t, e in ((1, 2), (4, 0), (4, 3)):
            x = final_obs[t, :, e].unsqueeze(1)  # (n_agents, 1, obs_dim)
            torch.testing.assert_close(values[t, :, e], agent.get_value(x, agent.generate(x))[:, 0])
            values[t, :, e] = 0
    assert torch.all(values == 0)


def small_agent(script, family, n=3, discrete=True):
    args = parsed(script, hypernet=family, n_agents=n, actor_hidden_dims=[8], critic_hidden_dims=[8],
                  total_timesteps=4096)
    return args, script.Agent(args, 6, 4, discrete)


def per_agent_actor_loss(script, agent, n, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, 32, 6)
    action = torch.randint(0, 4, (n, 32))
    advantages = torch.randn(n, 32)
    _, logprob, _, _ = agent.get_action_and_value(x, agent.generate(x), action)
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


@pytest.mark.smoke
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


def test_a_uniform_draw_of_exactly_zero_leaves_gumbel_max_a_categorical_sample(script, monkeypatch):
    """torch.rand can return 0 (2^-24 of float32 draws): -log(-log 0) = -inf would rule that action out, and
    an action with every draw 0 would become the first, whatever the logits."""
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)
    assert script.sample_action(torch.tensor([[[-1e10, 0.5, 3.0, -1e10]]]), True).item() == 2


def test_dico_log_probs_are_a_tanh_normal_s(script):
    torch.manual_seed(7)
    args = parsed(script, scenario="navigation", hypernet="dico", n_agents=3, actor_hidden_dims=[8],
                  critic_hidden_dims=[8])
    agent = script.make_agent(args, 6, 2, False)
    obs = torch.randn(3, 10, 6)
    weights = agent.generate(obs)
    u, logprob, _, _ = agent.get_action_and_value(obs, weights)
    mean, std = agent.policy(obs, weights)
    tanh_normal = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, std),
                                                              torch.distributions.transforms.TanhTransform())
    # the stored action is the Gaussian sample u; its log-probability is that of tanh(u) under TanhNormal
    torch.testing.assert_close(logprob, tanh_normal.log_prob(torch.tanh(u)).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(agent.env_action(u), torch.tanh(u))




def test_nops_agents_update_as_separate_learners():
    """NoPS is N separate learners (the authors' TrainState per agent): one ppo_update moves agent i exactly
    as agent i's network trained alone on agent i's data, with its own clipping and advantage normalisation.
    IPPO's: a MAPPO critic alone would not see the others' observations (test_design keeps the update identical)."""
    script = load_script("ippo_hyper_vmas")
    n, batch_size = 3, 64
    args, agent = small_agent(script, "nops", n)
    args = dataclasses.replace(args, update_epochs=2, num_minibatches=2, max_grad_norm=0.5)
    torch.manual_seed(7)
    obs, actions = torch.randn(n, batch_size, 6), torch.randint(0, 4, (n, batch_size))
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(obs, agent.generate(obs), actions)
    # agent 0's returns are far off (its gradient is clipped, the others' not); advantages of other means and scales
    scale = torch.tensor([[100.0], [1.0], [0.1]])
    batch = dict(obs=obs, actions=actions, logprobs=logprobs + 0.1 * torch.randn(n, batch_size), values=values,
                 advantages=scale * torch.randn(n, batch_size) + scale, returns=scale * torch.randn(n, batch_size))
    alone = []
    for i in range(n):
        args_alone = dataclasses.replace(args, n_agents=1)
        single = script.Agent(args_alone, 6, 4, True)
        single.load_state_dict({key: value[i: i + 1] for key, value in agent.state_dict().items()})
        optimizer = torch.optim.Adam(single.parameters(), lr=args.learning_rate, eps=1e-5)
        torch.manual_seed(0)  # the same minibatches
        script.ppo_update(single, optimizer, {key: value[i: i + 1] for key, value in batch.items()}, args_alone)
        alone.append(single.state_dict())
    before = {key: value.clone() for key, value in agent.state_dict().items()}
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    torch.manual_seed(0)
    script.ppo_update(agent, optimizer, batch, args)
    for key, value in agent.state_dict().items():
        for i in range(n):
            torch.testing.assert_close(value[i: i + 1], alone[i][key])
        assert not torch.equal(value, before[key])
