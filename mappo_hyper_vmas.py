"""HyperMARL with MAPPO on VMAS (Dispersion, Navigation), with its baselines and metrics.

HyperMARL (Tessera, Rahman & Albrecht) generates every agent's actor and critic weights with a
hypernetwork conditioned on that agent's embedding: all agents share one set of trainable
parameters, yet each acts with its own network. MAPPO: every agent's critic sees the global state
(critic_input); everything else is ippo_hyper_vmas.py line for line. Read top to bottom:
    Args               the flags with the paper's values (Tables 9-16), Navigation's presets
    Hypernetworks      Eq. (5) linear, Eq. (6) MLP, the initialisation of section 4.3
    The agent          FuPS, NoPS, the generated Weights, every agent's actor and critic
    The training loop  main(): rollout, GAE, update, logging, evaluation, checkpoints
    The update         GAE, CleanRL's PPO loss, the minibatch step
    Evaluation         episodes, SND (Eq. 9), gradient variance and interference
    Environment        VMAS: in-place auto-reset, time limits apart from terminations
    Appendix           the command line and its checks, the run folder
Quick start:  python mappo_hyper_vmas.py --n-agents 4 --hypernet mlp --total-timesteps 300000
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

try:  # checkpoints, --resume, --eval-only, signals, run folders, videos: a library, optional
    import hypermarl_extras as extras
except ImportError:
    extras = None


# ===== Args =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment (the evaluation environment uses seed + 10000)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda is used when available (networks and VMAS alike)
    compile: bool = False  # torch.compile the policy step and the minibatch step (LeanRL; first iteration ~1 min)
    memory_check: bool = True  # refuse a run whose memory (a lower bound) exceeds the machine's; --no-...: try anyway
    track: bool = False  # if toggled, track the run with Weights and Biases (pip install wandb)
    wandb_project_name: str = "hypermarl"  # the wandb's project name
    wandb_entity: Optional[str] = None  # the entity (team) of wandb's project
    capture_video: bool = False  # save each evaluation's first episode to runs_dir/run_name/videos and TensorBoard
    runs_dir: str = "runs"  # folder for TensorBoard logs and checkpoints (runs_dir/run_name)
    save_model: bool = False  # write a checkpoint every --save-interval steps and at the end
    save_interval: int = 100_000  # environment steps between checkpoints (follows --eval-interval unless given)
    resume: Optional[str] = None  # checkpoint to continue; its flags are the run's (budget, logging may change)
    eval_only: bool = False  # only evaluate --checkpoint (return and SND), print, exit; writes nothing but a video
    checkpoint: Optional[str] = None  # checkpoint to evaluate with --eval-only
    snd_obs_file: Optional[str] = None  # [--eval-only] SND on this .npz's obs (appendix D.1.2; benchmark/snd_dataset.py)

    # Environment (VMAS): Table 11 (Dispersion), Table 16 (Navigation)
    scenario: Literal["dispersion", "navigation"] = "dispersion"  # VMAS scenario (--help after it shows its values)
    n_agents: int = 4  # number of agents (at least 2)
    max_steps: int = 100  # episode time limit (truncation: bootstrapped from V(next state))
    continuous_actions: bool = False  # continuous (Gaussian) or discrete (categorical) actions
    n_food: int = 4  # [dispersion] number of food items (follows --n-agents unless given)
    share_reward: bool = False  # [dispersion] one team reward instead of per-agent rewards
    penalise_by_time: bool = True  # [dispersion] -0.01 per step without food
    food_radius: float = 0.08  # [dispersion] food radius
    agents_with_same_goal: int = 1  # [navigation] agents sharing the first goal: 1 (all differ) .. n_agents
    split_goals: bool = False  # [navigation] two groups of n/2 agents, one goal each
    observe_all_goals: bool = True  # [navigation] every agent observes every goal
    shared_rew: bool = False  # [navigation] one team reward instead of per-agent rewards
    collisions: bool = False  # [navigation] agents collide and carry a LIDAR
    lidar_range: float = 0.35  # [navigation] LIDAR range, only with --collisions
    agent_radius: float = 0.1  # [navigation] agent radius

    # PPO: Dispersion's values (Table 9); Navigation's are NAVIGATION (Table 12) and NAVIGATION_SWEEP (Table 15)
    total_timesteps: int = 20_000_000  # total environment steps
    learning_rate: float = 5e-4  # Adam learning rate
    num_envs: int = 16  # parallel VMAS environments
    num_steps: int = 128  # steps per environment per rollout
    anneal_lr: bool = False  # if toggled, the learning rate decays linearly to 0
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.95  # GAE lambda
    num_minibatches: int = 2  # minibatches per epoch
    update_epochs: int = 4  # PPO epochs per rollout
    norm_adv: bool = True  # if toggled, advantages are normalised per minibatch
    clip_coef: float = 0.2  # surrogate clipping coefficient
    clip_vloss: bool = True  # if toggled, the value loss is clipped like the policy (CleanRL)
    ent_coef: float = 0.01  # entropy bonus
    vf_coef: float = 0.5  # value loss coefficient
    max_grad_norm: float = 0.5  # global gradient-norm clip
    actor_hidden_dims: list[int] = field(default_factory=lambda: [64, 64])  # hidden layers of every actor
    critic_hidden_dims: list[int] = field(default_factory=lambda: [64, 64])  # hidden layers of every critic
    activation: Literal["relu", "tanh"] = "relu"  # activation of actor and critic

    # Families and HyperMARL options (Tables 10 and 13)
    hypernet: Literal["mlp", "linear", "fups", "nops", "dico"] = "mlp"  # mlp | linear (Eq. 6 | 5) | fups | nops | dico
    hypernet_embedding_dim: int = 8  # [mlp] size of the learned agent embedding
    hypernet_hidden_dims: list[int] = field(default_factory=lambda: [64])  # [mlp] hidden layers of the hypernetwork
    hypernet_embedding: Literal["learned", "onehot"] = "learned"  # [mlp] learned (orthogonal init) | onehot (ablation)
    hypernet_separate_embeddings: bool = False  # [mlp] ours; one table per network (the authors': actor and critic share one)
    hypernet_init: Literal["scaled", "matched", "flax", "pytorch"] = "scaled"  # [mlp, linear] 4.3 | ours | w/o RF | torch's
    hypernet_input: Literal["agent", "agent+obs"] = "agent"  # [mlp, linear] agent | agent+obs (ablation w/o GD)
    dico_snd_des: float = -1.0  # [dico] desired SND; -1 = unconstrained (Navigation: Table 14)

    # Evaluation and metrics (appendix D.1.1)
    eval_interval: int = 100_000  # environment steps between evaluations
    eval_episodes: int = 32  # evaluation episodes
    eval_deterministic: bool = True  # evaluate with the mode, not samples (Navigation samples, as its baselines)
    snd_samples: int = 1000  # observations (from the evaluation episodes) on which SND is computed
    snd_gaussian_samples: int = 64  # Monte Carlo samples per observation of the Gaussian Jensen-Shannon distance
    interference_samples: int = 512  # samples per agent of each update's first minibatch for grad/interference
    print_interval: int = 10  # iterations between progress lines (also at evaluations, at least once a minute)

# Navigation's values where they differ from Dispersion's: Tables 12 and 16, evaluation of D.1.1. Budget: Table 12
# prints 10^6, appendix D.1.1 "10 million timesteps, consistent with the baselines": DiCo's config has 10M.
NAVIGATION = dict(
    total_timesteps=10_000_000, learning_rate=5e-5, num_envs=600, num_steps=100, gamma=0.9, gae_lambda=0.9,
    num_minibatches=30, update_epochs=45, ent_coef=0.0, vf_coef=1.0, max_grad_norm=5.0,
    actor_hidden_dims=[256, 256], critic_hidden_dims=[256, 256], activation="tanh", continuous_actions=True,
    eval_interval=120_000, eval_episodes=200, eval_deterministic=False,
)
# Table 15: clip_coef per (family, n_agents) in the goal settings GOALS: one goal for all, one each, half share
# one; the learning rate is 5e-5 in every row. Baselines' rows are in their modules.
GOALS = ("same", "different", "half")
NAVIGATION_CLIP = {("fups", 8): (0.2, 0.1, 0.1), ("fups", 4): (0.2, 0.2, 0.2), ("linear", 8): (0.2, 0.1, 0.1),
                   ("linear", 4): (0.2, 0.1, 0.1), ("mlp", 8): (0.2, 0.1, 0.1), ("mlp", 4): (0.1, 0.1, 0.1),
                   ("nops", 8): (0.1, 0.2, 0.1), ("nops", 4): (0.1, 0.2, 0.1)}
BASELINES = {"dico": "dico"}  # --hypernet -> the module of a baseline from another paper, imported when chosen

def paper_defaults(args: Args, given: set[str]) -> Args:
    """The paper's value for every flag not given: the scenario's, then those that follow other flags."""
    n, same = args.n_agents, args.agents_with_same_goal
    values = dict(n_food=n)
    if args.scenario == "navigation":
        values.update(copy.deepcopy(NAVIGATION))  # its lists are the run's own, not the table's
        goals = "same" if same == n else "different" if same == 1 else "half" if 2 * same == n else None
        if goals and (args.hypernet, n) in NAVIGATION_CLIP:
            values["clip_coef"] = NAVIGATION_CLIP[args.hypernet, n][GOALS.index(goals)]
        if args.hypernet in BASELINES:  # its row of Table 15, and Table 14
            values.update(baseline_module(args).navigation_defaults(n, goals))
    eval_interval = args.eval_interval if "eval_interval" in given else values.get("eval_interval", args.eval_interval)
    values["save_interval"] = eval_interval
    return dataclasses.replace(args, **{k: v for k, v in values.items() if k not in given})

def baseline_module(args: Args):
    if importlib.util.find_spec(name := BASELINES[args.hypernet]) is None:  # a copy of this script alone
        raise ValueError(f"--hypernet {args.hypernet}: needs {name}.py beside this script")
    return importlib.import_module(name)


# ===== Hypernetworks (Eq. 5, Eq. 6, section 4.3) =====
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer

def layer_shapes(sizes: list[int]) -> list[tuple[int, int]]:
    return list(zip(sizes[:-1], sizes[1:]))

def num_target_params(sizes: list[int]) -> int:
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in layer_shapes(sizes))

def target_init_vector(sizes: list[int], gains: list[float]) -> torch.Tensor:
    """The target MLP's flat parameters as PPO initialises them (section 4.3): orthogonal, zero biases."""
    chunks = []
    for (fan_in, fan_out), gain in zip(layer_shapes(sizes), gains):
        weight = torch.empty(fan_out, fan_in)
        nn.init.orthogonal_(weight, gain)
        chunks += [weight.T.flatten(), torch.zeros(fan_out)]
    return torch.cat(chunks)

def unflatten_params(theta: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(..., m) flat parameters -> [(W (..., fan_in, fan_out), b (..., 1, fan_out)) per layer].
    One split, not a slice per tensor: a slice's backward writes a zero tensor of all m parameters."""
    shapes = layer_shapes(sizes)
    chunks = theta.split([n for fan_in, fan_out in shapes for n in (fan_in * fan_out, fan_out)], dim=-1)
    return [(chunks[2 * k].unflatten(-1, shape), chunks[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(shapes)]

def batched_mlp(x: torch.Tensor, params, activation) -> torch.Tensor:
    """All agents' networks, one batched matmul per layer. x: (n_agents, batch, fan_in); W: (n_agents,
    fan_in, fan_out), or (n_agents, batch, fan_in, fan_out) for per-sample weights."""
    for k, (weight, bias) in enumerate(params):
        if weight.dim() == 3:
            x = torch.baddbmm(bias, x, weight)
        else:
            x = (x.unsqueeze(-2) @ weight + bias).squeeze(-2)
        if k < len(params) - 1:
            x = activation(x)
    return x

def lecun_normal_(layer: nn.Linear) -> None:
    """Flax's default Dense init: lecun_normal kernel (a normal truncated at 2 std, variance 1 / fan_in), zero bias."""
    std = layer.in_features ** -0.5 / 0.8796256610342398  # rescaled by the std of a normal truncated at 2 std
    nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)

class LinearHypernet(nn.Module):
    """Eq. (5): theta_i = 1_i W + b. Row i of W is agent i's whole flattened network; b is shared (without
    it: exactly n independent networks). obs_dim > 0: the ablation w/o GD, weights per [1_i, o]."""

    def __init__(self, n_agents, sizes, gains, init="scaled", shared_bias=True, obs_dim=0):
        super().__init__()
        self.sizes, self.obs_dim = list(sizes), obs_dim
        self.head = nn.Linear(n_agents + obs_dim, num_target_params(sizes), bias=shared_bias)
        self.register_buffer("ids", torch.eye(n_agents))
        if init == "scaled":  # section 4.3: every agent starts with its own orthogonal network
            with torch.no_grad():
                self.head.weight.zero_()
                for i in range(n_agents):
                    self.head.weight[:, i] = target_init_vector(sizes, gains)
                if shared_bias:
                    self.head.bias.zero_()
        elif init == "flax":  # w/o RF (section 6) in the authors' code: their Dense heads without the scaling
            with torch.no_grad():
                lecun_normal_(self.head)

    def forward(self, obs=None):  # theta (n_agents, m), used for every sample; w/o GD (n_agents, batch, m)
        x = self.ids if self.obs_dim == 0 else torch.cat([self.ids.unsqueeze(1).expand(-1, obs.shape[1], -1), obs], -1)
        return unflatten_params(self.head(x), self.sizes)

class MLPHypernet(nn.Module):
    """Eq. (6): theta_i = f(g(e_i)), an MLP g (ReLU) on the agent embedding e_i, then a linear head f;
    as in the authors' code, one (g, f) per generated tensor, embeddings orthogonal with gain sqrt(2).
    init="scaled" (section 4.3, as the authors' code): g starts as Flax's default, column j of a weight
    head is a flattened orthogonal matrix with the target layer's gain, bias heads start at zero: a
    generated layer is |g(e_i)| times the target's scale (benchmark/init_scale.py). "matched" (ours):
    g's output L2-normalised and the columns orthogonal, every layer at exactly the target's norm. "flax"
    (w/o RF, section 6, as the authors' code leaves it without the scaling): heads too at Flax's default;
    "pytorch": nn.Linear's default in every layer (ours: a benign start, unlike the authors' w/o RF).
    table: another hypernetwork's learned embeddings, used and not owned (the authors' actor and critic share one)."""

    def __init__(self, n_agents, sizes, gains, embedding_dim, hidden_dims, embedding="learned",
                 init="scaled", obs_dim=0, table=None):
        super().__init__()
        self.shapes, self.obs_dim, self.normalise = layer_shapes(sizes), obs_dim, init == "matched"
        if table is not None:  # a plain attribute, not registered: state_dict and the optimizer hold it once
            self.__dict__["embedding"] = table
        elif embedding == "learned":
            self.embedding = nn.Parameter(nn.init.orthogonal_(torch.empty(n_agents, embedding_dim), np.sqrt(2)))
        else:
            self.register_buffer("embedding", torch.eye(n_agents))
        self.trunks, self.heads = nn.ModuleList(), nn.ModuleList()  # W_1, b_1, W_2, b_2, ...
        widths = [self.embedding.shape[1] + obs_dim, *hidden_dims]
        width = widths[-1]  # every trunk's output: its last hidden layer
        for size in (n for fan_in, fan_out in self.shapes for n in (fan_in * fan_out, fan_out)):
            self.trunks.append(nn.Sequential(*(m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU()))))
            self.heads.append(nn.Linear(width, size))
        if init == "pytorch":
            return
        with torch.no_grad():
            for layer in (m for trunk in self.trunks for m in trunk if isinstance(m, nn.Linear)):
                lecun_normal_(layer)  # g: Flax's default, as the authors' hidden layers
            if init == "flax":
                for head in self.heads:
                    lecun_normal_(head)
                return
            for k, ((fan_in, fan_out), gain) in enumerate(zip(self.shapes, gains)):
                weight_head, bias_head = self.heads[2 * k], self.heads[2 * k + 1]
                for j in range(width):
                    weight_head.weight[:, j] = target_init_vector([fan_in, fan_out], [gain])[: fan_in * fan_out]
                if init == "matched":  # nearest orthogonal columns: |f(u)| = |target| for |u| = 1 (on average if
                    # the head has fewer outputs than hidden units, never in the paper's settings)
                    u, _, vh = torch.linalg.svd(weight_head.weight, full_matrices=False)
                    norm = gain * min(fan_in, fan_out) ** 0.5 * max(1.0, width / (fan_in * fan_out)) ** 0.5
                    weight_head.weight.copy_(u @ vh * norm)
                for tensor in (weight_head.bias, bias_head.weight, bias_head.bias):
                    tensor.zero_()

    def forward(self, obs=None):
        z = self.embedding  # (n_agents, embedding_dim)
        if self.obs_dim:
            z = torch.cat([z.unsqueeze(1).expand(-1, obs.shape[1], -1), obs], -1)  # (n_agents, batch, e + obs_dim)
        theta = []
        for trunk, head in zip(self.trunks, self.heads):
            features = trunk(z)
            theta.append(head(F.normalize(features, dim=-1) if self.normalise else features))
        return [(theta[2 * k].unflatten(-1, shape), theta[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(self.shapes)]


# ===== The agent: the families (HyperMARL, FuPS, NoPS) and every agent's actor and critic =====
class SharedNet(nn.Module):
    """FuPS: one network for all agents on [o, 1_i] (use_id) or o. [o, 1_i] W = o W_obs + W_id[i]: the ID is
    a per-agent bias of the first layer, never materialised."""

    def __init__(self, n_agents, sizes, gains, use_id=True):
        super().__init__()
        self.n_agents, self.use_id = n_agents, use_id
        dims = [sizes[0] + (n_agents if use_id else 0)] + list(sizes[1:])
        self.layers = nn.ModuleList(layer_init(nn.Linear(i, o), g) for (i, o), g in zip(layer_shapes(dims), gains))

    def forward(self):
        n, params = self.n_agents, []
        for k, layer in enumerate(self.layers):
            weight, bias = layer.weight.T, layer.bias.expand(n, -1)
            if k == 0 and self.use_id:
                weight, id_rows = weight[: -n], weight[-n:]
                bias = bias + id_rows  # row i of W_id is agent i's extra bias
            params.append((weight.expand(n, -1, -1), bias.unsqueeze(1)))
        return params

class IndependentNets(nn.Module):
    """NoPS: one network per agent, stored stacked (n_agents, fan_in, fan_out) for one batched matmul."""

    def __init__(self, n_agents, sizes, gains):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for (fan_in, fan_out), gain in zip(layer_shapes(sizes), gains):
            weight = torch.empty(n_agents, fan_out, fan_in)
            for i in range(n_agents):
                nn.init.orthogonal_(weight[i], gain)
            self.weights.append(nn.Parameter(weight.transpose(1, 2).contiguous()))
            self.biases.append(nn.Parameter(torch.zeros(n_agents, 1, fan_out)))

    def forward(self):
        return list(zip(self.weights, self.biases))

def family_net(args: Args, family: str, n_agents: int, sizes: list[int], gains: list[float], use_id=True,
               table=None) -> nn.Module:
    """The module whose forward() yields every agent's [(W, b) per layer] of one network (w/o GD: forward(obs));
    table: [mlp] the agent embeddings of another network's hypernetwork, shared."""
    obs_dim = sizes[0] if args.hypernet_input == "agent+obs" else 0
    if family == "mlp":
        return MLPHypernet(n_agents, sizes, gains, args.hypernet_embedding_dim, args.hypernet_hidden_dims,
                           args.hypernet_embedding, args.hypernet_init, obs_dim, table)
    if family == "linear":
        return LinearHypernet(n_agents, sizes, gains, args.hypernet_init, obs_dim=obs_dim)
    return SharedNet(n_agents, sizes, gains, use_id) if family == "fups" else IndependentNets(n_agents, sizes, gains)

class Weights(NamedTuple):
    """Every agent's actor and critic, [(W, b) per layer] each: W (n_agents, fan_in, fan_out), or
    (n_agents, batch, fan_in, fan_out) when generated per observation (the ablation w/o GD)."""
    actor: list
    critic: list

# Written out: torch.distributions objects cost 5-14% of a Dispersion iteration on a CPU
# (benchmark/results/distributions_cost.md); tested against torch.distributions.
def sample_action(dist, discrete: bool) -> torch.Tensor:
    """An action from a policy's output dist: logits (..., k), or (mean, std) each (..., d)."""
    if discrete:  # Gumbel-max: argmax(logits + Gumbel noise) is a categorical sample
        noise = torch.rand_like(dist).clamp_(min=torch.finfo(dist.dtype).tiny)  # a 0 would make an action's noise -inf
        return torch.argmax(dist - torch.log(-torch.log(noise)), dim=-1)
    mean, std = dist
    return mean + std * torch.randn_like(mean)

def log_prob_entropy(dist, action, discrete: bool):
    """log pi(action) and the entropy of the policy, summed over action dimensions (Gaussian)."""
    if discrete:
        logp = torch.log_softmax(dist, -1)
        return logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)
    mean, std = dist
    log_std = torch.log(std)
    logprob = (-((action - mean) ** 2) / (2 * std**2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    return logprob, (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)

def critic_input(obs: torch.Tensor) -> torch.Tensor:
    """MAPPO: every agent's critic sees the global state, (n_agents, batch, n_agents * obs_dim): VMAS
    has none, so as in the paper it is all agents' observations of the same step, concatenated."""
    n, batch, obs_dim = obs.shape
    return obs.transpose(0, 1).reshape(batch, n * obs_dim).unsqueeze(0).expand(n, -1, -1)

class Agent(nn.Module):
    """Every agent's actor and critic, as the family of --hypernet generates them."""

    def __init__(self, args: Args, obs_dim: int, act_dim: int, discrete: bool):
        super().__init__()
        n, family = args.n_agents, args.hypernet
        self.discrete, self.activation = discrete, torch.relu if args.activation == "relu" else torch.tanh
        self.per_sample = family in ("mlp", "linear") and args.hypernet_input == "agent+obs"
        critic_in_dim = critic_input(torch.zeros(n, 1, obs_dim)).shape[-1]
        self.actor = family_net(args, family, n, [obs_dim, *args.actor_hidden_dims, act_dim],
                                [np.sqrt(2)] * len(args.actor_hidden_dims) + [0.01])
        # One learned agent-embedding table for actor and critic, as the authors' code (a one-hot is a constant)
        shared = family == "mlp" and args.hypernet_embedding == "learned" and not args.hypernet_separate_embeddings
        self.critic = family_net(args, family, n, [critic_in_dim, *args.critic_hidden_dims, 1],
                                 [np.sqrt(2)] * len(args.critic_hidden_dims) + [1.0],
                                 table=self.actor.embedding if shared else None)
        if not discrete:  # state-independent log-std, per agent only for NoPS
            self.actor_logstd = nn.Parameter(torch.zeros(n if family == "nops" else 1, 1, act_dim))

    def generate(self, obs) -> Weights:
        """Every agent's weights; only the ablation w/o GD reads obs (n_agents, batch, obs_dim)."""
        if self.per_sample:
            return Weights(self.actor(obs), self.critic(critic_input(obs)))
        return Weights(self.actor(), self.critic())

    def policy(self, x, weights: Weights):
        """Every agent's policy on x (n_agents, batch, obs_dim): logits, or (mean, std), (n_agents, batch, act)."""
        out = batched_mlp(x, weights.actor, self.activation)
        return out if self.discrete else (out, self.actor_logstd.exp().expand_as(out))

    def get_value(self, x, weights: Weights):
        return batched_mlp(critic_input(x), weights.critic, self.activation).squeeze(-1)

    def get_action_and_value(self, x, weights: Weights, action=None):
        dist = self.policy(x, weights)
        if action is None:
            action = sample_action(dist, self.discrete)
        logprob, entropy = log_prob_entropy(dist, action, self.discrete)
        return action, logprob, entropy, self.get_value(x, weights)

    def actor_parameters(self):
        # with it the shared embedding table: part of the actor's generator, its gradient carries the critic's share
        return list(self.actor.parameters()) + ([] if self.discrete else [self.actor_logstd])

    def env_action(self, action):  # what the environment receives (a baseline may squash it)
        return action

    def after_step(self, mb: dict) -> dict:  # after each PPO step: a baseline's own step, its statistics
        return {}

def make_agent(args: Args, obs_dim: int, act_dim: int, discrete: bool) -> nn.Module:
    if args.hypernet in BASELINES:  # a baseline is built from this file's parts: no copy of them to drift
        parts = dict(SharedNet=SharedNet, IndependentNets=IndependentNets, family_net=family_net, Weights=Weights,
                     batched_mlp=batched_mlp, sample_action=sample_action, log_prob_entropy=log_prob_entropy,
                     critic_input=critic_input)
        return baseline_module(args).Agent(args, obs_dim, act_dim, discrete, parts)
    return Agent(args, obs_dim, act_dim, discrete)


# ===== The training loop =====
def main(argv=None) -> int:
    try:  # a bad flag, file or scenario option: one line, exit status 2, nothing written (the appendix)
        args, loaded, changes = read_command_line(sys.argv[1:] if argv is None else [str(token) for token in argv])
        # TRY NOT TO MODIFY: seeding
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        envs = None if args.eval_only else VmasEnv(args, args.num_envs, args.seed, device)
        eval_env = VmasEnv(args, args.eval_episodes, args.seed + 10_000, device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # tyro: --help, or a value it refused (its message is printed)
        return exit_.code
    obs_dim, act_dim, discrete = eval_env.obs_dim, eval_env.act_dim, eval_env.discrete
    agent = make_agent(args, obs_dim, act_dim, discrete).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    # --compile: the two functions that run thousands of times per iteration (Adam stays eager: fused,
    # it is one kernel already, and a compiled one would recompile whenever --anneal-lr moves lr).
    policy_step, update_step = agent.get_action_and_value, gradient_step
    if args.compile:
        torch._inductor.config.fallback_random = True  # eager's random numbers: the actions of an eager run
        policy_step, update_step = torch.compile(policy_step), torch.compile(update_step)
    if envs is not None:
        envs.reset()
    if loaded is not None:  # its model and optimizer; resuming, its environments and random generators too
        try:
            extras.restore_vmas_run(args, loaded, agent, optimizer, envs)
        except extras.CheckpointError as error:  # it does not fit, or holds NaN or inf: before anything is written
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.eval_only:  # the checkpoint's return and SND, printed (hypermarl_extras.py)
        def evaluation_line(snd_obs, video):
            ret, per_agent, snd, _ = evaluate(agent, eval_env, args, args.seed + 10_000, snd_obs, video)
            return f"eval/episodic_return={ret:.4f} diversity/snd={snd:.6f} per_agent={[round(r, 4) for r in per_agent]}"
        return extras.eval_only(args, loaded, evaluation_line, obs_dim, 1 / eval_env.env.world.dt)

    n, T, E = args.n_agents, args.num_steps, args.num_envs
    batch_size = T * E
    num_iterations = args.total_timesteps // batch_size
    run_dir, writer, global_step, start_iteration = open_run(args, loaded, changes)  # a new folder, or the run's
    print(f"device: {device}" + (" (CUDA is not available)" if args.cuda and device.type != "cuda" else ""))
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))
    print(f"parameters: actor {sum(p.numel() for p in agent.actor_parameters())}, "
          f"total {sum(p.numel() for p in agent.parameters())}")
    next_obs, checkpoint_path = envs.obs, os.path.join(run_dir, "checkpoint.pt")

    # ALGO Logic: Storage setup, time-major (T, n_agents, num_envs, ...); episode ends (T, 1, num_envs)
    obs, final_obs = torch.zeros((2, T, n, E, obs_dim), device=device)  # final_obs[t]: before any reset
    actions = torch.zeros((T, n, E) + (() if discrete else (act_dim,)), device=device,
                          dtype=torch.long if discrete else torch.float)
    logprobs, rewards, values = torch.zeros((3, T, n, E), device=device)
    terminateds, truncateds = torch.zeros((2, T, 1, E), device=device)

    start_time, start_step, printed_at = time.time(), global_step, 0.0
    print(f"plan: {num_iterations - start_iteration + 1} iterations of {batch_size} steps ({E} envs x {T}) up to "
          f"step {num_iterations * batch_size:,}, evaluating every {args.eval_interval:,}; an estimate of the time "
          f"follows the first iteration", flush=True)
    next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
    next_save = (global_step // args.save_interval + 1) * args.save_interval
    exit_code, next_iteration = 0, start_iteration
    # Ctrl-C or SIGTERM: finish the iteration, save a checkpoint, stop (hypermarl_extras.py)
    stop = extras.StopOnSignal() if extras else types.SimpleNamespace(requested=None, restore=lambda: None)
    try:
        for iteration in range(start_iteration, num_iterations + 1):
            if stop.requested:  # between iterations the state is consistent: save it
                break
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

            # ALGO LOGIC: collect a rollout with every agent's weights generated once
            rollout_start = time.perf_counter()
            with torch.no_grad():
                weights = agent.generate(next_obs)
                for step in range(T):
                    global_step += E
                    obs[step] = next_obs
                    if agent.per_sample:  # w/o GD: the weights depend on the observation
                        weights = agent.generate(next_obs)
                    action, logprob, _, value = policy_step(next_obs, weights)
                    values[step], actions[step], logprobs[step] = value, action, logprob
                    next_obs, reward, terminated, truncated, final_obs[step] = envs.step(agent.env_action(action))
                    rewards[step], terminateds[step, 0], truncateds[step, 0] = reward, terminated, truncated

                # bootstrap value: V(next state), V(final observation) at a time limit, 0 at termination
                if agent.per_sample:
                    weights = agent.generate(next_obs)
                dones = torch.maximum(terminateds, truncateds)
                next_values = torch.cat([values[1:], agent.get_value(next_obs, weights).unsqueeze(0)])
                next_values = torch.where(dones.bool(), bootstrap_values(agent, final_obs, truncateds), next_values)
                advantages, returns = compute_gae(rewards, values, next_values, terminateds, dones,
                                                  args.gamma, args.gae_lambda)

            # flatten the batch: (T, n, E, ...) -> (n, T * E, ...), agent-major
            batch = {key: x.transpose(0, 1).reshape((n, T * E) + x.shape[3:]) for key, x in dict(
                obs=obs, actions=actions, logprobs=logprobs, advantages=advantages, returns=returns, values=values).items()}

            # Optimizing the policy and value network
            update_start = time.perf_counter()
            if iteration == start_iteration:  # an iteration can take minutes (Navigation on a CPU): say so early
                print(f"iteration {iteration}: rollout took {update_start - rollout_start:.1f} s; updating "
                      f"({args.update_epochs} epochs x {args.num_minibatches} minibatches)", flush=True)
            try:
                stats = ppo_update(agent, optimizer, batch, args, update_step)
            except FloatingPointError:  # the checkpoint on disk (if any) is the last good one: leave it
                print(f"error: the loss became NaN/inf at update {iteration} (global step {global_step}); stopping. "
                      f"Last good checkpoint: {checkpoint_path if args.save_model else 'none (no --save-model)'}",
                      file=sys.stderr)
                exit_code = 1
                break

            # TRY NOT TO MODIFY: record rewards, losses and gradient statistics for plotting purposes
            sps = int((global_step - start_step) / (time.time() - start_time))
            var_y = torch.var(returns)
            explained_var = float("nan") if var_y == 0 else float(1 - torch.var(returns - values) / var_y)
            stats |= {"perf/rollout_seconds": update_start - rollout_start, "charts/SPS": sps,
                      "perf/update_seconds": time.perf_counter() - update_start,
                      "charts/learning_rate": optimizer.param_groups[0]["lr"], "losses/explained_variance": explained_var}
            ended = envs.take_ended_episodes()
            if ended:
                stats |= {"charts/episodic_return": sum(ended[0]) / n, "charts/episodic_length": ended[1]}
                stats |= {f"charts/episodic_return_agent{i}": value for i, value in enumerate(ended[0])}
            for tag, value in stats.items():
                writer.add_scalar(tag, value, global_step)

            line = None
            if global_step >= next_eval or iteration == num_iterations:
                next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
                line = record_evaluation(agent, eval_env, args, writer, run_dir, global_step)
            elapsed = time.time() - start_time
            if line or iteration % args.print_interval == 0 or iteration == start_iteration or elapsed - printed_at >= 60:
                printed_at = elapsed
                eta = elapsed / (global_step - start_step) * (num_iterations * batch_size - global_step)
                print(f"global_step={global_step} iteration={iteration}/{num_iterations} episodic_return="
                      f"{f'{sum(ended[0]) / n:.3f}' if ended else 'no_episode_ended'} SPS={sps} "
                      f"elapsed={duration(elapsed)} eta={duration(eta)}" + (f" {line}" if line else ""), flush=True)
            next_iteration = iteration + 1
            if args.save_model and global_step >= next_save and iteration < num_iterations:
                next_save = (global_step // args.save_interval + 1) * args.save_interval
                extras.save_vmas_run(checkpoint_path, CHECKPOINT_FORMAT, args, os.path.basename(run_dir), agent,
                                     optimizer, envs, global_step, next_iteration)
        if exit_code == 0 and (args.save_model or stop.requested):  # both only with hypermarl_extras.py
            extras.save_vmas_run(checkpoint_path, CHECKPOINT_FORMAT, args, os.path.basename(run_dir), agent,
                                 optimizer, envs, global_step, next_iteration)
            print(f"checkpoint: {checkpoint_path} (continue with --resume {checkpoint_path})")
    except OSError as error:  # the run folder became unwritable (read-only, full): the last checkpoint stays
        print(f"error: cannot write {error.filename or run_dir} ({error.strerror or error}); stopping. Last good "
              f"checkpoint: {checkpoint_path if os.path.isfile(checkpoint_path) else 'none'}", file=sys.stderr)
        exit_code = 1
    finally:
        stop.restore()
        writer.close()
        if args.track:
            sys.modules["wandb"].finish()
    return exit_code


# ===== The update (GAE, PPO) =====
def compute_gae(rewards, values, next_values, terminated, dones, gamma, gae_lambda):
    """GAE over a (T, ...) rollout. next_values[t] = V(s_{t+1}) of the true next state (the final observation
    at a time limit), zeroed by a termination; dones stops the recursion at every episode end."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values

def bootstrap_values(agent, final_obs, truncated) -> torch.Tensor:
    """V(final observation) where an episode reached its time limit, else 0, (T, n_agents, E): the critic
    runs once after the rollout, on those steps only."""
    values = torch.zeros(final_obs.shape[:3], device=final_obs.device)
    t, e = truncated[:, 0].nonzero(as_tuple=True)  # one host sync per rollout
    if len(t):
        x = final_obs[t, :, e].transpose(0, 1)  # [t, :, e] puts the K steps first: -> (n_agents, K, obs_dim)
        values[t, :, e] = agent.get_value(x, agent.generate(x)).T
    return values

def ppo_loss(agent, mb: dict, args: Args):
    """CleanRL's clipped surrogate, clipped value loss and entropy bonus, kept per agent."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], agent.generate(mb["obs"]), mb["actions"])
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    advantages = mb["advantages"]
    if args.norm_adv and args.hypernet == "nops":  # N separate learners (the authors' TrainState per agent)
        advantages = (advantages - advantages.mean(1, keepdim=True)) / (advantages.std(1, keepdim=True) + 1e-8)
    elif args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss_per_agent = torch.max(pg_loss1, pg_loss2).mean(1)
    entropy_per_agent = entropy.mean(1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb["returns"]) ** 2
        v_clipped = mb["values"] + torch.clamp(newvalue - mb["values"], -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - mb["returns"]) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean()
    actor_loss_per_agent = pg_loss_per_agent - args.ent_coef * entropy_per_agent
    loss = actor_loss_per_agent.mean() + v_loss * args.vf_coef
    if args.hypernet == "nops":  # each separate learner minimises its own loss, not 1/N of it
        loss = loss * actor_loss_per_agent.shape[0]
    stats = dict(policy_loss=pg_loss_per_agent.mean(), value_loss=v_loss, entropy=entropy_per_agent.mean(),
                 old_approx_kl=old_approx_kl, approx_kl=approx_kl, clipfrac=clipfrac)
    return loss, actor_loss_per_agent, stats

def gradient_step(agent, mb: dict, args: Args):
    """One minibatch: loss, gradient, the paper's gradient variance (of the actor's), clip. --compile fuses it."""
    loss, _, stats = ppo_loss(agent, mb, args)
    loss.backward()
    actor_grads = [p.grad for p in agent.actor_parameters() if p.grad is not None]
    stats["actor_var"], stats["actor_norm"] = gradient_variance_and_norm(actor_grads)
    if args.hypernet == "nops":  # N separate learners: each clips its own gradient; Adam is elementwise anyway
        clip_grad_per_agent(list(agent.parameters()), args.max_grad_norm, args.n_agents)
    else:
        nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    return loss.detach(), stats

def clip_grad_per_agent(params, max_norm: float, n: int):
    """Every agent's slice (leading dimension n) clipped on its own: clip_grad_norm_ has no per-slice form."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = sum((g.reshape(n, -1).pow(2).sum(1) for g in grads), torch.zeros(n, device=params[0].device))
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))

def ppo_update(agent, optimizer, batch: dict, args: Args, step=gradient_step) -> dict:
    """update_epochs passes over the rollout (n_agents, batch_size, ...) in minibatches, each a PPO step
    (step: gradient_step, maybe compiled), then the agent's own (a baseline's extra loss)."""
    batch_size = batch["obs"].shape[1]
    minibatch_size = batch_size // args.num_minibatches
    grad_vars, grad_norms, finite = [], [], torch.ones((), dtype=torch.bool, device=batch["obs"].device)
    for epoch in range(args.update_epochs):
        order = torch.randperm(batch_size, device=batch["obs"].device)
        for start in range(0, batch_size, minibatch_size):
            mb = {key: value[:, order[start: start + minibatch_size]] for key, value in batch.items()}
            if epoch == 0 and start == 0:  # part of one minibatch per update is enough for this metric
                interference = interference_of(agent, mb, args)
            optimizer.zero_grad()
            loss, stats = step(agent, mb, args)
            optimizer.step()
            finite &= torch.isfinite(loss)  # checked once, after the update: no host sync per minibatch
            stats |= agent.after_step(mb)
            grad_vars.append(stats.pop("actor_var"))
            grad_norms.append(stats.pop("actor_norm"))
    if not finite:
        raise FloatingPointError("loss is not finite")
    # the losses of the last minibatch (CleanRL's); the gradient statistics averaged over the update
    return {key if "/" in key else f"losses/{key}": float(value.detach()) for key, value in stats.items()} | {
        "grad/actor_var": float(torch.stack(grad_vars).mean()), "grad/actor_norm": float(torch.stack(grad_norms).mean()),
        "grad/interference": interference}


# ===== Evaluation and metrics (SND, Eq. 9; gradient variance and interference) =====
def record_evaluation(agent, eval_env, args: Args, writer, run_dir: str, global_step: int) -> str:
    """An evaluation into TensorBoard, each episode's return into evaluations.jsonl (rliable), a video."""
    video = [] if args.capture_video else None
    eval_return, eval_per_agent, snd, episodes = evaluate(agent, eval_env, args, args.seed + 10_000, video=video)
    if video:
        extras.save_video(writer, os.path.join(run_dir, "videos", f"eval_{global_step}.mp4"), "eval/video",
                          video, global_step, 1 / eval_env.env.world.dt)
    writer.add_scalar("eval/episodic_return", eval_return, global_step)
    for i, value in enumerate(eval_per_agent):
        writer.add_scalar(f"eval/episodic_return_agent{i}", value, global_step)
    writer.add_scalar("diversity/snd", snd, global_step)
    with open(os.path.join(run_dir, "evaluations.jsonl"), "a") as f:
        f.write(json.dumps({"step": global_step, "episode_returns": episodes, "snd": snd}) + "\n")
    return f"eval_return={eval_return:.3f} snd={snd:.4f}"

def evaluate(agent, eval_env: VmasEnv, args: Args, seed: int, snd_obs=None, video=None):
    """Episodes on the evaluation environment, rewound every time (evaluations differ only by the policy),
    the mode or samples (--no-eval-deterministic) drawn from seed, not the training RNG; then SND (Eq. 9)
    on snd_obs (N, obs_dim) (appendix D.1.2) or on --snd-samples of the episodes' observations; a list as
    video gets the first episode's frames. Returns (mean return, per agent, SND, every episode's return)."""
    n, device = args.n_agents, eval_env.device
    # On CUDA, VMAS draws from torch's CUDA generator: forked and seeded here, like the policy's samples
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        eval_env.rewind()
        obs = eval_env.reset()
        returns = torch.zeros(n, eval_env.num_envs, device=device)
        active = torch.ones(eval_env.num_envs, dtype=torch.bool, device=device)
        seen = []
        if video is not None:
            video.append(eval_env.env.render(mode="rgb_array", env_index=0))
        weights = agent.generate(obs)  # once; w/o GD: per observation
        for _ in range(args.max_steps):
            seen.append(obs[:, active])
            if agent.per_sample:
                weights = agent.generate(obs)
            dist = agent.policy(obs, weights)
            if args.eval_deterministic:  # the mode: argmax, or the mean
                action = dist.argmax(-1) if agent.discrete else dist[0]
            else:
                action = sample_action(dist, agent.discrete)
            obs, reward, terminated, truncated, _ = eval_env.step(agent.env_action(action))
            if video is not None and active[0] and not (terminated[0] or truncated[0]):  # else it is reset
                video.append(eval_env.env.render(mode="rgb_array", env_index=0))
            returns += reward * active
            active &= ~(terminated | truncated)
            if not active.any():
                break
        if snd_obs is not None:
            pool = snd_obs.to(device)
        else:  # every agent's observations pooled: (n_agents, live envs, obs_dim) per step -> (N, obs_dim)
            pool = torch.cat([o.reshape(-1, o.shape[-1]) for o in seen])
            pool = pool[torch.randperm(pool.shape[0], device=device)[: args.snd_samples]]
        snd = 0.0
        for chunk in pool.split(10_000):  # chunks keep a million-observation dataset in memory
            same = chunk.expand(n, -1, -1)  # Eq. (9): every agent on the same observations
            dist = agent.policy(same, agent.generate(same))
            snd += system_neural_diversity(dist, agent.discrete, args.snd_gaussian_samples) * len(chunk)
        snd /= pool.shape[0]
    return returns.mean(0).mean().item(), returns.mean(1).tolist(), snd, returns.mean(0).tolist()

def js_distance_categorical(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between categorical distributions (..., k)."""
    p, q = p.double(), q.double()  # float32 keeps few digits of near-equal policies' distance: they moved run to run
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b.clamp_min(1e-30))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0).sqrt()

def js_distance_gaussian(mu1, std1, mu2, std2, n_samples=64, generator=None) -> torch.Tensor:
    """Jensen-Shannon distance (base 2) between diagonal Gaussians (..., d) by Monte Carlo, no closed form:
    1/2 E_p[log p - log m] + 1/2 E_q[log q - log m], m = (p + q) / 2; antithetic draws, exactly 0 if p = q."""
    half = max(n_samples // 2, 1)
    z = torch.randn((half,) + mu1.shape, generator=generator, device=mu1.device, dtype=mu1.dtype).double()
    z = torch.cat([z, -z])
    mu1, std1, mu2, std2 = (x.double() for x in (mu1, std1, mu2, std2))  # float64: see js_distance_categorical

    def log_density(x, mu, std):
        return (-0.5 * ((x - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def half_term(mu, std, mu_other, std_other):  # E_{x ~ f}[log f(x) - log m(x)]
        x = mu + std * z
        d = log_density(x, mu_other, std_other) - log_density(x, mu, std)
        # log m - log f = log((1 + e^d) / 2), written to be exactly 0 when the densities agree
        log_ratio = torch.where(d > 30, d - math.log(2.0), torch.log1p(torch.expm1(d.clamp(max=30)) / 2))
        return -log_ratio.mean(0)

    jsd_bits = (0.5 * half_term(mu1, std1, mu2, std2) + 0.5 * half_term(mu2, std2, mu1, std1)) / math.log(2.0)
    return jsd_bits.clamp(0.0, 1.0).sqrt()

def system_neural_diversity(dist, discrete: bool, n_samples=64, generator=None) -> float:
    """Eq. (9): mean Jensen-Shannon distance over agent pairs and observations. dist: every agent's
    policy on the SAME observations, logits (n_agents, batch, k) or (mean, std) each (n_agents, batch, d)."""
    n = (dist if discrete else dist[0]).shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    if discrete:
        probs = torch.softmax(dist.detach().double(), -1)
        distances = js_distance_categorical(probs[i], probs[j])
    else:
        mean, std = dist[0].detach(), dist[1].detach()
        distances = js_distance_gaussian(mean[i], std[i], mean[j], std[j], n_samples, generator)
    return float(distances.mean())

def gradient_variance_and_norm(grads):
    """Variance and L2 norm over all entries of the gradient, from each tensor's sum and norm (no copy)."""
    count = sum(g.numel() for g in grads)
    total = torch.stack([g.sum() for g in grads]).sum()
    squares = torch.stack([torch.linalg.vector_norm(g) for g in grads]).square().sum()
    return (squares - total**2 / count) / (count - 1), squares.sqrt()

def interference_of(agent, mb: dict, args: Args) -> float:
    """Gradient interference on the first --interference-samples of a minibatch (eager under --compile);
    the agent's buffers (a running estimate a forward pass moves) are left as they were."""
    subset = {key: value[:, : args.interference_samples] for key, value in mb.items()}
    buffers = [(buffer, buffer.clone()) for buffer in agent.buffers()]
    interference = gradient_interference(ppo_loss(agent, subset, args)[1], agent.actor_parameters())
    for buffer, saved in buffers:
        buffer.copy_(saved)
    return interference

def gradient_interference(per_agent_loss: torch.Tensor, params) -> float:
    """Mean pairwise cosine similarity of the agents' gradients on the shared parameters (one batched
    backward): 0 for disjoint parameters (NoPS), > 0 when their updates agree, < 0 when they conflict."""
    n = per_agent_loss.shape[0]
    grads = torch.autograd.grad(per_agent_loss, params, grad_outputs=torch.eye(n, device=per_agent_loss.device),
                                is_grads_batched=True, retain_graph=True, allow_unused=True)
    gram = sum(g.reshape(n, -1) @ g.reshape(n, -1).T for g in grads if g is not None)  # no (n, all) copy
    norms = gram.diagonal().sqrt().clamp_min(1e-12)
    cosine = gram / (norms[:, None] * norms[None, :])
    return float(cosine[~torch.eye(n, dtype=torch.bool, device=cosine.device)].mean())


# ===== Environment (VMAS) =====
# The keyword arguments each VMAS scenario receives besides n_agents (names as VMAS spells them).
SCENARIO_OPTIONS = {
    "dispersion": ("n_food", "share_reward", "penalise_by_time", "food_radius"),
    "navigation": ("agents_with_same_goal", "split_goals", "observe_all_goals", "shared_rew", "collisions",
                   "lidar_range", "agent_radius"),
}

class VmasEnv:
    """VMAS with agent-major tensors, terminated/truncated kept apart and in-place auto-reset: step()
    returns the next observations (fresh where an episode ended: a new episode's first action sees its
    own) and the ended episodes' final observations (to bootstrap V after a time limit). Each instance owns
    its CPU random stream: VMAS keeps one for all, which would tie training and evaluation together (on CUDA
    VMAS draws from torch's CUDA generator, shared with the policy; evaluate() forks and seeds it)."""

    def __init__(self, args: Args, num_envs: int, seed: int, device: torch.device):
        import vmas
        from vmas.simulator.environment import Environment

        self._shared_rng = Environment.vmas_random_state
        self._rng = list(self._shared_rng)
        kwargs = {name: getattr(args, name) for name in SCENARIO_OPTIONS[args.scenario]}
        with self.own_rng(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("error", "It is taking many iterations to spawn")  # VMAS would try forever
            try:
                self.env = vmas.make_env(args.scenario, num_envs=num_envs, device=device, seed=seed,
                                         continuous_actions=args.continuous_actions, max_steps=args.max_steps,
                                         terminated_truncated=True, n_agents=args.n_agents, **kwargs)
            except UserWarning:
                raise ValueError(f"--n-agents {args.n_agents}, --agent-radius {args.agent_radius}: VMAS finds no "
                                 "place for every agent and goal in 50,000 tries; use fewer or smaller agents") from None
        unused = [str(w.message) for w in caught if "not used" in str(w.message)]
        if unused:  # VMAS only warns about keyword arguments it ignores: refuse them instead (exit status 2)
            raise ValueError(f"--scenario {args.scenario}: {unused[0]}")
        self._start_rng = list(self._rng)
        self.num_envs, self.n_agents, self.device = num_envs, args.n_agents, device
        self.obs_dim = self.env.observation_space[0].shape[0]
        space = self.env.action_space[0]
        self.discrete = not args.continuous_actions
        self.act_dim = int(space.n) if self.discrete else space.shape[0]
        if not self.discrete:
            self.act_low = torch.as_tensor(space.low, device=device)
            self.act_high = torch.as_tensor(space.high, device=device)
        self.episode_return = torch.zeros(self.n_agents, num_envs, device=device)
        self.episode_length = torch.zeros(num_envs, dtype=torch.long, device=device)
        # the ended episodes' sums stay on the device, read once per iteration (take_ended_episodes)
        self.ended_returns = torch.zeros(self.n_agents, device=device)
        self.ended_lengths, self.ended_count = torch.zeros((2,), dtype=torch.long, device=device)
        self.obs = None

    @contextlib.contextmanager
    def own_rng(self):
        saved = self._shared_rng[:]
        self._shared_rng[:] = self._rng
        try:
            yield
        finally:
            self._rng = self._shared_rng[:]
            self._shared_rng[:] = saved

    def rewind(self) -> None:
        """Back to the random state of construction: every evaluation then meets the same episodes."""
        self._rng = list(self._start_rng)

    def reset(self) -> torch.Tensor:
        with self.own_rng():
            self.obs = torch.stack(self.env.reset())  # (n_agents, num_envs, obs_dim)
        self.episode_return.zero_()
        self.episode_length.zero_()
        return self.obs

    def step(self, actions: torch.Tensor):
        """actions: (n_agents, num_envs) discrete or (n_agents, num_envs, act_dim) continuous."""
        if not self.discrete:  # Gaussian samples can leave the box, which VMAS asserts against.
            actions = torch.clamp(actions, self.act_low, self.act_high)
        with self.own_rng():
            obs, rewards, terminated, truncated, _ = self.env.step(list(actions.unbind(0)))
            obs, rewards = torch.stack(obs), torch.stack(rewards)
            done = terminated | truncated
            self.episode_return += rewards
            self.episode_length += 1
            self.ended_returns += (self.episode_return * done).sum(1)
            self.ended_lengths += (self.episode_length * done).sum()
            self.ended_count += done.sum()
            self.episode_return *= ~done
            self.episode_length *= ~done
            final_obs = obs
            # The rollout's one host sync per step: VMAS's step has already waited for the device (it
            # asserts on every action), and a step where nothing ended then costs no reset at all.
            if done.any():
                obs = self._reset_done(done, obs)
        self.obs = obs
        return obs, rewards, terminated, truncated, final_obs

    def _reset_done(self, done: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """The ended environments reset in one batched reset, the others' state written back with one masked
        write per tensor (VMAS's reset_at(i) resets one environment per call: a Python loop)."""
        saved = [(holder, key, value.clone()) for holder in self._state_holders().values()
                 for key, value in vars(holder).items() if isinstance(value, torch.Tensor)]
        fresh_obs = torch.stack(self.env.reset())
        for holder, key, old in saved:
            if old.dim() > 0 and old.shape[0] == self.num_envs:  # one row per environment
                ended = done.view((-1,) + (1,) * (old.dim() - 1))
                setattr(holder, key, torch.where(ended, getattr(holder, key), old))
            else:  # shared by all environments (gravity): never reset
                setattr(holder, key, old)
        return torch.where(done[None, :, None], fresh_obs, obs)

    def _state_holders(self) -> dict:
        holders = {"env": self.env, "scenario": self.env.scenario, "world": self.env.world}
        for i, entity in enumerate(self.env.world.entities):
            holders[f"entity{i}"], holders[f"entity{i}.state"] = entity, entity.state
        return holders

    def take_ended_episodes(self):
        """(mean return per agent, mean length) of the episodes ended since the last call, or None."""
        count = int(self.ended_count)  # the one host sync for them, once per iteration
        result = ((self.ended_returns / count).tolist(), float(self.ended_lengths) / count) if count else None
        for total in (self.ended_returns, self.ended_lengths, self.ended_count):
            total.zero_()
        return result


# ===== Appendix: the command line and its checks, the run folder =====
SIMULATOR = "vmas"
ALGO = "mappo"  # in run folders' names and the checkpoint format
CHECKPOINT_FORMAT = f"hypermarl-{ALGO}-vmas/5"
CHECKPOINT_KEYS = ("format", "args", "run_name", "model", "optimizer", "env", "rng", "global_step", "iteration")
# The flags that define the model and the environment (--eval-only takes them from the checkpoint), and
# those --resume may change (budget, logging, cadence, device): every other flag is the checkpoint's.
MODEL_FIELDS = SCENARIO_OPTIONS["dispersion"] + SCENARIO_OPTIONS["navigation"] + (
    "scenario", "n_agents", "max_steps", "continuous_actions", "actor_hidden_dims", "critic_hidden_dims", "activation",
    "hypernet", "hypernet_embedding_dim", "hypernet_hidden_dims", "hypernet_embedding", "hypernet_init",
    "hypernet_input", "hypernet_separate_embeddings", "dico_snd_des")
RESUME_MAY_CHANGE = ("total_timesteps", "eval_interval", "save_interval", "save_model", "print_interval", "runs_dir",
                     "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video", "compile", "memory_check")
NEEDS_EXTRAS = ("resume", "eval_only", "checkpoint", "snd_obs_file", "save_model", "capture_video", "track")
POSITIVE = ("max_steps", "total_timesteps", "learning_rate", "num_envs", "num_steps", "num_minibatches",
            "update_epochs", "clip_coef", "max_grad_norm", "eval_interval", "eval_episodes", "snd_samples",
            "snd_gaussian_samples", "interference_samples", "print_interval", "save_interval", "n_food", "food_radius",
            "lidar_range", "agent_radius", "hypernet_embedding_dim")
SIZES = ("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims")
FAMILY_FLAGS = {"hypernet_embedding_dim": ("mlp",), "hypernet_hidden_dims": ("mlp",), "hypernet_embedding": ("mlp",),
                "hypernet_separate_embeddings": ("mlp",), "hypernet_init": ("mlp", "linear"),
                "hypernet_input": ("mlp", "linear"), "dico_snd_des": ("dico",)}

def check_args(args: Args, given: set[str], resume_rules=()) -> None:
    """Each flag given only where it applies, every value in its range: ValueError (one line) if not."""
    for broken, why in flag_rules(args, given, resume_rules):
        if broken:
            raise ValueError(why)

def flag_rules(args: Args, given: set[str], resume_rules=()):
    """(broken, message) pairs; a condition may assume that those before it hold."""
    def flag(name):
        return "--" + name.replace("_", "-")

    n, same, batch = args.n_agents, args.agents_with_same_goal, args.num_envs * args.num_steps
    other = "navigation" if args.scenario == "dispersion" else "dispersion"
    for name in sorted(given):  # a flag given where it does not apply, named as written
        written = "--no-" + flag(name)[2:] if getattr(args, name) is False else flag(name)
        yield not extras and name in NEEDS_EXTRAS and bool(getattr(args, name)), \
            f"{written}: needs hypermarl_extras.py beside this script"
        families = FAMILY_FLAGS.get(name, (args.hypernet,))
        yield args.hypernet not in families, \
            f"{written}: only with --hypernet {' or '.join(families)}, got --hypernet {args.hypernet}"
        yield name in SCENARIO_OPTIONS[other], f"{written}: is a {other} option, not for --scenario {args.scenario}"
        yield name == "save_interval" and not args.save_model, f"{written}: only with --save-model"
        yield name in ("hypernet_embedding_dim", "hypernet_separate_embeddings") and args.hypernet_embedding != "learned", \
            f"{written}: only with --hypernet-embedding learned, got --hypernet-embedding {args.hypernet_embedding}"
        yield name == "lidar_range" and not args.collisions, \
            f"{written}: only with --collisions (agents carry a LIDAR only then)"
    yield from resume_rules  # a resumed run's budget (hypermarl_extras.py): its reason before any range
    yield n < 2, f"--n-agents: must be at least 2, got {n}"
    for name, value in vars(args).items():  # inf and nan pass every comparison below: refuse them first
        yield isinstance(value, float) and not math.isfinite(value), f"{flag(name)}: must be a finite number, got {value!r}"
        yield any(type(v) is int and abs(v) > 2**53 for v in (value if isinstance(value, list) else [value])), \
            f"{flag(name)}: must be at most 2**53 = {2**53:,}"  # beyond, arithmetic and logs lose or overflow
    yield not 0 <= args.seed <= 2**32 - 1 - 10_000, f"--seed: must be between 0 and {2**32 - 1 - 10_000}, got {args.seed}"
    exp = repr(args.exp_name) if len(args.exp_name) <= 128 else f"{len(args.exp_name)} characters"
    yield not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{,127}", args.exp_name), \
        f"--exp-name: must be a plain name (letters, digits, '.', '_', '-'; at most 128), got {exp}"
    yield not args.runs_dir, "--runs-dir: must name a folder, got ''"  # a copy alone would write into the current one
    yield args.runs_dir.encode(errors="replace").decode() != args.runs_dir, \
        f"--runs-dir: {args.runs_dir!r} is not UTF-8 text (TensorBoard writes UTF-8 paths only)"
    for names, holds, why in ((POSITIVE, lambda v: v > 0, "must be positive"),
                              (("gamma", "gae_lambda"), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
                              (("ent_coef", "vf_coef"), lambda v: v >= 0, "must be >= 0"),
                              (SIZES, lambda v: v and min(v) > 0, "must be one or more positive sizes")):
        for name in names:
            yield not holds(getattr(args, name)), f"{flag(name)}: {why}, got {getattr(args, name)!r}"
    yield batch % args.num_minibatches > 0, \
        f"--num-minibatches: must divide num_envs * num_steps = {batch}, got {args.num_minibatches!r}"
    yield args.total_timesteps < batch, \
        f"--total-timesteps: must be at least num_envs * num_steps = {batch}, got {args.total_timesteps!r}"
    if args.hypernet == "nops" and args.norm_adv:  # each agent's advantages normalised alone: a std of 2 or more
        yield batch // args.num_minibatches < 2, f"--num-minibatches: with --hypernet nops a minibatch needs at least " \
            f"2 samples (advantages are normalised per agent), got {batch // args.num_minibatches}"
        yield args.interference_samples < 2, "--interference-samples: with --hypernet nops at least 2 (advantages " \
            f"are normalised per agent), got {args.interference_samples}"
    yield args.hypernet_init == "matched" and args.hypernet == "linear", \
        "--hypernet-init: matched is for --hypernet mlp, got --hypernet linear"  # the linear one's scaled init is exact
    if args.scenario == "navigation":
        yield not 1 <= same <= n, f"--agents-with-same-goal: must be between 1 and n_agents = {n}, got {same!r}"
        yield same > 1 and args.collisions, \
            "--collisions: agents cannot share a goal with collisions on (VMAS asserts it); use --agents-with-same-goal 1"
        yield args.split_goals and (n % 2 or same != n // 2), \
            f"--split-goals: needs an even n_agents and --agents-with-same-goal n/2, got n={n}, same={same}"
    if args.hypernet in BASELINES:
        yield from baseline_module(args).flag_rules(args)
    if args.memory_check and extras:  # this machine's memory (hypermarl_extras.py)
        yield extras.memory_rule(args, memory_needed(args), MEMORY_FLAGS)

# What each part of memory_needed grows with: the memory check names the flags of the largest part
MEMORY_FLAGS = dict(rollout=("n_agents", "num_envs", "num_steps"), simulators=("num_envs", "eval_episodes"),
                    networks=("n_agents", "actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims",
                              "hypernet_embedding_dim"), minibatch=("num_envs", "num_steps", "num_minibatches"),
                    snd=("snd_gaussian_samples", "snd_samples"))

def memory_needed(args: Args) -> dict[str, int]:
    """A lower bound of the bytes a run holds, by part, before anything is built (float32): the rollout and
    its batch, both simulators, every network with its gradients and Adam's moments, the generated weights,
    the interference's per-agent gradients, a minibatch's activations (w/o GD: its per-sample weights), and
    with Gaussian policies SND's Monte Carlo draws (float64, three tensors of them at once)."""
    n, E, T, mb = args.n_agents, args.num_envs, args.num_steps, args.num_envs * args.num_steps // args.num_minibatches
    obs, act = (4 + 3 * args.n_food if args.scenario == "dispersion" else 18), (2 if args.continuous_actions else 9)
    critic_in = critic_input(torch.zeros(n, 1, obs, device="meta")).shape[-1]
    m_actor = num_target_params([obs, *args.actor_hidden_dims, act])
    m_critic = num_target_params([critic_in, *args.critic_hidden_dims, 1])
    copies = {"mlp": args.hypernet_hidden_dims[-1] + 1, "linear": n + 1, "fups": 1}.get(args.hypernet, n)
    per_sample = args.hypernet in ("mlp", "linear") and args.hypernet_input == "agent+obs"
    activations = mb * n * (obs + sum(args.actor_hidden_dims) + sum(args.critic_hidden_dims) + act) + mb * critic_in
    trunks = 2 * (len(args.actor_hidden_dims) + len(args.critic_hidden_dims) + 2)  # [mlp] one per generated tensor
    trunk = num_target_params([args.hypernet_embedding_dim, *args.hypernet_hidden_dims])
    embeddings = n * args.hypernet_embedding_dim + trunks * trunk if args.hypernet == "mlp" else 0
    pool = min(args.snd_samples, 10_000, n * args.eval_episodes * args.max_steps)  # SND's observations, a chunk
    snd = 24 * args.snd_gaussian_samples * n * (n - 1) // 2 * pool * act
    return dict(rollout=4 * T * n * E * (3 * obs + 12),
                simulators=4 * (E + args.eval_episodes) * (2 * n * 64 + n * obs * 4),  # agents, food or goals
                networks=4 * ((m_actor + m_critic) * (4 * copies + 2 * n) + n * m_actor * copies + 4 * embeddings),
                minibatch=4 * (activations + (mb * n * (m_actor + m_critic) if per_sample else 0))) | (
                dict(snd=snd) if args.continuous_actions else {})

def parse_args(argv: list[str], given: set[str]) -> Args:
    """The flags given, the paper's values for the others (--help shows them)."""
    args = paper_defaults(tyro.cli(Args, args=[a for a in argv if a not in ("-h", "--help")]), given)
    if "-h" in argv or "--help" in argv:
        tyro.cli(Args, args=argv, default=args)
    return args

def flags_given(argv: list[str]) -> set[str]:
    """The Args fields named on the command line (--x, --x=v, --no-x)."""
    names = {f.name for f in dataclasses.fields(Args)}
    tokens = [token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")]
    return {name[3:] if name not in names and name.startswith("no_") else name for name in tokens} & names

def read_command_line(argv: list[str]):
    """(args, the checkpoint to resume or evaluate or None, the flags --resume changes). ValueError: a bad
    flag or file, in one line, before anything is written."""
    given = flags_given(argv)
    args, loaded, changes = parse_args(argv, given), None, []
    if extras:  # a copy alone refuses the flags that need it (flag_rules)
        loaded, changes = extras.read_checkpoint(args, given, CHECKPOINT_FORMAT, CHECKPOINT_KEYS, MODEL_FIELDS,
                                                 RESUME_MAY_CHANGE, check_args)
        if args.checkpoint:  # the evaluation's defaults are those of the checkpoint's run
            args = paper_defaults(args, given | set(MODEL_FIELDS) | set(extras.EVALUATION_FIELDS))
    check_args(args, given, extras.resume_rules(args, loaded, changes) if extras else ())
    if extras:
        extras.check_output(args, SIMULATOR, changes)
    return args, loaded, changes

def duration(seconds: float) -> str:  # 1h02m, 3m05s or 12s
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

def open_run(args, loaded, changes):
    """TensorBoard (and wandb) in a new run folder, or the checkpoint's (hypermarl_extras.py): (run_dir, writer,
    global_step, first iteration). A copy alone writes a plain folder: runs started in the same second share it."""
    prefix = f"vmas_{args.scenario}__{args.exp_name}__{ALGO}_{args.hypernet}__{args.seed}"
    if extras:
        return extras.open_run(args, prefix, loaded, changes)
    from torch.utils.tensorboard import SummaryWriter

    run_dir = os.path.join(args.runs_dir, f"{prefix}__{int(time.time())}")
    try:  # the library checks --runs-dir before anything is built; a copy alone, at its first write (one line)
        writer = SummaryWriter(run_dir)
    except OSError as error:
        print(f"error: --runs-dir: cannot create a run folder in {args.runs_dir!r} ({error.strerror})", file=sys.stderr)
        sys.exit(2)
    print(f"run: {run_dir}")
    return run_dir, writer, 0, 1

if __name__ == "__main__":
    sys.exit(main())
