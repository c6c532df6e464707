"""REINFORCE in the Specialisation and Synchronisation games (section 3, appendix B, Tables 2, 6, 8).

The paper motivates HyperMARL with two n-player matrix games: n agents each pick one of n foods,
once per trial (a one-step episode with no observation). Independent policies (NoPS), one shared
policy (FuPS) and a shared policy told the agent's one-hot ID (FuPS+ID) are trained with
REINFORCE; this script reproduces that and adds the two HyperMARL generators of section 4
(hyper-linear: Eq. 5, hyper-mlp: Eq. 6) that produce the NoPS per-agent network.
Read top to bottom:

    1. Arguments        5. Metrics (gradient variance, interference, SND)
    2. Input validation 6. Algorithm (REINFORCE update, training loop over a batch of seeds)
    3. Environment      7. Checkpoints
    4. Networks         8. Main (single run, or --sweep: every game x n x method x seed)

Payoffs (our reading of section 3.1; section 3 of benchmark/results/matrix_games.md has the evidence):
  Specialisation: a food is split between the agents that chose it, so agent i gets 1 / k_i, k_i the
    number of agents (i included) that chose agent i's food: 1 for a unique choice, 1/n when all n
    agents share one food, and for 2 players 0.5 (same food) / 1 (different), which is Table 1. The
    team reward (the mean over agents) is (number of distinct foods chosen) / n.
  Synchronisation: every agent gets 1 if all n agents chose the same food, else 1/n (2 players:
    1 same / 0.5 different, the inverse of Table 1).
  Why not "1/n whenever a choice is shared" for Specialisation: a shared (FuPS) policy then earns at
  most 0.75 / 0.566 / 0.469 for n = 2 / 4 / 8 (uniform policy), but Table 6 reports FuPS
  .7493 / .6826 / .6545, which is what the split payoff gives a uniform policy (.75 / .6836 / .6564).
  Why "all agents match" for Synchronisation: Table 6 reports NoPS at n = 8 as .1250 +- 0 with
  sampled actions, exactly 1/n on every trial; a per-agent "k_i / n" payoff would give more than 1/n
  to any policies that are not deterministic and fully dispersed.
Trials: one trial = one play of the game by all n agents; --num-trials 10000 with --batch-size 10
  is 1,000 SGD updates. Each update is REINFORCE on the batch: every agent's rewards are normalised
  over the batch (mean 0, std 1, as PyTorch's REINFORCE example does; --returns), loss = -sum over
  trials and agents of normalised reward x log pi_i(a_i), SGD with learning rate 0.01 (Table 8).
  Table 8 does not say how returns enter the loss; of normalize / baseline / raw, normalize is the
  one that reproduces Table 6 (e.g. NoPS .999 +- .001 at every n: the others leave NoPS and FuPS+ID
  short of deterministic after 1,000 updates).
Evaluation: --eval-trials 1000 trials with argmax actions (Table 2; every trial is the same) and
  with sampled actions (Table 6); the reported reward is the mean over agents and trials.
Seeds are vectorised: --num-seeds S trains seeds seed .. seed+S-1 together (torch.func.vmap over
  stacked parameters); each seed draws its own random numbers, so a seed's run does not depend on
  which other seeds share the batch.

Quick start:  python reinforce_matrix_games.py --game specialisation --n-agents 8 --method hyper-mlp
              python reinforce_matrix_games.py --sweep      (Tables 2 and 6 + HyperMARL rows)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.func import functional_call, stack_module_state, vmap


# ===== 1. Arguments =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """first seed; --num-seeds S trains seeds seed .. seed+S-1 (evaluation draws use seed + 10000)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """kept for CleanRL compatibility: this script always runs on the CPU (networks of < 600 parameters)"""
    track: bool = False
    """if toggled, this experiment is tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "hypermarl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    runs_dir: str = "runs"
    """folder for TensorBoard logs (runs_dir/run_name, one run per seed)"""
    save_model: bool = False
    """if toggled, save every seed's final parameters to runs_dir/run_name/model.pt"""
    num_threads: int = 1
    """torch CPU threads (the networks are tiny: one thread is fastest)"""

    # Game
    game: str = "specialisation"
    """specialisation (1 / k_i: a food is split between the agents that chose it) | synchronisation (1 if all agents chose the same food, else 1/n)"""
    n_agents: int = 2
    """number of agents, also the number of foods (actions); at least 2"""

    # Method
    method: str = "nops"
    """nops | fups | fups-id (one-hot ID input) | hyper-linear (Eq. 5) | hyper-mlp (Eq. 6)"""
    hidden_size: int = 4
    """hidden units of every agent's network (NoPS and the HyperMARL target); FuPS and FuPS+ID use hidden_size * n_agents (Table 8 counts)"""
    hyper_linear_shared_bias: bool = True
    """[hyper-linear] the shared bias b of Eq. (5); without it the hypernetwork is exactly NoPS"""
    hypernet_embedding_dim: int = 4
    """[hyper-mlp] size of the learned, orthogonally initialised agent embedding"""
    hypernet_hidden_dims: list[int] = field(default_factory=lambda: [8])
    """[hyper-mlp] hidden layers of the hypernetwork (8: 210/308/504 parameters at n = 2/4/8, under FuPS+ID's 552 at n = 8)"""

    # REINFORCE (Table 8)
    num_trials: int = 10_000
    """training trials (one trial = every agent picks a food once); updates = num_trials // batch_size"""
    batch_size: int = 10
    """trials per SGD update"""
    learning_rate: float = 0.01
    """SGD learning rate"""
    returns: str = "normalize"
    """what multiplies log pi: normalize (each agent's rewards over the batch to mean 0, std 1) | baseline (minus the batch mean) | raw"""
    num_seeds: Optional[int] = None
    """seeds trained together as one batch (default: 1, or 5 with --sweep)"""

    # Evaluation and metrics
    eval_trials: int = 1_000
    """evaluation trials (argmax actions and sampled actions)"""
    eval_interval: int = 100
    """training trials between evaluations (the learning curves)"""
    log_interval: int = 10
    """updates between TensorBoard points of the training metrics"""

    # Sweep
    sweep: bool = False
    """if toggled, run every game x n x method x seed and write the tables of Tables 2 and 6"""
    sweep_games: list[str] = field(default_factory=lambda: ["specialisation", "synchronisation"])
    """[sweep] games"""
    sweep_n_agents: list[int] = field(default_factory=lambda: [2, 4, 8])
    """[sweep] numbers of agents"""
    sweep_methods: list[str] = field(default_factory=lambda: ["nops", "fups", "fups-id", "hyper-linear", "hyper-mlp"])
    """[sweep] methods"""
    results_dir: str = "benchmark/results"
    """[sweep] folder for matrix_games_sweep.md / .json and matrix_games_n{max n}.png"""


GAMES = ("specialisation", "synchronisation")
RETURNS = ("normalize", "baseline", "raw")
METHODS = ("nops", "fups", "fups-id", "hyper-linear", "hyper-mlp")
METHOD_NAMES = {"nops": "NoPS", "fups": "FuPS", "fups-id": "FuPS+ID", "hyper-linear": "HyperMARL (linear)",
                "hyper-mlp": "HyperMARL (MLP)"}
# Table 8: total parameters per method.
PAPER_PARAMS = {"nops": {2: 36, 4: 112, 8: 384}, "fups": {2: 34, 4: 100, 8: 328}, "fups-id": {2: 42, 4: 148, 8: 552}}
# Table 2 (argmax evaluation) and Table 6 (sampled actions): (mean, std) for n = 2, 4, 8.
PAPER_TABLE2 = {
    ("specialisation", "nops"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (1.00, 0.00)},
    ("specialisation", "fups"): {2: (0.50, 0.00), 4: (0.25, 0.00), 8: (0.13, 0.00)},
    ("specialisation", "fups-id"): {2: (1.00, 0.00), 4: (0.95, 0.10), 8: (0.53, 0.09)},
    ("synchronisation", "nops"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (0.13, 0.00)},
    ("synchronisation", "fups"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (1.00, 0.00)},
    ("synchronisation", "fups-id"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (0.30, 0.35)},
}
PAPER_TABLE6 = {
    ("specialisation", "nops"): {2: (.9996, .0004), 4: (.9988, .0007), 8: (.9989, .0008)},
    ("specialisation", "fups"): {2: (.7493, .0062), 4: (.6826, .0039), 8: (.6545, .0025)},
    ("specialisation", "fups-id"): {2: (.9999, .0002), 4: (.9995, .0003), 8: (.7275, .0293)},
    ("synchronisation", "nops"): {2: (.9993, .0004), 4: (.9976, .0022), 8: (.1250, 0.0)},
    ("synchronisation", "fups"): {2: (.9999, .0002), 4: (1.0, 0.0), 8: (.3000, .3500)},
    ("synchronisation", "fups-id"): {2: (.9999, 0.0), 4: (.9999, .0003), 8: (.1250, 0.0)},
}


# ===== 2. Input validation =====
class ArgError(ValueError):
    """A bad flag value: reported as one line, exit status 2, nothing written."""


def parse_args(argv=None) -> Args:
    """tyro's parser, with its boxed error message folded into one ArgError line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Args, args=argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        # The box's title comes first, then the message up to the first blank line: keep the
        # message, on one line, and drop the drawing.
        rows = [line.strip("│╭╮╰╯─|+-= \t") for line in captured.getvalue().splitlines()]
        message = list(itertools.takewhile(bool, itertools.dropwhile(lambda row: not row, rows[1:])))
        raise ArgError(" ".join(message) if message else "invalid arguments; see --help")


def validate_args(args: Args) -> Args:
    """Checks every flag; raises ArgError naming the flag. Fills --num-seeds."""

    def positive(name):
        value = getattr(args, name)
        if not value > 0:
            raise ArgError(f"--{name.replace('_', '-')}: must be positive, got {value}")

    games = args.sweep_games if args.sweep else [args.game]
    methods = args.sweep_methods if args.sweep else [args.method]
    ns = args.sweep_n_agents if args.sweep else [args.n_agents]
    flag = "--sweep-" if args.sweep else "--"
    if not games or not methods or not ns:
        raise ArgError(f"{flag}{'games' if not games else 'methods' if not methods else 'n-agents'}: must not be empty")
    for game in games:
        if game not in GAMES:
            raise ArgError(f"{flag}game{'s' if args.sweep else ''}: must be one of {', '.join(GAMES)}, got {game!r}")
    for method in methods:
        if method not in METHODS:
            raise ArgError(f"{flag}method{'s' if args.sweep else ''}: must be one of {', '.join(METHODS)}, got {method!r}")
    for n in ns:
        if n < 2:
            raise ArgError(f"{flag}n-agents: must be at least 2, got {n}")
    if args.returns not in RETURNS:
        raise ArgError(f"--returns: must be one of {', '.join(RETURNS)}, got {args.returns!r}")
    if args.num_seeds is None:
        args.num_seeds = 5 if args.sweep else 1
    for name in ("num_trials", "batch_size", "learning_rate", "num_seeds", "eval_trials", "eval_interval",
                 "log_interval", "hidden_size", "hypernet_embedding_dim", "num_threads"):
        positive(name)
    if args.num_trials < args.batch_size:
        raise ArgError(f"--num-trials: must be at least --batch-size = {args.batch_size}, got {args.num_trials}")
    if len(args.hypernet_hidden_dims) == 0 or min(args.hypernet_hidden_dims) <= 0:
        raise ArgError(f"--hypernet-hidden-dims: must be one or more positive sizes, got {args.hypernet_hidden_dims}")
    if not math.isfinite(args.learning_rate):
        raise ArgError(f"--learning-rate: must be finite, got {args.learning_rate}")
    return args


# ===== 3. Environment =====
def payoff(game: str, actions: torch.Tensor, n_agents: int) -> torch.Tensor:
    """Every agent's reward for joint actions (..., n_agents) of foods in [0, n_agents).

    specialisation: 1 / k_i, k_i = agents (i included) that chose agent i's food (Table 1 for n = 2).
    synchronisation: 1 if all agents chose the same food, else 1/n.
    """
    counts = F.one_hot(actions, n_agents).sum(-2)  # (..., n_foods)
    k = counts.gather(-1, actions).float()  # (..., n_agents)
    if game == "specialisation":
        return 1.0 / k
    all_match = (k == n_agents).all(-1, keepdim=True)
    return torch.where(all_match, torch.ones_like(k), torch.full_like(k, 1.0 / n_agents))


def expected_team_reward(game: str, probs: torch.Tensor) -> torch.Tensor:
    """Exact expected mean-over-agents reward of independent policies probs (..., n_agents, n_foods)."""
    n = probs.shape[-2]
    if game == "specialisation":  # E[distinct foods] / n
        return (1.0 - (1.0 - probs).prod(-2)).sum(-1) / n
    p_match = probs.prod(-2).sum(-1)
    return p_match + (1.0 - p_match) / n


def shared_policy_return_2p(alpha):
    """Theorem B.1, Eq. (13): a shared policy with P(a = 0) = alpha earns -alpha^2 + alpha + 0.5 <= 0.75."""
    return -alpha ** 2 + alpha + 0.5


def sample_actions(probs: torch.Tensor, num: int, generators: list) -> torch.Tensor:
    """Inverse-CDF sampling with one generator per seed: probs (S, n_agents, A) -> actions (S, num, n_agents)."""
    S, n, A = probs.shape
    u = torch.stack([torch.rand(n, num, generator=g) for g in generators])  # (S, n, num)
    cdf = probs.cumsum(-1).contiguous()
    actions = torch.searchsorted(cdf, u).clamp_(max=A - 1)  # first food whose CDF reaches u
    return actions.transpose(1, 2)


# ===== 4. Networks =====
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def layer_shapes(sizes: list[int]) -> list[tuple[int, int]]:
    return list(zip(sizes[:-1], sizes[1:]))


def num_target_params(sizes: list[int]) -> int:
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in layer_shapes(sizes))


def target_init_vector(sizes: list[int], gains: list[float]) -> torch.Tensor:
    """One flattened parameter vector of the target MLP, initialised as PPO would: orthogonal
    weights with the layer's gain, zero biases (section 4.3)."""
    chunks = []
    for (fan_in, fan_out), gain in zip(layer_shapes(sizes), gains):
        weight = torch.empty(fan_out, fan_in)
        nn.init.orthogonal_(weight, gain)
        chunks += [weight.T.flatten(), torch.zeros(fan_out)]
    return torch.cat(chunks)


def unflatten_params(theta: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(..., m) flat parameters -> [(W (..., fan_in, fan_out), b (..., 1, fan_out)) per layer].

    One split rather than a slice per tensor: a slice's backward writes a zero tensor of all m
    parameters, a split's backward one concatenation.
    """
    shapes = layer_shapes(sizes)
    chunks = theta.split([n for fan_in, fan_out in shapes for n in (fan_in * fan_out, fan_out)], dim=-1)
    return [(chunks[2 * k].unflatten(-1, shape), chunks[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(shapes)]


def batched_mlp(x: torch.Tensor, params, activation) -> torch.Tensor:
    """All agents' networks in one batched matmul per layer.

    x: (n_agents, batch, fan_in), agent-major. W: (n_agents, fan_in, fan_out) is shared by the
    agent's whole batch; (n_agents, batch, fan_in, fan_out) only for per-sample weights (the
    agent+obs ablation).
    """
    for k, (weight, bias) in enumerate(params):
        if weight.dim() == 3:
            x = torch.baddbmm(bias, x, weight)
        else:
            x = (x.unsqueeze(-2) @ weight + bias).squeeze(-2)
        if k < len(params) - 1:
            x = activation(x)
    return x


class LinearHypernet(nn.Module):
    """Eq. (5): theta_i = 1_i W + b, a one-hot agent ID into one linear layer.

    Row i of W is agent i's whole flattened network; b is shared by all agents. With
    shared_bias=False this is exactly n independent networks (each agent's gradient only reaches
    its own row). obs_dim > 0 is the ablation without gradient decoupling: the input becomes
    [1_i, o] and the weights are generated per sample.
    """

    def __init__(self, n_agents, sizes, gains, init="scaled", shared_bias=True, obs_dim=0):
        super().__init__()
        self.n_agents, self.sizes, self.obs_dim = n_agents, list(sizes), obs_dim
        self.head = nn.Linear(n_agents + obs_dim, num_target_params(sizes), bias=shared_bias)
        self.register_buffer("ids", torch.eye(n_agents))
        if init == "scaled":  # section 4.3: every agent starts with its own orthogonal network
            with torch.no_grad():
                self.head.weight.zero_()
                for i in range(n_agents):
                    self.head.weight[:, i] = target_init_vector(sizes, gains)
                if shared_bias:
                    self.head.bias.zero_()

    def forward(self, obs=None):
        if self.obs_dim == 0:
            theta = self.head(self.ids)  # (n_agents, m): generated once, used for every sample
        else:
            ids = self.ids.unsqueeze(1).expand(-1, obs.shape[1], -1)
            theta = self.head(torch.cat([ids, obs], -1))  # (n_agents, batch, m)
        return unflatten_params(theta, self.sizes)


class MLPHypernet(nn.Module):
    """Eq. (6): theta_i = f(g(e_i)), an MLP g on the agent embedding e_i, then a linear head f.

    Embeddings are learned and orthogonally initialised (section 4.2), or fixed one-hot IDs.
    Section 4.3 (initialisation scaling): every column of the head is a flattened target network
    with PPO's orthogonal init, and g's output is normalised to unit length, so each generated
    network f(g(e_i)) is a unit-norm mix of orthogonal networks: the same scale as the target's
    init, whatever the embedding.
    """

    def __init__(self, n_agents, sizes, gains, embedding_dim, hidden_dims, embedding="learned",
                 init="scaled", obs_dim=0):
        super().__init__()
        self.sizes, self.obs_dim = list(sizes), obs_dim
        if embedding == "learned":
            self.embedding = nn.Parameter(nn.init.orthogonal_(torch.empty(n_agents, embedding_dim)))
        else:
            self.register_buffer("embedding", torch.eye(n_agents))
        layers, width = [], self.embedding.shape[1] + obs_dim
        for hidden in hidden_dims:
            layers += [layer_init(nn.Linear(width, hidden)), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_target_params(sizes))
        if init == "scaled":
            with torch.no_grad():
                for k in range(width):
                    self.head.weight[:, k] = target_init_vector(sizes, gains)
                self.head.bias.zero_()

    def forward(self, obs=None):
        z = self.embedding
        if self.obs_dim:
            z = torch.cat([z.unsqueeze(1).expand(-1, obs.shape[1], -1), obs], -1)
        features = F.normalize(self.trunk(z), dim=-1)
        return unflatten_params(self.head(features), self.sizes)


# The policies below take no input: every trial is the same one-step game, so an agent's policy
# is its network applied to the constant observation 1 (NoPS, FuPS, HyperMARL targets) or to its
# one-hot ID (FuPS+ID). forward() returns every agent's action logits (n_agents, n_foods).
class IndependentPolicies(nn.Module):
    """NoPS: agent i has its own 1 -> hidden -> n network, PyTorch's default nn.Linear init,
    stored stacked (n_agents, fan_in, fan_out) for batched_mlp. Parameters: n (2h + 1 + (h+1) n)."""

    def __init__(self, n_agents, hidden):
        super().__init__()
        self.sizes = [1, hidden, n_agents]
        layers = [[nn.Linear(i, o) for i, o in layer_shapes(self.sizes)] for _ in range(n_agents)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([agent[k].weight.detach().T for agent in layers])) for k in range(2))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([agent[k].bias.detach().unsqueeze(0) for agent in layers])) for k in range(2))
        self.register_buffer("obs", torch.ones(n_agents, 1, 1))

    def forward(self):
        return batched_mlp(self.obs, list(zip(self.weights, self.biases)), torch.relu).squeeze(1)


class SharedPolicy(nn.Module):
    """FuPS: one network for all agents on the constant observation (input 1); FuPS+ID: on the
    one-hot ID (input n). Hidden hidden * n (Table 8: 34/100/328 and 42/148/552 for n = 2/4/8)."""

    def __init__(self, n_agents, hidden, use_id):
        super().__init__()
        self.n_agents = n_agents
        self.net = nn.Sequential(nn.Linear(n_agents if use_id else 1, hidden * n_agents), nn.ReLU(),
                                 nn.Linear(hidden * n_agents, n_agents))
        self.register_buffer("obs", torch.eye(n_agents) if use_id else torch.ones(1, 1))

    def forward(self):
        return self.net(self.obs).expand(self.n_agents, -1)


class HyperPolicy(nn.Module):
    """HyperMARL: a hypernetwork generates every agent's NoPS network (1 -> hidden -> n), which is
    applied to the constant observation. Gains: sqrt(2) hidden layer, 0.01 policy head (section 4.3)."""

    def __init__(self, n_agents, hidden, kind, args: Args):
        super().__init__()
        sizes, gains = [1, hidden, n_agents], [math.sqrt(2), 0.01]
        if kind == "linear":
            self.hypernet = LinearHypernet(n_agents, sizes, gains, shared_bias=args.hyper_linear_shared_bias)
        else:
            self.hypernet = MLPHypernet(n_agents, sizes, gains, args.hypernet_embedding_dim, args.hypernet_hidden_dims)
        self.register_buffer("obs", torch.ones(n_agents, 1, 1))

    def forward(self):
        return batched_mlp(self.obs, self.hypernet(), torch.relu).squeeze(1)


def make_policy(method: str, n_agents: int, args: Args) -> nn.Module:
    if method == "nops":
        return IndependentPolicies(n_agents, args.hidden_size)
    if method in ("fups", "fups-id"):
        return SharedPolicy(n_agents, args.hidden_size, use_id=method == "fups-id")
    if method in ("hyper-linear", "hyper-mlp"):
        return HyperPolicy(n_agents, args.hidden_size, method.split("-")[1], args)
    raise ValueError(method)


def count_params(method: str, n_agents: int, args: Args) -> int:
    return sum(p.numel() for p in make_policy(method, n_agents, args).parameters())


class Population:
    """S seeds of one method, stacked: parameter tensors carry a leading seed dimension and one
    vmapped functional_call runs every seed's policy. Seed s is initialised after torch.manual_seed(s)."""

    def __init__(self, method: str, n_agents: int, seeds: list[int], args: Args):
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(make_policy(method, n_agents, args))
        self.base = models[0]
        self.params, self.buffers = stack_module_state(models)
        self._forward = vmap(lambda p, b: functional_call(self.base, (p, b), ()))

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def logits(self) -> torch.Tensor:
        """(S, n_agents, n_foods)"""
        return self._forward(self.params, self.buffers)


# ===== 5. Metrics =====
def js_distance_categorical(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between categorical distributions (..., k)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b.clamp_min(1e-30))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0).sqrt()


def policy_snd(probs: torch.Tensor) -> torch.Tensor:
    """Eq. (9) for observation-free policies: mean pairwise Jensen-Shannon distance, (S, n, A) -> (S,)."""
    n = probs.shape[1]
    i, j = torch.triu_indices(n, n, offset=1)
    return js_distance_categorical(probs[:, i], probs[:, j]).mean(-1)


def per_agent_gradients(per_agent_loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d(loss_i)/d(all trainable parameters) for every agent i and seed: (S, n) -> (n, S, P), one
    batched backward pass. Seeds have disjoint parameters, so one pass serves them all."""
    S, n = per_agent_loss.shape
    basis = torch.eye(n).unsqueeze(1).expand(n, S, n)
    grads = torch.autograd.grad(per_agent_loss, params, grad_outputs=basis, is_grads_batched=True,
                                allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(n, S, -1) for g in grads], -1)


def interference_per_seed(agent_grads: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the agents' gradients (n, S, P) -> (S,): 0 for disjoint
    parameters (NoPS), > 0 when updates agree, < 0 when they conflict. A zero gradient counts as 0."""
    n = agent_grads.shape[0]
    unit = F.normalize(agent_grads, dim=-1).transpose(0, 1)  # (S, n, P)
    cosine = unit @ unit.transpose(1, 2)
    return (cosine.sum((1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))


def gradient_variance_per_seed(grad: torch.Tensor) -> torch.Tensor:
    """Section 5.2: the variance across all actor parameters of one update's gradient, (S, P) -> (S,)."""
    return grad.var(-1)


# ===== 6. Algorithm =====
def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, mode: str) -> torch.Tensor:
    """REINFORCE (Williams, 1992) for a one-step game, every agent's loss: (S, n) =
    -sum over the batch of R_i x log pi_i(a_i), R_i agent i's reward (raw), minus its batch mean
    (baseline), or normalised over the batch to mean 0, std 1 (normalize)."""
    logp = torch.log_softmax(logits, -1).gather(-1, actions.transpose(1, 2))  # (S, n, B)
    returns = rewards.transpose(1, 2)
    if mode in ("baseline", "normalize"):
        returns = returns - returns.mean(-1, keepdim=True)
    if mode == "normalize":
        batch = returns.shape[-1]
        returns = returns / (returns.std(-1, keepdim=True, correction=min(1, batch - 1)) + np.finfo(np.float32).eps)
    return -(returns * logp).sum(-1)


def evaluate_policies(pop: Population, game: str, seeds: list[int], eval_trials: int) -> dict:
    """Mean-over-agents reward with argmax actions (Table 2; every trial is the same joint action) and
    over eval_trials sampled trials (Table 6, common random numbers: seed + 10000 each time)."""
    with torch.no_grad():
        probs = torch.softmax(pop.logits(), -1)
        n = probs.shape[1]
        argmax = payoff(game, probs.argmax(-1), n).mean(-1)
        generators = [torch.Generator().manual_seed(seed + 10_000) for seed in seeds]
        sampled = payoff(game, sample_actions(probs, eval_trials, generators), n).mean((1, 2))
        return dict(argmax=argmax, sampled=sampled, expected=expected_team_reward(game, probs), snd=policy_snd(probs))


def train(game: str, method: str, n_agents: int, seeds: list[int], args: Args, writers=None, pop=None) -> dict:
    """REINFORCE for every seed at once; returns per-seed final metrics and learning curves.
    pop: an existing Population to train (default: a fresh one for method and seeds)."""
    pop = Population(method, n_agents, seeds, args) if pop is None else pop
    params = pop.parameters()
    optimizer = torch.optim.SGD(params, lr=args.learning_rate)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    num_updates = args.num_trials // args.batch_size
    history = {key: [] for key in ("reward", "loss", "grad_var", "grad_norm", "interference")}
    curve = {key: [] for key in ("trials", "argmax", "sampled", "snd")}

    def record_eval(trials):
        ev = evaluate_policies(pop, game, seeds, args.eval_trials)
        curve["trials"].append(trials)
        for key in ("argmax", "sampled", "snd"):
            curve[key].append(ev[key])
        if writers:
            for s, writer in enumerate(writers):
                writer.add_scalar("eval/episodic_return", ev["argmax"][s].item(), trials)
                writer.add_scalar("eval/episodic_return_sampled", ev["sampled"][s].item(), trials)
                writer.add_scalar("diversity/snd", ev["snd"][s].item(), trials)
        return ev

    record_eval(0)
    start = time.time()
    for update in range(1, num_updates + 1):
        logits = pop.logits()
        with torch.no_grad():
            actions = sample_actions(torch.softmax(logits, -1), args.batch_size, generators)  # (S, B, n)
            rewards = payoff(game, actions, n_agents)
        per_agent_loss = reinforce_loss(logits, actions, rewards, args.returns)  # (S, n)
        agent_grads = per_agent_gradients(per_agent_loss, params)  # (n, S, P)
        grad = agent_grads.sum(0)  # d(sum_i loss_i)/d(params), per seed
        offset = 0
        for p in params:  # the summed per-agent gradients are the update's gradient
            size = p[0].numel()
            p.grad = grad[:, offset: offset + size].reshape(p.shape).clone()
            offset += size
        optimizer.step()
        with torch.no_grad():
            stats = dict(reward=rewards.mean((1, 2)), loss=per_agent_loss.sum(-1), grad_var=gradient_variance_per_seed(grad),
                         grad_norm=grad.norm(dim=-1), interference=interference_per_seed(agent_grads))
        for key, value in stats.items():
            history[key].append(value)
        trials = update * args.batch_size
        if writers and (update % args.log_interval == 0 or update == num_updates):
            sps = int(trials * n_agents / max(time.time() - start, 1e-9))
            for s, writer in enumerate(writers):
                writer.add_scalar("charts/episodic_return", stats["reward"][s].item(), trials)
                writer.add_scalar("losses/policy_loss", stats["loss"][s].item(), trials)
                writer.add_scalar("grad/actor_var", stats["grad_var"][s].item(), trials)
                writer.add_scalar("grad/actor_norm", stats["grad_norm"][s].item(), trials)
                writer.add_scalar("grad/interference", stats["interference"][s].item(), trials)
                writer.add_scalar("charts/SPS", sps, trials)
        if trials % args.eval_interval == 0 or update == num_updates:
            if not curve["trials"] or curve["trials"][-1] != trials:
                record_eval(trials)
    final = evaluate_policies(pop, game, seeds, args.eval_trials)
    stacked = {key: torch.stack(value) for key, value in history.items()}  # (U, S)
    return dict(
        game=game, method=method, n_agents=n_agents, seeds=list(seeds), updates=num_updates,
        params=count_params(method, n_agents, args),
        argmax=final["argmax"].tolist(), sampled=final["sampled"].tolist(), expected=final["expected"].tolist(),
        snd=final["snd"].tolist(),
        grad_var=stacked["grad_var"].mean(0).tolist(),  # averaged over training (section 5.2)
        interference=stacked["interference"].mean(0).tolist(),
        train_reward_last100=stacked["reward"][-100:].mean(0).tolist(),
        curve=dict(trials=curve["trials"], argmax=torch.stack(curve["argmax"], 1).tolist(),
                   sampled=torch.stack(curve["sampled"], 1).tolist(), snd=torch.stack(curve["snd"], 1).tolist()),
        population=pop,
    )


def format_cell(ours, paper, digits):
    """'mean ± std (paper m ± s)' + ' ✗' when |ours - paper| > max(std ours, std paper) + the paper's rounding."""
    mean, std = float(np.mean(ours)), float(np.std(ours))  # np.std (ddof 0): the paper's 0.30 ± 0.35 is 1 of 5 seeds
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if paper is None:
        return text, None
    unit = 10 ** -digits  # the paper rounds mean and std to this: half a unit of slack on each
    off = abs(mean - paper[0]) > max(std, paper[1] + 0.5 * unit) + 0.5 * unit + 1e-12
    return text + f" ({paper[0]:.{digits}f} ± {paper[1]:.{digits}f})" + (" ✗" if off else ""), off


def game_tables(games, methods, ns, cell) -> list[str]:
    """One markdown table per game (rows: methods, columns: n); cell(game, method, n) -> text."""
    header = "| Method | " + " | ".join(str(n) for n in ns) + " |\n|---|" + "---|" * len(ns)
    lines = []
    for game in games:
        lines += [f"**{game.capitalize()} game**\n", header]
        for method in methods:
            lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cell(game, method, n) for n in ns) + " |")
        lines.append("")
    return lines


def sweep_tables(results: list[dict], args: Args) -> tuple[str, list[str]]:
    """Markdown in the layout of Tables 2 and 6 (rows: methods, columns: n), plus parameters and gradients."""
    by_key = {(r["game"], r["method"], r["n_agents"]): r for r in results}
    ns = sorted({r["n_agents"] for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    games = [g for g in GAMES if any(r["game"] == g for r in results)]
    lines, misses = [], []
    for title, key, paper_table, digits in (
            ("Table 2 (argmax evaluation)", "argmax", PAPER_TABLE2, 2),
            ("Table 6 (sampled actions)", "sampled", PAPER_TABLE6, 4)):

        def paper_cell(game, method, n):
            r = by_key.get((game, method, n))
            if r is None:
                return "—"
            text, off = format_cell(r[key], paper_table.get((game, method), {}).get(n), digits)
            if off:
                misses.append(f"{title.split(' (')[0]} {game} {METHOD_NAMES[method]} n={n}: {text}")
            return text

        lines.append(f"### {title}: ours mean ± std over {args.num_seeds} seeds (paper's value), ✗ = more than one std away\n")
        lines += game_tables(games, methods, ns, paper_cell)
    lines += ["### Parameters per method (Table 8 in brackets)\n",
              "| Method | " + " | ".join(str(n) for n in ns) + " |\n|---|" + "---|" * len(ns)]
    for method in methods:
        cells = []
        for n in ns:
            paper = PAPER_PARAMS.get(method, {}).get(n)
            cells.append(f"{count_params(method, n, args)}" + (f" ({paper})" if paper is not None else ""))
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    lines.append("")
    for title, key, fmt in (("Gradient variance (variance across all policy parameters of each update's gradient, averaged over training)", "grad_var", ".2e"),
                            ("Interference (mean pairwise cosine similarity of the agents' gradients, averaged over training)", "interference", ".3f"),
                            ("SND (mean pairwise Jensen-Shannon distance between agents' final policies)", "snd", ".3f")):

        def stat_cell(game, method, n, key=key, fmt=fmt):
            r = by_key.get((game, method, n))
            return "—" if r is None else f"{np.mean(r[key]):{fmt}} ± {np.std(r[key]):{fmt}}"

        lines.append(f"### {title}\n")
        lines += game_tables(games, methods, ns, stat_cell)
    return "\n".join(lines), misses


def rounded(value, digits=6):
    """Floats rounded (significant digits) for a compact JSON."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def plot_curves(results: list[dict], n_agents: int, path: str) -> None:
    """Evaluation reward against training trials per method at n_agents, both games, argmax and sampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = [g for g in GAMES if any(r["game"] == g and r["n_agents"] == n_agents for r in results)]
    fig, axes = plt.subplots(len(games), 2, figsize=(10, 3.6 * len(games)), squeeze=False)
    for row, game in enumerate(games):
        for col, (key, label) in enumerate((("argmax", "argmax actions (Table 2)"), ("sampled", "sampled actions (Table 6)"))):
            ax = axes[row][col]
            for method in METHODS:
                r = next((r for r in results if (r["game"], r["method"], r["n_agents"]) == (game, method, n_agents)), None)
                if r is None:
                    continue
                x = np.array(r["curve"]["trials"])
                y = np.array(r["curve"][key])  # (S, T)
                mean, std = y.mean(0), y.std(0)
                k = METHODS.index(method)  # layered widths and dashes keep coinciding curves visible
                line, = ax.plot(x, mean, label=METHOD_NAMES[method], linewidth=3.2 - 0.6 * k,
                                linestyle=["-", "-", "--", "-.", ":"][k])
                ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=line.get_color(), alpha=0.15)
            ax.set_title(f"{game.capitalize()}, n = {n_agents}: {label}")
            ax.set_xlabel("training trials")
            ax.set_ylabel("evaluation reward (mean over agents)")
            ax.set_ylim(0, 1.05)
            ax.grid(True, linestyle="--", alpha=0.5)
    for ax in axes.flat:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ===== 7. Checkpoints =====
def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# ===== 8. Main =====
def make_writers(args: Args, game: str, n_agents: int, method: str, seeds: list[int]):
    from torch.utils.tensorboard import SummaryWriter

    writers, stamp = [], int(time.time())
    config_table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    for seed in seeds:
        run_name = f"matrix_{game}_n{n_agents}__{args.exp_name}__{method}__{seed}__{stamp}"
        writer = SummaryWriter(os.path.join(args.runs_dir, run_name))
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{config_table}|game|{game}|\n|method|{method}|\n|n_agents|{n_agents}|\n|run_seed|{seed}|")
        writers.append(writer)
    return writers


def main(argv=None) -> int:
    try:
        args = validate_args(parse_args(argv))
        if args.track:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ArgError("--track: wandb is not installed (pip install wandb)")
    except ArgError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # TRY NOT TO MODIFY: seeding (each seed's model and sampling are seeded again inside train())
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=f"matrix__{args.exp_name}__{args.seed}__{int(time.time())}", save_code=True)

    if not args.sweep:
        print(f"parameters: {METHOD_NAMES[args.method]} {count_params(args.method, args.n_agents, args)}"
              + (f" (Table 8: {PAPER_PARAMS[args.method][args.n_agents]})" if args.n_agents in PAPER_PARAMS.get(args.method, {}) else ""))
        writers = make_writers(args, args.game, args.n_agents, args.method, seeds)
        start = time.time()
        try:
            result = train(args.game, args.method, args.n_agents, seeds, args, writers)
            for s, writer in enumerate(writers):
                writer.add_scalar("eval/final_grad_var_mean", result["grad_var"][s], args.num_trials)
                writer.add_scalar("eval/final_interference_mean", result["interference"][s], args.num_trials)
        finally:
            for writer in writers:
                writer.close()
        if args.save_model:
            pop = result["population"]
            for s, (seed, writer) in enumerate(zip(seeds, writers)):
                save_checkpoint(os.path.join(writer.log_dir, "model.pt"),
                                dict(args=dataclasses.asdict(args), seed=seed,
                                     model={k: v[s].detach().clone() for k, v in pop.params.items()}))
        for s, seed in enumerate(seeds):
            print(f"seed={seed} eval/episodic_return={result['argmax'][s]:.4f} "
                  f"eval/episodic_return_sampled={result['sampled'][s]:.4f} grad/actor_var={result['grad_var'][s]:.3e} "
                  f"grad/interference={result['interference'][s]:.4f} diversity/snd={result['snd'][s]:.4f}")
        print(f"{args.game} n={args.n_agents} {METHOD_NAMES[args.method]}: argmax {np.mean(result['argmax']):.4f} ± "
              f"{np.std(result['argmax']):.4f}, sampled {np.mean(result['sampled']):.4f} ± {np.std(result['sampled']):.4f} "
              f"({time.time() - start:.1f} s, runs in {args.runs_dir})")
        return 0

    start, results = time.time(), []
    for n in args.sweep_n_agents:
        for game in args.sweep_games:
            for method in args.sweep_methods:
                writers = make_writers(args, game, n, method, seeds)
                t0 = time.time()
                try:
                    result = train(game, method, n, seeds, args, writers)
                finally:
                    for writer in writers:
                        writer.close()
                result.pop("population")
                results.append(result)
                print(f"{game:15s} n={n} {METHOD_NAMES[method]:18s} params={result['params']:4d} "
                      f"argmax {np.mean(result['argmax']):.3f} ± {np.std(result['argmax']):.3f}  "
                      f"sampled {np.mean(result['sampled']):.4f} ± {np.std(result['sampled']):.4f}  "
                      f"grad var {np.mean(result['grad_var']):.2e}  interference {np.mean(result['interference']):.3f}  "
                      f"({time.time() - t0:.1f} s)", flush=True)
    runtime = time.time() - start
    tables, misses = sweep_tables(results, args)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    command = "python reinforce_matrix_games.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Specialisation and Synchronisation games: REINFORCE sweep\n\n"
              f"Generated by `{command}`.\n\n"
              f"- Runtime: {runtime:.1f} s for {len(results)} configurations x {args.num_seeds} seeds "
              f"({args.num_trials} trials, batch {args.batch_size}, {args.num_trials // args.batch_size} updates each)\n"
              f"- Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.num_threads} thread(s)\n"
              f"- Seeds: {seeds}; evaluation: {args.eval_trials} trials\n\n")
    miss_text = "### Cells more than one std from the paper\n\n" + ("\n".join(f"- {m}" for m in misses) if misses else "- none") + "\n"
    os.makedirs(args.results_dir, exist_ok=True)
    md_path = os.path.join(args.results_dir, "matrix_games_sweep.md")
    with open(md_path + ".tmp", "w") as f:
        f.write(header + tables + "\n" + miss_text)
    os.replace(md_path + ".tmp", md_path)
    json_path = os.path.join(args.results_dir, "matrix_games_sweep.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(rounded(dict(command=command, runtime_s=runtime, machine=cpu, args=dataclasses.asdict(args),
                               results=results)), f)
    os.replace(json_path + ".tmp", json_path)
    n_plot = max(args.sweep_n_agents)
    png_path = os.path.join(args.results_dir, f"matrix_games_n{n_plot}.png")
    plot_curves(results, n_plot, png_path)
    print(tables)
    print(miss_text)
    print(f"sweep: {len(results)} configurations x {args.num_seeds} seeds in {runtime:.1f} s; wrote {md_path}, {json_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
