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
    4. Networks         8. Main (one game x n x method, a batch of seeds)

Payoffs (our reading of section 3.1; section 3 of benchmark/results/matrix_games.md has the evidence):
  Specialisation: a food is split between the agents that chose it, so agent i gets 1 / k_i, k_i the
    number of agents (i included) that chose agent i's food: 1 for a unique choice, 1/n when all n
    agents share one food, and for 2 players 0.5 (same food) / 1 (different), which is Table 1. The
    team payoff (the mean over agents) is (number of distinct foods chosen) / n.
  Synchronisation: every agent gets 1 if all n agents chose the same food, else 1/n (2 players:
    1 same / 0.5 different, the inverse of Table 1).
  Why not "1/n whenever a choice is shared" for Specialisation: a shared (FuPS) policy then earns at
  most 0.75 / 0.566 / 0.469 for n = 2 / 4 / 8 (uniform policy), but Table 6 reports FuPS
  .7493 / .6826 / .6545, which is what the split payoff gives a uniform policy (.75 / .6836 / .6564).
  Why "all agents match" for Synchronisation: Table 6 reports NoPS at n = 8 as .1250 +- 0 with
  sampled actions, exactly 1/n on every trial; a per-agent "k_i / n" payoff would give more than 1/n
  to any policies that are not deterministic and fully dispersed.
Reward (--reward team): every agent learns from the team payoff, as in Table 1, where both players
  always get the same payoff. It differs from each agent's own payoff only in Specialisation with
  n > 2. Of the two, only the team payoff reproduces FuPS+ID at n = 8 (Table 2: 0.53 +- 0.09; seeds
  1-20 give 0.59 +- 0.17 with it, 0.87 +- 0.15 with --reward individual). With both, the
  Synchronisation game at n = 8 is learned only when a batch happens to contain a trial where all 8
  agents match. That is rare (FuPS: 5 seeds in 100), and it is why Table 6's FuPS .30 +- .35 is one
  seed in five. benchmark/results/matrix_games.md has the measurements.
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
              python benchmark/matrix_games.py      (Tables 2 and 6 + HyperMARL rows, tables and plot)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.func import functional_call, stack_module_state, vmap


# ===== 1. Arguments =====
# A flag that only some methods use is None here, so that giving it to another method is an error,
# and validate_args fills it in; its docstring names the real default, so tyro's own "(default: None)" is hidden.
DOC_DEFAULT = tyro.conf.arg(help_behavior_hint="")


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
    """[hyper-linear] the shared bias b of Eq. (5); without it (--no-hyper-linear-shared-bias) the hypernetwork is exactly NoPS"""
    hypernet_embedding_dim: Annotated[Optional[int], DOC_DEFAULT] = None
    """[hyper-mlp] size of the learned, orthogonally initialised agent embedding (default: 4)"""
    hypernet_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """[hyper-mlp] hidden layers of each of the hypernetwork's generators (default: 8, giving 330/428/624 parameters at n = 2/4/8)"""

    # REINFORCE (Table 8)
    num_trials: int = 10_000
    """training trials (one trial = every agent picks a food once); updates = num_trials // batch_size"""
    batch_size: int = 10
    """trials per SGD update"""
    learning_rate: float = 0.01
    """SGD learning rate"""
    reward: str = "team"
    """what each agent learns from: team (the mean payoff over agents, the same for all: a common-payoff game, as Table 1 is) | individual (its own payoff, 1 / k_i in Specialisation)"""
    returns: str = "normalize"
    """what multiplies log pi: normalize (each agent's rewards over the batch to mean 0, std 1) | baseline (minus the batch mean) | raw"""
    num_seeds: int = 1
    """seeds trained together as one batch (benchmark/matrix_games.py runs the sweep of Tables 2 and 6)"""

    # Evaluation and metrics
    eval_trials: int = 1_000
    """evaluation trials (argmax actions and sampled actions)"""
    eval_interval: int = 100
    """training trials between evaluations (the learning curves)"""
    log_interval: int = 10
    """updates between TensorBoard points of the training metrics"""


GAMES = ("specialisation", "synchronisation")
RETURNS = ("normalize", "baseline", "raw")
REWARDS = ("team", "individual")
METHODS = ("nops", "fups", "fups-id", "hyper-linear", "hyper-mlp")
METHOD_NAMES = {"nops": "NoPS", "fups": "FuPS", "fups-id": "FuPS+ID", "hyper-linear": "HyperMARL (linear)",
                "hyper-mlp": "HyperMARL (MLP)"}
# Table 8: total parameters per method.
PAPER_PARAMS = {"nops": {2: 36, 4: 112, 8: 384}, "fups": {2: 34, 4: 100, 8: 328}, "fups-id": {2: 42, 4: 148, 8: 552}}
HYPER_MLP_DEFAULTS = dict(hypernet_embedding_dim=4, hypernet_hidden_dims=[8])
MAX_SEED = 2**32 - 1 - 10_000  # NumPy takes seeds below 2**32, and the evaluation environment uses seed + 10000


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


def validate_args(args: Args, methods: Optional[list[str]] = None) -> Args:
    """Checks every flag; raises ArgError naming the flag. Returns a copy with the [hyper-mlp]
    defaults filled in. methods: the methods these flags will train (default: --method); a flag
    marked [method] in --help is refused unless one of them is that method."""

    def positive(name):
        value = getattr(args, name)
        if not value > 0:
            raise ArgError(f"--{name.replace('_', '-')}: must be positive, got {value}")

    for field in dataclasses.fields(Args):  # inf and nan pass every comparison below: refuse them first
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgError(f"--{field.name.replace('_', '-')}: must be a finite number, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ArgError(f"--seed: must be between 0 and {MAX_SEED}, got {args.seed}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.exp_name):
        raise ArgError(f"--exp-name: must be a plain name (letters, digits, '.', '_', '-'), got {args.exp_name!r}")
    for flag, value, allowed in (("game", args.game, GAMES), ("method", args.method, METHODS),
                                 ("reward", args.reward, REWARDS), ("returns", args.returns, RETURNS)):
        if value not in allowed:
            raise ArgError(f"--{flag}: must be one of {', '.join(allowed)}, got {value!r}")
    trained = f"--method {args.method}" if methods is None else f"--methods {' '.join(methods)}"
    methods = [args.method] if methods is None else list(methods)
    for flag, given, method in (("--no-hyper-linear-shared-bias", not args.hyper_linear_shared_bias, "hyper-linear"),
                                ("--hypernet-embedding-dim", args.hypernet_embedding_dim is not None, "hyper-mlp"),
                                ("--hypernet-hidden-dims", args.hypernet_hidden_dims is not None, "hyper-mlp")):
        if given and method not in methods:
            raise ArgError(f"{flag}: only with --method {method}, got {trained}")
    args = dataclasses.replace(args, **{name: copy.copy(value) for name, value in HYPER_MLP_DEFAULTS.items()
                                        if getattr(args, name) is None})
    if args.n_agents < 2:
        raise ArgError(f"--n-agents: must be at least 2, got {args.n_agents}")
    for name in ("num_trials", "batch_size", "learning_rate", "num_seeds", "eval_trials", "eval_interval",
                 "log_interval", "hidden_size", "hypernet_embedding_dim", "num_threads"):
        positive(name)
    if args.seed + args.num_seeds - 1 > MAX_SEED:
        raise ArgError(f"--num-seeds: the last seed, {args.seed} + {args.num_seeds} - 1, must be at most {MAX_SEED}")
    if args.num_trials < args.batch_size:
        raise ArgError(f"--num-trials: must be at least --batch-size = {args.batch_size}, got {args.num_trials}")
    if len(args.hypernet_hidden_dims) == 0 or min(args.hypernet_hidden_dims) <= 0:
        raise ArgError(f"--hypernet-hidden-dims: must be one or more positive sizes, got {args.hypernet_hidden_dims}")
    check_output_folder("--runs-dir", args.runs_dir)
    return args


def check_output_folder(flag: str, path: str) -> None:
    """A folder this run may create and write into, checked before anything is written."""
    if not path:
        raise ArgError(f"{flag}: must name a folder, got ''")
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # a file, or a link to nothing
        raise ArgError(f"{flag}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgError(f"{flag}: {existing!r} is not writable")


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
    """Eq. (6): theta_i = f(g(e_i)), an MLP g (ReLU) on the agent embedding e_i, then a linear head f.

    As in the authors' code, every generated tensor has its own generator (g, f): one for each
    layer's weight, one for each layer's bias. Embeddings are learned and orthogonally initialised
    with gain sqrt(2), as there (section 4.2), or fixed one-hot IDs.
    init="scaled", section 4.3 as the authors' code does it: g starts as Flax's default (LeCun
    normal, zero bias); column j of a weight head (hidden unit j's share) is a flattened orthogonal
    matrix with the target layer's gain; bias heads start at zero. A generated layer is then
    sum_j g_j(e_i) O_j, so its scale is |g(e_i)| times the target's (benchmark/init_scale.py).
    init="matched" (ours): g's output is also L2-normalised (for the whole run) and each weight
    head's columns are made orthogonal, so every generated layer starts with exactly the target's
    Frobenius norm, whatever the embedding. init="default": PyTorch's init (ablation w/o RF).
    """

    def __init__(self, n_agents, sizes, gains, embedding_dim, hidden_dims, embedding="learned",
                 init="scaled", obs_dim=0):
        super().__init__()
        self.shapes, self.obs_dim, self.normalise = layer_shapes(sizes), obs_dim, init == "matched"
        if embedding == "learned":
            self.embedding = nn.Parameter(nn.init.orthogonal_(torch.empty(n_agents, embedding_dim), np.sqrt(2)))
        else:
            self.register_buffer("embedding", torch.eye(n_agents))
        self.trunks, self.heads = nn.ModuleList(), nn.ModuleList()  # W_1, b_1, W_2, b_2, ...
        for size in (n for fan_in, fan_out in self.shapes for n in (fan_in * fan_out, fan_out)):
            layers, width = [], self.embedding.shape[1] + obs_dim
            for hidden in hidden_dims:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            self.trunks.append(nn.Sequential(*layers))
            self.heads.append(nn.Linear(width, size))
        if init == "default":
            return
        with torch.no_grad():
            for layer in (m for trunk in self.trunks for m in trunk if isinstance(m, nn.Linear)):
                std = layer.in_features ** -0.5 / 0.8796256610342398  # Flax's lecun_normal: truncated at 2 std
                nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
                layer.bias.zero_()
            for k, ((fan_in, fan_out), gain) in enumerate(zip(self.shapes, gains)):
                weight_head, bias_head = self.heads[2 * k], self.heads[2 * k + 1]
                for j in range(width):
                    weight_head.weight[:, j] = target_init_vector([fan_in, fan_out], [gain])[: fan_in * fan_out]
                if init == "matched":  # nearest orthogonal columns, same norm: |f(u)| = |target| for |u| = 1
                    u, _, vh = torch.linalg.svd(weight_head.weight, full_matrices=False)
                    norm = gain * min(fan_in, fan_out) ** 0.5 * max(1.0, width / (fan_in * fan_out)) ** 0.5
                    weight_head.weight.copy_(u @ vh * norm)
                for tensor in (weight_head.bias, bias_head.weight, bias_head.bias):
                    tensor.zero_()

    def forward(self, obs=None):
        z = self.embedding
        if self.obs_dim:
            z = torch.cat([z.unsqueeze(1).expand(-1, obs.shape[1], -1), obs], -1)
        theta = []
        for trunk, head in zip(self.trunks, self.heads):
            features = trunk(z)
            theta.append(head(F.normalize(features, dim=-1) if self.normalise else features))
        return [(theta[2 * k].unflatten(-1, shape), theta[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(self.shapes)]


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


def train(game: str, method: str, n_agents: int, seeds: list[int], args: Args, writers=None, pop=None,
          progress: bool = False) -> dict:
    """REINFORCE for every seed at once; returns per-seed final metrics and learning curves.
    pop: an existing Population to train (default: a fresh one for method and seeds).
    progress: print a line with the elapsed time and an estimate of the rest once a minute."""
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
    start = printed_at = time.time()
    for update in range(1, num_updates + 1):
        logits = pop.logits()
        with torch.no_grad():
            actions = sample_actions(torch.softmax(logits, -1), args.batch_size, generators)  # (S, B, n)
            rewards = payoff(game, actions, n_agents)
            if args.reward == "team":  # every agent learns from the team's payoff (Table 1: both players get the same)
                rewards = rewards.mean(-1, keepdim=True).expand_as(rewards)
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
        if progress and update < num_updates and time.time() - printed_at >= 60:  # short runs print no progress
            printed_at = time.time()
            elapsed = printed_at - start
            print(f"trials={trials}/{num_updates * args.batch_size} train_reward={stats['reward'].mean().item():.4f} "
                  f"elapsed={duration(elapsed)} eta={duration(elapsed / update * (num_updates - update))}", flush=True)
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


# ===== 7. Checkpoints =====
def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# ===== 8. Main =====
def new_run_folder(runs_dir: str, prefix: str) -> str:
    """A fresh folder runs_dir/<prefix>__<time>[_k]: mkdir is atomic, so runs started in the same
    second (a sweep launched with &) never share one. Returns its name."""
    os.makedirs(runs_dir, exist_ok=True)
    stamp = int(time.time())
    for k in itertools.count():
        name = f"{prefix}__{stamp}" + (f"_{k}" if k else "")
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.join(runs_dir, name))
            return name


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def make_writers(args: Args, game: str, n_agents: int, method: str, seeds: list[int]):
    from torch.utils.tensorboard import SummaryWriter

    writers = []
    config_table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    for seed in seeds:
        run_name = new_run_folder(args.runs_dir, f"matrix_{game}_n{n_agents}__{args.exp_name}__{method}__{seed}")
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

    print(f"parameters: {METHOD_NAMES[args.method]} {count_params(args.method, args.n_agents, args)}"
          + (f" (Table 8: {PAPER_PARAMS[args.method][args.n_agents]})" if args.n_agents in PAPER_PARAMS.get(args.method, {}) else ""))
    writers = make_writers(args, args.game, args.n_agents, args.method, seeds)
    start = time.time()
    try:
        result = train(args.game, args.method, args.n_agents, seeds, args, writers, progress=True)
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
    elapsed = time.time() - start
    print(f"{args.game} n={args.n_agents} {METHOD_NAMES[args.method]}: argmax {np.mean(result['argmax']):.4f} ± "
          f"{np.std(result['argmax']):.4f}, sampled {np.mean(result['sampled']):.4f} ± {np.std(result['sampled']):.4f} "
          f"({f'{elapsed:.1f} s' if elapsed < 60 else duration(elapsed)}, runs in {args.runs_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
