"""HyperMARL MAPPO and HAPPO on Multi-Agent MuJoCo (Gymnasium-Robotics ``mamujoco_v1``).

Paper section 5.2 (Table 4, Figure 5) and section 6's ablations (Figure 7). HyperMARL is applied
to the actor only; the critic is one centralised V(s) on the global state, separate from the
actors, as HARL builds it for MAPPO and HAPPO alike. Implementation details follow HARL (appendix F,
Tables 17-21): MLPBase's LayerNorms (input and every hidden layer), Huber and clipped value loss,
value normalisation (HARL's ValueNorm), orthogonal init, separate actor and critic learning rates
and epochs, HARL's bounded Gaussian std (sigmoid(log_std / x) * y), actions in [-1, 1] rescaled to
the joints' ranges, Table 21's clip for HyperMARL. Gymnasium-Robotics runs the MuJoCo v5 tasks,
the paper the v2 ones: returns are not comparable with Table 4. Read top to bottom:

    1. Arguments (Tables 17-21)              5. Metrics (SND, gradient variance, interference)
    2. Environment                           6. The update (GAE, MAPPO / HAPPO, value loss)
    3. Hypernetworks (Eq. 5, 6; section 4.3) 7. The training loop, then evaluation
    4. Baselines and the agent               Appendix: command line, run folder, signals, checkpoints

Quick start:  python mappo_hyper_mamujoco.py --task HalfCheetah-2x3 --hypernet mlp --total-timesteps 20000
Baselines:    --hypernet nops (independent actors), --hypernet fups (shared actor + one-hot ID),
              --algo happo (HAPPO: independent actors, sequential updates)
Ablations:    --hypernet-hidden-dims 32 (HyperMARL-S), --hypernet-embedding onehot,
              --hypernet-init default (w/o RF), --hypernet-input agent+obs (w/o GD)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.wrappers.utils import RunningMeanStd
from torch.distributions import Normal


# ===== 1. Arguments =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (evaluation episode k uses seed + 10000 + k)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available (MuJoCo always runs on the CPU)"""
    torch_threads: int = 1
    """torch threads while collecting (HARL's torch_threads); 1 avoids OpenMP stalls while the environment workers share the cores"""
    update_threads: int = torch.get_num_threads()
    """torch threads for the update, when the environment workers are idle (torch's default here: one per physical core, or OMP_NUM_THREADS); the numbers depend on it: give it to compare runs across machines"""
    track: bool = False
    """if toggled, this experiment is tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "hypermarl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, every evaluation's first episode is saved as runs_dir/run_name/videos/eval_<step>.mp4 and to TensorBoard (eval/video; wandb with --track); needs hypermarl_extras.py and EGL (no display or GPU needed)"""
    runs_dir: str = "runs"
    """folder for TensorBoard logs and checkpoints (runs_dir/run_name)"""
    save_model: bool = False
    """if toggled, write a checkpoint every --save-interval steps and at the end (needs hypermarl_extras.py)"""
    save_interval: int = 100_000
    """environment steps between checkpoints (unless given: --eval-interval)"""
    resume: Optional[str] = None
    """path of a checkpoint to continue training from; the run's flags come from it, and only --total-timesteps, --eval-interval, --save-interval, --print-interval, --save-model, --runs-dir, --capture-video, --cuda, --async-envs and the wandb flags may change; the environments continue their episodes, so the numbers are those of an uninterrupted run"""
    eval_only: bool = False
    """if toggled, only evaluate --checkpoint (return and SND) and exit; writes nothing (with --capture-video: the video, in a new runs_dir folder)"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""

    # Environment
    task: Literal["HalfCheetah-2x3", "Walker2d-2x3", "Ant-4x2", "Humanoid-17x1", "Humanoid-9|8"] = "HalfCheetah-2x3"
    """MaMuJoCo task (--help after it shows its defaults)"""
    obs_mode: Literal["global", "local"] = "global"
    """global: every agent sees the global state plus a one-hot ID (HARL's convention, which Table 4 follows); local: each agent's own local observation, zero-padded to the largest, with a mask"""
    max_episode_steps: int = 1000
    """episode time limit (truncation, bootstrapped from V(final state)); MaMuJoCo's is 1000"""
    agent_obsk: int = 1
    """[local] observation depth: joints up to k hops away (Gymnasium-Robotics' agent_obsk)"""
    num_envs: int = 20
    """parallel environments, in worker processes (1: in-process); HARL's tuned configs: 20 (n_rollout_threads)"""
    async_envs: bool = True
    """worker processes (gymnasium AsyncVectorEnv); --no-async-envs steps all environments in this process"""
    total_timesteps: int = 10_000_000
    """total environment steps (paper: 10M)"""
    num_steps: int = 200
    """steps per environment per rollout (HARL's tuned configs: episode_length 200; Tables 17-20 do not give it)"""

    # Algorithm: HalfCheetah-2x3's values (Table 20; Table 21 for HyperMARL's clip); TASK_PRESETS has the others
    algo: Literal["mappo", "happo"] = "mappo"
    """mappo (all actors updated at once) | happo (independent actors updated one after the other, each weighted by the ratio product of those before it: Zhong et al. 2024)"""
    hypernet: Literal["mlp", "linear", "fups", "nops"] = "mlp"
    """actor family: mlp | linear (HyperMARL, Eq. 6 | 5) | fups (one shared actor with a one-hot ID) | nops (independent actors: --algo happo's default and only family)"""
    critic: Literal["shared", "per-agent"] = "shared"
    """shared (one centralised V(s) with one ValueNorm, HARL's for MAPPO and HAPPO) | per-agent (one centralised critic per agent, ours)"""
    learning_rate: float = 5e-4
    """actor Adam learning rate"""
    critic_learning_rate: float = 5e-4
    """critic Adam learning rate"""
    update_epochs: int = 15
    """actor epochs per update (ppo_epoch)"""
    critic_epochs: int = 15
    """critic epochs per update (critic_epoch)"""
    num_minibatches: int = 1
    """actor minibatches per epoch (actor_num_mini_batch)"""
    critic_num_minibatches: int = 1
    """critic minibatches per epoch (critic_num_mini_batch)"""
    clip_coef: float = 0.0375
    """ratio and value clip (Table 21 for mlp and linear, Tables 17-20 for the others)"""
    ent_coef: float = 0.01
    """entropy bonus"""
    fixed_order: bool = False
    """[happo] update the agents in index order, not in a random order each update (Table 17: Ant)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    huber_delta: float = 10.0
    """Huber loss delta of the value loss"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped (HARL use_clipped_value_loss)"""
    norm_value: bool = True
    """if toggled, value targets are normalised (HARL's ValueNorm)"""
    norm_obs: bool = False
    """if toggled, inputs are also normalised by a running mean/std before HARL's input LayerNorm (ours, not HARL's; saved in checkpoints)"""
    max_grad_norm: float = 10.0
    """gradient-norm clip, per agent for independent actors and per critic"""
    adam_eps: float = 1e-5
    """Adam epsilon (HARL opti_eps)"""
    actor_hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    """hidden layers of every agent's actor"""
    critic_hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    """hidden layers of every critic"""
    std_x_coef: float = 1.0
    """Gaussian std = sigmoid(log_std / x) * y, log_std initialised to x (HARL std_x_coef)"""
    std_y_coef: float = 0.5
    """see --std-x-coef (HARL std_y_coef)"""

    # HyperMARL (section 4, Table 21) and the ablations of section 6
    hypernet_embedding_dim: int = 64
    """[mlp] size of the learned agent embedding"""
    hypernet_hidden_dims: list[int] = field(default_factory=lambda: [64])
    """[mlp] hidden layers of the hypernetwork (32 = HyperMARL-S)"""
    hypernet_embedding: Literal["learned", "onehot"] = "learned"
    """[mlp] learned (orthogonally initialised) | onehot (ablation)"""
    hypernet_init: Literal["scaled", "matched", "default"] = "scaled"
    """[mlp, linear] scaled (section 4.3 as the authors' code does it) | matched (ours, mlp only: unit-norm hidden features, every generated layer at the target's scale) | default (PyTorch init: w/o RF)"""
    hypernet_input: Literal["agent", "agent+obs"] = "agent"
    """[mlp, linear] agent (gradient decoupling) | agent+obs (ablation w/o GD: per-sample weights)"""

    # Evaluation and metrics
    eval_interval: int = 100_000
    """environment steps between evaluations (appendix D.1.1's "every 25 training episodes", read as HARL's eval_interval: 25 rollouts of 20 x 200 steps)"""
    eval_episodes: int = 40
    """deterministic evaluation episodes, run side by side (appendix D.1.1 and HARL: 40)"""
    snd_samples: int = 1000
    """joint states (from evaluation rollouts) on which SND is computed"""
    snd_gaussian_samples: int = 64
    """Monte Carlo samples per observation for the Gaussian Jensen-Shannon estimator"""
    interference_interval: int = 10
    """compute cross-agent gradient interference every this many iterations"""
    interference_samples: int = 512
    """samples of the rollout used for the interference metric"""
    print_interval: int = 1
    """print a progress line every this many iterations (also after the first, at every evaluation and at least once a minute)"""


# The other tasks' values where they differ from HalfCheetah-2x3's: Tables 19 (Walker2d), 17 (Ant) and
# 18 (Humanoid), HARL's defaults (Zhong et al. 2024). Humanoid-9|8 is not in the paper: Humanoid-17x1's.
_HUMANOID = dict(update_epochs=5, critic_epochs=5, ent_coef=0.0)
TASK_PRESETS = {
    "HalfCheetah-2x3": {},
    "Walker2d-2x3": dict(learning_rate=1e-3, critic_learning_rate=1e-3, update_epochs=5, critic_epochs=5,
                         num_minibatches=2, critic_num_minibatches=2, ent_coef=0.0),
    "Ant-4x2": dict(update_epochs=5, critic_epochs=5, ent_coef=0.0, fixed_order=True),
    "Humanoid-17x1": _HUMANOID,
    "Humanoid-9|8": _HUMANOID,
}
# --clip-coef: (HyperMARL's, Table 21; the other actors', Tables 17-20)
CLIP_COEF = {"HalfCheetah-2x3": (0.0375, 0.05), "Walker2d-2x3": (0.0375, 0.05), "Ant-4x2": (0.075, 0.1),
             "Humanoid-17x1": (0.075, 0.1), "Humanoid-9|8": (0.075, 0.1)}


def paper_defaults(args: Args, given: set[str]) -> Args:
    """The paper's value for every flag not given: the task's, then those that follow other flags."""
    hypernet = args.hypernet if "hypernet" in given else "nops" if args.algo == "happo" else "mlp"
    values = dict(TASK_PRESETS[args.task], hypernet=hypernet, save_interval=args.eval_interval,
                  clip_coef=CLIP_COEF[args.task][hypernet not in ("mlp", "linear")])
    return dataclasses.replace(args, **{k: v for k, v in values.items() if k not in given})


# ===== 2. Environment =====
def make_parallel_env(task: str, agent_obsk: int = 1, max_episode_steps: int = 1000, render_mode=None):
    """The PettingZoo parallel env of a task. Humanoid-17x1, one joint (actuator) per agent, is not built
    into Gymnasium-Robotics: its partition comes from Gymnasium-Robotics' own graph of the Humanoid."""
    from gymnasium_robotics import mamujoco_v1

    scenario, conf = task.split("-")  # --task is Gymnasium-Robotics' scenario and agent_conf
    kwargs = dict(agent_obsk=agent_obsk, max_episode_steps=max_episode_steps, render_mode=render_mode)
    if task == "Humanoid-17x1":
        parts, edges, global_nodes = mamujoco_v1.get_parts_and_edges("Humanoid", None)
        # agent_conf must not be None (None means one agent seeing everything); the factorization overrides it
        kwargs["agent_factorization"] = {"partition": [(joint,) for joint in parts[0]], "edges": edges,
                                         "globals": global_nodes}
    return mamujoco_v1.parallel_env(scenario, conf, **kwargs)


def pad_stack(arrays, width: int):
    """Rows of unequal length -> (n, width) float32, zero-padded, and the bool mask of real entries."""
    out = np.zeros((len(arrays), width), dtype=np.float32)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, row in enumerate(arrays):
        out[i, : len(row)] = row
        mask[i, : len(row)] = True
    return out, mask


class MaMuJoCoEnv(gym.Env):
    """One MaMuJoCo task as a fixed-shape gymnasium Env, for gymnasium's vector API. Observation (flat
    float32): in local mode the agents' local observations zero-padded to the largest, then the global
    state (the ParallelEnv's state()); global mode's one-hot IDs are added in the learner. Action
    (n_agents, act_dim), zero-padded (act_mask False: ignored), in [-1, 1], mapped linearly to every
    joint's [low, high] (HARL's NormalizedActions: Humanoid's +-0.4 joints would otherwise saturate),
    not clipped (MuJoCo clamps the control; the control cost sees the action). Reward: the team's.
    Stepping is the ParallelEnv's own transition without building local observations nobody reads
    (test_mamujoco checks it against ParallelEnv.step)."""

    metadata = {"render_modes": []}

    def __init__(self, task: str, obs_mode: str = "global", agent_obsk: int = 1, max_episode_steps: int = 1000,
                 render_mode: Optional[str] = None):
        super().__init__()
        self.ma = make_parallel_env(task, agent_obsk, max_episode_steps, render_mode)
        self.base = self.ma.single_agent_env  # gymnasium.make(...-v5): TimeLimit(max_episode_steps) and checkers
        self.obs_mode = obs_mode
        agents = self.ma.possible_agents
        self.n_agents = len(agents)
        self.act_dims = [self.ma.action_space(a).shape[0] for a in agents]
        self.local_obs_dims = [self.ma.observation_space(a).shape[0] for a in agents]
        self.state_dim = self.base.observation_space.shape[0]
        self.act_dim, self.local_obs_dim = max(self.act_dims), max(self.local_obs_dims)
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

    def local_to_global_action(self, actions: np.ndarray) -> np.ndarray:
        """(n_agents, act_dim) padded -> the single-agent action vector."""
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
        local = flat[..., : self.n_agents * self.local_obs_dim]
        return local.reshape(*flat.shape[:-1], self.n_agents, self.local_obs_dim), state

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
        import hypermarl_extras as extras

        return extras.mujoco_sim_state(self.base)

    @sim_state.setter
    def sim_state(self, state: dict) -> None:
        import hypermarl_extras as extras

        extras.set_mujoco_sim_state(self.base, state)

    def close(self):
        self.ma.close()


def make_vector_env(args: Args) -> gym.vector.VectorEnv:
    """num_envs environments, in worker processes (async_envs). Autoreset SAME_STEP: with done=True comes
    the next episode's first observation, and the ended one's last in info["final_obs"] (to bootstrap)."""
    fns = [functools.partial(MaMuJoCoEnv, args.task, args.obs_mode, args.agent_obsk, args.max_episode_steps)
           for _ in range(args.num_envs)]
    if args.async_envs and args.num_envs > 1:
        return workers_deaf_to_signals(fns)  # Ctrl-C stops the run, not the simulators (the appendix)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


class ObsNormalizer:
    """--norm-obs (ours, off by default): running mean/std (gymnasium's RunningMeanStd, float64) of the
    global state and, in local mode, of every agent's own local features (padded features stay exactly
    0), clipped to [-10, 10]. Part of the checkpoint: a restored policy sees the inputs it was trained on."""

    def __init__(self, state_dim: int, obs_mask: Optional[np.ndarray], enabled: bool = True):
        self.enabled, self.obs_mask = enabled, obs_mask
        self.rms = dict(state=RunningMeanStd(shape=(state_dim,))) | (
            {} if obs_mask is None else dict(local=RunningMeanStd(shape=obs_mask.shape)))

    def update(self, local: Optional[np.ndarray], state: np.ndarray) -> None:
        for key, x in (("state", state), ("local", local)):
            if self.enabled and x is not None:
                self.rms[key].update(np.asarray(x, np.float64).reshape((-1,) + self.rms[key].mean.shape))

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return x.astype(np.float32)
        rms = self.rms[key]
        return np.clip((x - rms.mean) / np.sqrt(rms.var + 1e-8), -10.0, 10.0).astype(np.float32)

    def state(self, state: np.ndarray) -> np.ndarray:
        return self.normalize("state", state)

    def local(self, local: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if local is None else self.normalize("local", local) * self.obs_mask

    def state_dict(self) -> dict:
        return {key: dict(mean=torch.as_tensor(r.mean), var=torch.as_tensor(r.var), count=float(r.count))
                for key, r in self.rms.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, r in self.rms.items():
            r.mean, r.var = state[key]["mean"].numpy().astype(np.float64), state[key]["var"].numpy().astype(np.float64)
            r.count = float(state[key]["count"])


def actor_inputs(local_n: Optional[np.ndarray], state_n: np.ndarray, n_agents: int) -> np.ndarray:
    """Normalised observations -> agent-major actor inputs (n_agents, batch, obs_dim). global: [state,
    one-hot ID] for every agent (HARL). local: the agent's padded local observation (the shared FuPS
    actor adds the ID itself, as a per-agent first-layer bias)."""
    if local_n is not None:
        return np.ascontiguousarray(np.swapaxes(local_n, 0, 1))
    batch = state_n.shape[0]
    ids = np.broadcast_to(np.eye(n_agents, dtype=np.float32)[:, None, :], (n_agents, batch, n_agents))
    return np.concatenate([np.broadcast_to(state_n[None], (n_agents,) + state_n.shape), ids], -1)


def actor_obs_dim(args: Args, env: MaMuJoCoEnv) -> int:
    return env.state_dim + env.n_agents if args.obs_mode == "global" else env.local_obs_dim


# ===== 3. Hypernetworks (Eq. 5, Eq. 6, section 4.3) =====
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
    One split, not a slice per tensor: a slice's backward writes a zero tensor of all m parameters."""
    shapes = layer_shapes(sizes)
    chunks = theta.split([n for fan_in, fan_out in shapes for n in (fan_in * fan_out, fan_out)], dim=-1)
    return [(chunks[2 * k].unflatten(-1, shape), chunks[2 * k + 1].unsqueeze(-2)) for k, shape in enumerate(shapes)]


class LinearHypernet(nn.Module):
    """Eq. (5): theta_i = 1_i W + b, a one-hot agent ID into one linear layer.

    Row i of W is agent i's whole flattened network; b is shared by all agents. With
    shared_bias=False this is exactly n independent networks. obs_dim > 0 is the ablation without
    gradient decoupling: the input becomes [1_i, o] and the weights are generated per sample.
    """

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

    def forward(self, obs=None):
        if self.obs_dim == 0:
            theta = self.head(self.ids)  # (n_agents, m): generated once, used for every sample
        else:
            ids = self.ids.unsqueeze(1).expand(-1, obs.shape[1], -1)
            theta = self.head(torch.cat([ids, obs], -1))  # (n_agents, batch, m)
        return unflatten_params(theta, self.sizes)


class MLPHypernet(nn.Module):
    """Eq. (6): theta_i = f(g(e_i)), an MLP g (ReLU) on the agent embedding e_i, then a linear head f.

    As in the authors' code, every generated tensor (each layer's weight, each layer's bias) has its
    own sub-network (g, f). Embeddings are learned and orthogonally initialised with gain sqrt(2), as
    there (section 4.2), or fixed one-hot IDs.
    init="scaled", section 4.3 as the authors' code does it: g starts as Flax's default (LeCun
    normal, zero bias); column j of a weight head is a flattened orthogonal matrix with the target
    layer's gain; bias heads start at zero, so a generated layer is sum_j g_j(e_i) O_j, |g(e_i)| times
    the target's scale (benchmark/init_scale.py). init="matched" (ours): g's output is also
    L2-normalised (for the whole run) and each weight head's columns are made orthogonal, so every
    generated layer starts at exactly the target's norm. init="default": PyTorch's (w/o RF).
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
                # Flax's lecun_normal: truncated at 2 std, rescaled by that truncated normal's std (0.8796)
                std = layer.in_features ** -0.5 / 0.8796256610342398
                nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
                layer.bias.zero_()
            for k, ((fan_in, fan_out), gain) in enumerate(zip(self.shapes, gains)):
                weight_head, bias_head = self.heads[2 * k], self.heads[2 * k + 1]
                for j in range(width):  # width: every trunk's output (its last hidden layer)
                    weight_head.weight[:, j] = target_init_vector([fan_in, fan_out], [gain])[: fan_in * fan_out]
                if init == "matched":  # nearest orthogonal columns, same norm: |f(u)| = |target| for |u| = 1
                    # (a head with fewer outputs than hidden units, never in the paper's settings, gets orthonormal rows
                    # instead: then the target's norm holds on average, not exactly)
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


# ===== 4. Baselines and the agent =====
class SharedNet(nn.Module):
    """FuPS: one network for every agent, input [o, 1_i] (use_id) or o alone. [o, 1_i] W = o W_obs +
    W_id[i]: the ID only adds a per-agent bias to the first layer, so it is never materialised."""

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


class PerAgentMLP(nn.Module):
    """One network per agent, whatever the family, as HARL's MLPBase: LayerNorm on the input, then
    Linear -> ReLU -> LayerNorm per hidden layer, then the output Linear; x (n_agents, batch, in) ->
    (n_agents, batch, out). weight_net yields every agent's Linear layers, [(W, b) per layer]: a
    hypernetwork, FuPS's shared network or NoPS's. The LayerNorm gains and biases are per agent for
    disjoint networks (nops: independent actors, critics), else one shared set: FuPS shares
    everything, and HyperMARL generates what section 4.3 initialises (the Linear layers) and shares
    the rest."""

    def __init__(self, args: Args, family: str, n_agents: int, sizes: list[int], gains: list[float], use_id=True):
        super().__init__()
        self.per_sample = family in ("mlp", "linear") and args.hypernet_input == "agent+obs"
        obs_dim = sizes[0] if self.per_sample else 0
        if family == "mlp":
            self.weight_net = MLPHypernet(n_agents, sizes, gains, args.hypernet_embedding_dim, args.hypernet_hidden_dims,
                                          args.hypernet_embedding, args.hypernet_init, obs_dim)
        elif family == "linear":
            self.weight_net = LinearHypernet(n_agents, sizes, gains, args.hypernet_init, obs_dim=obs_dim)
        elif family == "fups":
            self.weight_net = SharedNet(n_agents, sizes, gains, use_id)
        else:
            self.weight_net = IndependentNets(n_agents, sizes, gains)
        self.sizes, self.per_agent_norms = list(sizes), family == "nops"
        k = n_agents if self.per_agent_norms else 1
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(k, 1, d)) for d in sizes[:-1])
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(k, 1, d)) for d in sizes[:-1])

    def generate(self):
        """Every agent's [(W, b) per layer]; None for per-sample weights, which forward() makes from x."""
        return None if self.per_sample else self.weight_net()

    def forward(self, x, params=None, agent_ids=None):
        """params: generate()'s (None: generated now). agent_ids: x holds only those agents' inputs
        (HAPPO updates one agent at a time)."""
        norms = list(zip(self.norm_weights, self.norm_biases))
        if agent_ids is not None and self.per_agent_norms:
            norms = [(w[agent_ids], b[agent_ids]) for w, b in norms]
        x = layer_norm(x, *norms[0])
        if params is None:  # per-sample weights (w/o GD) see the input as the network does, normalised
            params = self.weight_net(x) if self.per_sample else self.weight_net()
        if agent_ids is not None:
            params = [(w[agent_ids], b[agent_ids]) for w, b in params]
        for k, (weight, bias) in enumerate(params):  # W (k, in, out), or (k, batch, in, out) per sample
            x = torch.baddbmm(bias, x, weight) if weight.dim() == 3 else (x.unsqueeze(-2) @ weight + bias).squeeze(-2)
            if k < len(params) - 1:
                x = layer_norm(torch.relu(x), *norms[k + 1])
        return x


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """nn.LayerNorm over the features, with (k, 1, d) gains and biases: one set per agent or shared."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight + bias


class GaussianActor(nn.Module):
    """Every agent's Gaussian policy: means from the family's per-agent networks, std =
    sigmoid(log_std / x) * y (HARL's bounded std), log_std one vector per agent for independent
    actors and one shared otherwise. Padded action dimensions are left out of log-probabilities
    and entropies."""

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

    def generate(self):
        """Every agent's weights, generated once per rollout or minibatch (None: per-sample ablation)."""
        return self.net.generate()

    def forward(self, x, params=None, agent_ids=None) -> Normal:
        """x (k, batch, obs_dim) of all agents (k = n) or of agent_ids -> their policies, batch shape
        (k, batch, act_dim)."""
        if agent_ids is None and self.net.per_sample and x.shape[1] > self.chunk_size(x):
            mean = self.per_sample_chunked(x)
        else:  # agent_ids: independent actors only (HAPPO), never per-sample weights
            mean = self.net(x, params, agent_ids)
        log_std = self.log_std[agent_ids] if (self.independent and agent_ids is not None) else self.log_std
        std = torch.sigmoid(log_std / self.std_x) * self.std_y
        # validate_args=False: the argument checks read every mean and std at each call (and sync a GPU)
        return Normal(mean, std.expand_as(mean), validate_args=False)

    def log_prob_entropy(self, x, actions, params=None, agent_ids=None):
        """Log-probabilities and entropies (k, batch), over the real action dimensions only."""
        dist = self(x, params, agent_ids)
        mask = self.act_mask if agent_ids is None else self.act_mask[agent_ids]
        return (dist.log_prob(actions) * mask).sum(-1), (dist.entropy() * mask).sum(-1)

    def chunk_size(self, x, max_elements: int = 2**25) -> int:
        """Samples per chunk so that the per-sample weights of a chunk stay under max_elements floats."""
        return max(1, max_elements // (x.shape[0] * num_target_params(self.net.sizes)))

    def per_sample_chunked(self, x):
        """The w/o-GD ablation generates one network per agent and sample: (n, batch, m) weights
        (5.4e9 floats for Humanoid-17x1 on a 4000-sample batch). Chunks over the batch, each
        recomputed in the backward pass (activation checkpointing), bound the memory; the result
        and its gradients are those of the unchunked forward."""
        from torch.utils.checkpoint import checkpoint

        outs = []
        for piece in x.split(self.chunk_size(x), dim=1):
            outs.append(checkpoint(self.net, piece, use_reentrant=False) if torch.is_grad_enabled() else self.net(piece))
        return torch.cat(outs, 1)


class CentralCritics(nn.Module):
    """n_critics centralised critics V_c(s) on the global state (HARL's VNet: MLPBase and a linear
    value head), independent weights, one batched matmul per layer; outputs are in value-normalised
    units. One critic by default (HARL); --critic per-agent gives every agent its own."""

    def __init__(self, args: Args, n_critics: int, state_dim: int):
        super().__init__()
        sizes = [state_dim] + list(args.critic_hidden_dims) + [1]
        gains = [np.sqrt(2)] * len(args.critic_hidden_dims) + [1.0]
        self.n_critics = n_critics
        self.net = PerAgentMLP(args, "nops", n_critics, sizes, gains)

    def forward(self, state):  # (batch, state_dim) -> (n_critics, batch)
        return self.net(state.unsqueeze(0).expand(self.n_critics, -1, -1)).squeeze(-1)


class ValueNorm(nn.Module):
    """HARL's ValueNorm (use_popart): debiased exponential moving mean and mean square (beta
    0.99999) of the value targets, one per critic. HARL updates it inside every critic minibatch;
    here it is updated once per update with all the targets (the same statistics up to the
    weighting of a near-uniform running average)."""

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


# ===== 5. Metrics =====
# ippo_hyper_vmas.py's SND, copied whole (a test keeps the copies equal): MaMuJoCo uses its Gaussian branch.
def js_distance_categorical(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between categorical distributions (..., k)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b.clamp_min(1e-30))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0).sqrt()


def js_distance_gaussian(mu1, std1, mu2, std2, n_samples=64, generator=None) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 between diagonal Gaussians (..., d), by Monte Carlo (there
    is no closed form): JSD = 1/2 E_p[log p - log m] + 1/2 E_q[log q - log m], m = (p + q) / 2, each
    expectation from n_samples antithetic draws; identical Gaussians give exactly 0."""
    half = max(n_samples // 2, 1)
    z = torch.randn((half,) + mu1.shape, generator=generator, device=mu1.device, dtype=mu1.dtype)
    z = torch.cat([z, -z])

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
        probs = torch.softmax(dist.detach(), -1)
        distances = js_distance_categorical(probs[i], probs[j])
    else:
        mean, std = dist[0].detach(), dist[1].detach()
        distances = js_distance_gaussian(mean[i], std[i], mean[j], std[j], n_samples, generator)
    return float(distances.mean())


def gradient_variance_and_norm(grads):
    """Variance and L2 norm over all entries of the gradient, from each tensor's sum and norm: no
    concatenated copy of millions of entries at every gradient step."""
    count = sum(g.numel() for g in grads)
    total = torch.stack([g.sum() for g in grads]).sum()
    squares = torch.stack([torch.linalg.vector_norm(g) for g in grads]).square().sum()
    return (squares - total**2 / count) / (count - 1), squares.sqrt()


def gradient_interference(per_agent_loss: torch.Tensor, params) -> float:
    """Mean pairwise cosine similarity between the agents' gradients on the shared parameters: 0 when
    two agents touch disjoint parameters (NoPS), positive when their updates agree, negative when
    they conflict. All n gradients come from one batched backward pass."""
    n = per_agent_loss.shape[0]
    grads = torch.autograd.grad(per_agent_loss, params, grad_outputs=torch.eye(n, device=per_agent_loss.device),
                                is_grads_batched=True, retain_graph=True, allow_unused=True)
    gram = sum(g.reshape(n, -1) @ g.reshape(n, -1).T for g in grads if g is not None)  # no (n, all) copy
    norms = gram.diagonal().sqrt().clamp_min(1e-12)
    cosine = gram / (norms[:, None] * norms[None, :])
    return float(cosine[~torch.eye(n, dtype=torch.bool, device=cosine.device)].mean())


def common_action_dims(mean, std, act_mask):
    """SND compares the agents on the action dimensions they all have (padding is at the end): all
    of them where action sizes are equal, the first 8 for Humanoid-9|8. A padded dimension would
    otherwise count as diversity."""
    common = int(act_mask.sum(-1).min())
    return mean[..., :common], std[..., :common]


# ===== 6. The update (GAE, MAPPO / HAPPO, value loss) =====
def compute_gae(rewards, values, next_values, terminated, dones, gamma, gae_lambda):
    """Generalised advantage estimation over a (T, ...) rollout. next_values[t] is V(s_{t+1}) for
    the true next state (at a time limit, the final observation's value); a termination multiplies
    it by 0. dones stops the recursion at every episode end, whatever its cause."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def value_loss(values, old_values, targets_n, args: Args):
    """HARL's cal_value_loss, per critic: Huber loss against the normalised targets, the larger of
    the clipped and the unclipped loss (use_clipped_value_loss)."""
    loss = F.huber_loss(values, targets_n, reduction="none", delta=args.huber_delta)
    if args.clip_vloss:
        clipped = old_values + (values - old_values).clamp(-args.clip_coef, args.clip_coef)
        loss = torch.max(loss, F.huber_loss(clipped, targets_n, reduction="none", delta=args.huber_delta))
    return loss.mean(-1)


def clipped_surrogate(newlogprob, oldlogprob, advantages, clip_coef, factor=None):
    """PPO's clipped objective as a loss per agent, (k, batch) -> (k,), and the ratio; HAPPO weights
    every sample by factor, the ratio product of the agents updated before (HARL's happo.py)."""
    ratio = (newlogprob - oldlogprob).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    if factor is not None:
        surrogate = factor * surrogate
    return -surrogate.mean(-1), ratio


class PerAgentAdam(torch.optim.Optimizer):
    """Adam on parameters stacked over agents (leading dimension n): exactly n separate Adam
    optimisers, each with its own step count (HARL gives every independent actor its own).
    step(agents) moves only those agents' slices and state: HAPPO's sequential updates must not
    let one agent's momentum keep moving the agents already updated."""

    def __init__(self, params, n_agents: int, lr: float, eps: float = 1e-8, betas=(0.9, 0.999)):
        super().__init__(params, dict(lr=lr, eps=eps, betas=betas))
        self.n_agents = n_agents

    @torch.no_grad()
    def step(self, agents=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(self.n_agents, dtype=torch.float64, device=p.device)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                elif state["step"].device != p.device:  # load_state_dict leaves "step" where it was saved (CPU)
                    state["step"] = state["step"].to(p.device)
                idx = slice(None) if agents is None else agents
                grad, shape = p.grad[idx], (-1,) + (1,) * (p.dim() - 1)
                step = state["step"][idx] + 1
                exp_avg = state["exp_avg"][idx].mul(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"][idx].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["step"][idx], state["exp_avg"][idx], state["exp_avg_sq"][idx] = step, exp_avg, exp_avg_sq
                step_size = (group["lr"] / (1 - beta1**step)).to(p.dtype).view(shape)
                bias_correction2_sqrt = (1 - beta2**step).sqrt().to(p.dtype).view(shape)
                p[idx] = p[idx] - step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])


def clip_grad_per_agent(params, max_norm: float, n: int):
    """Clip every agent's slice (leading dimension n) on its own, as n separate optimisers would:
    nn.utils.clip_grad_norm_ has no per-slice form."""
    squares = torch.zeros(n, device=params[0].device)
    for p in params:
        if p.grad is not None:
            squares += p.grad.reshape(n, -1).pow(2).sum(1)
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.view((-1,) + (1,) * (p.grad.dim() - 1)))


def actor_step(actor, optimizer, loss, max_grad_norm: float, agents=None):
    """Backward, the paper's gradient variance and norm (before the clip), the clip and Adam's step
    (of agents only, for HAPPO). Returns (variance, norm)."""
    if not torch.isfinite(loss):
        raise FloatingPointError("actor loss is not finite")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in actor.parameters() if p.grad is not None]
    grad_stats = gradient_variance_and_norm([p.grad for p in params])
    if actor.independent:  # HARL: every actor has its own optimiser and clip
        clip_grad_per_agent(params, max_grad_norm, actor.n_agents)
    else:  # clip_grad_norm_ with the norm just measured: one pass less over the gradients (3% of the mlp update)
        nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_stats[1])
    if isinstance(optimizer, PerAgentAdam):
        optimizer.step(agents)
    else:
        optimizer.step()
    return grad_stats


def ppo_stats(pg_loss, entropy, newlogprob, oldlogprob, ratio, grad_stats, clip_coef) -> dict:
    with torch.no_grad():
        return {"losses/policy_loss": pg_loss.mean(), "losses/entropy": entropy.mean(),
                "losses/clipfrac": ((ratio - 1).abs() > clip_coef).float().mean(),
                "losses/approx_kl": ((ratio - 1) - (newlogprob - oldlogprob)).mean(),
                "grad/actor_var": grad_stats[0], "grad/actor_norm": grad_stats[1]}


def mean_stats(history: list[dict]) -> dict:
    """Every statistic averaged over the update's minibatches."""
    return {key: float(torch.stack([stats[key] for stats in history]).mean()) for key in history[0]}


def minibatches(batch_size: int, num_minibatches: int, epochs: int, device):
    """The indices of every minibatch: epochs passes over the batch, each in a new random order."""
    minibatch_size = batch_size // num_minibatches
    for _ in range(epochs):
        order = torch.randperm(batch_size, device=device)
        for start in range(0, batch_size, minibatch_size):
            yield order[start: start + minibatch_size]


def mappo_actor_update(actor, optimizer, batch: dict, args: Args) -> dict:
    """All agents at once, update_epochs passes over the rollout in minibatches, the weights generated
    once per minibatch. batch: obs (n, B, D), actions (n, B, A), logprobs (n, B), advantages (n, B)."""
    history = []
    for idx in minibatches(batch["obs"].shape[1], args.num_minibatches, args.update_epochs, batch["obs"].device):
        mb = {key: batch[key][:, idx] for key in ("obs", "actions", "logprobs", "advantages")}
        newlogprob, entropy = actor.log_prob_entropy(mb["obs"], mb["actions"], actor.generate())
        pg_loss, ratio = clipped_surrogate(newlogprob, mb["logprobs"], mb["advantages"], args.clip_coef)
        per_agent = pg_loss - args.ent_coef * entropy.mean(-1)
        # independent actors: the sum is n separate losses; shared weights: the mean over agents
        grad_stats = actor_step(actor, optimizer, per_agent.sum() if actor.independent else per_agent.mean(),
                                args.max_grad_norm)
        history.append(ppo_stats(pg_loss, entropy, newlogprob, mb["logprobs"], ratio, grad_stats, args.clip_coef))
    return mean_stats(history)


def happo_actor_update(actor, optimizer, batch: dict, args: Args, order: list):
    """HAPPO (Zhong et al. 2024): agents updated one after the other in `order`. Agent i_m's
    surrogate is weighted by M = prod_{j<m} pi_new^{i_j} / pi_old^{i_j} on every sample, the ratio
    product of the agents already updated, evaluated on the whole batch after their updates.
    Returns the statistics and the factors each agent was weighted by (for the tests)."""
    batch_size = batch["obs"].shape[1]
    factor = torch.ones(batch_size, device=batch["obs"].device)
    history, factors_used = [], []
    for agent_id in order:
        ids = torch.tensor([agent_id], device=batch["obs"].device)
        obs, actions, oldlogprob, advantages = (batch[key][ids] for key in ("obs", "actions", "logprobs", "advantages"))
        factors_used.append(factor.clone())
        for idx in minibatches(batch_size, args.num_minibatches, args.update_epochs, batch["obs"].device):
            newlogprob, entropy = actor.log_prob_entropy(obs[:, idx], actions[:, idx], actor.generate(), ids)
            pg_loss, ratio = clipped_surrogate(newlogprob, oldlogprob[:, idx], advantages[:, idx], args.clip_coef,
                                               factor[idx].unsqueeze(0))
            grad_stats = actor_step(actor, optimizer, (pg_loss - args.ent_coef * entropy.mean(-1)).sum(),
                                    args.max_grad_norm, ids)
            history.append(ppo_stats(pg_loss, entropy, newlogprob, oldlogprob[:, idx], ratio, grad_stats, args.clip_coef))
        with torch.no_grad():  # M^{i_1:m} = M^{i_1:m-1} * pi_new^{i_m}(a|o) / pi_old^{i_m}(a|o), joint over the action
            newlogprob, _ = actor.log_prob_entropy(obs, actions, actor.generate(), ids)
            factor = factor * (newlogprob[0] - oldlogprob[0]).exp()
    return mean_stats(history), factors_used


def critic_update(critics, optimizer, value_norm, batch: dict, args: Args) -> float:
    """batch: state (B, S), values (C, B) old outputs (normalised units), returns (C, B) raw."""
    value_norm.update(batch["returns"])
    targets_n = value_norm.normalize(batch["returns"])
    losses = []
    state = batch["state"]  # (B, S)
    for idx in minibatches(state.shape[0], args.critic_num_minibatches, args.critic_epochs, state.device):
        per_critic = value_loss(critics(state[idx]), batch["values"][:, idx], targets_n[:, idx], args)
        loss = per_critic.sum()  # separate critics: separate losses
        if not torch.isfinite(loss):
            raise FloatingPointError("critic loss is not finite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_per_agent(list(critics.parameters()), args.max_grad_norm, critics.n_critics)
        optimizer.step()
        losses.append(per_critic.detach().mean())
    return float(torch.stack(losses).mean())


def interference_of(actor, batch: dict, args: Args) -> float:
    """Cross-agent interference before the update, on a random subset of the rollout: mean pairwise
    cosine similarity of the agents' policy-loss gradients on all actor parameters."""
    idx = torch.randperm(batch["obs"].shape[1], device=batch["obs"].device)[: args.interference_samples]
    newlogprob, _ = actor.log_prob_entropy(batch["obs"][:, idx], batch["actions"][:, idx], actor.generate())
    pg_loss, _ = clipped_surrogate(newlogprob, batch["logprobs"][:, idx], batch["advantages"][:, idx], args.clip_coef)
    return gradient_interference(pg_loss, list(actor.parameters()))


# ===== 7. The training loop =====
def main(argv=None) -> int:
    try:
        args, loaded, changes = read_command_line(sys.argv[1:] if argv is None else [str(token) for token in argv])
    except ValueError as error:  # a bad flag or file (the appendix): one line, nothing written
        print(f"error: {error}", file=sys.stderr)
        return 2

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    evaluator = Evaluator(args, device)
    probe = evaluator.envs[0]  # shapes, masks and split() (which keeps no state: the training envs use it too)
    n, A, S, D = probe.n_agents, probe.act_dim, probe.state_dim, actor_obs_dim(args, probe)
    C = n if args.critic == "per-agent" else 1
    actor = GaussianActor(args, n, D, A, probe.act_mask).to(device)
    critics = CentralCritics(args, C, S).to(device)
    value_norm = ValueNorm(C, enabled=args.norm_value).to(device)
    obs_norm = ObsNormalizer(S, probe.obs_mask if args.obs_mode == "local" else None, args.norm_obs)
    fused = device.type in ("cpu", "cuda")  # fused Adam: ~8x faster steps on the large hypernetwork heads
    if actor.independent:  # one Adam per agent (exactly), as HARL; HAPPO steps one agent at a time
        actor_optimizer = PerAgentAdam(actor.parameters(), n, lr=args.learning_rate, eps=args.adam_eps)
    else:
        actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=fused)
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=args.critic_learning_rate, eps=args.adam_eps, fused=fused)
    if args.eval_only:  # the checkpoint's return and SND, printed (hypermarl_extras.py)
        import hypermarl_extras as extras

        return extras.evaluate_mamujoco_checkpoint(sys.modules[__name__], args, loaded, actor, obs_norm, evaluator)

    T, E = args.num_steps, args.num_envs
    batch_size = T * E
    num_iterations = args.total_timesteps // batch_size
    # a new run folder, or the checkpoint's; TensorBoard and wandb (the appendix)
    run_name, writer, global_step, start_iteration = open_run(args, loaded, changes, device, probe, actor, critics)
    run_dir = os.path.join(args.runs_dir, run_name)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    # ALGO Logic: Storage setup, time-major (T, n_agents, num_envs, ...); states (T, E, S); rewards, ends (T, 1, E)
    envs = make_vector_env(args)
    obs = torch.zeros((T, n, E, D), device=device)
    states = torch.zeros((T, E, S), device=device)
    actions = torch.zeros((T, n, E, A), device=device)
    rewards = torch.zeros((T, 1, E), device=device)
    terminateds = torch.zeros((T, 1, E), device=device)
    dones = torch.zeros((T, 1, E), device=device)
    flat, _ = envs.reset(seed=args.seed)
    episode_return, episode_length = np.zeros(E), np.zeros(E, dtype=np.int64)
    if loaded is not None:  # weights, optimisers, normalisers, RNGs, and the environments mid-episode
        import hypermarl_extras as extras

        flat, episode_return, episode_length = extras.restore_mamujoco_run(
            loaded, actor, critics, value_norm, obs_norm, actor_optimizer, critic_optimizer, envs)

    def save(iteration) -> bool:  # everything a resumed run needs to go on bit for bit (the appendix)
        return save_run(checkpoint_path, args, run_name, actor, critics, value_norm, obs_norm, actor_optimizer,
                        critic_optimizer, envs, flat, episode_return, episode_length, global_step, iteration)

    start_time, start_step, printed_at = time.time(), global_step, 0.0
    print(f"plan: {num_iterations - start_iteration + 1} iterations of {batch_size} steps ({E} envs x {T}) up to "
          f"step {num_iterations * batch_size:,}, evaluating every {args.eval_interval:,}; an estimate of the time "
          f"follows the first iteration", flush=True)
    rollout_time = update_time = 0.0
    window_returns = []  # episodes that ended since the last progress line
    next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
    next_save = (global_step // args.save_interval + 1) * args.save_interval
    exit_code, next_iteration = 0, start_iteration
    stop = StopOnSignal()  # Ctrl-C or SIGTERM: finish the iteration, save a checkpoint, stop (the appendix)
    try:
        for iteration in range(start_iteration, num_iterations + 1):
            if stop.requested:  # between iterations the state is consistent: save it
                break

            # ALGO LOGIC: collect a rollout with every agent's weights generated once
            tick = time.time()
            finished_returns, finished_lengths, bootstrap_at, bootstrap_states = [], [], [], []
            with torch.no_grad():
                params = actor.generate()
                for step in range(T):
                    global_step += E
                    local, state = probe.split(flat)
                    obs_norm.update(local, state)
                    state_n = obs_norm.state(state)
                    obs[step] = torch.as_tensor(actor_inputs(obs_norm.local(local), state_n, n), device=device)
                    states[step] = torch.as_tensor(state_n, device=device)
                    actions[step] = actor(obs[step], params).sample()
                    # the sample itself, as HARL: the env maps [-1, 1] to the joints' ranges; (n, E, A) -> (E, n, A)
                    flat, reward, terminated, truncated, info = envs.step(actions[step].cpu().numpy().transpose(1, 0, 2))
                    rewards[step, 0] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                    terminateds[step, 0] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
                    done = terminated | truncated
                    dones[step, 0] = torch.as_tensor(done, dtype=torch.float32, device=device)
                    time_limit = truncated & ~terminated
                    if time_limit.any():  # bootstrap from V(final state): computed after the rollout
                        _, final_state = probe.split(np.stack(info["final_obs"][time_limit]).astype(np.float32))
                        bootstrap_at += [(step, e) for e in np.nonzero(time_limit)[0]]
                        bootstrap_states.append(obs_norm.state(final_state))
                    episode_return += reward
                    episode_length += 1
                    for e in np.nonzero(done)[0]:
                        finished_returns.append(episode_return[e])
                        finished_lengths.append(episode_length[e])
                        episode_return[e], episode_length[e] = 0.0, 0

                # behaviour log-probs and values in one batched pass (the weights did not change); (n, T * E, ...)
                batch_obs, batch_actions = (x.transpose(0, 1).reshape(n, T * E, -1) for x in (obs, actions))
                logprobs = actor.log_prob_entropy(batch_obs, batch_actions, params)[0]
                values_n = critics(states.reshape(T * E, S)).reshape(C, T, E)  # normalised units
                values = value_norm.denormalize(values_n).float().transpose(0, 1)  # (T, C, E)

                # bootstrap value: V(next state), V(final state) at a time limit, 0 at termination
                last_state = torch.as_tensor(obs_norm.state(probe.split(flat)[1]), device=device)
                next_values = torch.cat([values[1:], value_norm.denormalize(critics(last_state)).float()[None]])
                bootstrap = torch.zeros_like(values)
                if bootstrap_at:
                    final_states = torch.as_tensor(np.concatenate(bootstrap_states), device=device)
                    steps_, envs_ = zip(*bootstrap_at)
                    # [steps, :, envs] puts the K indexed pairs first: (K, C), the critics' output transposed
                    bootstrap[list(steps_), :, list(envs_)] = value_norm.denormalize(critics(final_states)).float().T
                next_values = torch.where(dones.bool(), bootstrap, next_values)
                advantages, returns = compute_gae(rewards.expand(-1, C, -1).contiguous(), values, next_values,
                                                  terminateds, dones, args.gamma, args.gae_lambda)
            rollout_seconds = time.time() - tick
            rollout_time += rollout_seconds
            if iteration == start_iteration:  # an iteration can take minutes on a CPU: say so early
                print(f"iteration {iteration}: rollout took {rollout_seconds:.1f} s; updating "
                      f"({args.update_epochs} actor and {args.critic_epochs} critic epochs)", flush=True)

            # flatten the batch: agent-major; agent i's advantages come from its own critic (per-agent) or the shared one
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
                if args.algo == "happo":
                    order = list(range(n)) if args.fixed_order else torch.randperm(n).tolist()
                    stats, _ = happo_actor_update(actor, actor_optimizer, batch, args, order)
                else:
                    stats = mappo_actor_update(actor, actor_optimizer, batch, args)
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
            stats |= {"charts/SPS": sps, "perf/rollout_seconds": rollout_seconds, "perf/update_seconds": update_seconds}
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
        if exit_code == 0 and (args.save_model or stop.requested) and save(next_iteration):
            print(f"checkpoint: {checkpoint_path} (continue with --resume {checkpoint_path})")
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


def record_evaluation(evaluator, actor, obs_norm, args: Args, writer, run_dir: str, global_step: int) -> str:
    """An evaluation (Evaluator, below) into TensorBoard, and every episode's return into
    evaluations.jsonl (for rliable); with --capture-video, its first episode as a video. Returns the
    progress line's part."""
    video = [] if args.capture_video else None
    eval_return, snd, episodes = evaluator(actor, obs_norm, video)
    if video:
        import hypermarl_extras as extras

        extras.save_video(writer, os.path.join(run_dir, "videos", f"eval_{global_step}.mp4"), "eval/video",
                          video, global_step, evaluator.video_timing()[1])
    writer.add_scalar("eval/episodic_return", eval_return, global_step)
    writer.add_scalar("diversity/snd", snd, global_step)
    with open(os.path.join(run_dir, "evaluations.jsonl"), "a") as f:
        f.write(json.dumps({"step": global_step, "episode_returns": episodes, "snd": snd}) + "\n")
    return f"eval_return={eval_return:.3f} snd={snd:.4f}"


class Evaluator:
    """eval_episodes deterministic episodes side by side, episode k seeded seed + 10000 + k: every
    evaluation (and --eval-only on a checkpoint, with its saved normalisers) sees the same
    starting states, so a restored checkpoint scores exactly what the run scored. With
    --capture-video, episode 0's environment renders (its GL context opens at the first frame, and
    close() must free it before the interpreter exits, or EGL prints errors)."""

    def __init__(self, args: Args, device):
        self.envs = [MaMuJoCoEnv(args.task, args.obs_mode, args.agent_obsk, args.max_episode_steps,
                                 "rgb_array" if args.capture_video and k == 0 else None)
                     for k in range(args.eval_episodes)]
        self.args, self.device = args, device

    def video_timing(self) -> tuple[int, float]:
        """(stride, fps) of the videos: real time, at most 50 frames a second."""
        import hypermarl_extras as extras

        return extras.video_timing(self.envs[0].base.metadata["render_fps"])

    def __call__(self, actor: GaussianActor, obs_norm: ObsNormalizer, video: Optional[list] = None):
        """(mean return, SND, every episode's return). A list as video receives every stride-th frame of episode 0 (rendering
        reads the simulation and changes nothing in it)."""
        args, envs = self.args, self.envs
        flats = [env.reset(seed=args.seed + 10_000 + k)[0] for k, env in enumerate(envs)]
        if video is not None:
            import hypermarl_extras as extras

            stride = self.video_timing()[0]
            video.append(extras.mamujoco_frame(envs[0].ma))
        returns, active = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
        pool, generator = [], torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            params = actor.generate()
            for t in range(args.max_episode_steps + 1):  # TimeLimit ends every episode within it
                live = np.nonzero(active)[0]
                film = video is not None and active[0] and (t + 1) % stride == 0
                pool.append(np.stack([flats[k] for k in live]))
                x = torch.as_tensor(self.inputs(pool[-1], obs_norm), device=self.device)
                actions = actor(x, params).mean.cpu().numpy().transpose(1, 0, 2)  # [-1, 1]: MaMuJoCoEnv rescales
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
            x = self.inputs(pool[torch.randperm(len(pool), generator=generator)[: args.snd_samples].numpy()], obs_norm)
            dist = actor(torch.as_tensor(x, device=self.device), params)
            snd = system_neural_diversity(common_action_dims(dist.mean, dist.stddev, actor.act_mask), discrete=False,
                                          n_samples=args.snd_gaussian_samples,
                                          generator=torch.Generator(device=self.device).manual_seed(args.seed))
        return float(returns.mean()), snd, returns.tolist()

    def inputs(self, flat: np.ndarray, obs_norm: ObsNormalizer) -> np.ndarray:
        """Raw observations (batch, flat) -> every agent's actor input (n_agents, batch, obs_dim)."""
        local, state = self.envs[0].split(flat)
        return actor_inputs(obs_norm.local(local), obs_norm.state(state), self.envs[0].n_agents)

    def close(self):
        for env in self.envs:
            env.close()


# ===== Appendix: the command line, run folder, signals, checkpoints =====
# The checks, checkpoints, --eval-only and videos live in hypermarl_extras.py, imported only where one
# of them is used: a script copied without it trains, with tyro's checks of types and choices only.
def parse_args(argv=None, checked=True) -> Args:
    """The flags given, the paper's values for the others (--help shows them), then (checked) the checks."""
    argv = sys.argv[1:] if argv is None else [str(token) for token in argv]
    given = flags_given(argv)
    args = paper_defaults(tyro.cli(Args, args=[a for a in argv if a not in ("-h", "--help")]), given)
    if "-h" in argv or "--help" in argv:
        tyro.cli(Args, args=argv, default=args)
    if checked:  # the checks are in hypermarl_extras.py
        import hypermarl_extras as extras

        extras.check_args(sys.modules[__name__], args, given)
    return args


def flags_given(argv: list[str]) -> set[str]:
    """The Args fields named on the command line (--x, --x=v, --no-x)."""
    names = {f.name for f in dataclasses.fields(Args)}
    tokens = [token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")]
    return {name[3:] if name not in names and name.startswith("no_") else name for name in tokens} & names


def read_command_line(argv: list[str]):
    """(args, the checkpoint to resume or evaluate or None, the flags --resume changes)."""
    try:
        import hypermarl_extras as extras
    except ImportError:
        args = parse_args(argv, checked=False)
        for name in ("resume", "eval_only", "checkpoint", "snd_obs_file", "save_model", "capture_video"):
            if getattr(args, name, None):
                raise ValueError(f"--{name.replace('_', '-')}: needs hypermarl_extras.py beside this script")
        return args, None, []
    return extras.read_command_line(sys.modules[__name__], argv)


def workers_deaf_to_signals(fns) -> gym.vector.AsyncVectorEnv:
    """AsyncVectorEnv whose workers (env_worker) ignore Ctrl-C and SIGTERM: the main process still needs
    their simulator states for the checkpoint it writes on a stop."""
    mode, worker = gym.vector.AutoresetMode.SAME_STEP, functools.partial(env_worker, os.getpid())
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, worker=worker)
    # The workers inherit the blocked mask: a Ctrl-C right after their start cannot kill them before
    # env_worker has ignored it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, worker=worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def env_worker(main_pid: int, *args) -> None:
    """gymnasium's AsyncVectorEnv worker, deaf to the SIGINT and SIGTERM that Ctrl-C, `timeout` and Slurm
    send to every process of the job: the main process saves a checkpoint, which needs the workers'
    simulator states, then closes them. SIGTERM from the main process itself (multiprocessing's
    terminate()) still ends a worker; a worker whose main process was killed exits when its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # SIGTERM stays blocked (the mask above): only this thread takes it
        def sigterm_from_main():
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
                pass
            os._exit(128 + signal.SIGTERM)  # the status of a death by SIGTERM

        threading.Thread(target=sigterm_from_main, daemon=True).start()
    else:  # macOS: a forced close still ends the workers, by closing their pipes
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        gym.vector.async_vector_env._async_worker(*args)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the main process is gone: nobody to report to, and no traceback for the terminal


def new_run_folder(runs_dir: str, prefix: str) -> str:
    """A fresh folder runs_dir/<prefix>__<time>[_k]: mkdir is atomic, so runs started in the same
    second (a sweep launched with &) never share one. Returns its name."""
    os.makedirs(runs_dir, exist_ok=True)
    stamp, k = int(time.time()), 0
    while True:
        name = f"{prefix}__{stamp}" + (f"_{k}" if k else "")
        try:
            os.mkdir(os.path.join(runs_dir, name))
            return name
        except FileExistsError:
            k += 1


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


SIMULATOR = "mujoco"  # which checks, checkpoint fields and video probe of hypermarl_extras.py apply
CHECKPOINT_FORMAT = "hypermarl-mappo-mamujoco/3"  # 3: --hypernet, every run's environment states


def open_run(args, loaded, changes, device, probe, actor, critics):
    """A new run folder, or the checkpoint's run (restored later, with the environments); TensorBoard,
    wandb and the run's header lines. Returns (run_name, writer, global_step, first iteration)."""
    global_step, start_iteration = 0, 1
    if loaded is None:
        run_name = new_run_folder(args.runs_dir, f"mamujoco_{args.task.replace('|', '_')}__{args.exp_name}__"
                                                 f"{args.algo}_{args.hypernet}__{args.seed}")
    else:
        global_step, start_iteration, run_name = loaded["global_step"], loaded["iteration"], loaded["run_name"]
        print(f"resume: {run_name} at step {global_step}" + (f"; changed: {', '.join(changes)}" if changes else ""))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(args.runs_dir, run_name))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"run: {os.path.join(args.runs_dir, run_name)}")
    print(f"device: {device}" + (" (CUDA is not available)" if args.cuda and device.type != "cuda" else ""))
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))
    print(f"task: {args.task} agents={probe.n_agents} act_dims={probe.act_dims} local_obs_dims={probe.local_obs_dims} "
          f"state_dim={probe.state_dim} actor_obs_dim={actor_obs_dim(args, probe)} critics={critics.n_critics}")
    print(f"parameters: actor {sum(p.numel() for p in actor.parameters())}, "
          f"critics {sum(p.numel() for p in critics.parameters())}")
    return run_name, writer, global_step, start_iteration


class StopOnSignal:
    """Ctrl-C or SIGTERM sets `requested`: the loop saves a checkpoint and stops after its iteration. A
    second one stops at once. restore() puts the previous handlers back."""

    def __init__(self):
        self.requested = None
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\nsignal {signum}: saving a checkpoint and stopping", flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def save_run(path, *run) -> bool:
    """The run (args, run_name, networks, normalisers, optimisers, environments and where they are, step,
    iteration), atomically; False if it could not be."""
    try:
        import hypermarl_extras as extras
    except ImportError:  # a script copied without its helper: training went on, only the checkpoint is missing
        print("no checkpoint written: hypermarl_extras.py is not beside this script", file=sys.stderr)
        return False
    extras.save_mamujoco_run(path, CHECKPOINT_FORMAT, *run)
    return True


if __name__ == "__main__":
    sys.exit(main())
