"""DiCo (Bettini, Kortvelesy & Prorok 2024, "Controlling Behavioral Diversity in Multi-Agent
Reinforcement Learning"), the baseline of the paper's Figure 4 and Table 3, as its authors' code runs it.

A baseline from another paper, kept apart from the HyperMARL scripts: ippo_hyper_vmas.py and
mappo_hyper_vmas.py import this module only for --hypernet dico, and hand it their building blocks
(SharedNet, IndependentNets, batched_mlp, the sampling functions, critic_input, Weights), so DiCo runs
the same code as the families it is compared with. Its interface is the scripts' Agent's: generate,
policy, get_value, get_action_and_value, actor_parameters, env_action, after_step.

    pi_i(o) = shared(o) + (SND_des / SND_hat) * deviation_i(o)

Its values for Navigation: Table 14 (SND_des) and Table 15's DiCo row (clip, learning rate).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Table 15's DiCo row: (clip_coef, learning_rate) for Navigation with 8 and 4 agents, per goal setting.
NAVIGATION_SWEEP = {8: dict(same=(0.2, 5e-5), different=(0.1, 2.5e-4), half=(0.1, 2.5e-4)),
                    4: dict(same=(0.2, 5e-5), different=(0.1, 2.5e-4), half=(0.1, 5e-4))}


def navigation_defaults(n_agents: int, goals) -> dict:
    """DiCo's Navigation values: Table 15's clip and learning rate, Table 14's SND_des (0 when all agents
    share a goal, 1.2 for two agents with two goals, else unconstrained)."""
    values = {}
    if goals in NAVIGATION_SWEEP.get(n_agents, {}):
        values["clip_coef"], values["learning_rate"] = NAVIGATION_SWEEP[n_agents][goals]
    values["dico_snd_des"] = 0.0 if goals == "same" else 1.2 if (n_agents, goals) == (2, "different") else -1.0
    return values


def flag_rules(args):
    """(broken, message) pairs for DiCo's own flags, as the scripts' flag_rules."""
    yield not (args.dico_snd_des == -1 or args.dico_snd_des >= 0), \
        f"--dico-snd-des: must be -1 (unconstrained) or >= 0, got {args.dico_snd_des!r}"


def torch_default_init_(module: nn.Module) -> None:
    """nn.Linear's default init, U(+-1/sqrt(fan_in)) for weights and biases: DiCo's networks are
    torchrl MLPs, which keep it (no orthogonal init). module: a SharedNet or IndependentNets."""
    with torch.no_grad():
        if hasattr(module, "layers"):  # SharedNet
            for layer in module.layers:
                layer.reset_parameters()
            return
        for weight, bias in zip(module.weights, module.biases):
            bound = weight.shape[1] ** -0.5
            weight.uniform_(-bound, bound)
            bias.uniform_(-bound, bound)


class DiCoMLP(nn.Module):
    """DiCo's policy network: pi_i(o) = shared(o) + (SND_des / SND_hat) * deviation_i(o).

    Gaussian actions: the shared network outputs a mean, squashed by tanh into [-1, 1] (their
    process_shared), and a state-dependent std (torchrl's biased softplus: softplus(x + b) + 0.01,
    std 1 at x = 0); the per-agent deviation networks output mean offsets; actions follow a
    TanhNormal (Agent). SND_hat is their running estimate: each training forward pass moves it by
    tau = 0.01 toward the mean pairwise L2 distance between the deviation outputs (every agent's
    network on every agent's observation), starting from the first measurement; rollouts and
    evaluation use the stored value. SND_des -1: ratio 1 (unconstrained); 0: shared network only.
    Discrete actions (in neither the paper nor DiCo's code): logits = shared + ratio * deviation.
    """

    TAU = 0.01
    STD_BIAS = math.log(math.expm1(0.99))  # softplus(STD_BIAS) + 0.01 = 1

    def __init__(self, parts: dict, n_agents, sizes, gains, activation, snd_des, discrete):
        super().__init__()
        act_dim = sizes[-1]
        self.batched_mlp = parts["batched_mlp"]
        self.shared = parts["SharedNet"](n_agents, list(sizes[:-1]) + [act_dim if discrete else 2 * act_dim], gains,
                                         use_id=False)
        self.deviation = parts["IndependentNets"](n_agents, sizes, gains)
        torch_default_init_(self.shared)
        torch_default_init_(self.deviation)
        self.activation, self.snd_des, self.discrete = activation, snd_des, discrete
        self.register_buffer("snd_hat", torch.tensor(float("nan")))  # in the checkpoint with the weights

    def forward(self):
        """Every agent's weights: (the shared network's, the deviation networks')."""
        return self.shared(), self.deviation()

    def deviation_snd(self, x, deviation_params) -> torch.Tensor:
        """Mean pairwise L2 distance between the agents' deviation outputs on all observations of x."""
        n = x.shape[0]
        everyone = x.reshape(1, -1, x.shape[-1]).expand(n, -1, -1)  # (n, n * batch, obs_dim): all agents' obs
        outputs = self.batched_mlp(everyone, deviation_params, self.activation)  # every agent's network on each
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        return torch.linalg.vector_norm(outputs[i] - outputs[j], dim=-1).mean()

    # Eager under --compile: a compiled backward would read SND_hat after the in-place update below
    # (torch 2.13; measured: first-minibatch gradients off by up to 140%).
    @torch.compiler.disable
    def scaling_ratio(self, x, deviation_params, update_estimate=True):
        if self.snd_des <= 0:
            return 0.0 if self.snd_des == 0 else 1.0
        estimate = self.snd_hat
        if torch.is_grad_enabled():
            measured = self.deviation_snd(x, deviation_params)
            # torch.where, not `if`: a Python test of a CUDA value would sync every rollout step and minibatch
            estimate = torch.where(self.snd_hat.isnan(), measured, (1 - self.TAU) * self.snd_hat + self.TAU * measured)
            if update_estimate:
                self.snd_hat.copy_(estimate.detach())
        return torch.where(estimate.isnan(), 1.0, self.snd_des / estimate)

    def policy(self, x, params, update_estimate=True):
        """logits, or (mean, std), each (n_agents, batch, act)."""
        shared_params, deviation_params = params
        out = self.batched_mlp(x, shared_params, self.activation)
        if not self.discrete:
            loc, pre_std = out.chunk(2, -1)
            out = torch.tanh(loc)  # process_shared
            std = F.softplus(pre_std + self.STD_BIAS) + 0.01
        ratio = self.scaling_ratio(x, deviation_params, update_estimate)
        if not (isinstance(ratio, float) and ratio == 0.0):
            out = out + ratio * self.batched_mlp(x, deviation_params, self.activation)
        return out if self.discrete else (out, std)


class Agent(nn.Module):
    """Every agent's DiCo actor and critic, with the interface of the scripts' Agent.

    BenchMARL's IPPO (DiCo's config) gives every agent its own critic; its MAPPO shares one
    centralised critic (here with a one-hot ID, since rewards are per agent). Gaussian actions follow
    a TanhNormal: the stored action is the Gaussian sample u, the environment gets tanh(u). After each
    PPO step, DiCo's action-space loss takes one step with its own Adam (their ActionSpaceLoss callback).
    """

    per_sample = False  # generated once per rollout or minibatch

    def __init__(self, args, obs_dim: int, act_dim: int, discrete: bool, parts: dict):
        super().__init__()
        n = args.n_agents
        self.parts, self.discrete, self.squash = parts, discrete, not discrete
        self.activation = torch.relu if args.activation == "relu" else torch.tanh
        self.max_grad_norm, self.snd_logged = args.max_grad_norm, args.dico_snd_des > 0
        critic_in_dim = parts["critic_input"](torch.zeros(n, 1, obs_dim)).shape[-1]
        self.actor = DiCoMLP(parts, n, [obs_dim, *args.actor_hidden_dims, act_dim],
                             [math.sqrt(2)] * len(args.actor_hidden_dims) + [0.01], self.activation,
                             args.dico_snd_des, discrete)
        critic_family = "fups" if critic_in_dim != obs_dim else "nops"  # centralised (MAPPO) or not (IPPO)
        self.critic = parts["family_net"](args, critic_family, n, [critic_in_dim, *args.critic_hidden_dims, 1],
                                                [math.sqrt(2)] * len(args.critic_hidden_dims) + [1.0])
        torch_default_init_(self.critic)
        # DiCo's action-space loss has its own Adam (their callback: lr 3e-5, torch's default eps).
        self.action_optimizer = torch.optim.Adam(self.actor.parameters(), lr=3e-5) if self.squash else None

    def generate(self, obs):
        return self.parts["Weights"](self.actor(), self.critic())

    def policy(self, x, weights, update_estimate=True):
        return self.actor.policy(x, weights.actor, update_estimate)

    def get_value(self, x, weights):
        return self.parts["batched_mlp"](self.parts["critic_input"](x), weights.critic, self.activation).squeeze(-1)

    def get_action_and_value(self, x, weights, action=None):
        dist = self.policy(x, weights)
        if action is None:
            action = self.parts["sample_action"](dist, self.discrete)
        logprob, entropy = self.parts["log_prob_entropy"](dist, action, self.discrete)
        if self.squash:  # TanhNormal: minus log|d tanh(u)/du|; the entropy is its one-sample estimate at u
            log_jacobian = (2 * (math.log(2.0) - action - F.softplus(-2 * action))).sum(-1)
            logprob, entropy = logprob - log_jacobian, entropy + log_jacobian.detach()
        return action, logprob, entropy, self.get_value(x, weights)

    def actor_parameters(self):
        return list(self.actor.parameters())

    def env_action(self, action):
        return torch.tanh(action) if self.squash else action

    def action_space_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """DiCo's extra loss: the squared largest (over agents) L2 overflow of the Gaussian mean outside
        the action box [-1, 1], averaged over the minibatch."""
        loc, _ = self.policy(obs, self.generate(obs), update_estimate=False)
        overflow = torch.linalg.vector_norm(loc - loc.detach().clamp(-1.0, 1.0), dim=-1)
        return overflow.max(0).values.square().mean()

    def after_step(self, mb: dict) -> dict:
        """One step of the action-space loss (own Adam, the same clip), as their callback; the estimate SND_hat."""
        stats = {}
        if self.action_optimizer is not None:
            stats["dico_action_loss"] = action_loss = self.action_space_loss(mb["obs"])
            self.action_optimizer.zero_grad()
            action_loss.backward()
            nn.utils.clip_grad_norm_(self.actor.parameters(), self.max_grad_norm)
            self.action_optimizer.step()
        if self.snd_logged:
            stats["diversity/dico_snd_hat"] = self.actor.snd_hat
        return stats

    def get_extra_state(self):  # the action optimizer's moments, in the checkpoint with the weights
        return {"action_optimizer": self.action_optimizer.state_dict() if self.action_optimizer else {}}

    def set_extra_state(self, state):
        if self.action_optimizer is not None:
            settings = self.action_optimizer.state_dict()["param_groups"]
            self.action_optimizer.load_state_dict(state["action_optimizer"])
            if self.action_optimizer.state_dict()["param_groups"] != settings:  # an edited checkpoint: refused
                raise ValueError("the action optimizer's settings are not DiCo's")
