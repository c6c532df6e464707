"""HyperMARL with recurrent IPPO on SMAX (2s3z, 3s5z, SMACv2 with 10 and 20 units), with its baselines and metrics.

HyperMARL (Tessera, Rahman & Albrecht) generates every agent's actor and critic weights with a
hypernetwork conditioned on that agent's embedding. On SMAX, as in the authors' code, all agents share
one Dense -> ReLU -> GRU trunk, which is not generated (appendix); after it the hypernetwork generates
each agent's actor and critic layers. Read top to bottom:
    Args               the flags with the paper's values (Table 22), per map and family (Table 23)
    Hypernetworks      Eq. (5) linear, Eq. (6) MLP, the initialisation of section 4.3
    The agent          the trunk and its GRU, the families, every agent's actor and critic, action masking
    The training loop  main(): rollout with hidden states, GAE, update, logging, evaluation, checkpoints
    The update         GAE, recurrent PPO on whole environment sequences
    Evaluation         episodes and win rate, SND (Eq. 9) on shared observation histories, gradient variance
    Environment        SMAX (JaxMARL): JAX inside, torch outside (DLPack), time limits apart from terminations
    Appendix           the command line and its checks, the run folder, checkpoints
Quick start:  python ippo_hyper_smax.py --map 2s3z --hypernet mlp
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import random
import re
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

try:  # checkpoints, --resume, --eval-only, signals, run folders: a library, optional
    import hypermarl_extras as extras
except ImportError:
    extras = None


# ===== Args =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment (the evaluation environment uses seed + 10000)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda is used when available (the networks; JAX steps SMAX on its own device)
    memory_check: bool = True  # refuse a run whose memory (a lower bound) exceeds the machine's; --no-...: try anyway
    track: bool = False  # if toggled, track the run with Weights and Biases (pip install wandb)
    wandb_project_name: str = "hypermarl"  # the wandb's project name
    wandb_entity: Optional[str] = None  # the entity (team) of wandb's project
    runs_dir: str = "runs"  # folder for TensorBoard logs and checkpoints (runs_dir/run_name)
    save_model: bool = False  # write a checkpoint every --save-interval steps and at the end
    save_interval: int = 500_000  # environment steps between checkpoints (follows --eval-interval unless given)
    resume: Optional[str] = None  # checkpoint to continue; its flags are the run's (budget, logging may change)
    eval_only: bool = False  # only evaluate --checkpoint (return, win rate and SND), print, exit; writes nothing
    checkpoint: Optional[str] = None  # checkpoint to evaluate with --eval-only

    # Environment (SMAX: JaxMARL's HeuristicEnemySMAX)
    map: Literal["2s3z", "3s5z", "smacv2_10_units", "smacv2_20_units"] = "2s3z"  # SMAX map (section 5.3)

    # Recurrent PPO: Table 22 (IPPO); the learning rate per map and family: Table 23 (MAPS)
    total_timesteps: int = 10_000_000  # total environment steps
    learning_rate: float = 0.004  # Adam learning rate (the map's and family's, Table 23)
    num_envs: int = 128  # parallel SMAX environments
    num_steps: int = 128  # steps per environment per rollout: the length of the sequences the GRU learns from
    anneal_lr: bool = True  # if toggled, the learning rate decays linearly to 0
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.95  # GAE lambda
    num_minibatches: int = 4  # minibatches per epoch, each of whole environment sequences
    update_epochs: int = 4  # PPO epochs per rollout
    norm_adv: bool = True  # if toggled, advantages are normalised per minibatch
    clip_coef: float = 0.05  # surrogate clipping coefficient (and the value loss's)
    clip_vloss: bool = True  # if toggled, the value loss is clipped like the policy
    ent_coef: float = 0.01  # entropy bonus
    vf_coef: float = 0.5  # value loss coefficient
    max_grad_norm: float = 0.25  # global gradient-norm clip
    fc_dim: int = 128  # the trunk's Dense layer (and IPPO's critic's hidden layer, as JaxMARL's)
    gru_hidden_dim: int = 128  # the GRU's hidden state (and the actor's hidden layer, and MAPPO's critic's)

    # Families and HyperMARL options (Table 23)
    hypernet: Literal["mlp", "linear", "fups", "nops"] = "mlp"  # mlp | linear (Eq. 6 | 5) | fups | nops
    hypernet_embedding_dim: int = 4  # [mlp] size of the learned agent embedding (the map's, Table 23)
    hypernet_hidden_dims: list[int] = field(default_factory=lambda: [32])  # [mlp] hidden layers (the map's, Table 23)
    hypernet_embedding: Literal["learned", "onehot"] = "learned"  # [mlp] learned (orthogonal init) | onehot (ablation)
    hypernet_separate_embeddings: bool = False  # [mlp] ours; one table per network (the authors': actor and critic share one)
    hypernet_init: Literal["scaled", "matched", "flax", "pytorch"] = "scaled"  # [mlp, linear] 4.3 | ours | w/o RF | torch's
    hypernet_input: Literal["agent", "agent+obs"] = "agent"  # [mlp, linear] agent | agent+obs (ablation w/o GD)

    # Evaluation and metrics (appendix D.1.1)
    eval_interval: int = 500_000  # environment steps between evaluations
    eval_episodes: int = 32  # evaluation episodes
    eval_deterministic: bool = True  # evaluate with the most likely available action, not samples
    print_interval: int = 10  # iterations between progress lines (also at evaluations, at least once a minute)

    @property
    def n_agents(self) -> int:  # the map's agents (JaxMARL's scenarios)
        return AGENTS[self.map]

# Table 23: per map, IPPO's learning rate (FuPS) and H-IPPO's (MLP) with its embedding size and hidden layers.
# The paper tunes neither NoPS nor the linear hypernetwork on SMAX: they take FuPS's learning rate.
MAPS = {"2s3z": dict(fups=0.004, mlp=(0.004, 4, [32])), "3s5z": dict(fups=0.004, mlp=(0.004, 64, [16])),
        "smacv2_10_units": dict(fups=0.001, mlp=(0.005, 4, [64])),
        "smacv2_20_units": dict(fups=0.005, mlp=(0.005, 64, [64]))}

def paper_defaults(args: Args, given: set[str]) -> Args:
    """The paper's value for every flag not given: the map's and family's, then those that follow other flags."""
    rates = MAPS[args.map]
    values = dict(learning_rate=rates["fups"])
    if args.hypernet == "mlp":
        values.update(zip(("learning_rate", "hypernet_embedding_dim", "hypernet_hidden_dims"), copy.deepcopy(rates["mlp"])))
    values["save_interval"] = args.eval_interval
    return dataclasses.replace(args, **{k: v for k, v in values.items() if k not in given})


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


# ===== The agent: the trunk, the families (HyperMARL, FuPS, NoPS) and every agent's actor and critic =====
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

class Trunk(nn.Module):
    """Dense(fc) -> ReLU -> GRU(hidden) on every agent's observation, as the authors' and JaxMARL's: one for
    all agents (stored once, expanded), or one per agent (NoPS), run as (n_agents, batch, ...) batched matmuls.
    The GRU is Flax's GRUCell, initialised as Flax does: input kernels lecun-normal with biases, recurrent
    kernels orthogonal (gain 1), only the candidate's recurrent part with a bias; all biases zero."""

    def __init__(self, n_agents: int, obs_dim: int, fc_dim: int, hidden_dim: int, per_agent: bool):
        super().__init__()
        self.n_agents, k = n_agents, n_agents if per_agent else 1

        def stacked(init, fan_in, fan_out, gates=1):  # (k, fan_in, gates * fan_out), each gate's block initialised
            blocks = [torch.stack([init(torch.empty(fan_out, fan_in)).T for _ in range(k)]) for _ in range(gates)]
            return nn.Parameter(torch.cat(blocks, -1))

        def lecun(w):  # Flax's default Dense kernel: a normal truncated at 2 std, variance 1 / fan_in
            std = w.shape[1] ** -0.5 / 0.8796256610342398
            return nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)

        self.dense_w = stacked(lambda w: nn.init.orthogonal_(w, np.sqrt(2)), obs_dim, fc_dim)
        self.dense_b = nn.Parameter(torch.zeros(k, 1, fc_dim))
        self.input_w = stacked(lecun, fc_dim, hidden_dim, gates=3)  # reset, update, candidate
        self.input_b = nn.Parameter(torch.zeros(k, 1, 3 * hidden_dim))
        self.hidden_w = stacked(nn.init.orthogonal_, hidden_dim, hidden_dim, gates=3)
        self.hidden_b = nn.Parameter(torch.zeros(k, 1, hidden_dim))  # the candidate's only

    def _all(self, p):  # a shared parameter, seen by every agent (no copy)
        return p.expand(self.n_agents, *p.shape[1:])

    def encode(self, obs):  # (n_agents, batch, obs_dim) -> (n_agents, batch, fc_dim)
        return torch.relu(torch.baddbmm(self._all(self.dense_b), obs, self._all(self.dense_w)))

    def gru(self, x, h):  # Flax's GRUCell: h' = (1 - z) * n + z * h
        r_i, z_i, n_i = torch.baddbmm(self._all(self.input_b), x, self._all(self.input_w)).chunk(3, -1)
        r_h, z_h, n_h = torch.bmm(h, self._all(self.hidden_w)).chunk(3, -1)
        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * (n_h + self._all(self.hidden_b)))
        return (1 - z) * n + z * h

    def step(self, obs, h, start):
        """One step of every agent: the hidden state restarts at zero where start (1, batch) marks an episode's first."""
        return self.gru(self.encode(obs), h * (1.0 - start).unsqueeze(-1))

    def unroll(self, obs, h, starts):
        """A whole sequence, obs (T, n_agents, batch, obs_dim) from hidden state h, starts (T, 1, batch): the
        features (T, n_agents, batch, hidden) the rollout computed step by step. The Dense layer runs once."""
        T, n, B = obs.shape[:3]
        x = self.encode(obs.transpose(0, 1).reshape(n, T * B, -1)).reshape(n, T, B, -1).transpose(0, 1)
        features = []
        for t in range(T):
            h = self.gru(x[t], h * (1.0 - starts[t]).unsqueeze(-1))
            features.append(h)
        return torch.stack(features)

class Agent(nn.Module):
    """Every agent's actor and critic after the shared trunk, as the family of --hypernet generates them."""

    def __init__(self, args: Args, obs_dim: int, act_dim: int, state_dim: int):
        super().__init__()
        self.n_agents, family, hidden = args.n_agents, args.hypernet, args.gru_hidden_dim
        n = self.n_agents
        self.per_sample = family in ("mlp", "linear") and args.hypernet_input == "agent+obs"
        self.trunk = Trunk(n, obs_dim, args.fc_dim, hidden, per_agent=family == "nops")
        # JaxMARL's FuPS actor sees no agent ID; its heads' hidden layers are orthogonal with gain 2 (the
        # generated ones: sqrt(2), section 4.3)
        gain = np.sqrt(2) if family in ("mlp", "linear") else 2.0
        self.actor = family_net(args, family, n, [hidden, hidden, act_dim], [gain, 0.01], use_id=False)
        shared = family == "mlp" and args.hypernet_embedding == "learned" and not args.hypernet_separate_embeddings
        self.critic = family_net(args, family, n, [hidden, args.fc_dim, 1], [gain, 1.0], use_id=False,
                                 table=self.actor.embedding if shared else None)
        # The authors' SMAX code starts g orthogonal, gain sqrt(2), not at Flax's default as their VMAS code and
        # MLPHypernet do; matched and flax keep Flax's g (they differ from scaled in g too)
        if family == "mlp" and args.hypernet_init == "scaled":
            with torch.no_grad():
                for trunk in (*self.actor.trunks, *self.critic.trunks):
                    for layer in (m for m in trunk if isinstance(m, nn.Linear)):
                        nn.init.orthogonal_(layer.weight, np.sqrt(2))

    def initial_hidden(self, num_envs: int, device) -> torch.Tensor:  # every agent's, before its first step
        return torch.zeros(self.n_agents, num_envs, self.trunk.hidden_b.shape[-1], device=device)

    @property
    def actor_trunk(self) -> Trunk:  # what turns an observation history into the actor's input (SND replays it)
        return self.trunk

    def actor_input(self, obs):  # what the actor's trunk reads of an observation (..., n_agents, batch, obs_dim)
        return obs

    def step(self, obs, world_state, hidden, start):
        """One step of every agent: (its next hidden state, the actor's input, the critic's). IPPO: one trunk
        for both, on the agent's own observation; the world state (1, batch, state_dim) is MAPPO's."""
        hidden = self.trunk.step(obs, hidden, start)
        return hidden, hidden, hidden

    def unroll(self, obs, world_states, hidden, starts):
        """step() over whole sequences (T, ...): (the actor's inputs, the critic's), each (T, n_agents, batch, ...)."""
        features = self.trunk.unroll(obs, hidden, starts)
        return features, features

    def generate(self, actor_in=None, critic_in=None) -> Weights:
        """Every agent's head weights; only the ablation w/o GD reads the inputs (n_agents, batch, ...)."""
        if self.per_sample:
            return Weights(self.actor(actor_in), self.critic(critic_in))
        return Weights(self.actor(), self.critic())

    def policy(self, features, weights: Weights, avail):
        """Every agent's logits (n_agents, batch, act_dim), an unavailable action's lowered by 1e10 (the authors')."""
        return batched_mlp(features, weights.actor, torch.relu) - (1.0 - avail.float()) * 1e10

    def get_value(self, features, weights: Weights):
        return batched_mlp(features, weights.critic, torch.relu).squeeze(-1)

    def actor_parameters(self):
        # the trunk feeds the actor too: part of what the actor's gradient moves (the shared table carries the critic's)
        return list(self.actor_trunk.parameters()) + list(self.actor.parameters())

def sample_action(logits) -> torch.Tensor:
    """Gumbel-max: argmax(logits + Gumbel noise) is a categorical sample (a masked logit is never the argmax)."""
    noise = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)  # a 0 would make an action's noise -inf
    return torch.argmax(logits - torch.log(-torch.log(noise)), dim=-1)

def log_prob_entropy(logits, action):
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


# ===== The training loop =====
def main(argv=None) -> int:
    try:  # a bad flag or file: one line, exit status 2, nothing written (the appendix)
        args, loaded, changes = read_command_line(sys.argv[1:] if argv is None else [str(token) for token in argv])
        # TRY NOT TO MODIFY: seeding
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        envs = None if args.eval_only else SmaxEnv(args.map, args.num_envs, args.seed, device)
        eval_env = SmaxEnv(args.map, args.eval_episodes, args.seed + 10_000, device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # tyro: --help, or a value it refused (its message is printed)
        return exit_.code
    obs_dim, act_dim = eval_env.obs_dim, eval_env.act_dim
    agent = Agent(args, obs_dim, act_dim, eval_env.state_dim).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    n, T, E = args.n_agents, args.num_steps, args.num_envs
    carry = None if envs is None else Carry(*envs.reset(), torch.ones(1, E, device=device), agent.initial_hidden(E, device))
    if loaded is not None:  # its model and optimizer; resuming, its environments, carry and random generators too
        try:
            carry = restore_run(args, loaded, agent, optimizer, envs, carry)
        except extras.CheckpointError as error:  # it does not fit, or holds NaN or inf: before anything is written
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.eval_only:  # the checkpoint's return, win rate and SND, printed (hypermarl_extras.py)
        def evaluation_line(snd_obs, video):
            ret, win, snd, _ = evaluate(agent, eval_env, args, args.seed + 10_000)
            return f"eval/episodic_return={ret:.4f} eval/win_rate={win:.4f} diversity/snd={snd:.6f}"
        return extras.eval_only(args, loaded, evaluation_line, obs_dim, 1.0)

    batch_size = T * E
    num_iterations = args.total_timesteps // batch_size
    run_dir, writer, global_step, start_iteration = open_run(args, loaded, changes)  # a new folder, or the run's
    print(f"device: {device}" + (" (CUDA is not available)" if args.cuda and device.type != "cuda" else ""))
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))
    print(f"parameters: actor {sum(p.numel() for p in agent.actor_parameters())}, "
          f"total {sum(p.numel() for p in agent.parameters())}")
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    # ALGO Logic: Storage setup, time-major (T, n_agents, num_envs, ...); episode starts and ends (T, 1, num_envs)
    obs = torch.zeros((T, n, E, obs_dim), device=device)
    world_states = torch.zeros((T, 1, E, eval_env.state_dim), device=device)
    avails = torch.zeros((T, n, E, act_dim), dtype=torch.bool, device=device)
    actions = torch.zeros((T, n, E), dtype=torch.long, device=device)
    logprobs, rewards, values, truncation_values = torch.zeros((4, T, n, E), device=device)
    starts, terminateds, truncateds = torch.zeros((3, T, 1, E), device=device)

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

            # ALGO LOGIC: collect a rollout, the hidden state carried from step to step (and from the last rollout)
            rollout_start = time.perf_counter()
            h0 = carry.hidden
            with torch.no_grad():
                for step in range(T):
                    global_step += E
                    obs[step], world_states[step], avails[step], starts[step] = carry.obs, carry.world_state, carry.avail, carry.start
                    hidden, actor_in, critic_in = agent.step(carry.obs, carry.world_state, carry.hidden, carry.start)
                    if step == 0 or agent.per_sample:  # once per rollout; w/o GD: per step, from the features
                        weights = agent.generate(actor_in, critic_in)
                    action, logprob, _, value = act(agent, actor_in, critic_in, weights, carry.avail)
                    values[step], actions[step], logprobs[step] = value, action, logprob
                    next_obs, world_state, avail, reward, terminated, truncated, _, final_obs, final_state = envs.step(action)
                    rewards[step], terminateds[step, 0], truncateds[step, 0] = reward, terminated, truncated
                    if truncated.any():  # a time limit: V(final observation), with the hidden state it would meet
                        _, final_actor_in, final_in = agent.step(final_obs, final_state, hidden, torch.zeros_like(carry.start))
                        truncation_values[step] = agent.get_value(final_in, agent.generate(final_actor_in, final_in)) * truncated
                    else:
                        truncation_values[step] = 0.0
                    carry = Carry(next_obs, world_state, avail, (terminated | truncated).float().unsqueeze(0), hidden)

                # bootstrap value: V(next state), V(final observation) at a time limit, 0 at termination
                _, last_actor_in, last_in = agent.step(carry.obs, carry.world_state, carry.hidden, carry.start)
                dones = torch.maximum(terminateds, truncateds)
                next_values = torch.cat([values[1:], agent.get_value(last_in, agent.generate(last_actor_in, last_in)).unsqueeze(0)])
                next_values = torch.where(dones.bool(), truncation_values, next_values)
                advantages, returns = compute_gae(rewards, values, next_values, terminateds, dones,
                                                  args.gamma, args.gae_lambda)

            batch = dict(obs=obs, world_states=world_states, avails=avails, starts=starts, actions=actions, logprobs=logprobs,
                         advantages=advantages, returns=returns, values=values, h0=h0)

            # Optimizing the policy and value network
            update_start = time.perf_counter()
            if iteration == start_iteration:  # an iteration takes a while on a CPU: say so early
                print(f"iteration {iteration}: rollout took {update_start - rollout_start:.1f} s; updating "
                      f"({args.update_epochs} epochs x {args.num_minibatches} minibatches)", flush=True)
            try:
                stats = ppo_update(agent, optimizer, batch, args)
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
                stats |= {"charts/episodic_return": ended[0], "charts/episodic_length": ended[1], "charts/win_rate": ended[2]}
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
                      f"{f'{ended[0]:.3f} win_rate={ended[2]:.2f}' if ended else 'no_episode_ended'} SPS={sps} "
                      f"elapsed={duration(elapsed)} eta={duration(eta)}" + (f" {line}" if line else ""), flush=True)
            next_iteration = iteration + 1
            if args.save_model and global_step >= next_save and iteration < num_iterations:
                next_save = (global_step // args.save_interval + 1) * args.save_interval
                save_run(checkpoint_path, args, os.path.basename(run_dir), agent, optimizer, envs, carry,
                         global_step, next_iteration)
        if exit_code == 0 and (args.save_model or stop.requested):  # both only with hypermarl_extras.py
            save_run(checkpoint_path, args, os.path.basename(run_dir), agent, optimizer, envs, carry,
                     global_step, next_iteration)
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

class Carry(NamedTuple):
    """What one step hands the next: every agent's observation, the world state (1, num_envs, state_dim; MAPPO's
    critic), available actions, whether the step starts an episode (1, num_envs), the hidden states before it."""
    obs: torch.Tensor
    world_state: torch.Tensor
    avail: torch.Tensor
    start: torch.Tensor
    hidden: torch.Tensor

def act(agent, actor_in, critic_in, weights: Weights, avail):
    logits = agent.policy(actor_in, weights, avail)
    action = sample_action(logits)
    logprob, entropy = log_prob_entropy(logits, action)
    return action, logprob, entropy, agent.get_value(critic_in, weights)


# ===== The update (GAE, recurrent PPO) =====
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

def ppo_loss(agent, mb: dict, args: Args):
    """CleanRL's clipped surrogate, clipped value loss and entropy bonus on whole sequences: the trunk reruns
    each minibatch's environments from their rollout's first hidden state, episode starts resetting it."""
    T, n, B = mb["obs"].shape[:3]

    def per_agent(x):  # (T, n, B, ...) -> (n, T * B, ...), agent-major as the heads take them
        return x.transpose(0, 1).reshape((n, T * B) + x.shape[3:])

    actor_in, critic_in = map(per_agent, agent.unroll(mb["obs"], mb["world_states"], mb["h0"], mb["starts"]))
    weights = agent.generate(actor_in, critic_in)
    logits = agent.policy(actor_in, weights, per_agent(mb["avails"]))
    newlogprob, entropy = log_prob_entropy(logits, per_agent(mb["actions"]))
    newvalue = agent.get_value(critic_in, weights)
    oldlogprob, advantages, returns, values = (per_agent(mb[k]) for k in ("logprobs", "advantages", "returns", "values"))
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv and args.hypernet == "nops":  # N separate learners (the authors' TrainState per agent)
        advantages = (advantages - advantages.mean(1, keepdim=True)) / (advantages.std(1, correction=0, keepdim=True) + 1e-8)
    elif args.norm_adv:  # the population std, as JaxMARL's jnp.std
        advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss_per_agent = torch.max(pg_loss1, pg_loss2).mean(1)
    entropy_per_agent = entropy.mean(1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = values + torch.clamp(newvalue - values, -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    actor_loss_per_agent = pg_loss_per_agent - args.ent_coef * entropy_per_agent
    loss = actor_loss_per_agent.mean() + v_loss * args.vf_coef
    if args.hypernet == "nops":  # each separate learner minimises its own loss, not 1/N of it
        loss = loss * n
    stats = dict(policy_loss=pg_loss_per_agent.mean(), value_loss=v_loss, entropy=entropy_per_agent.mean(),
                 old_approx_kl=old_approx_kl, approx_kl=approx_kl, clipfrac=clipfrac)
    return loss, actor_loss_per_agent, stats

def gradient_step(agent, mb: dict, args: Args):
    """One minibatch: loss, gradient, the paper's gradient variance (of the actor's), clip."""
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

def ppo_update(agent, optimizer, batch: dict, args: Args) -> dict:
    """update_epochs passes over the rollout, each in minibatches of whole environment sequences (every agent
    of an environment together: the hypernetwork runs every agent at once), each minibatch a PPO step."""
    num_envs = batch["obs"].shape[2]
    envs_per_minibatch = num_envs // args.num_minibatches
    grad_vars, grad_norms, finite = [], [], torch.ones((), dtype=torch.bool, device=batch["obs"].device)
    for epoch in range(args.update_epochs):
        order = torch.randperm(num_envs, device=batch["obs"].device)
        for start in range(0, num_envs, envs_per_minibatch):
            envs = order[start: start + envs_per_minibatch]
            mb = {key: value[:, envs] if key == "h0" else value[:, :, envs] for key, value in batch.items()}
            optimizer.zero_grad()
            loss, stats = gradient_step(agent, mb, args)
            optimizer.step()
            finite &= torch.isfinite(loss)  # checked once, after the update: no host sync per minibatch
            grad_vars.append(stats.pop("actor_var"))
            grad_norms.append(stats.pop("actor_norm"))
    if not finite:
        raise FloatingPointError("loss is not finite")
    # the losses of the last minibatch (CleanRL's); the gradient statistics averaged over the update
    return {f"losses/{key}": float(value.detach()) for key, value in stats.items()} | {
        "grad/actor_var": float(torch.stack(grad_vars).mean()), "grad/actor_norm": float(torch.stack(grad_norms).mean())}


# ===== Evaluation and metrics (win rate; SND, Eq. 9; gradient variance) =====
def record_evaluation(agent, eval_env, args: Args, writer, run_dir: str, global_step: int) -> str:
    """An evaluation into TensorBoard, each episode's return and win into evaluations.jsonl (rliable)."""
    eval_return, win_rate, snd, episodes = evaluate(agent, eval_env, args, args.seed + 10_000)
    writer.add_scalar("eval/episodic_return", eval_return, global_step)
    writer.add_scalar("eval/win_rate", win_rate, global_step)
    writer.add_scalar("diversity/snd", snd, global_step)
    with open(os.path.join(run_dir, "evaluations.jsonl"), "a") as f:
        f.write(json.dumps({"step": global_step, "episode_returns": episodes[0], "wins": episodes[1], "snd": snd}) + "\n")
    return f"eval_return={eval_return:.3f} win_rate={win_rate:.2f} snd={snd:.4f}"

def evaluate(agent, eval_env, args: Args, seed: int):
    """One episode in each evaluation environment, rewound every time (evaluations differ only by the policy),
    the most likely available action or samples (--no-eval-deterministic) drawn from seed. SND (Eq. 9) on
    shared histories: every agent runs on each agent's observation sequences. Returns (mean return, win rate,
    SND, (every episode's return, every episode's win))."""
    device, E = eval_env.device, eval_env.num_envs
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        eval_env.rewind()
        obs, world_state, avail = eval_env.reset()
        hidden = agent.initial_hidden(E, device)
        start = torch.ones(1, E, device=device)
        returns, wins = torch.zeros(E, device=device), torch.zeros(E, device=device)
        active = torch.ones(E, dtype=torch.bool, device=device)
        seen, seen_avail, seen_active = [], [], []
        for t in range(eval_env.max_steps):
            seen.append(obs), seen_avail.append(avail), seen_active.append(active.clone())
            hidden, actor_in, critic_in = agent.step(obs, world_state, hidden, start)
            if t == 0 or agent.per_sample:  # once; w/o GD: per step
                weights = agent.generate(actor_in, critic_in)
            logits = agent.policy(actor_in, weights, avail)
            action = logits.argmax(-1) if args.eval_deterministic else sample_action(logits)
            obs, world_state, avail, reward, terminated, truncated, won, *_ = eval_env.step(action)
            returns += reward.mean(0) * active
            wins += won.float() * active
            active &= ~(terminated | truncated)
            start = torch.zeros_like(start)  # an ended environment's next episode is not evaluated
            if not active.any():
                break
        snd = shared_history_snd(agent, torch.stack(seen), torch.stack(seen_avail), torch.stack(seen_active))
    return returns.mean().item(), wins.mean().item(), snd, (returns.tolist(), wins.tolist())

def shared_history_snd(agent, obs, avail, active) -> float:
    """Eq. (9) for recurrent policies: a policy acts on an observation history, so every agent runs on the SAME
    history, agent j's in each environment, for each j; SND is the mean Jensen-Shannon distance over agent
    pairs and the steps where j is alive in a running episode (a dead agent's one action, "stop", is every
    agent's: its distance 0 would measure survival). obs (T, n, E, obs_dim), avail (T, n, E, A), active (T, E)."""
    T, n, E = obs.shape[:3]
    h0 = torch.zeros(n, E, agent.actor_trunk.hidden_b.shape[-1], device=obs.device)
    starts = torch.zeros(T, 1, E, device=obs.device)
    starts[0] = 1.0
    i, j = torch.triu_indices(n, n, offset=1)
    total, count = 0.0, 0
    for source in range(n):
        history = obs[:, source: source + 1].expand(-1, n, -1, -1)
        features = agent.actor_trunk.unroll(agent.actor_input(history), h0, starts)
        flat = features.transpose(0, 1).reshape(n, T * E, -1)
        source_avail = avail[:, source: source + 1].expand(-1, n, -1, -1).transpose(0, 1).reshape(n, T * E, -1)
        weights = Weights(agent.actor(flat) if agent.per_sample else agent.actor(), [])  # the actors only
        probs = torch.softmax(agent.policy(flat, weights, source_avail).double(), -1)
        distances = js_distance_categorical(probs[i], probs[j]).mean(0)  # (T * E,)
        live = (active & (avail[:, source].sum(-1) > 1)).reshape(-1)  # alive: more than "stop" available
        total, count = total + float(distances[live].sum()), count + int(live.sum())
    return total / max(count, 1)

def js_distance_categorical(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between categorical distributions (..., k)."""
    p, q = p.double(), q.double()  # float32 keeps few digits of near-equal policies' distance: they moved run to run
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b.clamp_min(1e-30))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0).sqrt()

def gradient_variance_and_norm(grads):
    """Variance and L2 norm over all entries of the gradient, from each tensor's sum and norm (no copy)."""
    count = sum(g.numel() for g in grads)
    total = torch.stack([g.sum() for g in grads]).sum()
    squares = torch.stack([torch.linalg.vector_norm(g) for g in grads]).square().sum()
    return (squares - total**2 / count) / (count - 1), squares.sqrt()


# ===== Environment (SMAX) =====
class SmaxEnv:
    """SMAX (JaxMARL's HeuristicEnemySMAX) with agent-major tensors, terminated/truncated kept apart and in-place
    auto-reset: step() returns the next observations (fresh where an episode ended) and the ended episodes'
    final observations (to bootstrap V after a time limit). JAX lives only here (and in smax_functions): the
    environments are one jax.vmap of the map's, each step one jax.jit call; arrays cross to torch through
    DLPack (no copy on the same device). Each instance owns its random key: evaluation apart from training."""

    def __init__(self, map_name: str, num_envs: int, seed: int, device: torch.device):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts: else 75% of a GPU
        import jax

        self.jax, self.device, self.num_envs = jax, device, num_envs
        self.jax_device = jax.devices()[0]  # where JAX steps SMAX: a GPU with jax[cuda], else the CPU
        (self.n_agents, self.obs_dim, self.act_dim, self.state_dim, self.max_steps,
         self._reset, self._step) = smax_functions(map_name)
        self._start_key = self._key = jax.random.PRNGKey(seed)
        self.episode_return = torch.zeros(num_envs, device=device)
        self.episode_length = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.ended = torch.zeros(4, device=device)  # returns, lengths, wins, count of the episodes ended since taken
        self.state = None

    def _keys(self):
        self._key, key = self.jax.random.split(self._key)
        return self.jax.random.split(key, self.num_envs)

    def _torch(self, x, agent_major=False):
        t = torch.from_dlpack(x).to(self.device)
        return t.transpose(0, 1) if agent_major else t

    def rewind(self) -> None:
        """Back to the random state of construction: every evaluation then meets the same episodes."""
        self._key = self._start_key

    def reset(self):
        """(every agent's observation (n_agents, E, obs_dim), the world state (1, E, state_dim), available actions)."""
        self.state, obs, world_state, avail = self._reset(self._keys())
        self.episode_return.zero_()
        self.episode_length.zero_()
        return self._torch(obs, True), self._torch(world_state)[None], self._torch(avail, True).bool()

    def step(self, actions: torch.Tensor):
        """actions (n_agents, E) -> next observations, world state, available actions, rewards (n_agents, E),
        terminated, truncated, won (E,), final observations (n_agents, E, obs_dim), final world state."""
        actions = actions.T.to(torch.int32).contiguous()
        if (actions.device.type == "cuda") != (self.jax_device.platform == "gpu"):  # JAX and torch apart: copy
            actions = actions.cpu()
        jax_actions = self.jax.device_put(self.jax.numpy.from_dlpack(actions), self.jax_device)
        self.state, *out = self._step(self._keys(), self.state, jax_actions)
        obs, world_state, avail, reward, terminated, truncated, won, final_obs, final_state = out
        reward, terminated, truncated, won = (self._torch(reward, True), self._torch(terminated),
                                              self._torch(truncated), self._torch(won))
        done = terminated | truncated
        self.episode_return += reward.mean(0)
        self.episode_length += 1
        self.ended += torch.stack([(self.episode_return * done).sum(), (self.episode_length * done).sum(),
                                   (won & done).sum(), done.sum()])
        self.episode_return *= ~done
        self.episode_length *= ~done
        return (self._torch(obs, True), self._torch(world_state)[None], self._torch(avail, True).bool(), reward,
                terminated, truncated, won, self._torch(final_obs, True), self._torch(final_state)[None])

    def take_ended_episodes(self):
        """(mean return, mean length, win rate) of the episodes ended since the last call, or None."""
        returns, lengths, wins, count = self.ended.tolist()  # the one host sync for them, once per iteration
        self.ended.zero_()
        return (returns / count, lengths / count, wins / count) if count else None

    def get_state(self) -> dict:
        """Everything a checkpoint needs to step on bit for bit, as tensors: the environments' JAX state, the key."""
        leaves = self.jax.tree.leaves((self.state, self._key))
        return dict(leaves=[torch.from_numpy(np.array(leaf)) for leaf in leaves],
                    episode_return=self.episode_return.clone(), episode_length=self.episode_length.clone())

    def set_state(self, saved: dict) -> None:
        treedef = self.jax.tree.structure((self.state, self._key))
        if len(saved["leaves"]) != treedef.num_leaves:
            raise ValueError(f"env: {len(saved['leaves'])} arrays, not {treedef.num_leaves}")
        self.state, self._key = self.jax.tree.unflatten(treedef, [self.jax.numpy.asarray(t.numpy()) for t in saved["leaves"]])
        self.episode_return, self.episode_length = saved["episode_return"].to(self.device), saved["episode_length"].to(self.device)


@functools.lru_cache(maxsize=None)
def smax_functions(map_name: str):
    """A map's sizes and its batched reset and step, compiled once per process and batch shape (jax.jit caches
    by function): (n_agents, obs_dim, act_dim, state_dim, the longest episode, reset(keys), step(keys, state,
    actions)). An episode terminates when a side is destroyed, and is truncated at the map's time limit."""
    import jax
    import jax.numpy as jnp

    saved = sys.stdout, sys.__stdout__
    with open(os.devnull, "w") as devnull:  # jaxmarl announces its optional environments, resetting sys.stdout
        sys.stdout = sys.__stdout__ = devnull
        try:
            from jaxmarl import make
            from jaxmarl.environments.smax import map_name_to_scenario
        finally:
            sys.stdout, sys.__stdout__ = saved
    env = make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name))
    agents, allies = env.agents, env.num_allies

    def stack(values):  # {agent: (...)} -> (n_agents, ...)
        return jnp.stack([values[a] for a in agents])

    def reset(key):
        obs, state = env.reset(key)
        return state, stack(obs), obs["world_state"], stack(env.get_avail_actions(state))

    def step(key, state, actions):  # one environment, actions (n_agents,)
        key_step, key_reset = jax.random.split(key)
        obs, state, reward, done, _ = env.step_env(key_step, state, {a: actions[i] for i, a in enumerate(agents)})
        alive = state.state.unit_alive
        lost, destroyed = ~alive[:allies].any(), ~alive[allies:].any()
        ended, terminated = done["__all__"], lost | destroyed
        final_obs = stack(obs)
        fresh_state, fresh_obs, fresh_ws, fresh_avail = reset(key_reset)
        avail = jnp.where(ended, fresh_avail, stack(env.get_avail_actions(state)))
        state = jax.tree.map(lambda a, b: jnp.where(ended, a, b), fresh_state, state)
        return (state, jnp.where(ended, fresh_obs, final_obs), jnp.where(ended, fresh_ws, obs["world_state"]),
                avail, stack(reward), terminated, ended & ~terminated, destroyed & ~lost, final_obs, obs["world_state"])

    state_dim = jax.eval_shape(reset, jax.random.PRNGKey(0))[2].shape[-1]
    # the longest episode is max_steps + 1 steps: JaxMARL tests its limit before it counts the step
    return (env.num_agents, env.observation_space(agents[0]).shape[0], env.action_space(agents[0]).n, state_dim,
            env.max_steps + 1, jax.jit(jax.vmap(reset)), jax.jit(jax.vmap(step)))


# ===== Appendix: the command line and its checks, the run folder, checkpoints =====
ALGO = "ippo"  # in run folders' names and the checkpoint format
CHECKPOINT_FORMAT = f"hypermarl-{ALGO}-smax/1"
CHECKPOINT_KEYS = ("format", "args", "run_name", "model", "optimizer", "env", "carry", "rng", "global_step", "iteration")
# The flags that define the model and the environment (--eval-only takes them from the checkpoint), and
# those --resume may change (budget, logging, cadence, device): every other flag is the checkpoint's.
MODEL_FIELDS = ("map", "fc_dim", "gru_hidden_dim", "hypernet", "hypernet_embedding_dim", "hypernet_hidden_dims",
                "hypernet_embedding", "hypernet_init", "hypernet_input", "hypernet_separate_embeddings")
RESUME_MAY_CHANGE = ("total_timesteps", "eval_interval", "save_interval", "save_model", "print_interval", "runs_dir",
                     "track", "wandb_project_name", "wandb_entity", "cuda", "memory_check")
NEEDS_EXTRAS = ("resume", "eval_only", "checkpoint", "save_model", "track")
POSITIVE = ("total_timesteps", "learning_rate", "num_envs", "num_steps", "num_minibatches", "update_epochs",
            "clip_coef", "max_grad_norm", "eval_interval", "eval_episodes", "print_interval", "save_interval",
            "fc_dim", "gru_hidden_dim", "hypernet_embedding_dim")
FAMILY_FLAGS = {"hypernet_embedding_dim": ("mlp",), "hypernet_hidden_dims": ("mlp",), "hypernet_embedding": ("mlp",),
                "hypernet_separate_embeddings": ("mlp",), "hypernet_init": ("mlp", "linear"),
                "hypernet_input": ("mlp", "linear")}
AGENTS = {"2s3z": 5, "3s5z": 8, "smacv2_10_units": 10, "smacv2_20_units": 20}  # allies per map (JaxMARL's scenarios)

def check_args(args: Args, given: set[str], resume_rules=()) -> None:
    """Each flag given only where it applies, every value in its range: ValueError (one line) if not."""
    for broken, why in flag_rules(args, given, resume_rules):
        if broken:
            raise ValueError(why)

def flag_rules(args: Args, given: set[str], resume_rules=()):
    """(broken, message) pairs; a condition may assume that those before it hold."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in sorted(given):  # a flag given where it does not apply, named as written
        written = "--no-" + flag(name)[2:] if getattr(args, name) is False else flag(name)
        yield not extras and name in NEEDS_EXTRAS and bool(getattr(args, name)), \
            f"{written}: needs hypermarl_extras.py beside this script"
        families = FAMILY_FLAGS.get(name, (args.hypernet,))
        yield args.hypernet not in families, \
            f"{written}: only with --hypernet {' or '.join(families)}, got --hypernet {args.hypernet}"
        yield name == "save_interval" and not args.save_model, f"{written}: only with --save-model"
        yield name in ("hypernet_embedding_dim", "hypernet_separate_embeddings") and args.hypernet_embedding != "learned", \
            f"{written}: only with --hypernet-embedding learned, got --hypernet-embedding {args.hypernet_embedding}"
    yield from resume_rules  # a resumed run's budget (hypermarl_extras.py): its reason before any range
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
                              (("hypernet_hidden_dims",), lambda v: v and min(v) > 0, "must be one or more positive sizes")):
        for name in names:
            yield not holds(getattr(args, name)), f"{flag(name)}: {why}, got {getattr(args, name)!r}"
    yield args.num_envs % args.num_minibatches > 0, \
        f"--num-minibatches: must divide --num-envs = {args.num_envs} (a minibatch holds whole sequences), " \
        f"got {args.num_minibatches!r}"
    yield args.total_timesteps < args.num_envs * args.num_steps, \
        f"--total-timesteps: must be at least num_envs * num_steps = {args.num_envs * args.num_steps}, " \
        f"got {args.total_timesteps!r}"
    yield args.hypernet_init == "matched" and args.hypernet == "linear", \
        "--hypernet-init: matched is for --hypernet mlp, got --hypernet linear"  # the linear one's scaled init is exact
    if args.memory_check and extras:  # this machine's memory (hypermarl_extras.py)
        yield extras.memory_rule(args, memory_needed(args), MEMORY_FLAGS)

# What each part of memory_needed grows with: the memory check names the flags of the largest part
MEMORY_FLAGS = dict(rollout=("num_envs", "num_steps"), minibatch=("num_envs", "num_steps", "num_minibatches"),
                    networks=("fc_dim", "gru_hidden_dim", "hypernet_hidden_dims", "hypernet_embedding_dim"),
                    evaluation=("eval_episodes",))

def memory_needed(args: Args) -> dict[str, int]:
    """A lower bound of the bytes a run holds, by part (float32): the rollout, a minibatch's activations through
    the trunk and the heads, kept for the backward pass (the GRU's gates for every step of every sequence), and
    the actor's trunk and hypernetwork with their gradients and Adam's moments, an evaluation's observations."""
    n, E, T, H, fc = args.n_agents, args.num_envs, args.num_steps, args.gru_hidden_dim, args.fc_dim
    obs, act = {"2s3z": (127, 10), "3s5z": (205, 13), "smacv2_10_units": (257, 15), "smacv2_20_units": (517, 25)}[args.map]
    rollout = T * n * E * (obs + 2 * act + 8)
    minibatch = T * n * (E // args.num_minibatches) * (fc + 8 * H + 2 * H + fc + 2 * act)
    trunk = (n if args.hypernet == "nops" else 1) * (obs * fc + 3 * H * (fc + H + 2))  # the dense layer, the GRU
    hyper = n * args.hypernet_embedding_dim + 2 * num_target_params([args.hypernet_embedding_dim,
                                                                      *args.hypernet_hidden_dims])
    networks = trunk + (hyper if args.hypernet == "mlp" else 0)  # with their gradients and Adam's two moments
    evaluation = n * args.eval_episodes * (obs + act)  # one step of every evaluation environment, at least
    return dict(rollout=4 * rollout, minibatch=4 * minibatch, networks=16 * networks, evaluation=4 * evaluation)

def parse_args(argv: list[str], given: set[str]) -> Args:
    """The flags given, the paper's values for the others (--help shows them); n_agents: the map's."""
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
        extras.check_output(args, changes=changes)
    return args, loaded, changes

def duration(seconds: float) -> str:  # 1h02m, 3m05s or 12s
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

def open_run(args, loaded, changes):
    """TensorBoard (and wandb) in a new run folder, or the checkpoint's (hypermarl_extras.py): (run_dir, writer,
    global_step, first iteration). A copy alone writes a plain folder: runs started in the same second share it."""
    prefix = f"smax_{args.map}__{args.exp_name}__{ALGO}_{args.hypernet}__{args.seed}"
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

def save_run(path, args, run_name, agent, optimizer, envs, carry: Carry, global_step, iteration):
    """Everything a resumed run needs to go on bit for bit, written atomically (hypermarl_extras.py)."""
    extras.save_checkpoint(path, dict(
        format=CHECKPOINT_FORMAT, args=dataclasses.asdict(args), run_name=run_name, model=agent.state_dict(),
        optimizer=optimizer.state_dict(), env=envs.get_state(), carry=carry._asdict(),
        rng=extras.rng_state(), global_step=global_step, iteration=iteration))

def restore_run(args, loaded, agent, optimizer, envs=None, carry=None) -> Optional[Carry]:
    """The saved run's model and optimizer, restored in place; resuming (envs given), its environments, carry
    and random generators too: the carry to go on with. CheckpointError (one line) if it does not fit."""
    fresh = dict(model=agent.state_dict(), optimizer=optimizer.state_dict())
    if envs is not None:
        fresh |= dict(env=envs.get_state(), carry=carry._asdict(),
                      rng=extras.rng_state())
    with extras.restoring(args, loaded, fresh):
        agent.load_state_dict(loaded["model"])
        extras.load_optimizer(optimizer, loaded["optimizer"], updated=loaded["iteration"] > 1)
        if envs is None:
            return None
        extras.same_layout(loaded["env"], fresh["env"], "env")
        extras.same_layout(loaded["carry"], fresh["carry"], "carry")
        envs.set_state(loaded["env"])
        extras.set_rng_state(loaded["rng"])
        device = carry.obs.device
        return Carry(**{k: loaded["carry"][k].to(device) for k in Carry._fields})

if __name__ == "__main__":
    sys.exit(main())
