"""HyperMARL MAPPO / HAPPO on Multi-Agent MuJoCo (Gymnasium-Robotics ``mamujoco_v1``).

Paper section 5.2 (Table 4, Figures 5 and 7) and section 6 (ablations). HyperMARL is applied to the
actor only; the critic is centralised on the global state and not shared between agents
("centralised but non-shared critic", following Zhong et al. 2024). Implementation details follow
HARL (paper appendix F, Tables 17-21): Huber + clipped value loss, value normalisation (HARL's
ValueNorm), input feature normalisation, orthogonal init, separate actor/critic learning rates and
epochs, HARL's bounded Gaussian std (sigmoid(log_std / x) * y).

Example:
    python mappo_hyper_mamujoco.py --task HalfCheetah-2x3 --actor mlp --total-timesteps 20000
    python mappo_hyper_mamujoco.py --task Humanoid-17x1 --algo happo --actor ind
"""

import functools
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


# ===== 1. Arguments =====
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, cuda will be enabled (CPU is the default: these networks are small)"""
    torch_threads: int = 1
    """torch.set_num_threads (HARL torch_threads); 1 avoids OpenMP stalls when the environment
    workers or other processes share the cores"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "hypermarl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the final checkpoint to runs/{run_name}/{exp_name}.pt"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint (deterministic actions, its own normalisers) and exit; the task and
    networks come from the checkpoint"""

    # Environment
    task: str = "HalfCheetah-2x3"
    """HalfCheetah-2x3 | Walker2d-2x3 | Ant-4x2 | Humanoid-17x1 | Humanoid-9|8"""
    obs_mode: str = "global"
    """global: every agent sees the global state plus a one-hot ID (HARL's convention, Table 4);
    local: each agent's own local observation, zero-padded to the largest, with a mask"""
    agent_obsk: int = 1
    """local observation depth (joints k hops away); only used by --obs-mode local"""
    num_envs: int = 4
    """number of parallel environments (worker processes through gymnasium's vector API)"""
    async_envs: bool = True
    """worker processes (AsyncVectorEnv); --no-async-envs steps them in this process"""
    total_timesteps: int = 10_000_000
    """total environment steps (paper: 10M)"""
    num_steps: int = 500
    """steps per environment per rollout (HARL: 20 envs x 100 = 2000 samples per iteration)"""

    # Algorithm
    algo: str = "mappo"
    """mappo (parallel actor updates) | happo (sequential updates with the ratio-product factor)"""
    actor: str = "mlp"
    """mlp (HyperMARL MLP hypernet) | linear (HyperMARL linear hypernet) | fups (shared actor,
    one-hot ID) | ind (independent actors)"""
    critic: str = "auto"
    """auto (per-agent for mappo, one shared for happo as in HARL) | per-agent | shared; always
    centralised on the global state"""
    lr: Optional[float] = None
    """actor learning rate (default: from the task's table, 5e-4; Walker2d 1e-3)"""
    critic_lr: Optional[float] = None
    """critic learning rate (default: from the task's table)"""
    ppo_epochs: Optional[int] = None
    """actor epochs per iteration (default: table; HalfCheetah 15, others 5)"""
    critic_epochs: Optional[int] = None
    """critic epochs per iteration (default: table)"""
    actor_num_minibatches: Optional[int] = None
    """actor minibatches (default: table; Walker2d 2, others 1)"""
    critic_num_minibatches: Optional[int] = None
    """critic minibatches (default: table)"""
    clip_coef: Optional[float] = None
    """PPO ratio and value clip (default: Table 21 for hypernet actors, Tables 17-20 otherwise)"""
    ent_coef: Optional[float] = None
    """entropy coefficient (default: table; HalfCheetah 0.01, others 0)"""
    fixed_order: Optional[bool] = None
    """HAPPO: update agents in a fixed order instead of a random one (default: table; Ant true)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    huber_delta: float = 10.0
    """Huber loss delta of the value loss"""
    clip_vloss: bool = True
    """clipped value loss (HARL use_clipped_value_loss)"""
    norm_value: bool = True
    """value normalisation (HARL ValueNorm)"""
    norm_obs: bool = True
    """input feature normalisation: running mean/std of the observations (saved in checkpoints)"""
    max_grad_norm: float = 10.0
    """gradient clipping, per agent for independent actors and per-agent critics"""
    adam_eps: float = 1e-5
    """Adam epsilon (HARL opti_eps)"""
    hidden_sizes: Tuple[int, ...] = (128, 128, 128)
    """hidden layers of actors and critics (HARL)"""
    std_x_coef: float = 1.0
    """Gaussian std = sigmoid(log_std / x) * y, log_std initialised to x (HARL)"""
    std_y_coef: float = 0.5
    """see std_x_coef"""

    # HyperMARL (section 4, Table 21) and the ablations of section 6
    hypernet_embedding_dim: Optional[int] = None
    """MLP hypernet: learned agent-embedding size (default 64, Table 21)"""
    hypernet_hidden_dims: Optional[Tuple[int, ...]] = None
    """MLP hypernet hidden layers (default 64, Table 21; 32 = HyperMARL-S)"""
    hypernet_embedding: Optional[str] = None
    """MLP hypernet: learned (orthogonally initialised, default) | onehot (ablation)"""
    hypernet_init: Optional[str] = None
    """scaled (initialisation scaling of section 4.3, default) | default (PyTorch init, w/o RF)"""
    hypernet_input: Optional[str] = None
    """MLP hypernet: agent (default) | agent+obs (embedding and observation: w/o gradient
    decoupling)"""

    # Evaluation and metrics
    eval_interval: int = 100_000
    """evaluate every this many environment steps (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic actions (paper: 40)"""
    metrics_interval: int = 10
    """compute SND and gradient interference every this many iterations (0: never)"""
    snd_samples: int = 256
    """rollout samples used for SND"""

    # filled in at runtime
    batch_size: int = 0
    num_iterations: int = 0


# Tables 17-20 (HARL defaults, Zhong et al. 2024) and Table 21 (HyperMARL clip). Humanoid-9|8 is
# not in the paper: it uses Humanoid-17x1's table.
TASKS = {
    "HalfCheetah-2x3": ("HalfCheetah", "2x3"),
    "Walker2d-2x3": ("Walker2d", "2x3"),
    "Ant-4x2": ("Ant", "4x2"),
    "Humanoid-17x1": ("Humanoid", "17x1"),
    "Humanoid-9|8": ("Humanoid", "9|8"),
}
_HUMANOID = dict(lr=5e-4, critic_lr=5e-4, ppo_epochs=5, critic_epochs=5, actor_num_minibatches=1,
                 critic_num_minibatches=1, clip_coef=0.1, hyper_clip_coef=0.075, ent_coef=0.0,
                 fixed_order=False)
TASK_HPARAMS = {
    "HalfCheetah-2x3": dict(lr=5e-4, critic_lr=5e-4, ppo_epochs=15, critic_epochs=15,
                            actor_num_minibatches=1, critic_num_minibatches=1, clip_coef=0.05,
                            hyper_clip_coef=0.0375, ent_coef=0.01, fixed_order=False),
    "Walker2d-2x3": dict(lr=1e-3, critic_lr=1e-3, ppo_epochs=5, critic_epochs=5,
                         actor_num_minibatches=2, critic_num_minibatches=2, clip_coef=0.05,
                         hyper_clip_coef=0.0375, ent_coef=0.0, fixed_order=False),
    "Ant-4x2": dict(lr=5e-4, critic_lr=5e-4, ppo_epochs=5, critic_epochs=5, actor_num_minibatches=1,
                    critic_num_minibatches=1, clip_coef=0.1, hyper_clip_coef=0.075, ent_coef=0.0,
                    fixed_order=True),
    "Humanoid-17x1": dict(_HUMANOID),
    "Humanoid-9|8": dict(_HUMANOID),
}
HYPERNET_DEFAULTS = dict(hypernet_embedding_dim=64, hypernet_hidden_dims=(64,),
                         hypernet_embedding="learned", hypernet_init="scaled",
                         hypernet_input="agent")


def resolve_args(args: Args) -> Args:
    """Fill the None defaults from the task's table (call after validate_args)."""
    table = TASK_HPARAMS[args.task]
    hyper = args.actor in ("mlp", "linear")
    for key in ("lr", "critic_lr", "ppo_epochs", "critic_epochs", "actor_num_minibatches",
                "critic_num_minibatches", "ent_coef", "fixed_order"):
        if getattr(args, key) is None:
            setattr(args, key, table[key])
    if args.clip_coef is None:
        args.clip_coef = table["hyper_clip_coef"] if hyper else table["clip_coef"]
    for key, value in HYPERNET_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.critic == "auto":
        args.critic = "shared" if args.algo == "happo" else "per-agent"
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


# ===== 2. Input validation =====
class ArgError(ValueError):
    """A bad command-line value: main prints one line `error: ...` and exits 2."""


def validate_args(args: Args) -> None:
    if args.eval_checkpoint is not None:
        if not os.path.isfile(args.eval_checkpoint):
            raise ArgError(f"--eval-checkpoint: no such file, got {args.eval_checkpoint!r}")
        return
    if args.task not in TASKS:
        raise ArgError(f"--task: one of {', '.join(TASKS)}, got {args.task!r}")
    choices = dict(obs_mode=("global", "local"), algo=("mappo", "happo"),
                   actor=("mlp", "linear", "fups", "ind"), critic=("auto", "per-agent", "shared"))
    for key, allowed in choices.items():
        if getattr(args, key) not in allowed:
            flag = "--" + key.replace("_", "-")
            raise ArgError(f"{flag}: one of {', '.join(allowed)}, got {getattr(args, key)!r}")
    positive_int = ("torch_threads", "num_envs", "total_timesteps", "num_steps", "eval_episodes", "snd_samples")
    for key in positive_int:
        if getattr(args, key) < 1:
            raise ArgError(f"--{key.replace('_', '-')}: a positive integer, got {getattr(args, key)}")
    for key in ("ppo_epochs", "critic_epochs", "actor_num_minibatches", "critic_num_minibatches",
                "hypernet_embedding_dim"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ArgError(f"--{key.replace('_', '-')}: a positive integer, got {value}")
    for key in ("eval_interval", "metrics_interval", "agent_obsk"):
        if getattr(args, key) < 0:
            raise ArgError(f"--{key.replace('_', '-')}: a non-negative integer, got {getattr(args, key)}")
    for key in ("lr", "critic_lr", "clip_coef"):
        value = getattr(args, key)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ArgError(f"--{key.replace('_', '-')}: a positive number, got {value}")
    for key in ("huber_delta", "max_grad_norm", "adam_eps", "std_x_coef", "std_y_coef"):
        value = getattr(args, key)
        if not (np.isfinite(value) and value > 0):
            raise ArgError(f"--{key.replace('_', '-')}: a positive number, got {value}")
    if args.ent_coef is not None and not (np.isfinite(args.ent_coef) and args.ent_coef >= 0):
        raise ArgError(f"--ent-coef: a non-negative number, got {args.ent_coef}")
    for key in ("gamma", "gae_lambda"):
        value = getattr(args, key)
        if not (0.0 <= value <= 1.0):
            raise ArgError(f"--{key.replace('_', '-')}: a number in [0, 1], got {value}")
    if len(args.hidden_sizes) == 0 or min(args.hidden_sizes) < 1:
        raise ArgError(f"--hidden-sizes: one or more positive integers, got {args.hidden_sizes}")
    if args.num_envs * args.num_steps > args.total_timesteps:
        raise ArgError(f"--total-timesteps: at least --num-envs x --num-steps = "
                       f"{args.num_envs * args.num_steps}, got {args.total_timesteps}")
    batch = args.num_envs * args.num_steps
    for key in ("actor_num_minibatches", "critic_num_minibatches"):
        value = getattr(args, key)
        if value is not None and value > batch:
            raise ArgError(f"--{key.replace('_', '-')}: at most --num-envs x --num-steps = {batch}, "
                           f"got {value}")
    # hypernetwork options apply to some actors only: reject them elsewhere rather than ignore them
    only_for = dict(hypernet_embedding_dim=("mlp",), hypernet_hidden_dims=("mlp",),
                    hypernet_embedding=("mlp",), hypernet_init=("mlp", "linear"),
                    hypernet_input=("mlp",))
    for key, actors in only_for.items():
        if getattr(args, key) is not None and args.actor not in actors:
            raise ArgError(f"--{key.replace('_', '-')}: only with --actor {' or '.join(actors)}, "
                           f"got --actor {args.actor}")
    hyper_choices = dict(hypernet_embedding=("learned", "onehot"), hypernet_init=("scaled", "default"),
                         hypernet_input=("agent", "agent+obs"))
    for key, allowed in hyper_choices.items():
        value = getattr(args, key)
        if value is not None and value not in allowed:
            raise ArgError(f"--{key.replace('_', '-')}: one of {', '.join(allowed)}, got {value!r}")
    if args.hypernet_hidden_dims is not None and (
            len(args.hypernet_hidden_dims) == 0 or min(args.hypernet_hidden_dims) < 1):
        raise ArgError(f"--hypernet-hidden-dims: one or more positive integers, "
                       f"got {args.hypernet_hidden_dims}")
    if args.hypernet_embedding == "onehot" and args.hypernet_embedding_dim is not None:
        raise ArgError("--hypernet-embedding-dim: not with --hypernet-embedding onehot "
                       "(the one-hot size is the number of agents)")
    if args.fixed_order is not None and args.algo != "happo":
        raise ArgError(f"--fixed-order: only with --algo happo, got --algo {args.algo}")


# ===== 3. Environment =====
def make_parallel_env(task: str, agent_obsk: int = 1):
    """The PettingZoo parallel env of a task. Humanoid-17x1 is not built into Gymnasium-Robotics:
    its partition (one joint, i.e. one actuator, per agent) is built from its own graph helpers."""
    from gymnasium_robotics import mamujoco_v1

    scenario, conf = TASKS[task]
    if task == "Humanoid-17x1":
        parts, edges, globals_ = mamujoco_v1.get_parts_and_edges("Humanoid", None)
        factorization = {"partition": [(joint,) for joint in parts[0]], "edges": edges,
                         "globals": globals_}
        return mamujoco_v1.parallel_env(scenario, None, agent_obsk=agent_obsk,
                                        agent_factorization=factorization)
    return mamujoco_v1.parallel_env(scenario, conf, agent_obsk=agent_obsk)


def pad_stack(arrays: List[np.ndarray], width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stack 1-d arrays of unequal length into (n, width), zero-padded, with a bool mask."""
    out = np.zeros((len(arrays), width), dtype=np.float32)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
        mask[i, : len(a)] = True
    return out, mask


def unpad(padded: np.ndarray, mask: np.ndarray) -> List[np.ndarray]:
    """Inverse of pad_stack: the valid entries of each row."""
    return [padded[i][mask[i]] for i in range(padded.shape[0])]


class MaMuJoCoEnv(gym.Env):
    """One MaMuJoCo task as a fixed-shape gymnasium Env, for gymnasium's vector API.

    Observation (flat float32): global mode: the global state (the single-agent observation, as
    `state()`); local mode: the agents' local observations zero-padded to the largest
    (n_agents * obs_dim), then the global state. The agent view (global state + one-hot ID) is
    built in the learner process, so workers do not send the state n_agents times.
    Action: (n_agents, act_dim), zero-padded; padded entries are ignored (`act_mask`).
    Reward: the team reward. Terminated and truncated (the 1000-step time limit) are kept apart.
    `info` is empty, so the vector env has nothing to merge but `final_obs` on autoreset.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: str, obs_mode: str = "global", agent_obsk: int = 1):
        super().__init__()
        self.ma = make_parallel_env(task, agent_obsk)
        self.base = self.ma.single_agent_env  # TimeLimit(...(MujocoEnv)): 1000-step limit
        self.obs_mode = obs_mode
        agents = self.ma.possible_agents
        self.n_agents = len(agents)
        self.act_dims = [self.ma.action_space(a).shape[0] for a in agents]
        self.obs_dims = [self.ma.observation_space(a).shape[0] for a in agents]
        self.state_dim = self.base.observation_space.shape[0]
        self.act_dim = max(self.act_dims)
        self.local_obs_dim = max(self.obs_dims)
        self.act_mask = pad_stack([np.ones(d) for d in self.act_dims], self.act_dim)[1]
        self.obs_mask = pad_stack([np.ones(d) for d in self.obs_dims], self.local_obs_dim)[1]
        # global action index of every (agent, slot): the mapping of map_local_actions_to_global_action
        agent_idx, slot_idx, global_idx = [], [], []
        for i, partition in enumerate(self.ma.agent_action_partitions):
            for j, node in enumerate(partition):
                agent_idx.append(i)
                slot_idx.append(j)
                global_idx.append(node.act_ids)
        self._agent_idx, self._slot_idx = np.array(agent_idx), np.array(slot_idx)
        self._global_idx = np.array(global_idx)
        n_global = self.base.action_space.shape[0]
        assert sorted(global_idx) == list(range(n_global)), "every actuator exactly once"
        self.n_global_actions = n_global
        low = np.zeros((self.n_agents, self.act_dim), np.float32)
        high = np.zeros((self.n_agents, self.act_dim), np.float32)
        for i, a in enumerate(agents):
            low[i, : self.act_dims[i]] = self.ma.action_space(a).low
            high[i, : self.act_dims[i]] = self.ma.action_space(a).high
        self.action_low, self.action_high = low, high
        self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        flat = self.state_dim + (self.n_agents * self.local_obs_dim if obs_mode == "local" else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (flat,), dtype=np.float32)

    def local_to_global_action(self, actions: np.ndarray) -> np.ndarray:
        """(n_agents, act_dim) padded -> the single-agent action vector."""
        out = np.empty(self.n_global_actions, dtype=np.float64)
        out[self._global_idx] = actions[self._agent_idx, self._slot_idx]
        return out

    def _flat_obs(self, state: np.ndarray) -> np.ndarray:
        if self.obs_mode == "global":
            return state.astype(np.float32)
        local = pad_stack([self.ma._get_obs_agent(i) for i in range(self.n_agents)],
                          self.local_obs_dim)[0]
        return np.concatenate([local.reshape(-1), state.astype(np.float32)])

    def split_flat(self, flat: np.ndarray) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """(..., flat) -> local obs (..., n_agents, obs_dim) or None, state (..., state_dim)."""
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
        # the same transition as ParallelEnv.step (the same single-agent step), without building
        # the local observations when nobody uses them
        state, reward, terminated, truncated, _ = self.base.step(
            self.local_to_global_action(np.asarray(action)))
        return self._flat_obs(state), float(reward), bool(terminated), bool(truncated), {}

    def close(self):
        self.ma.close()


def make_env(task: str, obs_mode: str, agent_obsk: int) -> MaMuJoCoEnv:
    return MaMuJoCoEnv(task, obs_mode, agent_obsk)


def make_vector_env(args: Args) -> gym.vector.VectorEnv:
    """SAME_STEP autoreset: the observation returned with done=True is already the next episode's
    first one (so the next action sees it), the last one is in info["final_obs"]."""
    fns = [functools.partial(make_env, args.task, args.obs_mode, args.agent_obsk)
           for _ in range(args.num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if args.async_envs and args.num_envs > 1:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


class RunningMeanStd:
    """Running mean/variance (parallel algorithm of Chan et al.), float64, any leading shape."""

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": torch.as_tensor(self.mean), "var": torch.as_tensor(self.var),
                "count": float(self.count)}

    def load_state_dict(self, d: dict) -> None:
        self.mean = d["mean"].numpy().astype(np.float64)
        self.var = d["var"].numpy().astype(np.float64)
        self.count = float(d["count"])


class ObsNormalizer:
    """Input feature normalisation: running mean/std of the global state (and, in local mode, of
    each agent's local features); padded features stay exactly 0. Observations are clipped to
    [-clip, clip] after normalisation."""

    def __init__(self, state_dim: int, obs_mask: Optional[np.ndarray], enabled: bool = True,
                 clip: float = 10.0, eps: float = 1e-8):
        self.enabled, self.clip, self.eps = enabled, clip, eps
        self.state_rms = RunningMeanStd((state_dim,))
        self.obs_mask = obs_mask
        self.local_rms = RunningMeanStd(obs_mask.shape) if obs_mask is not None else None

    def update(self, local: Optional[np.ndarray], state: np.ndarray) -> None:
        if not self.enabled:
            return
        self.state_rms.update(state)
        if local is not None:
            self.local_rms.update(local)

    def _norm(self, x: np.ndarray, rms: RunningMeanStd) -> np.ndarray:
        if not self.enabled:
            return x.astype(np.float32)
        return np.clip((x - rms.mean) / np.sqrt(rms.var + self.eps), -self.clip, self.clip).astype(np.float32)

    def state(self, state: np.ndarray) -> np.ndarray:
        return self._norm(state, self.state_rms)

    def local(self, local: np.ndarray) -> np.ndarray:
        return self._norm(local, self.local_rms) * self.obs_mask

    def state_dict(self) -> dict:
        d = {"state": self.state_rms.state_dict()}
        if self.local_rms is not None:
            d["local"] = self.local_rms.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.state_rms.load_state_dict(d["state"])
        if self.local_rms is not None:
            self.local_rms.load_state_dict(d["local"])


def agent_inputs(local: Optional[np.ndarray], state: np.ndarray, n_agents: int, obs_mode: str,
                 add_id_local: bool) -> np.ndarray:
    """Normalised env output -> agent-major actor inputs (n_agents, batch, obs_dim).
    global: the state plus a one-hot ID for every agent (HARL); local: the padded local
    observation (plus a one-hot ID for the shared FuPS actor)."""
    batch = state.shape[0]
    onehot = np.broadcast_to(np.eye(n_agents, dtype=np.float32)[:, None, :], (n_agents, batch, n_agents))
    if obs_mode == "global":
        x = np.broadcast_to(state[None], (n_agents, batch, state.shape[-1]))
        return np.concatenate([x, onehot], axis=-1)
    x = np.ascontiguousarray(np.swapaxes(local, 0, 1))
    return np.concatenate([x, onehot], axis=-1) if add_id_local else x


# ===== 4. Networks =====
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def batched_mlp(x, params, activation=F.relu):
    """x: (n_agents, batch, in), agent-major; params: [(W (n, in, out), b (n, 1, out)), ...]."""
    for k, (w, b) in enumerate(params):
        x = torch.baddbmm(b, x, w)
        if k < len(params) - 1:
            x = activation(x)
    return x


def _layer_gains(n_layers: int, out_gain: float) -> List[float]:
    return [float(np.sqrt(2))] * (n_layers - 1) + [out_gain]


def orthogonal_params(layer_sizes, n: int, out_gain: float) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """n independent orthogonally initialised MLPs: [(W (n, in, out), b zeros (n, 1, out))]."""
    out = []
    gains = _layer_gains(len(layer_sizes) - 1, out_gain)
    for (fan_in, fan_out), gain in zip(zip(layer_sizes[:-1], layer_sizes[1:]), gains):
        w = torch.empty(n, fan_in, fan_out)
        for i in range(n):
            nn.init.orthogonal_(w[i], gain)
        out.append((w, torch.zeros(n, 1, fan_out)))
    return out


def _n_target_params(layer_sizes) -> int:
    return sum(i * o + o for i, o in zip(layer_sizes[:-1], layer_sizes[1:]))


def _unflatten_params(flat: torch.Tensor, layer_sizes):
    """flat (n, m) -> [(W (n, in, out), b (n, 1, out))]."""
    out, k = [], 0
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        w = flat[:, k: k + fan_in * fan_out].reshape(-1, fan_in, fan_out)
        k += fan_in * fan_out
        b = flat[:, k: k + fan_out].reshape(-1, 1, fan_out)
        k += fan_out
        out.append((w, b))
    return out


def _flat_orthogonal_columns(layer_sizes, n_cols: int, out_gain: float) -> torch.Tensor:
    """(m, n_cols): each column is one flattened orthogonally initialised target network with
    zero biases (the "initialisation scaling" of section 4.3)."""
    cols = []
    for w, b in orthogonal_params(layer_sizes, n_cols, out_gain):
        cols.append(w.reshape(n_cols, -1))
        cols.append(b.reshape(n_cols, -1))
    return torch.cat(cols, dim=1).T.contiguous()


class NoPSNet(nn.Module):
    """Independent per-agent networks, stored stacked for one batched forward."""

    def __init__(self, n_agents, layer_sizes, out_gain):
        super().__init__()
        self.layer_sizes = list(layer_sizes)
        params = orthogonal_params(layer_sizes, n_agents, out_gain)
        self.weights = nn.ParameterList([nn.Parameter(w) for w, _ in params])
        self.biases = nn.ParameterList([nn.Parameter(b) for _, b in params])

    def params(self, agent_ids=None):
        if agent_ids is None:
            return list(zip(self.weights, self.biases))
        return [(w[agent_ids], b[agent_ids]) for w, b in zip(self.weights, self.biases)]


class FuPSNet(nn.Module):
    """One shared network (the agent ID is part of its input)."""

    def __init__(self, layer_sizes, out_gain):
        super().__init__()
        self.layer_sizes = list(layer_sizes)
        params = orthogonal_params(layer_sizes, 1, out_gain)
        self.weights = nn.ParameterList([nn.Parameter(w) for w, _ in params])
        self.biases = nn.ParameterList([nn.Parameter(b) for _, b in params])

    def params(self, agent_ids=None):
        return list(zip(self.weights, self.biases))


class LinearHypernet(nn.Module):
    """Eq. (5): theta_i = 1_i W + b, one-hot agent ID in, flattened target params out."""

    def __init__(self, n_agents, layer_sizes, out_gain, init="scaled", shared_bias=False):
        super().__init__()
        self.n_agents, self.layer_sizes = n_agents, list(layer_sizes)
        m = _n_target_params(layer_sizes)
        self.head = nn.Linear(n_agents, m, bias=shared_bias)
        if init == "scaled":
            with torch.no_grad():
                # column i = agent i's flattened orthogonal target params
                self.head.weight.copy_(_flat_orthogonal_columns(layer_sizes, n_agents, out_gain))
                if shared_bias:
                    self.head.bias.zero_()

    def params(self, agent_ids=None):
        eye = torch.eye(self.n_agents, device=self.head.weight.device)
        ids = eye if agent_ids is None else eye[agent_ids]
        return _unflatten_params(self.head(ids), self.layer_sizes)


class MLPHypernet(nn.Module):
    """Eq. (6): theta_i = f(g(e_i)), learned orthogonal agent embeddings (or one-hot), ReLU MLP g,
    L2-normalised hidden features, linear head f whose columns are flattened target networks."""

    def __init__(self, n_agents, layer_sizes, out_gain, embedding_dim=64, hidden_dims=(64,),
                 embedding="learned", init="scaled", context_dim=0):
        super().__init__()
        self.n_agents, self.layer_sizes = n_agents, list(layer_sizes)
        if embedding == "learned":
            emb = torch.empty(n_agents, embedding_dim)
            nn.init.orthogonal_(emb)
            self.embedding = nn.Parameter(emb)
        else:
            self.register_buffer("embedding", torch.eye(n_agents))
        in_dim = self.embedding.shape[1] + context_dim
        layers = []
        for h in hidden_dims:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        self.body = nn.Sequential(*layers)
        m = _n_target_params(layer_sizes)
        self.head = nn.Linear(in_dim, m)
        if init == "scaled":
            with torch.no_grad():
                self.head.weight.copy_(_flat_orthogonal_columns(layer_sizes, in_dim, out_gain))
                self.head.bias.zero_()

    def features(self, agent_ids=None, context=None):
        e = self.embedding if agent_ids is None else self.embedding[agent_ids]
        if context is not None:  # (k, batch, context_dim): per-sample input (w/o GD ablation)
            e = torch.cat([e[:, None, :].expand(-1, context.shape[1], -1), context], dim=-1)
        return F.normalize(self.body(e), dim=-1)

    def params(self, agent_ids=None):
        return _unflatten_params(self.head(self.features(agent_ids)), self.layer_sizes)

    def per_sample_mlp(self, x, agent_ids=None, activation=F.relu):
        """The w/o GD ablation: theta depends on (e_i, o): out = x W(z) + b(z) with z the hidden
        features of (e_i, o) and W(z) = reshape(head(z)). Computed as sum_m z_m (x H_m) so the
        per-sample weights are never materialised (same result, memory batch*out*hidden)."""
        z = self.features(agent_ids, x)  # (k, B, H)
        hw, hb = self.head.weight, self.head.bias  # (m, H), (m,)
        k_off = 0
        for li, (fan_in, fan_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            w_h = hw[k_off: k_off + fan_in * fan_out].reshape(fan_in, fan_out, -1)
            w_b = hb[k_off: k_off + fan_in * fan_out].reshape(fan_in, fan_out)
            k_off += fan_in * fan_out
            b_h = hw[k_off: k_off + fan_out]
            b_b = hb[k_off: k_off + fan_out]
            k_off += fan_out
            xh = torch.einsum("kbi,ioh->kboh", x, w_h)
            x = torch.einsum("kboh,kbh->kbo", xh, z) + x @ w_b + z @ b_h.T + b_b
            if li < len(self.layer_sizes) - 2:
                x = activation(x)
        return x


# ===== 5. Metrics =====
def gaussian_js_distance(mu_p, std_p, mu_q, std_q, n_samples: int = 64, generator=None):
    """Monte-Carlo Jensen-Shannon distance (base 2, in [0, 1]) between diagonal Gaussians;
    inputs (..., d); returns (...)."""
    p, q = torch.distributions.Normal(mu_p, std_p), torch.distributions.Normal(mu_q, std_q)

    def kl_to_mixture(dist):
        x = dist.sample((n_samples,))
        lp, lq = p.log_prob(x).sum(-1), q.log_prob(x).sum(-1)
        own = dist.log_prob(x).sum(-1)
        lm = torch.logaddexp(lp, lq) - np.log(2.0)
        return (own - lm).mean(0)

    js = 0.5 * (kl_to_mixture(p) + kl_to_mixture(q)) / np.log(2.0)
    return js.clamp(0.0, 1.0).sqrt()


def snd_gaussian(mu, std, n_samples: int = 64):
    """SND (Eq. 9): mean pairwise Jensen-Shannon distance between the agents' action
    distributions on the same joint samples; mu, std: (n_agents, batch, d)."""
    n = mu.shape[0]
    if n < 2:
        return 0.0
    i, j = torch.triu_indices(n, n, offset=1)
    d = gaussian_js_distance(mu[i], std[i], mu[j], std[j], n_samples)
    return float(d.mean())


def grad_stats(grads: List[torch.Tensor]) -> Tuple[float, float]:
    """Variance across all entries of one minibatch's actor gradient (the paper's gradient
    variance) and its L2 norm."""
    n = sum(g.numel() for g in grads)
    s1 = sum(float(g.sum()) for g in grads)
    s2 = sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads)
    var = (s2 - s1 * s1 / n) / max(n - 1, 1)
    return float(var), float(np.sqrt(s2))


def interference(per_agent_grads: List[torch.Tensor]) -> float:
    """Mean pairwise cosine similarity of per-agent actor gradients (flattened)."""
    g = torch.stack(per_agent_grads)
    g = F.normalize(g, dim=1)
    sim = g @ g.T
    n = g.shape[0]
    if n < 2:
        return 1.0
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


# ===== 6. Algorithm =====
LOG_2PI = float(np.log(2 * np.pi))


class Actor(nn.Module):
    """Gaussian actor of one family. Means from a batched per-agent MLP whose parameters come
    from the family; std = sigmoid(log_std / x) * y (HARL), one log_std vector per agent (one
    shared for FuPS). Padded action dims are masked out of log-probs and entropies."""

    def __init__(self, args: Args, n_agents: int, obs_dim: int, act_dim: int, act_mask: np.ndarray):
        super().__init__()
        self.family, self.n_agents = args.actor, n_agents
        sizes = [obs_dim, *args.hidden_sizes, act_dim]
        self.per_sample = args.actor == "mlp" and args.hypernet_input == "agent+obs"
        if args.actor == "ind":
            self.net = NoPSNet(n_agents, sizes, out_gain=0.01)
        elif args.actor == "fups":
            self.net = FuPSNet(sizes, out_gain=0.01)
        elif args.actor == "linear":
            self.net = LinearHypernet(n_agents, sizes, out_gain=0.01, init=args.hypernet_init)
        else:
            self.net = MLPHypernet(n_agents, sizes, out_gain=0.01,
                                   embedding_dim=args.hypernet_embedding_dim,
                                   hidden_dims=args.hypernet_hidden_dims,
                                   embedding=args.hypernet_embedding, init=args.hypernet_init,
                                   context_dim=obs_dim if self.per_sample else 0)
        n_std = 1 if args.actor == "fups" else n_agents
        self.log_std = nn.Parameter(torch.full((n_std, 1, act_dim), float(args.std_x_coef)))
        self.std_x, self.std_y = args.std_x_coef, args.std_y_coef
        self.register_buffer("act_mask", torch.as_tensor(act_mask, dtype=torch.float32)[:, None, :])

    def params(self, agent_ids=None):
        """Generated/stacked target-network params (None for the per-sample ablation)."""
        return None if self.per_sample else self.net.params(agent_ids)

    def dist(self, x, agent_ids=None, params=None):
        """x: (k, batch, obs_dim) for all agents (k = n) or agent_ids -> mean, std (k, batch, a)."""
        if self.per_sample:
            mean = self.net.per_sample_mlp(x, agent_ids)
        else:
            params = self.params(agent_ids) if params is None else params
            if params[0][0].shape[0] == 1 and x.shape[0] > 1:  # shared network: one big batch
                k, b = x.shape[:2]
                mean = batched_mlp(x.reshape(1, k * b, -1), params).reshape(k, b, -1)
            else:
                mean = batched_mlp(x, params)
        log_std = self.log_std
        if log_std.shape[0] > 1 and agent_ids is not None:
            log_std = log_std[agent_ids]
        std = torch.sigmoid(log_std / self.std_x) * self.std_y
        return mean, std.expand_as(mean)

    def mask(self, agent_ids=None):
        return self.act_mask if agent_ids is None else self.act_mask[agent_ids]

    def log_prob_entropy(self, x, actions, agent_ids=None, params=None):
        mean, std = self.dist(x, agent_ids, params)
        m = self.mask(agent_ids)
        log_std = std.log()
        logp = -0.5 * ((actions - mean) / std) ** 2 - log_std - 0.5 * LOG_2PI
        ent = 0.5 + 0.5 * LOG_2PI + log_std
        return (logp * m).sum(-1), (ent * m).sum(-1)


class Critic(nn.Module):
    """Centralised critics V_c(s) on the global state: n_critics non-shared networks (one per
    agent for MAPPO), batched; outputs are in value-normalised space."""

    def __init__(self, args: Args, n_critics: int, state_dim: int):
        super().__init__()
        self.n = n_critics
        self.net = NoPSNet(n_critics, [state_dim, *args.hidden_sizes, 1], out_gain=1.0)

    def forward(self, state):  # (batch, state_dim) -> (n_critics, batch)
        x = state[None].expand(self.n, -1, -1)
        return batched_mlp(x, self.net.params()).squeeze(-1)


class ValueNorm(nn.Module):
    """HARL's ValueNorm: debiased exponential moving mean / mean-square (beta 0.99999), one per
    critic; normalize/denormalize value targets. Updated once per iteration with the returns."""

    def __init__(self, n: int, beta: float = 0.99999, epsilon: float = 1e-5, enabled: bool = True):
        super().__init__()
        self.beta, self.epsilon, self.enabled = beta, epsilon, enabled
        self.register_buffer("running_mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("running_mean_sq", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("debiasing_term", torch.zeros((), dtype=torch.float64))

    def _mean_var(self):
        d = self.debiasing_term.clamp(min=self.epsilon)
        mean, mean_sq = self.running_mean / d, self.running_mean_sq / d
        return mean, (mean_sq - mean**2).clamp(min=1e-2)

    @torch.no_grad()
    def update(self, x):  # x: (n, batch)
        if not self.enabled:
            return
        x = x.double()
        self.running_mean.mul_(self.beta).add_(x.mean(1) * (1 - self.beta))
        self.running_mean_sq.mul_(self.beta).add_((x**2).mean(1) * (1 - self.beta))
        self.debiasing_term.mul_(self.beta).add_(1 - self.beta)

    def normalize(self, x):  # (n, ...) raw -> normalised
        if not self.enabled:
            return x
        mean, var = self._mean_var()
        shape = (-1,) + (1,) * (x.dim() - 1)
        return ((x - mean.view(shape).to(x.dtype)) / var.sqrt().view(shape).to(x.dtype))

    def denormalize(self, x):
        if not self.enabled:
            return x
        mean, var = self._mean_var()
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x * var.sqrt().view(shape).to(x.dtype) + mean.view(shape).to(x.dtype)


def compute_gae(rewards, values, next_value, dones, gamma, lam):
    """rewards, values: (T, C, E) raw scale (bootstrap of truncated steps already in rewards);
    next_value (C, E); dones (T, E): 1 where the episode ended at step t (the next value then
    belongs to a new episode). Returns advantages, returns (T, C, E)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nv = next_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nv * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


def huber(x, delta):
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x**2, delta * (a - 0.5 * delta))


def value_loss_fn(values, old_values, returns_norm, clip, delta, clip_vloss):
    """HARL cal_value_loss: Huber loss on normalised targets, max of clipped and unclipped."""
    loss = huber(returns_norm - values, delta)
    if clip_vloss:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.max(loss, huber(returns_norm - clipped, delta))
    return loss.mean(-1)  # per critic


def ppo_actor_loss(new_logp, old_logp, adv, clip, factor=None):
    """Clipped surrogate (per agent, mean over samples); HAPPO multiplies by the factor of the
    agents updated before (Zhong et al. 2024, HARL's happo.py)."""
    ratio = torch.exp(new_logp - old_logp)
    surr = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    if factor is not None:
        surr = factor * surr
    return -surr.mean(-1), ratio


def happo_factor(factor, new_logp, old_logp):
    """HAPPO: M^{i_{1:m}} = M^{i_{1:m-1}} * pi_new^{i_m} / pi_old^{i_m} (joint over the agent's
    action dims: HARL's action_aggregation=prod), no gradient."""
    return (factor * torch.exp(new_logp - old_logp)).detach()


def clip_grad_per_row(params, max_norm: float, n_rows: int):
    """Clip each agent's slice (leading dim n_rows) separately: independent networks trained as
    if by separate optimisers (HARL clips each actor/critic on its own)."""
    sq = torch.zeros(n_rows)
    for p in params:
        if p.grad is not None:
            sq += p.grad.reshape(n_rows, -1).pow(2).sum(1)
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.view(-1, *([1] * (p.grad.dim() - 1))))
    return norm


def actor_grads(actor: Actor):
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in actor.parameters()]


def clip_actor(actor: Actor, max_norm: float):
    if actor.family == "ind":
        return float(clip_grad_per_row(list(actor.parameters()), max_norm, actor.n_agents).max())
    return float(nn.utils.clip_grad_norm_(actor.parameters(), max_norm))


def actor_update_mappo(actor, opt, b, args, collect_stats=True):
    """All agents in parallel. b: obs (N, B, D), actions (N, B, A), logp (N, B), adv (N, B)."""
    B = b["obs"].shape[1]
    mb_size = B // args.actor_num_minibatches
    stats = {"pg": [], "ent": [], "kl": [], "clipfrac": [], "var": [], "norm": []}
    for _ in range(args.ppo_epochs):
        perm = torch.randperm(B)
        for k in range(args.actor_num_minibatches):
            idx = perm[k * mb_size: (k + 1) * mb_size]
            new_logp, ent = actor.log_prob_entropy(b["obs"][:, idx], b["actions"][:, idx])
            per_agent, ratio = ppo_actor_loss(new_logp, b["logp"][:, idx], b["adv"][:, idx], args.clip_coef)
            per_agent = per_agent - args.ent_coef * ent.mean(-1)
            loss = per_agent.sum() if actor.family == "ind" else per_agent.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if collect_stats:
                var, norm = grad_stats(actor_grads(actor))
                stats["var"].append(var)
                stats["norm"].append(norm)
            clip_actor(actor, args.max_grad_norm)
            opt.step()
            with torch.no_grad():
                logr = new_logp - b["logp"][:, idx]
                stats["kl"].append(float(((logr.exp() - 1) - logr).mean()))
                stats["clipfrac"].append(float(((ratio - 1).abs() > args.clip_coef).float().mean()))
                stats["pg"].append(float(per_agent.mean() + args.ent_coef * ent.mean()))
                stats["ent"].append(float(ent.mean()))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}


def actor_update_happo(actor, opt, b, args, order, collect_stats=True):
    """HAPPO (Zhong et al. 2024): agents updated one after another in `order`; agent i_m's
    surrogate is weighted by the product of the ratios new/old of the agents updated before it,
    evaluated on the whole batch after their updates. Returns stats and the factors used."""
    B = b["obs"].shape[1]
    mb_size = B // args.actor_num_minibatches
    factor = torch.ones(B)
    factors_used = []
    stats = {"pg": [], "ent": [], "kl": [], "clipfrac": [], "var": [], "norm": []}
    for agent in order:
        ids = torch.tensor([agent])
        factors_used.append(factor.clone())
        obs, act, old = b["obs"][ids], b["actions"][ids], b["logp"][ids]
        adv = b["adv"][ids]
        for _ in range(args.ppo_epochs):
            perm = torch.randperm(B)
            for k in range(args.actor_num_minibatches):
                idx = perm[k * mb_size: (k + 1) * mb_size]
                new_logp, ent = actor.log_prob_entropy(obs[:, idx], act[:, idx], ids)
                per_agent, ratio = ppo_actor_loss(new_logp, old[:, idx], adv[:, idx], args.clip_coef,
                                                  factor[idx][None])
                loss = (per_agent - args.ent_coef * ent.mean(-1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if collect_stats:
                    var, norm = grad_stats(actor_grads(actor))
                    stats["var"].append(var)
                    stats["norm"].append(norm)
                clip_actor(actor, args.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    logr = new_logp - old[:, idx]
                    stats["kl"].append(float(((logr.exp() - 1) - logr).mean()))
                    stats["clipfrac"].append(float(((ratio - 1).abs() > args.clip_coef).float().mean()))
                    stats["pg"].append(float(per_agent.mean()))
                    stats["ent"].append(float(ent.mean()))
        with torch.no_grad():
            new_logp, _ = actor.log_prob_entropy(obs, act, ids)
            factor = happo_factor(factor, new_logp[0], old[0])
    return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}, factors_used


def critic_update(critic, opt, value_norm, b, args):
    """b: state (B, S), values (C, B) normalised-space old predictions, returns (C, B) raw."""
    B = b["state"].shape[0]
    mb_size = B // args.critic_num_minibatches
    value_norm.update(b["returns"])
    returns_norm = value_norm.normalize(b["returns"])
    losses = []
    for _ in range(args.critic_epochs):
        perm = torch.randperm(B)
        for k in range(args.critic_num_minibatches):
            idx = perm[k * mb_size: (k + 1) * mb_size]
            v = critic(b["state"][idx])
            per_critic = value_loss_fn(v, b["values"][:, idx], returns_norm[:, idx], args.clip_coef,
                                       args.huber_delta, args.clip_vloss)
            loss = per_critic.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_per_row(list(critic.parameters()), args.max_grad_norm, critic.n)
            opt.step()
            losses.append(float(per_critic.detach().mean()))
    return float(np.mean(losses))


def interference_stat(actor: Actor, b, args, max_samples: int = 512) -> float:
    """Cross-agent interference on one minibatch: per-agent PPO-loss gradients w.r.t. all actor
    parameters, mean pairwise cosine similarity (independent actors: 0 by construction)."""
    B = b["obs"].shape[1]
    idx = torch.randperm(B)[: min(B, max_samples)]
    new_logp, _ = actor.log_prob_entropy(b["obs"][:, idx], b["actions"][:, idx])
    per_agent, _ = ppo_actor_loss(new_logp, b["logp"][:, idx], b["adv"][:, idx], args.clip_coef)
    params = [p for p in actor.parameters() if p.requires_grad]
    grads = []
    for i in range(actor.n_agents):
        g = torch.autograd.grad(per_agent[i], params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                for x, p in zip(g, params)]))
    return interference(grads)


@torch.no_grad()
def evaluate(actor: Actor, env: MaMuJoCoEnv, obs_norm: ObsNormalizer, args: Args, episodes: int,
             seed: int) -> float:
    """Mean return of deterministic (mean) actions; episode k is seeded seed + k, so a restored
    checkpoint scores exactly what the run scored."""
    params = actor.params()
    low, high = env.action_low, env.action_high
    returns = []
    for ep in range(episodes):
        flat, _ = env.reset(seed=seed + ep)
        done, ret = False, 0.0
        while not done:
            local, state = env.split_flat(flat[None])
            x = agent_inputs(obs_norm.local(local) if local is not None else None,
                             obs_norm.state(state), env.n_agents, env.obs_mode, args.actor == "fups")
            mean, _ = actor.dist(torch.as_tensor(x), params=params)
            act = np.clip(mean[:, 0].numpy(), low, high)
            flat, r, term, trunc, _ = env.step(act)
            ret += r
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns))


# ===== 7. Checkpoints =====
def save_checkpoint(path: str, payload: dict) -> None:
    """Atomic: write to a temporary file, then os.replace."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Safe load: tensors and plain containers only (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_checkpoint(args, actor, critic, value_norm, obs_norm, global_step, eval_return):
    return {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "actor": actor.state_dict(), "critic": critic.state_dict(),
            "value_norm": value_norm.state_dict(), "obs_norm": obs_norm.state_dict(),
            "global_step": int(global_step), "eval_return": float(eval_return)}


def args_from_checkpoint(d: dict) -> Args:
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return Args(**kwargs)


def evaluate_checkpoint(path: str, episodes: Optional[int] = None) -> float:
    ckpt = load_checkpoint(path)
    args = args_from_checkpoint(ckpt["args"])
    env = MaMuJoCoEnv(args.task, args.obs_mode, args.agent_obsk)
    obs_dim = agent_obs_dim(args, env)
    actor = Actor(args, env.n_agents, obs_dim, env.act_dim, env.act_mask)
    actor.load_state_dict(ckpt["actor"])
    obs_norm = ObsNormalizer(env.state_dim, env.obs_mask if args.obs_mode == "local" else None,
                             args.norm_obs)
    obs_norm.load_state_dict(ckpt["obs_norm"])
    ret = evaluate(actor, env, obs_norm, args, episodes or args.eval_episodes, args.seed + 10_000)
    env.close()
    return ret


def agent_obs_dim(args: Args, env: MaMuJoCoEnv) -> int:
    if args.obs_mode == "global":
        return env.state_dim + env.n_agents
    return env.local_obs_dim + (env.n_agents if args.actor == "fups" else 0)


# ===== 8. Main =====
def main(argv=None):
    args = tyro.cli(Args, args=argv)
    try:
        validate_args(args)
    except ArgError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.eval_checkpoint is not None:
        ret = evaluate_checkpoint(args.eval_checkpoint)
        print(f"eval/episodic_return={ret:.4f}")
        return ret
    args = resolve_args(args)
    run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % (
        "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
    print(f"config: {vars(args)}", flush=True)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cpu")  # small networks; --cuda is accepted for the CleanRL interface

    envs = make_vector_env(args)
    probe = MaMuJoCoEnv(args.task, args.obs_mode, args.agent_obsk)  # shapes, masks; eval env
    N, E, T = probe.n_agents, args.num_envs, args.num_steps
    A, S = probe.act_dim, probe.state_dim
    D = agent_obs_dim(args, probe)
    C = N if args.critic == "per-agent" else 1
    low, high = probe.action_low, probe.action_high

    actor = Actor(args, N, D, A, probe.act_mask).to(device)
    critic = Critic(args, C, S).to(device)
    value_norm = ValueNorm(C, enabled=args.norm_value)
    obs_norm = ObsNormalizer(S, probe.obs_mask if args.obs_mode == "local" else None, args.norm_obs)
    fused = device.type == "cpu"  # fused Adam: ~8x faster steps for the large hypernet heads
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.lr, eps=args.adam_eps, fused=fused)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=args.adam_eps, fused=fused)
    print(f"agents={N} obs_dim={D} act_dims={probe.act_dims} state_dim={S} critics={C} "
          f"actor_params={sum(p.numel() for p in actor.parameters())} "
          f"critic_params={sum(p.numel() for p in critic.parameters())}", flush=True)

    obs_buf = torch.zeros(T, N, E, D)
    state_buf = torch.zeros(T, E, S)
    act_buf = torch.zeros(T, N, E, A)
    rew_buf = torch.zeros(T, C, E)  # raw rewards plus gamma * V(final state) on truncation
    done_buf = torch.zeros(T, E)

    flat, _ = envs.reset(seed=args.seed)
    ep_ret, ep_len = np.zeros(E), np.zeros(E, dtype=np.int64)
    global_step, start = 0, time.time()
    last_eval_step, eval_return = 0, float("nan")
    rollout_time = update_time = 0.0
    for iteration in range(1, args.num_iterations + 1):
        t0 = time.time()
        finished = []
        boot_steps, boot_envs, boot_states = [], [], []
        with torch.no_grad():
            params = actor.params()
            for step in range(T):
                local, state = probe.split_flat(flat)
                obs_norm.update(local, state)
                state_n = obs_norm.state(state)
                local_n = obs_norm.local(local) if local is not None else None
                x = torch.as_tensor(agent_inputs(local_n, state_n, N, args.obs_mode, args.actor == "fups"))
                mean, std = actor.dist(x, params=params)
                action = mean + std * torch.randn_like(mean)
                obs_buf[step], state_buf[step], act_buf[step] = x, torch.as_tensor(state_n), action
                env_action = np.clip(action.numpy().transpose(1, 0, 2), low, high)
                flat, reward, term, trunc, info = envs.step(env_action)
                global_step += E
                rew_buf[step] = torch.as_tensor(reward, dtype=torch.float32)[None]
                done = np.logical_or(term, trunc)
                done_buf[step] = torch.as_tensor(done, dtype=torch.float32)
                boot = trunc & ~term
                if boot.any():  # time limit: bootstrap from V(final state) (computed below)
                    _, final_state = probe.split_flat(np.stack(info["final_obs"][boot]).astype(np.float32))
                    boot_steps += [step] * int(boot.sum())
                    boot_envs += np.nonzero(boot)[0].tolist()
                    boot_states.append(obs_norm.state(final_state))
                ep_ret += reward
                ep_len += 1
                for e in np.nonzero(done)[0]:
                    finished.append((ep_ret[e], ep_len[e]))
                    ep_ret[e], ep_len[e] = 0.0, 0
            # behaviour log-probs and values in one batched pass (the parameters did not change)
            logp_buf = actor.log_prob_entropy(obs_buf.permute(1, 0, 2, 3).reshape(N, T * E, D),
                                              act_buf.permute(1, 0, 2, 3).reshape(N, T * E, A),
                                              params=params)[0].reshape(N, T, E).permute(1, 0, 2)
            val_buf = critic(state_buf.reshape(T * E, S)).reshape(C, T, E).permute(1, 0, 2)
            if boot_steps:
                v = value_norm.denormalize(critic(torch.as_tensor(np.concatenate(boot_states))))
                rew_buf[boot_steps, :, boot_envs] += args.gamma * v.T.float()
            local, state = probe.split_flat(flat)
            next_value = value_norm.denormalize(critic(torch.as_tensor(obs_norm.state(state))))
            values_raw = value_norm.denormalize(val_buf.permute(1, 0, 2)).permute(1, 0, 2).float()
            adv, returns = compute_gae(rew_buf, values_raw, next_value.float(), done_buf,
                                       args.gamma, args.gae_lambda)
        t1 = time.time()
        rollout_time += t1 - t0

        # flatten (T, E) -> B, agent-major
        B = T * E
        agent_of_critic = torch.arange(N) if C == N else torch.zeros(N, dtype=torch.long)
        adv_agents = adv.permute(1, 0, 2).reshape(C, B)[agent_of_critic]
        adv_agents = (adv_agents - adv_agents.mean()) / (adv_agents.std() + 1e-5)
        b = {"obs": obs_buf.permute(1, 0, 2, 3).reshape(N, B, D),
             "actions": act_buf.permute(1, 0, 2, 3).reshape(N, B, A),
             "logp": logp_buf.permute(1, 0, 2).reshape(N, B), "adv": adv_agents,
             "state": state_buf.reshape(B, S), "values": val_buf.permute(1, 0, 2).reshape(C, B),
             "returns": returns.permute(1, 0, 2).reshape(C, B)}
        do_metrics = args.metrics_interval > 0 and (iteration - 1) % args.metrics_interval == 0
        if do_metrics:
            writer.add_scalar("grad/interference", interference_stat(actor, b, args), global_step)
            with torch.no_grad():
                idx = torch.randperm(B)[: args.snd_samples]
                mu, sd = actor.dist(b["obs"][:, idx])
                m = actor.act_mask  # padded dims: the same N(0, 1) for every agent (no JS change)
                mu, sd = mu * m, sd * m + (1 - m)
                writer.add_scalar("diversity/snd", snd_gaussian(mu, sd), global_step)
        if args.algo == "happo":
            order = list(range(N)) if args.fixed_order else torch.randperm(N).tolist()
            a_stats, _ = actor_update_happo(actor, actor_opt, b, args, order)
        else:
            a_stats = actor_update_mappo(actor, actor_opt, b, args)
        v_loss = critic_update(critic, critic_opt, value_norm, b, args)
        update_time += time.time() - t1

        sps = int(global_step / (time.time() - start))
        if finished:
            writer.add_scalar("charts/episodic_return", float(np.mean([f[0] for f in finished])), global_step)
            writer.add_scalar("charts/episodic_length", float(np.mean([f[1] for f in finished])), global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/rollout_time", rollout_time, global_step)
        writer.add_scalar("charts/update_time", update_time, global_step)
        writer.add_scalar("losses/policy_loss", a_stats["pg"], global_step)
        writer.add_scalar("losses/value_loss", v_loss, global_step)
        writer.add_scalar("losses/entropy", a_stats["ent"], global_step)
        writer.add_scalar("losses/approx_kl", a_stats["kl"], global_step)
        writer.add_scalar("losses/clipfrac", a_stats["clipfrac"], global_step)
        writer.add_scalar("grad/actor_var", a_stats["var"], global_step)
        writer.add_scalar("grad/actor_norm", a_stats["norm"], global_step)
        last = iteration == args.num_iterations
        if last or (args.eval_interval > 0 and global_step - last_eval_step >= args.eval_interval):
            last_eval_step = global_step
            eval_return = evaluate(actor, probe, obs_norm, args, args.eval_episodes, args.seed + 10_000)
            writer.add_scalar("eval/episodic_return", eval_return, global_step)
        ret_str = f"{np.mean([f[0] for f in finished]):.1f}" if finished else "-"
        print(f"iter={iteration}/{args.num_iterations} step={global_step} return={ret_str} "
              f"eval={eval_return:.1f} SPS={sps} rollout={rollout_time:.1f}s update={update_time:.1f}s",
              flush=True)

    if args.save_model:
        path = f"runs/{run_name}/{args.exp_name}.pt"
        save_checkpoint(path, build_checkpoint(args, actor, critic, value_norm, obs_norm,
                                               global_step, eval_return))
        print(f"model saved to {path}", flush=True)
    envs.close()
    probe.close()
    writer.close()
    return eval_return


if __name__ == "__main__":
    main()
