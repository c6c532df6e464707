"""HyperMARL MAPPO and HAPPO on Multi-Agent MuJoCo (Gymnasium-Robotics ``mamujoco_v1``).

Paper section 5.2 (Table 4, Figure 5) and section 6's ablations (Figure 7). HyperMARL generates the actors;
the critics are centralised V(s) on the global state. The rest follows HARL, as the paper does (appendix F,
Tables 17-21). MuJoCo v5 here, v2 in the paper: returns are not comparable with Table 4. Read top to bottom:
    Args, TASK_PRESETS   the flags with HalfCheetah's values (Tables 17-21), the other tasks' values
    Hypernetworks        Eq. (5) linear, Eq. (6) MLP, the initialisation of section 4.3
    The agent            FuPS, NoPS, the generated Weights, HARL's MLP, the Gaussian actors, the critics
    The training loop    main(): rollout, GAE, update, logging, evaluation, checkpoints
    The update           MAPPO (all actors at once), HAPPO (one after the other), the critics' value loss
    Evaluation           deterministic episodes, SND (Eq. 9), gradient variance and interference
    Environment          a task as a fixed-shape gymnasium Env, its worker processes, the inputs' normaliser
    Appendix             the command line and its checks, the run folder
Quick start:  python mappo_hyper_mamujoco.py --task HalfCheetah-2x3 --hypernet mlp --total-timesteps 20000
"""

from __future__ import annotations

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

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.wrappers.utils import RunningMeanStd
from torch.distributions import Normal

try:  # checkpoints, --resume, --eval-only, signals, run folders, videos: a library, optional
    import hypermarl_extras as extras
except ImportError:
    extras = None
Task = Literal["HalfCheetah-2x3", "Walker2d-2x3", "Ant-4x2", "Humanoid-17x1", "Humanoid-9|8"]


# ===== Args =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment (evaluation episode k uses seed + 10000 + k)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda is used when available (MuJoCo always runs on the CPU)
    torch_threads: int = 1  # torch threads while collecting (HARL's torch_threads): the workers need cores
    update_threads: int = torch.get_num_threads()  # torch threads for the update; the numbers depend on it
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

    # Environment
    task: Task = "HalfCheetah-2x3"  # MaMuJoCo task (--help after it shows its values)
    obs_mode: Literal["global", "local"] = "global"  # global: state + one-hot ID (HARL's) | local: own, padded
    max_episode_steps: int = 1000  # episode time limit (truncation: bootstrapped from V(final state))
    agent_obsk: int = 1  # [local] observation depth: joints up to k hops away (Gymnasium-Robotics' agent_obsk)
    num_envs: int = 20  # parallel environments (HARL's tuned configs: 20)
    async_envs: bool = True  # environments in worker processes; --no-async-envs: all in this process
    total_timesteps: int = 10_000_000  # total environment steps (paper: 10M)
    num_steps: int = 200  # steps per environment per rollout (HARL's tuned configs: episode_length 200)

    # Algorithm: HalfCheetah-2x3's values (Table 20; Table 21 for HyperMARL's clip); TASK_PRESETS has the others
    algo: Literal["mappo", "happo"] = "mappo"  # mappo: actors updated at once | happo: one after the other
    hypernet: Literal["mlp", "linear", "fups", "nops"] = "mlp"  # actors: mlp | linear (Eq. 6 | 5) | fups | nops
    critic: Literal["shared", "per-agent"] = "shared"  # one centralised V(s) (HARL) | one per agent (ours)
    learning_rate: float = 5e-4  # actor Adam learning rate
    critic_learning_rate: float = 5e-4  # critic Adam learning rate
    anneal_lr: bool = False  # if toggled, both learning rates decay linearly to 0 (HARL's use_linear_lr_decay)
    update_epochs: int = 15  # actor epochs per update (ppo_epoch)
    critic_epochs: int = 15  # critic epochs per update (critic_epoch)
    num_minibatches: int = 1  # actor minibatches per epoch (actor_num_mini_batch)
    critic_num_minibatches: int = 1  # critic minibatches per epoch (critic_num_mini_batch)
    clip_coef: float = 0.0375  # ratio and value clip (Table 21 for mlp and linear, Tables 17-20 for the others)
    ent_coef: float = 0.01  # entropy bonus
    fixed_order: bool = False  # [happo] update the agents in index order, not a random one (Table 17: Ant)
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.95  # GAE lambda
    huber_delta: float = 10.0  # Huber loss delta of the value loss
    clip_vloss: bool = True  # if toggled, the value loss is clipped (HARL use_clipped_value_loss)
    norm_value: bool = True  # if toggled, value targets are normalised (HARL's ValueNorm)
    norm_obs: bool = False  # if toggled, a running mean/std of the inputs too (ours; saved in checkpoints)
    max_grad_norm: float = 10.0  # gradient-norm clip, per agent for independent actors and per critic
    adam_eps: float = 1e-5  # Adam epsilon (HARL opti_eps)
    actor_hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])  # hidden layers of every actor
    critic_hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])  # hidden layers of every critic
    std_x_coef: float = 1.0  # Gaussian std = sigmoid(log_std / x) * y, log_std starting at x (HARL std_x_coef)
    std_y_coef: float = 0.5  # see --std-x-coef (HARL std_y_coef)

    # HyperMARL (section 4, Table 21) and the ablations of section 6 (HyperMARL-S: --hypernet-hidden-dims 32)
    hypernet_embedding_dim: int = 64  # [mlp] size of the learned agent embedding
    hypernet_hidden_dims: list[int] = field(default_factory=lambda: [64])  # [mlp] hidden layers of the hypernetwork
    hypernet_embedding: Literal["learned", "onehot"] = "learned"  # [mlp] learned (orthogonal init) | onehot
    hypernet_init: Literal["scaled", "matched", "flax", "pytorch"] = "scaled"  # [mlp, linear] 4.3 | ours | w/o RF | torch's
    hypernet_input: Literal["agent", "agent+obs"] = "agent"  # [mlp, linear] agent | agent+obs (ablation w/o GD)

    # Evaluation and metrics (appendix D.1.1)
    eval_interval: int = 100_000  # environment steps between evaluations (D.1.1's 25 episodes: 25 rollouts)
    eval_episodes: int = 40  # deterministic evaluation episodes, run side by side (D.1.1 and HARL: 40)
    snd_samples: int = 1000  # joint states (from the evaluation episodes) on which SND is computed
    snd_gaussian_samples: int = 64  # Monte Carlo samples per observation of the Gaussian Jensen-Shannon distance
    interference_interval: int = 10  # iterations between two measures of the gradient interference
    interference_samples: int = 512  # samples of the rollout on which the interference is measured
    print_interval: int = 1  # iterations between progress lines (also at evaluations, at least once a minute)

# The other tasks' values where they differ from HalfCheetah-2x3's: Tables 19 (Walker2d), 17 (Ant) and
# 18 (Humanoid), HARL's defaults (Zhong et al. 2024), with the learning-rate decay of their tuned configs'
# "train" block, which the tables leave out. Humanoid-9|8 is not in the paper: Humanoid-17x1's.
_HUMANOID = dict(update_epochs=5, critic_epochs=5, ent_coef=0.0, anneal_lr=True)
TASK_PRESETS = {
    "HalfCheetah-2x3": {},
    "Walker2d-2x3": dict(learning_rate=1e-3, critic_learning_rate=1e-3, update_epochs=5, critic_epochs=5,
                         num_minibatches=2, critic_num_minibatches=2, ent_coef=0.0, anneal_lr=True),
    "Ant-4x2": dict(update_epochs=5, critic_epochs=5, ent_coef=0.0, fixed_order=True),
    "Humanoid-17x1": _HUMANOID, "Humanoid-9|8": _HUMANOID}
# --clip-coef: (HyperMARL's, Table 21; the other actors', Tables 17-20)
CLIP_COEF = {"HalfCheetah-2x3": (0.0375, 0.05), "Walker2d-2x3": (0.0375, 0.05), "Ant-4x2": (0.075, 0.1),
             "Humanoid-17x1": (0.075, 0.1), "Humanoid-9|8": (0.075, 0.1)}

def paper_defaults(args: Args, given: set[str]) -> Args:
    """The paper's value for every flag not given: the task's, then those that follow other flags."""
    hypernet = args.hypernet if "hypernet" in given else "nops" if args.algo == "happo" else "mlp"
    values = dict(TASK_PRESETS[args.task], hypernet=hypernet, save_interval=args.eval_interval,
                  clip_coef=CLIP_COEF[args.task][hypernet not in ("mlp", "linear")])
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


# ===== The agent: the families (HyperMARL, FuPS, NoPS), every agent's actor, the critics =====
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
    """Every agent's Linear layers [(W (k, fan_in, fan_out), b (k, 1, fan_out))], made once per rollout or minibatch.
    per_sample (w/o GD): the forward pass makes one network per sample from each input; layers is []."""
    layers: list
    per_sample: bool

class PerAgentMLP(nn.Module):
    """Every agent's HARL MLPBase, x (k, batch, in) -> (k, batch, out): LayerNorm(in), then Linear -> ReLU ->
    LayerNorm per hidden layer, then the output Linear. The family makes the Linear layers; the LayerNorms are
    per agent for disjoint networks (NoPS, critics), else shared (HyperMARL generates what 4.3 initialises)."""

    def __init__(self, args: Args, family: str, n_agents: int, sizes: list[int], gains: list[float], use_id=True):
        super().__init__()
        self.per_sample = family in ("mlp", "linear") and args.hypernet_input == "agent+obs"
        self.weight_net = family_net(args, family, n_agents, sizes, gains, use_id)
        self.sizes, self.per_agent_norms = list(sizes), family == "nops"
        k = n_agents if self.per_agent_norms else 1
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(k, 1, d)) for d in sizes[:-1])
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(k, 1, d)) for d in sizes[:-1])

    def generate(self) -> Weights:
        return Weights([] if self.per_sample else self.weight_net(), self.per_sample)

    def forward(self, x, weights: Weights, agent_ids=None):  # agent_ids: x holds only those agents' inputs (HAPPO)
        norms = list(zip(self.norm_weights, self.norm_biases))
        if agent_ids is not None and self.per_agent_norms:
            norms = [(w[agent_ids], b[agent_ids]) for w, b in norms]
        x = layer_norm(x, *norms[0])
        layers = self.weight_net(x) if weights.per_sample else weights.layers  # w/o GD: from the normalised input
        if agent_ids is not None:
            layers = [(w[agent_ids], b[agent_ids]) for w, b in layers]
        for k, (weight, bias) in enumerate(layers):  # one batched matmul per layer (w/o GD: one per sample)
            x = (x.unsqueeze(-2) @ weight + bias).squeeze(-2) if weights.per_sample else torch.baddbmm(bias, x, weight)
            if k < len(layers) - 1:
                x = layer_norm(torch.relu(x), *norms[k + 1])
        return x

def layer_norm(x, weight, bias, eps: float = 1e-5):  # nn.LayerNorm, with per-agent or shared (k, 1, d) parameters
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight + bias

class GaussianActor(nn.Module):
    """Every agent's Gaussian policy, std = sigmoid(log_std / x) * y (HARL's bounded std), log_std per agent for
    independent actors; padded action dimensions are left out of log-probabilities and entropies."""

    def __init__(self, args: Args, n_agents: int, obs_dim: int, act_dim: int, act_mask: np.ndarray):
        super().__init__()
        sizes = [obs_dim] + list(args.actor_hidden_dims) + [act_dim]
        gains = [np.sqrt(2)] * len(args.actor_hidden_dims) + [0.01]
        # global observations carry the one-hot ID already: FuPS's network adds none of its own
        self.net = PerAgentMLP(args, args.hypernet, n_agents, sizes, gains, use_id=args.obs_mode == "local")
        self.n_agents, self.independent = n_agents, args.hypernet == "nops"
        self.log_std = nn.Parameter(torch.full((n_agents if self.independent else 1, 1, act_dim), float(args.std_x_coef)))
        self.std_x, self.std_y = args.std_x_coef, args.std_y_coef
        self.register_buffer("act_mask", torch.as_tensor(act_mask, dtype=torch.float32).unsqueeze(1))

    def generate(self) -> Weights:
        return self.net.generate()

    def forward(self, x, weights: Weights, agent_ids=None) -> Normal:
        """x (k, batch, obs_dim) of every agent (k = n) or of agent_ids -> their policies, (k, batch, act_dim)."""
        if weights.per_sample and x.shape[1] > self.chunk_size(x):  # (agent_ids: HAPPO's, never per sample)
            mean = self.per_sample_chunked(x, weights)
        else:
            mean = self.net(x, weights, agent_ids)
        log_std = self.log_std[agent_ids] if (self.independent and agent_ids is not None) else self.log_std
        std = torch.sigmoid(log_std / self.std_x) * self.std_y
        # validate_args=False: the argument checks read every mean and std at each call (and sync a GPU)
        return Normal(mean, std.expand_as(mean), validate_args=False)

    def log_prob_entropy(self, x, actions, weights: Weights, agent_ids=None):  # (k, batch), real dimensions only
        dist = self(x, weights, agent_ids)
        mask = self.act_mask if agent_ids is None else self.act_mask[agent_ids]
        return (dist.log_prob(actions) * mask).sum(-1), (dist.entropy() * mask).sum(-1)

    def chunk_size(self, x, max_elements: int = 2**25) -> int:  # samples whose weights fit in max_elements floats
        return max(1, max_elements // (x.shape[0] * num_target_params(self.net.sizes)))

    def per_sample_chunked(self, x, weights: Weights):  # w/o GD's (n, batch, m) weights: 22 GB on Humanoid-17x1
        """Chunks of the batch, recomputed in the backward pass (activation checkpointing): same results."""
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(self.net, piece, weights, use_reentrant=False) if torch.is_grad_enabled()
                          else self.net(piece, weights) for piece in x.split(self.chunk_size(x), dim=1)], 1)

class CentralCritics(nn.Module):
    """Centralised critics V_c(s) (HARL's VNet), independent, value-normalised: one (HARL), or one per agent."""

    def __init__(self, args: Args, n_critics: int, state_dim: int):
        super().__init__()
        sizes = [state_dim] + list(args.critic_hidden_dims) + [1]
        gains = [np.sqrt(2)] * len(args.critic_hidden_dims) + [1.0]
        self.n_critics, self.net = n_critics, PerAgentMLP(args, "nops", n_critics, sizes, gains)

    def forward(self, state):  # (batch, state_dim) -> (n_critics, batch)
        return self.net(state.unsqueeze(0).expand(self.n_critics, -1, -1), self.net.generate()).squeeze(-1)

class ValueNorm(nn.Module):
    """HARL's ValueNorm, per critic: debiased moving mean and mean square of the value targets, updated with
    every critic minibatch's targets before they are normalised (HARL's cal_value_loss)."""

    def __init__(self, n: int, beta: float = 0.99999, epsilon: float = 1e-5, enabled: bool = True):
        super().__init__()
        self.beta, self.epsilon, self.enabled = beta, epsilon, enabled
        self.register_buffer("running_mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("running_mean_sq", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("debiasing_term", torch.zeros((), dtype=torch.float64))

    def mean_var(self):
        debias = self.debiasing_term.clamp(min=self.epsilon)
        mean, mean_sq = self.running_mean / debias, self.running_mean_sq / debias
        return mean, (mean_sq - mean**2).clamp(min=1e-2)

    @torch.no_grad()
    def update(self, targets):  # (n, batch)
        if self.enabled:
            targets = targets.double()
            self.running_mean.mul_(self.beta).add_(targets.mean(1) * (1 - self.beta))
            self.running_mean_sq.mul_(self.beta).add_((targets**2).mean(1) * (1 - self.beta))
            self.debiasing_term.mul_(self.beta).add_(1 - self.beta)

    def normalize(self, x, inverse=False):  # (n, ...)
        if not self.enabled:
            return x
        mean, var = (v.view((-1,) + (1,) * (x.dim() - 1)).to(x.dtype) for v in self.mean_var())
        return x * var.sqrt() + mean if inverse else (x - mean) / var.sqrt()

    def denormalize(self, x):
        return self.normalize(x, inverse=True)


# ===== The training loop =====
def main(argv=None) -> int:
    try:
        args, loaded, changes = read_command_line(sys.argv[1:] if argv is None else [str(token) for token in argv])
    except ValueError as error:  # a bad flag or file (the appendix): one line, nothing written
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # tyro: --help, or a value it refused (its message is printed)
        return exit_.code
    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    evaluator = Evaluator(args, device)
    probe = evaluator.envs[0]  # shapes, masks and split() (which keeps no state: the training envs use it too)
    n, A, S, D = probe.n_agents, probe.act_dim, probe.state_dim, probe.actor_obs_dim
    C = n if args.critic == "per-agent" else 1
    actor = GaussianActor(args, n, D, A, probe.act_mask).to(device)
    critics = CentralCritics(args, C, S).to(device)
    value_norm = ValueNorm(C, enabled=args.norm_value).to(device)
    obs_norm = ObsNormalizer(probe, args.norm_obs)
    fused = device.type in ("cpu", "cuda")  # fused Adam: ~8x faster steps on the large hypernetwork heads
    # independent actors: one Adam per agent (exactly), as HARL; HAPPO steps one agent at a time
    actor_optimizer = (PerAgentAdam(actor.parameters(), n, lr=args.learning_rate, eps=args.adam_eps) if actor.independent
                       else torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=fused))
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=args.critic_learning_rate, eps=args.adam_eps, fused=fused)
    # The environments are made and the checkpoint restored before the run folder: a checkpoint that does not
    # fit writes nothing.
    T, E = args.num_steps, args.num_envs
    envs = None if args.eval_only else make_vector_env(args)
    flat = None if envs is None else envs.reset(seed=args.seed)[0]
    episode_return, episode_length = np.zeros(E), np.zeros(E, dtype=np.int64)
    if loaded is not None:  # weights, optimisers, normalisers; resuming, RNGs and the environments mid-episode too
        try:
            restored = extras.restore_mamujoco_run(args, loaded, actor, critics, value_norm, obs_norm, actor_optimizer,
                                                   critic_optimizer, envs)
        except extras.CheckpointError as error:  # it does not fit, or holds NaN or inf
            print(f"error: {error}", file=sys.stderr)
            evaluator.close()
            if envs is not None:
                envs.close()
            return 2
        if envs is not None:
            flat, episode_return, episode_length = restored
    if args.eval_only:  # the checkpoint's return and SND, printed (hypermarl_extras.py)
        def evaluation_line(snd_obs, video):  # (no --snd-obs-file here: snd_obs is None)
            eval_return, snd, _ = evaluator(actor, obs_norm, video)
            return f"eval/episodic_return={eval_return:.4f} diversity/snd={snd:.6f}"
        try:
            return extras.eval_only(args, loaded, evaluation_line, D, evaluator.video_timing()[1])
        finally:
            evaluator.close()

    batch_size, num_iterations = T * E, args.total_timesteps // (T * E)
    run_dir, writer, global_step, start_iteration = open_run(args, loaded, changes)  # a new folder, or the run's
    print(f"device: {device}" + (" (CUDA is not available)" if args.cuda and device.type != "cuda" else ""))
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))
    print(f"task: {args.task} agents={n} act_dims={probe.act_dims} local_obs_dims={probe.local_obs_dims} state_dim={S} "
          f"actor_obs_dim={D} critics={C}; parameters: actor {sum(p.numel() for p in actor.parameters())}, "
          f"critics {sum(p.numel() for p in critics.parameters())}")
    run_name, checkpoint_path = os.path.basename(run_dir), os.path.join(run_dir, "checkpoint.pt")

    # ALGO Logic: Storage setup, time-major (T, n_agents, num_envs, ...); states (T, E, S); rewards, ends (T, 1, E)
    obs, actions = torch.zeros((T, n, E, D), device=device), torch.zeros((T, n, E, A), device=device)
    states, final_states = torch.zeros((2, T, E, S), device=device)  # final: where an episode hit its time limit
    time_limits = torch.zeros((T, E), dtype=torch.bool, device=device)
    rewards, terminateds, dones = torch.zeros((3, T, 1, E), device=device)

    def save(iteration: int) -> None:  # all a resumed run needs to go on bit for bit (hypermarl_extras.py)
        extras.save_mamujoco_run(checkpoint_path, CHECKPOINT_FORMAT, args, run_name, actor, critics, value_norm,
                                 obs_norm, actor_optimizer, critic_optimizer, envs, flat, episode_return,
                                 episode_length, global_step, iteration)

    start_time, start_step, printed_at = time.time(), global_step, 0.0
    print(f"plan: {num_iterations - start_iteration + 1} iterations of {batch_size} steps ({E} envs x {T}) up to "
          f"step {num_iterations * batch_size:,}, evaluating every {args.eval_interval:,}; an estimate of the time "
          f"follows the first iteration", flush=True)
    rollout_time, update_time, window_returns = 0.0, 0.0, []  # window: episodes ended since the last progress line
    next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
    next_save = (global_step // args.save_interval + 1) * args.save_interval
    exit_code, next_iteration = 0, start_iteration
    # Ctrl-C or SIGTERM: finish the iteration, save a checkpoint, stop (hypermarl_extras.py)
    stop = extras.StopOnSignal() if extras else types.SimpleNamespace(requested=None, restore=lambda: None)
    try:
        for iteration in range(start_iteration, num_iterations + 1):
            if stop.requested:  # between iterations the state is consistent: save it
                break
            if args.anneal_lr:  # HARL: every network's rate, from its own initial value, at each rollout
                fraction = 1.0 - (iteration - 1.0) / num_iterations
                actor_optimizer.param_groups[0]["lr"] = fraction * args.learning_rate
                critic_optimizer.param_groups[0]["lr"] = fraction * args.critic_learning_rate

            # ALGO LOGIC: collect a rollout with every agent's weights generated once
            tick = time.time()
            finished_returns, finished_lengths = [], []
            with torch.no_grad():
                weights = actor.generate()
                for step in range(T):
                    global_step += E
                    x, state_n = obs_norm(flat, update=True)
                    obs[step], states[step] = torch.as_tensor(x, device=device), torch.as_tensor(state_n, device=device)
                    actions[step] = actor(obs[step], weights).sample()
                    # the sample itself, as HARL: the env maps [-1, 1] to the joints' ranges; (n, E, A) -> (E, n, A)
                    flat, reward, terminated, truncated, info = envs.step(actions[step].cpu().numpy().transpose(1, 0, 2))
                    done = terminated | truncated
                    for store, value in ((rewards, reward), (terminateds, terminated), (dones, done)):
                        store[step, 0] = torch.as_tensor(value, dtype=torch.float32, device=device)
                    time_limit = truncated & ~terminated  # bootstrap from V(final state), after the rollout
                    time_limits[step] = torch.as_tensor(time_limit, device=device)
                    if time_limit.any():
                        final = obs_norm(np.stack(info["final_obs"][time_limit]).astype(np.float32))[1]
                        final_states[step, time_limits[step]] = torch.as_tensor(final, device=device)
                    episode_return += reward
                    episode_length += 1
                    finished_returns += episode_return[done].tolist()
                    finished_lengths += episode_length[done].tolist()
                    episode_return[done], episode_length[done] = 0.0, 0

                # behaviour log-probs and values in one batched pass (the weights did not change); (n, T * E, ...)
                batch_obs, batch_actions = (x.transpose(0, 1).reshape(n, T * E, -1) for x in (obs, actions))
                logprobs = actor.log_prob_entropy(batch_obs, batch_actions, weights)[0]
                values_n = critics(states.reshape(T * E, S)).reshape(C, T, E)  # normalised units
                values = value_norm.denormalize(values_n).float().transpose(0, 1)  # (T, C, E)

                # bootstrap value: V(next state), V(final state) at a time limit, 0 at termination
                last_state = torch.as_tensor(obs_norm(flat)[1], device=device)
                next_values = torch.cat([values[1:], value_norm.denormalize(critics(last_state)).float()[None]])
                bootstrap, (t, e) = torch.zeros_like(values), time_limits.nonzero(as_tuple=True)
                if len(t):  # [t, :, e] puts the K indexed pairs first: (K, C), the critics' output transposed
                    bootstrap[t, :, e] = value_norm.denormalize(critics(final_states[t, e])).float().T
                next_values = torch.where(dones.bool(), bootstrap, next_values)
                advantages, returns = compute_gae(rewards.expand(-1, C, -1).contiguous(), values, next_values,
                                                  terminateds, dones, args.gamma, args.gae_lambda)
            rollout_seconds = time.time() - tick
            rollout_time += rollout_seconds
            if iteration == start_iteration:  # an iteration can take minutes on a CPU: say so early
                print(f"iteration {iteration}: rollout took {rollout_seconds:.1f} s; updating "
                      f"({args.update_epochs} actor and {args.critic_epochs} critic epochs)", flush=True)

            # flatten the batch, agent-major: agent i's advantages from its own critic (per-agent) or the shared one
            tick = time.time()
            torch.set_num_threads(args.update_threads)  # the environment workers wait: use every core
            critic_of_agent = torch.arange(n) if C == n else torch.zeros(n, dtype=torch.long)
            adv = advantages.transpose(0, 1).reshape(C, T * E)[critic_of_agent.to(device)]  # (T, C, E) -> (n, T * E)
            adv = (adv - adv.mean()) / (adv.std() + 1e-5)  # HARL: normalised over the whole batch
            batch = dict(obs=batch_obs, actions=batch_actions, logprobs=logprobs, advantages=adv,
                         state=states.reshape(T * E, S), values=values_n.reshape(C, T * E),
                         returns=returns.transpose(0, 1).reshape(C, T * E))

            # Optimizing the actors (MAPPO: all at once; HAPPO: one after the other), then the critics
            interference = None
            if (iteration - 1) % args.interference_interval == 0:
                interference = interference_of(actor, batch, args)
            try:
                order = None if args.algo == "mappo" else range(n) if args.fixed_order else torch.randperm(n).tolist()
                stats = actor_update(actor, actor_optimizer, batch, args, order)
                stats["losses/value_loss"] = critic_update(critics, critic_optimizer, value_norm, batch, args)
            except FloatingPointError as error:
                print(f"error: {error} at update {iteration} (global step {global_step}); stopping. Last good "
                      f"checkpoint: {checkpoint_path if args.save_model else 'none (no --save-model)'}", file=sys.stderr)
                exit_code = 1  # the checkpoint on disk (if any) is the last good one: leave it
                break
            update_seconds = time.time() - tick
            update_time += update_seconds
            torch.set_num_threads(args.torch_threads)

            # TRY NOT TO MODIFY: record rewards, losses and gradient statistics for plotting purposes
            sps = int((global_step - start_step) / (time.time() - start_time))
            stats |= {"charts/SPS": sps, "perf/rollout_seconds": rollout_seconds, "perf/update_seconds": update_seconds,
                      "charts/learning_rate": actor_optimizer.param_groups[0]["lr"],
                      "charts/critic_learning_rate": critic_optimizer.param_groups[0]["lr"]}
            if finished_returns:
                stats |= {"charts/episodic_return": float(np.mean(finished_returns)),
                          "charts/episodic_length": float(np.mean(finished_lengths))}
            if interference is not None:
                stats["grad/interference"] = interference
            for tag, value in stats.items():
                writer.add_scalar(tag, value, global_step)

            line = None
            if global_step >= next_eval or iteration == num_iterations:
                next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
                line = record_evaluation(evaluator, actor, obs_norm, args, writer, run_dir, global_step)
            window_returns += finished_returns
            elapsed = time.time() - start_time
            if line or iteration % args.print_interval == 0 or iteration == start_iteration or elapsed - printed_at >= 60:
                printed_at = elapsed
                train_return = f"{np.mean(window_returns):.3f}" if window_returns else "no_episode_ended"
                window_returns = []
                eta = elapsed / (global_step - start_step) * (num_iterations * batch_size - global_step)
                print(f"global_step={global_step} iteration={iteration}/{num_iterations} "
                      f"episodic_return={train_return} SPS={sps} elapsed={duration(elapsed)} eta={duration(eta)} "
                      f"rollout_s_total={rollout_time:.1f} update_s_total={update_time:.1f}"
                      + (f" {line}" if line else ""), flush=True)
            if args.save_model and global_step >= next_save and iteration < num_iterations:
                next_save = (global_step // args.save_interval + 1) * args.save_interval
                save(iteration + 1)
            next_iteration = iteration + 1
        if exit_code == 0 and (args.save_model or stop.requested):  # both need hypermarl_extras.py
            save(next_iteration)
            print(f"checkpoint: {checkpoint_path} (continue with --resume {checkpoint_path})")
    except OSError as error:  # the run folder became unwritable (read-only, full): the last checkpoint stays
        print(f"error: cannot write {error.filename or run_dir} ({error.strerror or error}); stopping. Last good "
              f"checkpoint: {checkpoint_path if os.path.isfile(checkpoint_path) else 'none'}", file=sys.stderr)
        exit_code = 1
    except BaseException:
        # An exception (a second Ctrl-C) can cut a step or a get_attr after some of the workers' replies
        # were read: a polite close would wait for those again, forever. Stop the workers instead.
        envs.close(terminate=True)
        raise
    finally:
        stop.restore()
        envs.close()
        evaluator.close()
        writer.close()
        if args.track:
            sys.modules["wandb"].finish()
    return exit_code


# ===== The update (GAE, MAPPO and HAPPO, the value loss) =====
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

def actor_update(actor, optimizer, batch: dict, args: Args, order=None) -> dict:
    """update_epochs passes over the rollout in minibatches. MAPPO (no order): every agent at once. HAPPO (Zhong et
    al. 2024): the agents one after the other in `order`, agent i_m's surrogate weighted on every sample by
    M = prod_{j<m} pi_new^{i_j} / pi_old^{i_j}, the ratio product of the agents updated before it."""
    B, device, keys = batch["obs"].shape[1], batch["obs"].device, ("obs", "actions", "logprobs", "advantages")
    factor, history = torch.ones(B, device=device), []
    for ids in [None] if order is None else [torch.tensor([i], device=device) for i in order]:
        mine = {key: batch[key] if ids is None else batch[key][ids] for key in keys}  # (k agents, B, ...)
        for idx in minibatches(B, args.num_minibatches, args.update_epochs, device):
            mb = {key: value[:, idx] for key, value in mine.items()}
            history.append(actor_step(actor, optimizer, mb, args, ids, None if ids is None else factor[idx][None]))
        if ids is not None:  # M^{i_1:m} = M^{i_1:m-1} * pi_new^{i_m}(a|o) / pi_old^{i_m}(a|o), on the whole batch
            with torch.no_grad():
                newlogprob, _ = actor.log_prob_entropy(mine["obs"], mine["actions"], actor.generate(), ids)
                factor = factor * (newlogprob[0] - mine["logprobs"][0]).exp()
    return mean_stats(history)

def actor_step(actor, optimizer, mb: dict, args: Args, agents=None, factor=None) -> dict:
    """One gradient step on a minibatch, of every agent or (HAPPO) of agents, weighted by factor: the clipped
    surrogate and entropy bonus, the paper's gradient variance and norm (before the clip), the clip, Adam."""
    newlogprob, entropy = actor.log_prob_entropy(mb["obs"], mb["actions"], actor.generate(), agents)
    pg_loss, ratio = clipped_surrogate(newlogprob, mb["logprobs"], mb["advantages"], args.clip_coef, factor)
    per_agent = pg_loss - args.ent_coef * entropy.mean(-1)
    loss = per_agent.sum() if actor.independent else per_agent.mean()  # n separate losses, or one shared
    if not torch.isfinite(loss):
        raise FloatingPointError("actor loss is not finite")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in actor.parameters() if p.grad is not None]
    # HAPPO: the agents' slices being updated (the others' gradients are zeros that would dilute the variance)
    grad_var, grad_norm = gradient_variance_and_norm([p.grad if agents is None else p.grad[agents] for p in params])
    if actor.independent:  # HARL: every actor has its own optimiser and clip
        clip_grad_per_agent(params, args.max_grad_norm, actor.n_agents)
    else:  # clip_grad_norm_ with the norm just measured: one pass less over the gradients (3% of the mlp update)
        nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, grad_norm)
    optimizer.step() if agents is None else optimizer.step(agents)
    with torch.no_grad():
        return {"losses/policy_loss": pg_loss.mean(), "losses/entropy": entropy.mean(),
                "losses/clipfrac": ((ratio - 1).abs() > args.clip_coef).float().mean(),
                "losses/approx_kl": ((ratio - 1) - (newlogprob - mb["logprobs"])).mean(),
                "grad/actor_var": grad_var, "grad/actor_norm": grad_norm}

def clipped_surrogate(newlogprob, oldlogprob, advantages, clip_coef, factor=None):
    """PPO's clipped objective as a loss per agent, (k, batch) -> (k,), and the ratio; HAPPO weights it by factor."""
    ratio = (newlogprob - oldlogprob).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    return -(surrogate if factor is None else factor * surrogate).mean(-1), ratio

def minibatches(batch_size: int, num_minibatches: int, epochs: int, device):  # each epoch in a new random order
    minibatch_size = batch_size // num_minibatches
    for _ in range(epochs):
        order = torch.randperm(batch_size, device=device)
        for start in range(0, batch_size, minibatch_size):
            yield order[start: start + minibatch_size]

def mean_stats(history: list[dict]) -> dict:  # every statistic averaged over the update's minibatches
    return {key: float(torch.stack([stats[key] for stats in history]).mean()) for key in history[0]}

class PerAgentAdam(torch.optim.Optimizer):
    """Exactly n separate Adams (HARL's, one per independent actor) on parameters stacked over agents. step(agents)
    moves only their slices and state: in HAPPO, an agent's momentum must not move the agents updated before."""

    def __init__(self, params, n_agents: int, lr: float, eps: float = 1e-8, betas=(0.9, 0.999)):
        super().__init__(params, dict(lr=lr, eps=eps, betas=betas))
        self.n_agents = n_agents

    @torch.no_grad()
    def step(self, agents=None):
        idx = slice(None) if agents is None else agents
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros(self.n_agents, dtype=torch.float64), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] = state["step"].to(p.device)  # load_state_dict leaves it where it was saved (CPU)
                grad, shape = p.grad[idx], (-1,) + (1,) * (p.dim() - 1)
                step = state["step"][idx] + 1
                exp_avg = state["exp_avg"][idx].mul(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"][idx].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["step"][idx], state["exp_avg"][idx], state["exp_avg_sq"][idx] = step, exp_avg, exp_avg_sq
                step_size = (group["lr"] / (1 - beta1**step)).to(p.dtype).view(shape)
                bias_correction2_sqrt = (1 - beta2**step).sqrt().to(p.dtype).view(shape)
                p[idx] = p[idx] - step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])

def clip_grad_per_agent(params, max_norm: float, n: int):
    """Every agent's slice (leading dimension n) clipped on its own: clip_grad_norm_ has no per-slice form."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = sum((g.reshape(n, -1).pow(2).sum(1) for g in grads), torch.zeros(n, device=params[0].device))
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))

def critic_update(critics, optimizer, value_norm, batch: dict, args: Args) -> float:
    """batch: state (B, S), values (C, B) the critics' old outputs (normalised), returns (C, B) raw."""
    losses, state = [], batch["state"]
    for idx in minibatches(state.shape[0], args.critic_num_minibatches, args.critic_epochs, state.device):
        returns = batch["returns"][:, idx]
        value_norm.update(returns)  # as HARL: with every minibatch's targets, which it then normalises
        per_critic = value_loss(critics(state[idx]), batch["values"][:, idx], value_norm.normalize(returns), args)
        loss = per_critic.sum()  # separate critics: separate losses
        if not torch.isfinite(loss):
            raise FloatingPointError("critic loss is not finite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_per_agent(list(critics.parameters()), args.max_grad_norm, critics.n_critics)
        optimizer.step()
        losses.append(per_critic.detach().mean())
    return float(torch.stack(losses).mean())

def value_loss(values, old_values, targets_n, args: Args):
    """HARL's cal_value_loss per critic: the larger of the clipped and unclipped Huber losses, normalised targets."""
    loss = F.huber_loss(values, targets_n, reduction="none", delta=args.huber_delta)
    if args.clip_vloss:
        clipped = old_values + (values - old_values).clamp(-args.clip_coef, args.clip_coef)
        loss = torch.max(loss, F.huber_loss(clipped, targets_n, reduction="none", delta=args.huber_delta))
    return loss.mean(-1)

def interference_of(actor, batch: dict, args: Args) -> float:
    """The agents' gradient interference on all actor parameters, before the update, on a random subset."""
    idx = torch.randperm(batch["obs"].shape[1], device=batch["obs"].device)[: args.interference_samples]
    newlogprob, _ = actor.log_prob_entropy(batch["obs"][:, idx], batch["actions"][:, idx], actor.generate())
    pg_loss, _ = clipped_surrogate(newlogprob, batch["logprobs"][:, idx], batch["advantages"][:, idx], args.clip_coef)
    return gradient_interference(pg_loss, list(actor.parameters()))


# ===== Evaluation and metrics (SND, Eq. 9; gradient variance; interference) =====
def record_evaluation(evaluator, actor, obs_norm, args: Args, writer, run_dir: str, global_step: int) -> str:
    """An evaluation into TensorBoard, evaluations.jsonl (each return, for rliable), a video; the progress line's."""
    video = [] if args.capture_video else None
    eval_return, snd, episodes = evaluator(actor, obs_norm, video)
    if video:
        extras.save_video(writer, os.path.join(run_dir, "videos", f"eval_{global_step}.mp4"), "eval/video",
                          video, global_step, evaluator.video_timing()[1])
    writer.add_scalar("eval/episodic_return", eval_return, global_step)
    writer.add_scalar("diversity/snd", snd, global_step)
    with open(os.path.join(run_dir, "evaluations.jsonl"), "a") as f:
        f.write(json.dumps({"step": global_step, "episode_returns": episodes, "snd": snd}) + "\n")
    return f"eval_return={eval_return:.3f} snd={snd:.4f}"

class Evaluator:
    """eval_episodes deterministic episodes side by side, episode k seeded seed + 10000 + k: a restored checkpoint
    scores what its run scored (--eval-only takes the run's seed). With --capture-video episode 0 renders
    (close() frees its GL context)."""

    def __init__(self, args: Args, device):
        self.envs = [MaMuJoCoEnv(args.task, args.obs_mode, args.agent_obsk, args.max_episode_steps,
                                 "rgb_array" if args.capture_video and k == 0 else None)
                     for k in range(args.eval_episodes)]
        self.args, self.device = args, device

    def video_timing(self) -> tuple[int, float]:  # (stride, fps): real time, at most 50 frames a second
        return extras.video_timing(self.envs[0].base.metadata["render_fps"])

    def __call__(self, actor: GaussianActor, obs_norm: ObsNormalizer, video: Optional[list] = None):
        """(mean return, SND, every episode's return); video: a list for every stride-th frame of episode 0."""
        args, envs = self.args, self.envs
        flats = [env.reset(seed=args.seed + 10_000 + k)[0] for k, env in enumerate(envs)]
        if video is not None:  # rendering reads the simulation and changes nothing in it
            stride = self.video_timing()[0]
            video.append(extras.mamujoco_frame(envs[0].ma))
        returns, active = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
        pool, generator = [], torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            weights = actor.generate()
            for t in range(args.max_episode_steps + 1):  # TimeLimit ends every episode within it
                live = np.nonzero(active)[0]
                film = video is not None and active[0] and (t + 1) % stride == 0
                pool.append(np.stack([flats[k] for k in live]))
                x = torch.as_tensor(obs_norm(pool[-1])[0], device=self.device)
                actions = actor(x, weights).mean.cpu().numpy().transpose(1, 0, 2)  # [-1, 1]: MaMuJoCoEnv rescales
                for j, k in enumerate(live):
                    flats[k], reward, terminated, truncated, _ = envs[k].step(actions[j])
                    returns[k] += reward
                    active[k] = not (terminated or truncated)
                if film:  # no autoreset here: the last step's frame shows how the episode ended
                    video.append(extras.mamujoco_frame(envs[0].ma))
                if not active.any():
                    break
            # SND's joint states, drawn from the raw observations (global mode: 1/n_agents of the memory of
            # every agent's input; 40 Humanoid-17x1 episodes would hold 1 GB); each agent gets its own input
            pool = np.concatenate(pool)
            x = obs_norm(pool[torch.randperm(len(pool), generator=generator)[: args.snd_samples].numpy()])[0]
            dist = actor(torch.as_tensor(x, device=self.device), weights)
            snd = system_neural_diversity(dist.mean, dist.stddev, actor.act_mask, args.snd_gaussian_samples,
                                          torch.Generator(device=self.device).manual_seed(args.seed))
        return float(returns.mean()), snd, returns.tolist()

    def close(self):
        for env in self.envs:
            env.close()

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

def system_neural_diversity(mean, std, act_mask, n_samples=64, generator=None) -> float:
    """Eq. (9): mean Jensen-Shannon distance over agent pairs and observations, every agent's policy (n_agents,
    batch, d) on the SAME observations, on the action dimensions all have (padding would count as diversity)."""
    common, (i, j) = int(act_mask.sum(-1).min()), torch.triu_indices(mean.shape[0], mean.shape[0], offset=1)
    mean, std = mean[..., :common].detach(), std[..., :common].detach()
    return float(js_distance_gaussian(mean[i], std[i], mean[j], std[j], n_samples, generator).mean())

def gradient_variance_and_norm(grads):
    """Variance and L2 norm over all entries of the gradient, from each tensor's sum and norm (no copy)."""
    count = sum(g.numel() for g in grads)
    total = torch.stack([g.sum() for g in grads]).sum()
    squares = torch.stack([torch.linalg.vector_norm(g) for g in grads]).square().sum()
    return (squares - total**2 / count) / (count - 1), squares.sqrt()

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


# ===== Environment (MaMuJoCo) =====
class MaMuJoCoEnv(gym.Env):
    """One task as a fixed-shape gymnasium Env. Observation (flat float32): local mode's agents' observations
    zero-padded to the largest, then the global state. Action (n_agents, act_dim), zero-padded (act_mask), in
    [-1, 1], mapped to every joint's range (HARL's NormalizedActions: Humanoid's +-0.4 joints would saturate),
    not clipped (MuJoCo clamps the control; the control cost sees the action). Reward: the team's. A step is the
    ParallelEnv's without the local observations nobody reads."""

    def __init__(self, task: str, obs_mode: str = "global", agent_obsk: int = 1, max_episode_steps: int = 1000,
                 render_mode: Optional[str] = None):
        super().__init__()
        import farama_notifications  # gymnasium's: Gymnasium-Robotics prints its notice on the Adroit hands' rewards
        farama_notifications.notifications.pop("gymnasium_robotics", None)  # at import (not MaMuJoCo's): skip it
        from gymnasium_robotics import mamujoco_v1

        scenario, conf = task.split("-")  # --task is Gymnasium-Robotics' scenario and agent_conf
        kwargs = dict(agent_obsk=agent_obsk, max_episode_steps=max_episode_steps, render_mode=render_mode)
        if task == "Humanoid-17x1":  # one joint per agent, not built in: from Gymnasium-Robotics' graph of the body
            parts, edges, global_nodes = mamujoco_v1.get_parts_and_edges("Humanoid", None)
            kwargs["agent_factorization"] = dict(partition=[(j,) for j in parts[0]], edges=edges, globals=global_nodes)
        self.ma = mamujoco_v1.parallel_env(scenario, conf, **kwargs)  # (the factorization overrides conf "17x1")
        self.base = self.ma.single_agent_env  # gymnasium.make(...-v5): TimeLimit(max_episode_steps) and checkers
        agents = self.ma.possible_agents
        self.obs_mode, self.n_agents = obs_mode, len(agents)
        self.act_dims = [self.ma.action_space(a).shape[0] for a in agents]
        self.local_obs_dims = [self.ma.observation_space(a).shape[0] for a in agents]
        self.state_dim = self.base.observation_space.shape[0]
        self.act_dim, self.local_obs_dim = max(self.act_dims), max(self.local_obs_dims)
        self.actor_obs_dim = self.state_dim + self.n_agents if obs_mode == "global" else self.local_obs_dim
        self.act_mask = pad_stack([np.ones(d) for d in self.act_dims], self.act_dim)[1]
        self.obs_mask = pad_stack([np.ones(d) for d in self.local_obs_dims], self.local_obs_dim)[1]
        # where each (agent, slot) goes in the single-agent action (map_local_actions_to_global_action)
        index = [(i, j, node.act_ids) for i, part in enumerate(self.ma.agent_action_partitions) for j, node in enumerate(part)]
        self._agent_idx, self._slot_idx, self._global_idx = (np.array(column) for column in zip(*index))
        self.n_global_actions = self.base.action_space.shape[0]
        assert sorted(self._global_idx) == list(range(self.n_global_actions)), "every actuator exactly once"
        self.action_low = pad_stack([self.ma.action_space(a).low for a in agents], self.act_dim)[0]
        self.action_high = pad_stack([self.ma.action_space(a).high for a in agents], self.act_dim)[0]
        self.action_space = gym.spaces.Box(-1.0, 1.0, self.action_low.shape, dtype=np.float32)
        flat = self.state_dim + (self.n_agents * self.local_obs_dim if obs_mode == "local" else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (flat,), dtype=np.float32)

    def local_to_global_action(self, actions: np.ndarray) -> np.ndarray:  # (n_agents, act_dim) padded -> MuJoCo's
        out = np.empty(self.n_global_actions, dtype=np.float64)
        out[self._global_idx] = actions[self._agent_idx, self._slot_idx]
        return out

    def _flat_obs(self, state: np.ndarray) -> np.ndarray:
        state = state.astype(np.float32)
        if self.obs_mode == "global":
            return state
        local, _ = pad_stack([self.ma._get_obs_agent(i) for i in range(self.n_agents)], self.local_obs_dim)
        return np.concatenate([local.reshape(-1), state])

    def split(self, flat: np.ndarray):
        """(..., flat) -> local observations (..., n_agents, local_obs_dim) or None, state (..., state_dim)."""
        state = flat[..., flat.shape[-1] - self.state_dim:]
        if self.obs_mode == "global":
            return None, state
        return flat[..., : self.n_agents * self.local_obs_dim].reshape(*flat.shape[:-1], self.n_agents, -1), state

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        state, _ = self.base.reset(seed=seed, options=options)
        return self._flat_obs(state), {}

    def step(self, action):
        action = self.action_low + (np.asarray(action) + 1.0) * 0.5 * (self.action_high - self.action_low)
        state, reward, terminated, truncated, _ = self.base.step(self.local_to_global_action(action))
        return self._flat_obs(state), float(reward), bool(terminated), bool(truncated), {}

    @property
    def sim_state(self) -> dict:  # what a checkpoint needs to resume this env's episode (hypermarl_extras.py)
        return extras.mujoco_sim_state(self.base)

    @sim_state.setter
    def sim_state(self, state: dict) -> None:
        extras.set_mujoco_sim_state(self.base, state)

    def close(self):
        self.ma.close()

def pad_stack(arrays, width: int):
    """Rows of unequal length -> (n, width) float32, zero-padded, and the bool mask of real entries."""
    out, mask = np.zeros((len(arrays), width), dtype=np.float32), np.zeros((len(arrays), width), dtype=bool)
    for i, row in enumerate(arrays):
        out[i, : len(row)], mask[i, : len(row)] = row, True
    return out, mask

def make_vector_env(args: Args) -> gym.vector.VectorEnv:
    """num_envs environments, in worker processes (async_envs). Autoreset SAME_STEP: with done=True comes the
    next episode's first observation, and the ended one's last in info["final_obs"] (to bootstrap)."""
    fns = [functools.partial(MaMuJoCoEnv, args.task, args.obs_mode, args.agent_obsk, args.max_episode_steps)
           for _ in range(args.num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if not (args.async_envs and args.num_envs > 1):
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    if extras is None:  # without a checkpoint to write on Ctrl-C, the workers may stop with the run
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    return extras.signal_deaf_vector_env(fns, mode)  # the checkpoint a stop writes needs their simulators

class ObsNormalizer:
    """Raw observations -> the networks' inputs. --norm-obs (ours, off by default): a running mean/std (gymnasium's
    RunningMeanStd, float64) of the global state and, in local mode, of every agent's own features (padding stays
    0), clipped to [-10, 10]; in the checkpoint, so that a restored policy sees the inputs it was trained on."""

    def __init__(self, env: MaMuJoCoEnv, enabled: bool = True):
        self.env, self.enabled = env, enabled
        self.rms = dict(state=RunningMeanStd(shape=(env.state_dim,))) | (
            dict(local=RunningMeanStd(shape=env.obs_mask.shape)) if env.obs_mode == "local" else {})

    def __call__(self, flat: np.ndarray, update: bool = False):
        """(batch, flat) -> every agent's actor input (n_agents, batch, obs_dim), global mode's [state, one-hot ID]
        (HARL) or local mode's own padded observation (FuPS's network adds the ID), and the state (batch, S)."""
        local, state = self.env.split(flat)
        for key, x in (("state", state), ("local", local)):
            if update and self.enabled and x is not None:
                self.rms[key].update(np.asarray(x, np.float64).reshape((-1,) + self.rms[key].mean.shape))
        state = self.normalize("state", state)
        if local is not None:
            return np.ascontiguousarray(np.swapaxes(self.normalize("local", local) * self.env.obs_mask, 0, 1)), state
        n = self.env.n_agents
        ids = np.broadcast_to(np.eye(n, dtype=np.float32)[:, None, :], (n, state.shape[0], n))
        return np.concatenate([np.broadcast_to(state[None], (n,) + state.shape), ids], -1), state

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return x.astype(np.float32)
        rms = self.rms[key]
        return np.clip((x - rms.mean) / np.sqrt(rms.var + 1e-8), -10.0, 10.0).astype(np.float32)


# ===== Appendix: the command line and its checks, the run folder =====
SIMULATOR = "mujoco"
CHECKPOINT_FORMAT = "hypermarl-mappo-mamujoco/5"
CHECKPOINT_KEYS = ("format", "args", "run_name", "actor", "critics", "value_norm", "obs_norm", "actor_optimizer",
                   "critic_optimizer", "envs", "rng", "global_step", "iteration")
# The flags that define the model and the environment (--eval-only takes them from the checkpoint), and those
# --resume may change (budget, logging, cadence, device, worker processes): every other flag is the checkpoint's,
# the thread counts too (a matrix product's sums split otherwise).
MODEL_FIELDS = ("task", "obs_mode", "agent_obsk", "max_episode_steps", "algo", "hypernet", "critic", "norm_obs",
                "norm_value", "actor_hidden_dims", "critic_hidden_dims", "std_x_coef", "std_y_coef",
                "hypernet_embedding_dim", "hypernet_hidden_dims", "hypernet_embedding", "hypernet_init", "hypernet_input")
RESUME_MAY_CHANGE = ("total_timesteps", "eval_interval", "save_interval", "save_model", "print_interval", "runs_dir",
                     "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video", "async_envs", "memory_check")
NEEDS_EXTRAS = ("resume", "eval_only", "checkpoint", "save_model", "capture_video", "track")
POSITIVE = ("torch_threads", "update_threads", "max_episode_steps", "num_envs", "total_timesteps", "num_steps",
            "learning_rate", "critic_learning_rate", "update_epochs", "critic_epochs", "num_minibatches",
            "critic_num_minibatches", "clip_coef", "huber_delta", "max_grad_norm", "adam_eps", "std_x_coef",
            "std_y_coef", "hypernet_embedding_dim", "eval_interval", "eval_episodes", "snd_samples",
            "snd_gaussian_samples", "interference_interval", "interference_samples", "print_interval", "save_interval")
SIZES = ("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims")
FAMILY_FLAGS = {"hypernet_embedding_dim": ("mlp",), "hypernet_hidden_dims": ("mlp",), "hypernet_embedding": ("mlp",),
                "hypernet_init": ("mlp", "linear"), "hypernet_input": ("mlp", "linear")}

def check_args(args: Args, given: set[str], resume_rules=()) -> None:
    """Each flag given only where it applies, every value in its range: ValueError (one line) if not."""
    for broken, why in flag_rules(args, given, resume_rules):
        if broken:
            raise ValueError(why)

def flag_rules(args: Args, given: set[str], resume_rules=()):
    """(broken, message) pairs; a condition may assume that those before it hold."""
    def flag(name):
        return "--" + name.replace("_", "-")

    batch, max_seed = args.num_envs * args.num_steps, 2**32 - 1 - 10_000 - (args.eval_episodes - 1)  # NumPy's seeds
    for name in sorted(given):  # a flag given where it does not apply, named as written
        written = "--no-" + flag(name)[2:] if getattr(args, name) is False else flag(name)
        yield not extras and name in NEEDS_EXTRAS and bool(getattr(args, name)), \
            f"{written}: needs hypermarl_extras.py beside this script"
        families = FAMILY_FLAGS.get(name, (args.hypernet,))
        yield args.hypernet not in families, \
            f"{written}: only with --hypernet {' or '.join(families)}, got --hypernet {args.hypernet}"
        yield name == "save_interval" and not args.save_model, f"{written}: only with --save-model"
        yield name == "hypernet_embedding_dim" and args.hypernet_embedding != "learned", \
            f"{written}: only with --hypernet-embedding learned, got --hypernet-embedding {args.hypernet_embedding}"
        yield name == "fixed_order" and args.algo != "happo", f"{written}: only with --algo happo, got --algo {args.algo}"
        yield name == "agent_obsk" and args.obs_mode != "local", \
            f"{written}: only with --obs-mode local, got --obs-mode {args.obs_mode}"
    yield from resume_rules  # a resumed run's budget (hypermarl_extras.py): its reason before any range
    for name, value in vars(args).items():  # inf and nan pass every comparison below: refuse them first
        yield isinstance(value, float) and not math.isfinite(value), f"{flag(name)}: must be a finite number, got {value!r}"
        yield any(type(v) is int and abs(v) > 2**53 for v in (value if isinstance(value, list) else [value])), \
            f"{flag(name)}: must be at most 2**53 = {2**53:,}"  # beyond, arithmetic and logs lose or overflow
    yield not 0 < args.eval_episodes < 2**32 - 10_000, f"--eval-episodes: must be between 1 and {2**32 - 10_001} " \
                                                       f"(episode k is seeded seed + 10000 + k), got {args.eval_episodes!r}"
    yield not 0 <= args.seed <= max_seed, f"--seed: must be between 0 and {max_seed} (evaluation episode k uses " \
                                          f"seed + 10000 + k, below 2**32), got {args.seed!r}"
    exp = repr(args.exp_name) if len(args.exp_name) <= 128 else f"{len(args.exp_name)} characters"
    yield not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{,127}", args.exp_name), \
        f"--exp-name: must be a plain name (letters, digits, '.', '_', '-'; at most 128), got {exp}"
    yield not args.runs_dir, "--runs-dir: must name a folder, got ''"  # a copy alone would write into the current one
    yield args.runs_dir.encode(errors="replace").decode() != args.runs_dir, \
        f"--runs-dir: {args.runs_dir!r} is not UTF-8 text (TensorBoard writes UTF-8 paths only)"
    for names, holds, why in ((POSITIVE, lambda v: v > 0, "must be positive"),
                              (("gamma", "gae_lambda"), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
                              (("ent_coef",), lambda v: v >= 0, "must be >= 0"),
                              (("agent_obsk",), lambda v: 0 <= v <= 16, "must be between 0 and 16 (no body is deeper)"),
                              (("torch_threads", "update_threads"), lambda v: v <= 1024, "must be at most 1024"),
                              (SIZES, lambda v: v and min(v) > 0, "must be one or more positive sizes")):
        for name in names:
            yield not holds(getattr(args, name)), f"{flag(name)}: {why}, got {getattr(args, name)!r}"
    for name in ("num_minibatches", "critic_num_minibatches"):
        yield batch % getattr(args, name) > 0, \
            f"{flag(name)}: must divide num_envs * num_steps = {batch}, got {getattr(args, name)!r}"
    yield args.total_timesteps < batch, \
        f"--total-timesteps: must be at least num_envs * num_steps = {batch}, got {args.total_timesteps!r}"
    yield args.algo == "happo" and args.hypernet != "nops", "--hypernet: --algo happo needs disjoint per-agent " \
        f"actors (nops), got --hypernet {args.hypernet}"  # shared weights: one agent's step would move the others
    yield args.hypernet_init == "matched" and args.hypernet == "linear", \
        "--hypernet-init: matched is for --hypernet mlp, got --hypernet linear"  # the linear one's scaled init is exact
    if args.memory_check and extras:  # this machine's memory (hypermarl_extras.py); MuJoCo runs on the CPU
        yield extras.memory_rule(args, memory_needed(args), MEMORY_FLAGS, host_parts=("environments",))

# What each part of memory_needed grows with: the memory check names the flags of the largest part
MEMORY_FLAGS = dict(environments=("num_envs", "eval_episodes"), rollout=("num_envs", "num_steps"),
                    networks=("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims", "hypernet_embedding_dim"),
                    minibatch=("num_envs", "num_steps", "num_minibatches"), snd=("snd_gaussian_samples", "snd_samples"))

# (agents, largest action, global state) of each task: the memory check's, before any simulator is built
TASK_SHAPES = {"HalfCheetah-2x3": (2, 3, 17), "Walker2d-2x3": (2, 3, 17), "Ant-4x2": (4, 2, 105),
               "Humanoid-17x1": (17, 1, 348), "Humanoid-9|8": (2, 9, 348)}

def memory_needed(args: Args) -> dict[str, int]:
    """A lower bound of the bytes a run holds, by part, before anything is built: the environments (a worker
    process holds 8 MiB of its own, an environment in this process 1 MiB: benchmark/memory_estimate.py), the
    rollout and its batch (float32), the networks with their gradients and Adam's moments, the interference's
    per-agent gradients, a minibatch's activations (w/o GD: a chunk of per-sample weights), SND's Monte Carlo
    draws (float64, three tensors of them at once)."""
    (n, A, S), E, T = TASK_SHAPES[args.task], args.num_envs, args.num_steps
    D, C = (S + n if args.obs_mode == "global" else S // n), (n if args.critic == "per-agent" else 1)
    mb, mb_critic = T * E // args.num_minibatches, T * E // args.critic_num_minibatches
    m_actor = num_target_params([D, *args.actor_hidden_dims, A])
    m_critic = num_target_params([S, *args.critic_hidden_dims, 1])
    copies = {"mlp": args.hypernet_hidden_dims[-1] + 1, "linear": n + 1, "fups": 1}.get(args.hypernet, n)
    trunk = num_target_params([args.hypernet_embedding_dim, *args.hypernet_hidden_dims])  # [mlp] one per tensor
    hyper = n * args.hypernet_embedding_dim + 2 * (len(args.actor_hidden_dims) + 1) * trunk if args.hypernet == "mlp" else 0
    per_sample = args.hypernet in ("mlp", "linear") and args.hypernet_input == "agent+obs"
    pool = min(args.snd_samples, args.eval_episodes * (args.max_episode_steps + 1))  # SND's joint states
    workers = args.async_envs and E > 1
    return dict(environments=2**20 * (E * (8 if workers else 1) + args.eval_episodes),
                rollout=4 * T * E * (2 * n * (D + A) + 2 * S + 8),
                networks=4 * (m_actor * (4 * copies + 2 * n + n * copies) + 4 * C * m_critic + 4 * hyper),
                minibatch=4 * (mb * n * (D + sum(args.actor_hidden_dims) + A) + C * mb_critic * (
                    S + sum(args.critic_hidden_dims)) + (min(mb * n * m_actor, 2**25) if per_sample else 0)),
                snd=24 * args.snd_gaussian_samples * n * (n - 1) // 2 * pool * A)

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
    prefix = f"mamujoco_{args.task.replace('|', '_')}__{args.exp_name}__{args.algo}_{args.hypernet}__{args.seed}"
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
