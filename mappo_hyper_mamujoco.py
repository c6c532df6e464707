"""HyperMARL MAPPO and HAPPO on Multi-Agent MuJoCo (Gymnasium-Robotics ``mamujoco_v1``).

Paper section 5.2 (Table 4, Figures 5 and 7) and the ablations of section 6. HyperMARL is applied
to the actor only; the critic is one centralised V(s) on the global state, separate from the
actors, as HARL builds it for MAPPO and HAPPO alike. Implementation details follow HARL (appendix F,
Tables 17-21): MLPBase's LayerNorms (input and every hidden layer), Huber and clipped value loss,
value normalisation (HARL's ValueNorm), orthogonal init, separate actor and critic learning rates
and epochs, HARL's bounded Gaussian std (sigmoid(log_std / x) * y), actions in [-1, 1] rescaled to
the joints' ranges, Table 21's clip for HyperMARL. Gymnasium-Robotics runs the MuJoCo v5 tasks,
the paper the v2 ones: returns are not comparable with Table 4. Read top to bottom:

    1. Arguments        5. Metrics (SND, gradient variance, interference)
    2. Input validation 6. Algorithm (MAPPO / HAPPO updates, value loss, GAE)
    3. Environment      7. Checkpoints
    4. Networks         8. Main (the training loop)

Quick start:  python mappo_hyper_mamujoco.py --task HalfCheetah-2x3 --actor mlp --total-timesteps 20000
Baselines:    --actor ind (independent actors), --actor fups (shared actor + one-hot ID),
              --algo happo (HAPPO: independent actors, sequential updates)
Ablations:    --hypernet-hidden-dims 32 (HyperMARL-S), --hypernet-embedding onehot,
              --hypernet-init default (w/o RF), --hypernet-input agent+obs (w/o GD)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Annotated, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


# ===== 1. Arguments =====
# A flag whose default depends on others (the task, the algorithm, the actor) is None here and filled
# in by resolve_args; its docstring names the real default, so tyro's own "(default: None)" is hidden.
DOC_DEFAULT = tyro.conf.arg(help_behavior_hint="")


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
    """torch threads while collecting (HARL's torch_threads); 1 avoids OpenMP stalls while the
    environment workers share the cores"""
    update_threads: Annotated[Optional[int], DOC_DEFAULT] = None
    """torch threads for the update, when the environment workers are idle (default: torch's, one per
    physical core or OMP_NUM_THREADS); on the CPU the numbers depend on it: give it to compare runs
    across machines (--resume keeps the run's)"""
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
    """if toggled, write a checkpoint every --save-interval steps and at the end"""
    save_interval: Annotated[Optional[int], DOC_DEFAULT] = None
    """environment steps between checkpoints (default: --eval-interval)"""
    resume: Optional[str] = None
    """path of a checkpoint to continue training from; the run's flags come from it, and only
    --total-timesteps, --eval-interval, --save-interval, --print-interval, --save-model, --runs-dir,
    --capture-video, --cuda, --async-envs and the wandb flags may change; the environments continue
    their episodes, so the numbers are those of an uninterrupted run"""
    eval_only: bool = False
    """if toggled, only evaluate --checkpoint (return and SND) and exit; writes nothing (with --capture-video: the video, in a new runs_dir folder)"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""

    # Environment
    task: str = "HalfCheetah-2x3"
    """HalfCheetah-2x3 | Walker2d-2x3 | Ant-4x2 | Humanoid-17x1 | Humanoid-9|8"""
    obs_mode: str = "global"
    """global: every agent sees the global state plus a one-hot ID (HARL's convention, which the
    paper's Table 4 follows); local: each agent's own local observation, zero-padded to the
    largest, with a mask"""
    max_episode_steps: int = 1000
    """episode time limit (truncation, bootstrapped from V(final state)); MaMuJoCo's is 1000"""
    agent_obsk: int = 1
    """[local] observation depth: joints up to k hops away (Gymnasium-Robotics' agent_obsk)"""
    num_envs: int = 20
    """parallel environments, in worker processes (gymnasium AsyncVectorEnv; 1: in-process); HARL's
    tuned configs for these tasks: 20 (n_rollout_threads)"""
    async_envs: bool = True
    """worker processes; --no-async-envs steps all environments in this process (SyncVectorEnv)"""
    total_timesteps: int = 10_000_000
    """total environment steps (paper: 10M)"""
    num_steps: int = 200
    """steps per environment per rollout (HARL's tuned configs: episode_length 200, so 20 x 200 = 4000
    samples per update, except its MAPPO config for Humanoid-17x1: 100; Tables 17-20 do not give it)"""

    # Algorithm. None = the task's value in Tables 17-20 (and Table 21 for HyperMARL's clip).
    algo: str = "mappo"
    """mappo (all actors updated in parallel) | happo (independent actors updated one after the
    other, weighted by the ratio product of the agents updated before: Zhong et al. 2024)"""
    actor: Annotated[Optional[str], DOC_DEFAULT] = None
    """mlp | linear (HyperMARL hypernetworks) | fups (one shared actor with a one-hot ID) |
    ind (independent actors); default mlp for mappo, ind for happo (the only actor HAPPO accepts)"""
    critic: str = "shared"
    """shared (one centralised V(s) with one ValueNorm, HARL's for MAPPO and HAPPO) | per-agent (one
    centralised critic per agent, ours)"""
    learning_rate: Annotated[Optional[float], DOC_DEFAULT] = None
    """actor Adam learning rate (Tables 17-20: 5e-4; Walker2d 1e-3)"""
    critic_learning_rate: Annotated[Optional[float], DOC_DEFAULT] = None
    """critic Adam learning rate (Tables 17-20: 5e-4; Walker2d 1e-3)"""
    update_epochs: Annotated[Optional[int], DOC_DEFAULT] = None
    """actor epochs per update (ppo_epoch: HalfCheetah 15, others 5)"""
    critic_epochs: Annotated[Optional[int], DOC_DEFAULT] = None
    """critic epochs per update (critic_epoch: HalfCheetah 15, others 5)"""
    num_minibatches: Annotated[Optional[int], DOC_DEFAULT] = None
    """actor minibatches per epoch (actor_num_mini_batch: Walker2d 2, others 1)"""
    critic_num_minibatches: Annotated[Optional[int], DOC_DEFAULT] = None
    """critic minibatches per epoch (critic_num_mini_batch: Walker2d 2, others 1)"""
    clip_coef: Annotated[Optional[float], DOC_DEFAULT] = None
    """ratio and value clip (Table 21 for mlp/linear: HalfCheetah, Walker2d 0.0375, Ant, Humanoid
    0.075; Tables 17-20 otherwise: 0.05, 0.05, 0.1, 0.1)"""
    ent_coef: Annotated[Optional[float], DOC_DEFAULT] = None
    """entropy bonus (HalfCheetah 0.01, others 0)"""
    fixed_order: Annotated[Optional[bool], DOC_DEFAULT] = None
    """[happo] update agents in index order rather than a random order each update (Table 17: true for
    Ant, although HARL's tuned HAPPO config for Ant has false; Tables 18-20: false)"""
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
    """if toggled, inputs are also normalised by a running mean/std before HARL's input LayerNorm
    (ours, not HARL's; saved in checkpoints)"""
    max_grad_norm: float = 10.0
    """gradient-norm clip, per agent for independent actors and per critic"""
    adam_eps: float = 1e-5
    """Adam epsilon (HARL opti_eps)"""
    actor_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """hidden layers of every agent's actor (HARL: 128 128 128)"""
    critic_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """hidden layers of every critic (HARL: 128 128 128)"""
    std_x_coef: float = 1.0
    """Gaussian std = sigmoid(log_std / x) * y, log_std initialised to x (HARL std_x_coef)"""
    std_y_coef: float = 0.5
    """see --std-x-coef (HARL std_y_coef)"""

    # HyperMARL (section 4, Table 21) and the ablations of section 6
    hypernet_embedding_dim: Annotated[Optional[int], DOC_DEFAULT] = None
    """[mlp] size of the learned agent embedding (default: 64, Table 21)"""
    hypernet_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """[mlp] hidden layers of the hypernetwork (default: 64, Table 21; 32 = HyperMARL-S)"""
    hypernet_embedding: Annotated[Optional[str], DOC_DEFAULT] = None
    """[mlp] learned (orthogonally initialised, default) | onehot (ablation)"""
    hypernet_init: Annotated[Optional[str], DOC_DEFAULT] = None
    """[mlp, linear] scaled (section 4.3 as the authors' code does it, default) | matched (ours, mlp only: unit-norm hidden features, every generated layer at the target's scale) | default (PyTorch init: w/o RF)"""
    hypernet_input: Annotated[Optional[str], DOC_DEFAULT] = None
    """[mlp, linear] agent (gradient decoupling, default) | agent+obs (ablation w/o GD: per-sample weights)"""

    # Evaluation and metrics
    eval_interval: int = 100_000
    """environment steps between evaluations (appendix D.1.1: every 25 rollouts of 20 x 200 steps)"""
    eval_episodes: int = 40
    """deterministic evaluation episodes, run side by side (appendix D.1.1 and HARL: 40)"""
    snd_samples: int = 1000
    """joint states (from evaluation rollouts) on which SND is computed"""
    snd_gaussian_samples: int = 64
    """Monte Carlo samples per observation for the Gaussian Jensen-Shannon estimator"""
    interference_interval: int = 10
    """compute cross-agent gradient interference every this many updates"""
    interference_samples: int = 512
    """samples of the rollout used for the interference metric"""
    print_interval: int = 1
    """print a progress line every this many updates (and at every evaluation)"""


TASKS = {  # --task: (Gymnasium-Robotics scenario, agent_conf)
    "HalfCheetah-2x3": ("HalfCheetah", "2x3"),
    "Walker2d-2x3": ("Walker2d", "2x3"),
    "Ant-4x2": ("Ant", "4x2"),
    "Humanoid-17x1": ("Humanoid", "17x1"),  # not built in: see make_parallel_env
    "Humanoid-9|8": ("Humanoid", "9|8"),
}
ACTORS = ("mlp", "linear", "fups", "ind")
FAMILY_OF_ACTOR = {"mlp": "mlp", "linear": "linear", "fups": "fups", "ind": "nops"}
_HUMANOID = dict(learning_rate=5e-4, critic_learning_rate=5e-4, update_epochs=5, critic_epochs=5,
                 num_minibatches=1, critic_num_minibatches=1, clip_coef=0.1, hyper_clip_coef=0.075,
                 ent_coef=0.0, fixed_order=False)
PAPER_DEFAULTS = {
    # Tables 20, 19, 17, 18 (HARL's defaults, Zhong et al. 2024); hyper_clip_coef: Table 21.
    # Humanoid-9|8 is not in the paper: it takes Humanoid-17x1's values.
    "HalfCheetah-2x3": dict(learning_rate=5e-4, critic_learning_rate=5e-4, update_epochs=15, critic_epochs=15,
                            num_minibatches=1, critic_num_minibatches=1, clip_coef=0.05,
                            hyper_clip_coef=0.0375, ent_coef=0.01, fixed_order=False),
    "Walker2d-2x3": dict(learning_rate=1e-3, critic_learning_rate=1e-3, update_epochs=5, critic_epochs=5,
                         num_minibatches=2, critic_num_minibatches=2, clip_coef=0.05,
                         hyper_clip_coef=0.0375, ent_coef=0.0, fixed_order=False),
    "Ant-4x2": dict(learning_rate=5e-4, critic_learning_rate=5e-4, update_epochs=5, critic_epochs=5,
                    num_minibatches=1, critic_num_minibatches=1, clip_coef=0.1, hyper_clip_coef=0.075,
                    ent_coef=0.0, fixed_order=True),
    "Humanoid-17x1": dict(_HUMANOID),
    "Humanoid-9|8": dict(_HUMANOID),
}
HYPERNET_DEFAULTS = dict(
    hypernet_embedding_dim=64, hypernet_hidden_dims=[64], hypernet_embedding="learned",
    hypernet_init="scaled", hypernet_input="agent",
)  # Table 21
# Flags that define the model and the environment: --eval-only takes them from its checkpoint.
COMPAT_FIELDS = (
    "task", "obs_mode", "agent_obsk", "max_episode_steps", "algo", "actor", "critic", "norm_obs", "norm_value",
    "actor_hidden_dims", "critic_hidden_dims", "std_x_coef", "std_y_coef", "hypernet_embedding_dim",
    "hypernet_hidden_dims", "hypernet_embedding", "hypernet_init", "hypernet_input",
)
# What --resume may change (budget, logging, cadence, device, worker processes); every other flag is the
# checkpoint's. --no-async-envs changes no number; the thread counts do (a matrix product's sums split
# otherwise), so a resumed run keeps the threads it was started with.
RESUME_MAY_CHANGE = ("total_timesteps", "eval_interval", "save_interval", "save_model", "print_interval",
                     "runs_dir", "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video",
                     "async_envs")
# Flags that say what to do with a checkpoint, not what the run is.
INVOCATION_FIELDS = ("resume", "eval_only", "checkpoint")


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


def resolve_args(args: Args) -> Args:
    """Checks every flag and fills the paper's defaults; raises ArgError naming the flag."""
    check_invocation(args)
    check_given_flags(args)
    return fill_defaults(args)


def check_invocation(args: Args) -> None:
    """What to do with a checkpoint: train on from it, or only evaluate it."""
    if args.eval_only and not args.checkpoint:
        raise ArgError("--eval-only: needs --checkpoint PATH")
    if args.checkpoint and not args.eval_only:
        raise ArgError("--checkpoint: only with --eval-only (use --resume to continue training)")
    if args.eval_only and args.resume:
        raise ArgError("--resume: cannot be combined with --eval-only")
    for flag, path in (("--resume", args.resume), ("--checkpoint", args.checkpoint)):
        if path is not None and not os.path.isfile(path):
            raise ArgError(f"{flag}: {path!r} is a folder, not a file" if os.path.isdir(path) else f"{flag}: no such file {path!r}")


def check_given_flags(args: Args) -> None:
    """The flags of a new run, as given: each only where it applies (a checkpoint's run passed them)."""
    if args.task not in TASKS:
        raise ArgError(f"--task: must be one of {', '.join(TASKS)}, got {args.task!r}")
    for name, allowed in (("obs_mode", ("global", "local")), ("algo", ("mappo", "happo")),
                          ("actor", ACTORS + (None,)), ("critic", ("shared", "per-agent"))):
        if getattr(args, name) not in allowed:
            choices = ", ".join(a for a in allowed if a is not None)
            raise ArgError(f"--{name.replace('_', '-')}: must be one of {choices}, got {getattr(args, name)!r}")
    actor = args.actor or ("ind" if args.algo == "happo" else "mlp")  # fill_defaults' choice
    for name in HYPERNET_DEFAULTS:  # options of some actors only: refused elsewhere, never ignored
        mlp_only = name not in ("hypernet_init", "hypernet_input")
        allowed = ("mlp",) if mlp_only else ("mlp", "linear")
        if getattr(args, name) is not None and actor not in allowed:
            raise ArgError(f"--{name.replace('_', '-')}: only with --actor {' or '.join(allowed)}, got --actor {actor}")
    if args.algo == "happo" and actor != "ind":  # shared weights: one agent's step moves the others
        raise ArgError(f"--actor: --algo happo needs disjoint per-agent actors (ind), got --actor {actor}")
    if args.fixed_order is not None and args.algo != "happo":
        raise ArgError(f"--fixed-order: only with --algo happo, got --algo {args.algo}")
    if args.obs_mode != "local" and args.agent_obsk != 1:
        raise ArgError(f"--agent-obsk: only with --obs-mode local, got --obs-mode {args.obs_mode}")
    if args.save_interval is not None and not args.save_model:
        raise ArgError("--save-interval: only with --save-model")


def fill_defaults(args: Args) -> Args:
    """The paper's value for every flag left at None, then the checks of the values."""
    if args.actor is None:
        args.actor = "ind" if args.algo == "happo" else "mlp"
    table = PAPER_DEFAULTS[args.task]
    values = {k: v for k, v in table.items() if k != "hyper_clip_coef"}
    if args.actor in ("mlp", "linear"):
        values["clip_coef"] = table["hyper_clip_coef"]
    values.update(actor_hidden_dims=[128, 128, 128], critic_hidden_dims=[128, 128, 128])
    if args.actor == "mlp":
        values.update(HYPERNET_DEFAULTS)
    elif args.actor == "linear":
        values.update({k: HYPERNET_DEFAULTS[k] for k in ("hypernet_init", "hypernet_input")})
    for name, default in values.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.algo != "happo":
        args.fixed_order = None
    if args.save_interval is None:
        args.save_interval = args.eval_interval
    if args.update_threads is None:
        args.update_threads = torch.get_num_threads()  # torch's default: one per physical core, or OMP_NUM_THREADS
    check_values(args)
    return args


def check_values(args: Args) -> None:
    def positive(name):
        value = getattr(args, name)
        if not value > 0:
            raise ArgError(f"--{name.replace('_', '-')}: must be positive, got {value}")

    for field in dataclasses.fields(Args):  # inf and nan pass every comparison below: refuse them first
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgError(f"--{field.name.replace('_', '-')}: must be a finite number, got {value}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.exp_name):
        raise ArgError(f"--exp-name: must be a plain name (letters, digits, '.', '_', '-'), got {args.exp_name!r}")
    for name in ("torch_threads", "update_threads", "max_episode_steps", "num_envs", "total_timesteps", "num_steps", "learning_rate",
                 "critic_learning_rate", "update_epochs", "critic_epochs", "num_minibatches",
                 "critic_num_minibatches", "clip_coef", "huber_delta", "max_grad_norm", "adam_eps",
                 "std_x_coef", "std_y_coef", "eval_interval", "eval_episodes", "snd_samples",
                 "snd_gaussian_samples", "interference_interval", "interference_samples",
                 "print_interval", "save_interval"):
        positive(name)
    max_seed = 2**32 - 1 - 10_000 - (args.eval_episodes - 1)  # NumPy takes seeds below 2**32
    if not 0 <= args.seed <= max_seed:
        raise ArgError(f"--seed: must be between 0 and {max_seed} (evaluation episode k uses seed + 10000 + k, "
                       f"below 2**32), got {args.seed}")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ArgError(f"--{name.replace('_', '-')}: must be in [0, 1], got {getattr(args, name)}")
    if not args.ent_coef >= 0:
        raise ArgError(f"--ent-coef: must be >= 0, got {args.ent_coef}")
    if args.agent_obsk < 0:
        raise ArgError(f"--agent-obsk: must be >= 0, got {args.agent_obsk}")
    for name in ("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims"):
        dims = getattr(args, name)
        if dims is not None and (len(dims) == 0 or min(dims) <= 0):
            raise ArgError(f"--{name.replace('_', '-')}: must be one or more positive sizes, got {dims}")
    batch_size = args.num_envs * args.num_steps
    for name in ("num_minibatches", "critic_num_minibatches"):
        if batch_size % getattr(args, name):
            raise ArgError(f"--{name.replace('_', '-')}: must divide num_envs * num_steps = {batch_size}, got {getattr(args, name)}")
    if args.total_timesteps < batch_size:
        raise ArgError(f"--total-timesteps: must be at least num_envs * num_steps = {batch_size}, got {args.total_timesteps}")
    if args.actor == "mlp":
        positive("hypernet_embedding_dim")
        if args.hypernet_embedding not in ("learned", "onehot"):
            raise ArgError(f"--hypernet-embedding: must be learned or onehot, got {args.hypernet_embedding!r}")
    if args.actor in ("mlp", "linear"):
        if args.hypernet_init not in ("scaled", "matched", "default"):
            raise ArgError(f"--hypernet-init: must be scaled, matched or default, got {args.hypernet_init!r}")
        if args.hypernet_init == "matched" and args.actor != "mlp":  # the linear one's scaled init is already exact
            raise ArgError(f"--hypernet-init: matched is for --actor mlp, got --actor {args.actor}")
        if args.hypernet_input not in ("agent", "agent+obs"):
            raise ArgError(f"--hypernet-input: must be agent or agent+obs, got {args.hypernet_input!r}")
    if not args.eval_only or args.capture_video:
        check_output_folder("--runs-dir", args.runs_dir)


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
def make_parallel_env(task: str, agent_obsk: int = 1, max_episode_steps: int = 1000, render_mode=None):
    """The PettingZoo parallel env of a task (render_mode "rgb_array": frames for --capture-video).
    Humanoid-17x1 is not built into Gymnasium-Robotics ("UNKNOWN partitioning config"): its
    partition, one joint (one actuator) per agent, is built from Gymnasium-Robotics' own graph of
    the Humanoid (whose single-agent partition lists the 17 actuated joints)."""
    from gymnasium_robotics import mamujoco_v1

    scenario, conf = TASKS[task]
    if task == "Humanoid-17x1":
        parts, edges, global_nodes = mamujoco_v1.get_parts_and_edges("Humanoid", None)
        factorization = {"partition": [(joint,) for joint in parts[0]], "edges": edges, "globals": global_nodes}
        # agent_conf must not be None (None means one agent seeing everything); the factorization overrides it
        return mamujoco_v1.parallel_env(scenario, conf, agent_obsk=agent_obsk, agent_factorization=factorization,
                                        max_episode_steps=max_episode_steps, render_mode=render_mode)
    return mamujoco_v1.parallel_env(scenario, conf, agent_obsk=agent_obsk, max_episode_steps=max_episode_steps,
                                    render_mode=render_mode)


def pad_stack(arrays, width: int):
    """Rows of unequal length -> (n, width) float32, zero-padded, and the bool mask of real entries."""
    out = np.zeros((len(arrays), width), dtype=np.float32)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, row in enumerate(arrays):
        out[i, : len(row)] = row
        mask[i, : len(row)] = True
    return out, mask


def unpad(padded: np.ndarray, mask: np.ndarray) -> list:
    """Inverse of pad_stack: the real entries of every row."""
    return [padded[i][mask[i]] for i in range(padded.shape[0])]


class MaMuJoCoEnv(gym.Env):
    """One MaMuJoCo task as a fixed-shape gymnasium Env, for gymnasium's vector API.

    Observation (flat float32): the global state (the single-agent observation, what the
    ParallelEnv's state() returns) and, in local mode, first the agents' local observations
    zero-padded to the largest (n_agents * local_obs_dim). The one-hot IDs of global mode are
    added in the learner, so workers do not send the state n_agents times.
    Action: (n_agents, act_dim), zero-padded; the padded entries (act_mask False) are ignored. The
    policy acts in [-1, 1], mapped linearly to every joint's [low, high] (HARL's NormalizedActions:
    Humanoid's +-0.4 joints would otherwise saturate); not clipped, as there: MuJoCo clamps the
    control to its range and the control cost sees the unclamped action.
    Reward: the team reward. terminated (fell over) and truncated (1000-step limit) stay apart.
    Stepping is the ParallelEnv's own transition (one step of its single-agent MuJoCo env), without
    building local observations that nobody reads; test_mamujoco checks it against ParallelEnv.step.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: str, obs_mode: str = "global", agent_obsk: int = 1, max_episode_steps: int = 1000,
                 render_mode: Optional[str] = None):
        super().__init__()
        self.ma = make_parallel_env(task, agent_obsk, max_episode_steps, render_mode)
        self.base = self.ma.single_agent_env  # gymnasium.make(...-v5): TimeLimit(1000) and checkers
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
        agent_idx, slot_idx, global_idx = [], [], []
        for i, partition in enumerate(self.ma.agent_action_partitions):
            for j, node in enumerate(partition):
                agent_idx.append(i)
                slot_idx.append(j)
                global_idx.append(node.act_ids)
        self.n_global_actions = self.base.action_space.shape[0]
        assert sorted(global_idx) == list(range(self.n_global_actions)), "every actuator exactly once"
        self._agent_idx, self._slot_idx = np.array(agent_idx), np.array(slot_idx)
        self._global_idx = np.array(global_idx)
        low, _ = pad_stack([self.ma.action_space(a).low for a in agents], self.act_dim)
        high, _ = pad_stack([self.ma.action_space(a).high for a in agents], self.act_dim)
        self.action_low, self.action_high = low, high
        self.action_space = gym.spaces.Box(-1.0, 1.0, low.shape, dtype=np.float32)
        flat = self.state_dim + (self.n_agents * self.local_obs_dim if obs_mode == "local" else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (flat,), dtype=np.float32)

    def local_to_global_action(self, actions: np.ndarray) -> np.ndarray:
        """(n_agents, act_dim) padded -> the single-agent action vector."""
        out = np.empty(self.n_global_actions, dtype=np.float64)
        out[self._global_idx] = actions[self._agent_idx, self._slot_idx]
        return out

    def global_to_local_action(self, action: np.ndarray) -> np.ndarray:
        """The single-agent action vector -> (n_agents, act_dim), zero-padded."""
        out = np.zeros((self.n_agents, self.act_dim), dtype=np.float32)
        out[self._agent_idx, self._slot_idx] = action[self._global_idx]
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
    def sim_state(self) -> dict:
        """All the env carries from one step to the next, so that a checkpoint resumes its episode
        exactly: MuJoCo's integration state (qpos, qvel, act, time, warm start, controls), the body
        positions xpos and xipos (Ant and Humanoid read them before stepping; they are left over from
        the last substep, so mj_forward cannot recompute them), the time-limit counter and the reset
        noise generator (later episodes start where they would have). Plain lists, ints and dicts:
        they cross worker pipes and load with weights_only=True. Vector envs: get_attr/set_attr."""
        import mujoco

        sim = self.base.unwrapped
        physics = np.empty(mujoco.mj_stateSize(sim.model, mujoco.mjtState.mjSTATE_INTEGRATION))
        mujoco.mj_getState(sim.model, sim.data, physics, mujoco.mjtState.mjSTATE_INTEGRATION)
        return dict(physics=physics.tolist(), xpos=sim.data.xpos.tolist(), xipos=sim.data.xipos.tolist(),
                    elapsed_steps=self.base._elapsed_steps, np_random=sim.np_random.bit_generator.state)

    @sim_state.setter
    def sim_state(self, state: dict) -> None:
        import mujoco

        sim = self.base.unwrapped
        mujoco.mj_setState(sim.model, sim.data, np.array(state["physics"]), mujoco.mjtState.mjSTATE_INTEGRATION)
        sim.data.xpos[:], sim.data.xipos[:] = state["xpos"], state["xipos"]
        self.base._elapsed_steps = state["elapsed_steps"]
        sim.np_random.bit_generator.state = state["np_random"]

    def close(self):
        self.ma.close()


def make_env(task: str, obs_mode: str, agent_obsk: int, max_episode_steps: int) -> MaMuJoCoEnv:
    return MaMuJoCoEnv(task, obs_mode, agent_obsk, max_episode_steps)


def make_vector_env(args: Args) -> gym.vector.VectorEnv:
    """num_envs environments through gymnasium's vector API, in worker processes (async_envs).

    Autoreset SAME_STEP: the observation returned with done=True is already the first one of the
    next episode (so the next action sees it); the last observation of the ended episode is
    info["final_obs"] (to bootstrap a time limit from V(final state)).
    """
    fns = [functools.partial(make_env, args.task, args.obs_mode, args.agent_obsk, args.max_episode_steps)
           for _ in range(args.num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if not (args.async_envs and args.num_envs > 1):
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    worker = functools.partial(env_worker, os.getpid())
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
    """gymnasium's AsyncVectorEnv worker, deaf to the SIGINT and SIGTERM that a terminal's Ctrl-C,
    `timeout` and Slurm send to every process of the job: the main process saves a checkpoint, which
    needs the workers' simulator states, and then closes them. SIGTERM from the main process itself
    still ends a worker: multiprocessing's terminate() (a forced close, or the exit of a process
    that left its workers open) sends it and then waits for the worker. A worker whose main process
    was killed (SIGKILL) exits when its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # SIGTERM stays blocked (make_vector_env): only this thread takes it
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


class RunningMeanStd:
    """Running mean and variance over the leading axis (Chan et al.'s parallel update), float64."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape((-1,) + self.mean.shape)
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean = self.mean + delta * batch_count / total
        self.var, self.count = m2 / total, total

    def state_dict(self) -> dict:
        return dict(mean=torch.as_tensor(self.mean), var=torch.as_tensor(self.var), count=float(self.count))

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].numpy().astype(np.float64)
        self.var = state["var"].numpy().astype(np.float64)
        self.count = float(state["count"])


class ObsNormalizer:
    """--norm-obs (ours, off by default): running mean/std of the global state and, in local mode, of
    every agent's own local features (padded features stay exactly 0); clipped to [-10, 10].
    Its statistics are part of the checkpoint: a restored policy sees the inputs it was trained on."""

    def __init__(self, state_dim: int, obs_mask: Optional[np.ndarray], enabled: bool = True, clip: float = 10.0):
        self.enabled, self.clip = enabled, clip
        self.state_rms = RunningMeanStd((state_dim,))
        self.obs_mask = obs_mask
        self.local_rms = RunningMeanStd(obs_mask.shape) if obs_mask is not None else None

    def update(self, local: Optional[np.ndarray], state: np.ndarray) -> None:
        if self.enabled:
            self.state_rms.update(state)
            if local is not None:
                self.local_rms.update(local)

    def _normalize(self, x: np.ndarray, rms: RunningMeanStd) -> np.ndarray:
        if not self.enabled:
            return x.astype(np.float32)
        return np.clip((x - rms.mean) / np.sqrt(rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def state(self, state: np.ndarray) -> np.ndarray:
        return self._normalize(state, self.state_rms)

    def local(self, local: np.ndarray) -> np.ndarray:
        return self._normalize(local, self.local_rms) * self.obs_mask

    def state_dict(self) -> dict:
        state = dict(state=self.state_rms.state_dict())
        if self.local_rms is not None:
            state["local"] = self.local_rms.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.state_rms.load_state_dict(state["state"])
        if self.local_rms is not None:
            self.local_rms.load_state_dict(state["local"])


def actor_inputs(local_n: Optional[np.ndarray], state_n: np.ndarray, n_agents: int) -> np.ndarray:
    """Normalised observations -> agent-major actor inputs (n_agents, batch, obs_dim).

    global: [state, one-hot ID] for every agent (HARL). local: the agent's padded local observation
    (the shared FuPS actor adds the ID itself, as a per-agent first-layer bias)."""
    if local_n is not None:
        return np.ascontiguousarray(np.swapaxes(local_n, 0, 1))
    batch = state_n.shape[0]
    ids = np.broadcast_to(np.eye(n_agents, dtype=np.float32)[:, None, :], (n_agents, batch, n_agents))
    return np.concatenate([np.broadcast_to(state_n[None], (n_agents,) + state_n.shape), ids], -1)


def actor_obs_dim(args: Args, env: MaMuJoCoEnv) -> int:
    return env.state_dim + env.n_agents if args.obs_mode == "global" else env.local_obs_dim


def rng_to_tensors(states: list) -> dict:
    """[torch, numpy, python] RNG states as tensors and lists, loadable with weights_only=True."""
    torch_state, np_state, py_state = states
    return dict(torch=torch_state.clone(), numpy_keys=torch.as_tensor(np_state[1].astype(np.int64)),
                numpy_rest=[int(np_state[2]), int(np_state[3]), float(np_state[4])],
                python=[py_state[0], list(py_state[1]), py_state[2]])


def rng_from_tensors(state: dict) -> list:
    pos, has_gauss, cached = state["numpy_rest"]
    np_state = ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    version, internal, gauss_next = state["python"]
    return [state["torch"].clone(), np_state, (version, tuple(internal), gauss_next)]


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


class SharedNet(nn.Module):
    """FuPS: one network for every agent, input [o, 1_i] (use_id) or o alone.

    [o, 1_i] W = o W_obs + W_id[i]: the ID only adds a per-agent bias to the first layer, so the
    one-hot vector is never materialised.
    """

    def __init__(self, n_agents, sizes, gains, use_id=True):
        super().__init__()
        self.n_agents, self.use_id = n_agents, use_id
        first_in = sizes[0] + (n_agents if use_id else 0)
        dims = [first_in] + list(sizes[1:])
        self.layers = nn.ModuleList(layer_init(nn.Linear(i, o), g) for (i, o), g in zip(layer_shapes(dims), gains))

    def forward(self, obs=None):
        n, params = self.n_agents, []
        for k, layer in enumerate(self.layers):
            weight = layer.weight.T
            bias = layer.bias.expand(n, -1)
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

    def forward(self, obs=None):
        return list(zip(self.weights, self.biases))


def make_generator(args: Args, family: str, n_agents: int, sizes: list[int], gains: list[float]) -> nn.Module:
    """The module that yields every agent's (W, b) for one network (actor or critic)."""
    obs_dim = sizes[0] if getattr(args, "hypernet_input", None) == "agent+obs" else 0
    if family == "mlp":
        return MLPHypernet(n_agents, sizes, gains, args.hypernet_embedding_dim, args.hypernet_hidden_dims,
                           args.hypernet_embedding, args.hypernet_init, obs_dim)
    if family == "linear":
        return LinearHypernet(n_agents, sizes, gains, args.hypernet_init, obs_dim=obs_dim)
    if family == "fups":
        return SharedNet(n_agents, sizes, gains, use_id=True)
    if family == "nops":
        return IndependentNets(n_agents, sizes, gains)
    raise ValueError(family)


class PerAgentMLP(nn.Module):
    """One network per agent, whatever the family, as HARL's MLPBase: LayerNorm on the input
    (use_feature_normalization), Linear -> ReLU -> LayerNorm per hidden layer, output Linear.
    x (n_agents, batch, in) -> (n_agents, batch, out). The family yields the Linear layers. The
    LayerNorm gains and biases are per agent for disjoint networks (independent actors, critics),
    else one shared set: FuPS shares everything, and HyperMARL generates what section 4.3
    initialises (the Linear layers) and shares its other weights."""

    def __init__(self, args, family, n_agents, sizes, gains):
        super().__init__()
        self.generator, self.sizes = make_generator(args, family, n_agents, sizes, gains), list(sizes)
        self.per_sample = getattr(args, "hypernet_input", None) == "agent+obs" and family in ("mlp", "linear")
        self.per_agent_norms = family == "nops"
        k = n_agents if self.per_agent_norms else 1
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(k, 1, d)) for d in sizes[:-1])
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(k, 1, d)) for d in sizes[:-1])

    def generate(self, x=None):
        """Every agent's (W, b); None for per-sample weights, which forward() makes from x."""
        return None if self.per_sample else self.generator()

    def forward(self, x, params=None, agent_ids=None):
        """agent_ids: x holds only those agents' inputs (HAPPO updates one agent at a time)."""
        norms = list(zip(self.norm_weights, self.norm_biases))
        if agent_ids is not None and self.per_agent_norms:
            norms = select_agents(norms, agent_ids)
        x = layer_norm(x, *norms[0])
        if params is None:  # per-sample weights (w/o GD) see the input as the network does, normalised
            params = self.generator(x if self.per_sample else None)
        if agent_ids is not None:
            params = select_agents(params, agent_ids)
        for k, layer in enumerate(params):
            x = batched_mlp(x, [layer], None)  # one Linear layer
            if k < len(params) - 1:
                x = layer_norm(torch.relu(x), *norms[k + 1])
        return x


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """nn.LayerNorm over the features, with (k, 1, d) gains and biases: one set per agent or shared."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight + bias


def select_agents(params, agent_ids):
    """Every agent's (W, b) -> those of agent_ids (HAPPO updates one agent at a time)."""
    return [(w[agent_ids], b[agent_ids]) for w, b in params]


class GaussianActor(nn.Module):
    """Every agent's Gaussian policy: means from the family's per-agent networks (HyperMARL MLP or
    linear hypernetwork, shared FuPS, independent), std = sigmoid(log_std / x) * y (HARL's
    bounded std), log_std one vector per agent for independent actors and one shared otherwise.
    Padded action dimensions are left out of log-probabilities and entropies."""

    def __init__(self, args: Args, n_agents: int, obs_dim: int, act_dim: int, act_mask: np.ndarray):
        super().__init__()
        sizes = [obs_dim] + list(args.actor_hidden_dims) + [act_dim]
        gains = [np.sqrt(2)] * len(args.actor_hidden_dims) + [0.01]
        self.net = PerAgentMLP(args, FAMILY_OF_ACTOR[args.actor], n_agents, sizes, gains)
        if args.actor == "fups" and args.obs_mode == "global":
            self.net.generator = SharedNet(n_agents, sizes, gains, use_id=False)  # the ID is in the input
        self.n_agents, self.independent = n_agents, args.actor == "ind"
        self.log_std = nn.Parameter(torch.full((n_agents if self.independent else 1, 1, act_dim), float(args.std_x_coef)))
        self.std_x, self.std_y = args.std_x_coef, args.std_y_coef
        self.register_buffer("act_mask", torch.as_tensor(act_mask, dtype=torch.float32).unsqueeze(1))

    def generate(self):
        """Every agent's weights, generated once per rollout or minibatch (None: per-sample ablation)."""
        return self.net.generate()

    def forward(self, x, params=None, agent_ids=None):
        """x (k, batch, obs_dim) for all agents (k = n) or for agent_ids -> mean, std (k, batch, act_dim)."""
        if agent_ids is None and self.net.per_sample and x.shape[1] > self.chunk_size(x):
            mean = self.per_sample_chunked(x)
        else:  # agent_ids: independent actors only (HAPPO), never per-sample weights
            mean = self.net(x, params, agent_ids)
        log_std = self.log_std[agent_ids] if (self.independent and agent_ids is not None) else self.log_std
        std = torch.sigmoid(log_std / self.std_x) * self.std_y
        return mean, std.expand_as(mean)

    def chunk_size(self, x, max_elements: int = 2**25) -> int:
        """Samples per chunk so that the per-sample weights of a chunk stay under max_elements floats."""
        m = num_target_params(self.net.sizes)
        return max(1, max_elements // (x.shape[0] * m))

    def per_sample_chunked(self, x):
        """The w/o-GD ablation generates one network per agent and sample: (n, batch, m) weights
        (5.4e9 floats for Humanoid-17x1 on a 4000-sample batch). Chunks over the batch, each
        recomputed in the backward pass (activation checkpointing), bound the memory; the result
        and its gradients are those of the unchunked forward."""
        from torch.utils.checkpoint import checkpoint

        chunk = self.chunk_size(x)
        outs = []
        for start in range(0, x.shape[1], chunk):
            piece = x[:, start: start + chunk]
            if torch.is_grad_enabled():
                outs.append(checkpoint(self.net, piece, use_reentrant=False))
            else:
                outs.append(self.net(piece))
        return torch.cat(outs, 1)

    def log_prob_entropy(self, x, actions, params=None, agent_ids=None):
        """Log-probabilities and entropies (k, batch), over the real action dimensions only."""
        mean, std = self(x, params, agent_ids)
        mask = self.act_mask if agent_ids is None else self.act_mask[agent_ids]
        return masked_gaussian_log_prob_entropy(mean, std, actions, mask)


def masked_gaussian_log_prob_entropy(mean, std, actions, mask):
    log_std = torch.log(std)
    logprob = -((actions - mean) ** 2) / (2 * std**2) - log_std - 0.5 * math.log(2 * math.pi)
    entropy = 0.5 + 0.5 * math.log(2 * math.pi) + log_std
    return (logprob * mask).sum(-1), (entropy * mask).sum(-1)


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

    def normalize(self, x):  # (n, ...)
        if not self.enabled:
            return x
        mean, var = self.mean_var()
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x - mean.view(shape).to(x.dtype)) / var.sqrt().view(shape).to(x.dtype)

    def denormalize(self, x):
        if not self.enabled:
            return x
        mean, var = self.mean_var()
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x * var.sqrt().view(shape).to(x.dtype) + mean.view(shape).to(x.dtype)


# ===== 5. Metrics =====
def js_distance_categorical(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between categorical distributions (..., k)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b.clamp_min(1e-30))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0).sqrt()


def js_distance_gaussian(mu1, std1, mu2, std2, n_samples=64, generator=None) -> torch.Tensor:
    """Jensen-Shannon distance in base 2 between diagonal Gaussians (..., d), by Monte Carlo.

    JSD = 1/2 E_p[log p - log m] + 1/2 E_q[log q - log m], m = (p + q) / 2, each expectation
    estimated with n_samples antithetic draws (x = mu +- std * z). There is no closed form; the
    estimate is unbiased for the divergence and its error falls as 1/sqrt(n_samples) (identical
    Gaussians give exactly 0).
    """
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
    """Eq. (9): mean Jensen-Shannon distance over agent pairs and observations.

    dist: every agent's policy on the SAME observations, logits (n_agents, batch, k) or
    (mean, std) each (n_agents, batch, d).
    """
    n = (dist if discrete else dist[0]).shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    dist = dist.detach() if discrete else (dist[0].detach(), dist[1].detach())
    if discrete:
        probs = torch.softmax(dist, -1)
        distances = js_distance_categorical(probs[i], probs[j])
    else:
        mean, std = dist
        distances = js_distance_gaussian(mean[i], std[i], mean[j], std[j], n_samples, generator)
    return float(distances.mean())


def gradient_variance_and_norm(grads, norms):
    """Variance and L2 norm over all entries of the gradient, from each tensor's sum and norm: no
    concatenated copy of millions of entries at every gradient step."""
    count = sum(g.numel() for g in grads)
    total = torch.stack([g.sum() for g in grads]).sum()
    squares = torch.stack(norms).square().sum()
    return (squares - total**2 / count) / (count - 1), squares.sqrt()


def gradient_interference(per_agent_loss: torch.Tensor, params) -> float:
    """Mean pairwise cosine similarity between the agents' gradients on the shared parameters.

    Gradient i is d(loss_i)/d(all actor parameters): its cosine with gradient j is 0 when the two
    agents touch disjoint parameters (NoPS), positive when their updates agree and negative when
    they conflict. All n gradients come from one batched backward pass.
    """
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


# ===== 6. Algorithm =====
def compute_gae(rewards, values, next_values, terminated, dones, gamma, gae_lambda):
    """Generalised advantage estimation over a (T, ...) rollout.

    next_values[t] is V(s_{t+1}) for the true next state: at a time limit, the value of the final
    observation (bootstrap); at termination it is multiplied by 0. dones stops the recursion at
    every episode end, whatever its cause.
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def huber_loss(error, delta):
    abs_error = error.abs()
    return torch.where(abs_error <= delta, 0.5 * error**2, delta * (abs_error - 0.5 * delta))


def value_loss(values, old_values, targets_n, args: Args):
    """HARL's cal_value_loss, per critic: Huber loss against the normalised targets, the larger of
    the clipped and the unclipped loss (use_clipped_value_loss)."""
    loss = huber_loss(targets_n - values, args.huber_delta)
    if args.clip_vloss:
        clipped = old_values + (values - old_values).clamp(-args.clip_coef, args.clip_coef)
        loss = torch.max(loss, huber_loss(targets_n - clipped, args.huber_delta))
    return loss.mean(-1)


def clipped_surrogate(new_logp, old_logp, advantages, clip_coef, factor=None):
    """PPO's clipped objective as a loss, per agent (k, batch) -> (k,); HAPPO weights each sample by
    `factor`, the ratio product of the agents updated before (HARL's happo.py)."""
    ratio = torch.exp(new_logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    if factor is not None:
        surrogate = factor * surrogate
    return -surrogate.mean(-1), ratio


def happo_factor(factor, new_logp, old_logp):
    """M^{i_1:m} = M^{i_1:m-1} * pi_new^{i_m}(a|o) / pi_old^{i_m}(a|o), joint over the agent's action
    dimensions (HARL's action_aggregation=prod), without gradient."""
    return (factor * torch.exp(new_logp - old_logp)).detach()


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
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
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
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                p[idx] = p[idx] - step_size * exp_avg / denom


def clip_grad_per_agent(params, max_norm: float, n: int):
    """Clip every agent's slice (leading dimension n) on its own, as separate optimisers would."""
    squares = torch.zeros(n, device=params[0].device)
    for p in params:
        if p.grad is not None:
            squares += p.grad.reshape(n, -1).pow(2).sum(1)
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.view((-1,) + (1,) * (p.grad.dim() - 1)))


def clip_grad_norm(params, norms, max_norm: float) -> None:
    """nn.utils.clip_grad_norm_ from the per-tensor norms already computed for the metrics (the same
    global norm and result); unconditional, so that it never waits for the GPU (a factor of 1 is exact)."""
    total_norm = torch.linalg.vector_norm(torch.stack(norms))
    nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)


def actor_step(actor, optimizer, loss, stats, agents=None):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in actor.parameters() if p.grad is not None]
    norms = [torch.linalg.vector_norm(p.grad) for p in params]  # one pass, for metrics and clip
    variance, norm = gradient_variance_and_norm([p.grad for p in params], norms)  # the paper's gradient variance
    stats["actor_var"].append(variance)
    stats["actor_norm"].append(norm)
    if actor.independent:  # HARL: every actor has its own optimiser and clip
        clip_grad_per_agent(params, stats["max_grad_norm"], actor.n_agents)
    else:
        clip_grad_norm(params, norms, stats["max_grad_norm"])
    if isinstance(optimizer, PerAgentAdam):
        optimizer.step(agents)
    else:
        optimizer.step()


def new_stats(args):
    return dict(policy_loss=[], entropy=[], approx_kl=[], clipfrac=[], actor_var=[], actor_norm=[],
                max_grad_norm=args.max_grad_norm)


def record(stats, per_agent_pg, entropy, new_logp, old_logp, ratio, clip_coef):
    with torch.no_grad():
        logratio = new_logp - old_logp
        stats["policy_loss"].append(per_agent_pg.mean())
        stats["entropy"].append(entropy.mean())
        stats["approx_kl"].append(((ratio - 1) - logratio).mean())
        stats["clipfrac"].append(((ratio - 1.0).abs() > clip_coef).float().mean())


def summarize(stats):
    return {k: float(torch.stack(v).mean()) for k, v in stats.items() if isinstance(v, list) and v}


def mappo_actor_update(actor, optimizer, batch: dict, args: Args):
    """All agents in parallel, weights generated once per minibatch. batch: obs (n, B, D),
    actions (n, B, A), logprobs (n, B), advantages (n, B)."""
    batch_size = batch["obs"].shape[1]
    minibatch_size = batch_size // args.num_minibatches
    stats = new_stats(args)
    for _ in range(args.update_epochs):
        order = torch.randperm(batch_size, device=batch["obs"].device)
        for start in range(0, batch_size, minibatch_size):
            idx = order[start: start + minibatch_size]
            new_logp, entropy = actor.log_prob_entropy(batch["obs"][:, idx], batch["actions"][:, idx], actor.generate())
            pg, ratio = clipped_surrogate(new_logp, batch["logprobs"][:, idx], batch["advantages"][:, idx], args.clip_coef)
            per_agent = pg - args.ent_coef * entropy.mean(-1)
            # independent actors: the sum is n separate losses; shared actors: the mean over agents
            loss = per_agent.sum() if actor.independent else per_agent.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError("actor loss is not finite")
            actor_step(actor, optimizer, loss, stats)
            record(stats, pg, entropy, new_logp, batch["logprobs"][:, idx], ratio, args.clip_coef)
    return summarize(stats)


def happo_actor_update(actor, optimizer, batch: dict, args: Args, order: list):
    """HAPPO (Zhong et al. 2024): agents updated one after the other in `order`. Agent i_m's
    surrogate is weighted by M = prod_{j<m} pi_new^{i_j} / pi_old^{i_j} on every sample, the ratio
    product of the agents already updated, evaluated on the whole batch after their updates.
    Returns the statistics and the factors each agent was weighted by (for the tests)."""
    batch_size = batch["obs"].shape[1]
    minibatch_size = batch_size // args.num_minibatches
    factor = torch.ones(batch_size, device=batch["obs"].device)
    stats, factors_used = new_stats(args), []
    for agent_id in order:
        ids = torch.tensor([agent_id], device=batch["obs"].device)
        factors_used.append(factor.clone())
        old_logp, advantages = batch["logprobs"][ids], batch["advantages"][ids]
        for _ in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=batch["obs"].device)
            for start in range(0, batch_size, minibatch_size):
                idx = perm[start: start + minibatch_size]
                new_logp, entropy = agent_log_prob_entropy(actor, batch["obs"][:, idx], batch["actions"][:, idx], ids)
                pg, ratio = clipped_surrogate(new_logp, old_logp[:, idx], advantages[:, idx], args.clip_coef,
                                              factor[idx].unsqueeze(0))
                loss = (pg - args.ent_coef * entropy.mean(-1)).sum()
                if not torch.isfinite(loss):
                    raise FloatingPointError("actor loss is not finite")
                actor_step(actor, optimizer, loss, stats, ids)
                record(stats, pg, entropy, new_logp, old_logp[:, idx], ratio, args.clip_coef)
        with torch.no_grad():
            new_logp, _ = agent_log_prob_entropy(actor, batch["obs"], batch["actions"], ids)
            factor = happo_factor(factor, new_logp[0], old_logp[0])
    return summarize(stats), factors_used


def agent_log_prob_entropy(actor, obs, actions, ids):
    """One agent's log-probs and entropies, computing only that agent's network.
    obs, actions: every agent's (n, B, ...)."""
    return actor.log_prob_entropy(obs[ids], actions[ids], actor.generate(), ids)


def critic_update(critics, optimizer, value_norm, batch: dict, args: Args) -> float:
    """batch: state (B, S), values (C, B) old outputs (normalised units), returns (C, B) raw."""
    batch_size = batch["state"].shape[0]
    minibatch_size = batch_size // args.critic_num_minibatches
    value_norm.update(batch["returns"])
    targets_n = value_norm.normalize(batch["returns"])
    losses = []
    for _ in range(args.critic_epochs):
        order = torch.randperm(batch_size, device=batch["state"].device)
        for start in range(0, batch_size, minibatch_size):
            idx = order[start: start + minibatch_size]
            per_critic = value_loss(critics(batch["state"][idx]), batch["values"][:, idx], targets_n[:, idx], args)
            loss = per_critic.sum()  # separate critics: separate losses
            if not torch.isfinite(loss):
                raise FloatingPointError("critic loss is not finite")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_per_agent(list(critics.parameters()), args.max_grad_norm, critics.n_critics)
            optimizer.step()
            losses.append(per_critic.detach().mean())
    return float(torch.stack(losses).mean())


def interference_metric(actor, batch: dict, args: Args) -> float:
    """Cross-agent interference before the update, on a random subset of the rollout: mean pairwise
    cosine similarity of the agents' policy-loss gradients on all actor parameters."""
    batch_size = batch["obs"].shape[1]
    idx = torch.randperm(batch_size, device=batch["obs"].device)[: args.interference_samples]
    new_logp, _ = actor.log_prob_entropy(batch["obs"][:, idx], batch["actions"][:, idx], actor.generate())
    pg, _ = clipped_surrogate(new_logp, batch["logprobs"][:, idx], batch["advantages"][:, idx], args.clip_coef)
    return gradient_interference(pg, list(actor.parameters()))


# ===== 7. Checkpoints =====
CHECKPOINT_FORMAT = "hypermarl-mappo-mamujoco/2"  # 2: LayerNorms, one critic


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: reported as one line, exit status 2."""


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, flag: str) -> dict:
    """weights_only=True: a file that smuggles code, or is not ours, is refused."""
    try:
        with warnings.catch_warnings():  # torch warns about some foreign files: the one line below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises turning weights_only off: never relay that
        raise CheckpointError(f"{flag}: {path!r} holds objects other than tensors and plain data: refused")
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        if "weights_only" in str(error):  # e.g. a TorchScript archive: again, no advice to load it unsafely
            raise CheckpointError(f"{flag}: {path!r} is not a checkpoint torch can load as plain data: refused")
        why = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]  # an empty file's error is blank
        raise CheckpointError(f"{flag}: {path!r} is not a readable checkpoint ({why})")
    required = {"format", "args", "run_name", "actor", "critics", "value_norm", "obs_norm", "actor_optimizer",
                "critic_optimizer", "rng", "global_step", "iteration"}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not required <= set(state):
        raise CheckpointError(f"{flag}: {path!r} is not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def flags_given(argv: list[str]) -> set[str]:
    """The Args fields named on the command line (--x, --x=v, --no-x): a flag given with its default
    value is not the same as a flag left out."""
    names = {field.name for field in dataclasses.fields(Args)}
    given = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            given.add(name[3:] if name not in names and name.startswith("no_") else name)
    return given & names


def take_flags_from_checkpoint(args: Args, saved: dict, flag: str, given: set[str]) -> list[str]:
    """--resume continues the saved run, so its flags are the checkpoint's, and --eval-only takes the
    model's (COMPAT_FIELDS) from it. A flag given with another value is an error, except the ones
    RESUME_MAY_CHANGE, which take effect. Returns those changes, to report."""
    defaults = {field.name: field.default for field in dataclasses.fields(Args)}
    names = COMPAT_FIELDS if flag == "--checkpoint" else [n for n in defaults if n not in INVOCATION_FIELDS]
    changes = []
    for name in names:
        value, kept = getattr(args, name), saved.get(name, defaults[name])
        if name not in given or value == kept:
            setattr(args, name, kept)
        elif flag == "--resume" and name in RESUME_MAY_CHANGE:
            changes.append(f"--{name.replace('_', '-')} {kept} -> {value}")
        else:
            raise CheckpointError(f"--{name.replace('_', '-')}: the checkpoint's run has {kept!r}, not {value!r}; "
                                  f"{flag} takes it from the checkpoint (leave the flag out)")
    if flag == "--resume" and "save_interval" not in given and saved["save_interval"] == saved["eval_interval"]:
        args.save_interval = args.eval_interval  # its default follows --eval-interval, which may have changed
    return changes


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


def vector_env_state(envs, flat, episode_return, episode_length) -> dict:
    """The environments' part of a checkpoint: every simulator's state (MaMuJoCoEnv.sim_state) and
    what the training loop carries across iterations (current observations, returns and lengths of
    the unfinished episodes). With SAME_STEP autoreset the vector env itself keeps nothing else."""
    return dict(sim=list(envs.get_attr("sim_state")), obs=torch.as_tensor(flat).clone(),
                episode_return=torch.as_tensor(episode_return).clone(),
                episode_length=torch.as_tensor(episode_length).clone())


def load_vector_env_state(envs, state: dict) -> tuple:
    """Inverse of vector_env_state: the environments continue their episodes; returns the loop's
    (flat observations, episode returns, episode lengths)."""
    envs.set_attr("sim_state", state["sim"])
    return state["obs"].numpy(), state["episode_return"].numpy().copy(), state["episode_length"].numpy().copy()


def rng_state() -> dict:
    state = rng_to_tensors([torch.get_rng_state(), np.random.get_state(), random.getstate()])
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return state


def set_rng_state(state: dict) -> None:
    torch_state, np_state, py_state = rng_from_tensors(state)
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ===== 8. Main =====
def duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


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
        import hypermarl_extras

        return hypermarl_extras.video_timing(self.envs[0].base.metadata["render_fps"])

    def __call__(self, actor: GaussianActor, obs_norm: ObsNormalizer, video: Optional[list] = None):
        """(mean return, SND). A list as video receives every stride-th frame of episode 0 (rendering
        reads the simulation and changes nothing in it)."""
        args, envs = self.args, self.envs
        flats = [env.reset(seed=args.seed + 10_000 + k)[0] for k, env in enumerate(envs)]
        if video is not None:
            import hypermarl_extras

            stride = self.video_timing()[0]
            video.append(hypermarl_extras.mamujoco_frame(envs[0].ma))
        returns, active = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
        pool, generator = [], torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            params = actor.generate()
            for t in range(args.max_episode_steps + 1):
                live = np.nonzero(active)[0]
                film = video is not None and active[0] and (t + 1) % stride == 0
                pool.append(np.stack([flats[k] for k in live]))
                x = torch.as_tensor(self.inputs(pool[-1], obs_norm), device=self.device)
                mean, _ = actor(x, params)
                actions = mean.cpu().numpy().transpose(1, 0, 2)  # in [-1, 1] units: MaMuJoCoEnv rescales
                for j, k in enumerate(live):
                    flats[k], reward, terminated, truncated, _ = envs[k].step(actions[j])
                    returns[k] += reward
                    active[k] = not (terminated or truncated)
                if film:  # no autoreset here: the last step's frame shows how the episode ended
                    video.append(hypermarl_extras.mamujoco_frame(envs[0].ma))
                if not active.any():
                    break
            # SND's joint states, drawn from the raw observations (global mode: 1/n_agents of the memory of
            # every agent's input; 40 Humanoid-17x1 episodes would hold 1 GB); each agent gets its own input
            pool = np.concatenate(pool)
            x = self.inputs(pool[torch.randperm(len(pool), generator=generator)[: args.snd_samples].numpy()], obs_norm)
            mean, std = common_action_dims(*actor(torch.as_tensor(x, device=self.device), params), actor.act_mask)
            snd = system_neural_diversity((mean, std), False, args.snd_gaussian_samples,
                                          torch.Generator(device=self.device).manual_seed(args.seed))
        return float(returns.mean()), snd

    def inputs(self, flat: np.ndarray, obs_norm: ObsNormalizer) -> np.ndarray:
        """Raw observations (batch, flat) -> every agent's actor input (n_agents, batch, obs_dim)."""
        local, state = self.envs[0].split(flat)
        return actor_inputs(obs_norm.local(local) if local is not None else None, obs_norm.state(state),
                            self.envs[0].n_agents)

    def close(self):
        for env in self.envs:
            env.close()


def main(argv=None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else [str(token) for token in argv]
        args = parse_args(argv)
        check_invocation(args)
        loaded, changes = None, []
        if args.resume or args.checkpoint:
            flag = "--resume" if args.resume else "--checkpoint"
            loaded = load_checkpoint(args.resume or args.checkpoint, flag)
            changes = take_flags_from_checkpoint(args, loaded["args"], flag, flags_given(argv))
        else:
            check_given_flags(args)
        fill_defaults(args)
        batch_size = args.num_envs * args.num_steps
        if args.resume and loaded["iteration"] > args.total_timesteps // batch_size:
            raise ArgError(f"--total-timesteps: the run already trained {loaded['global_step']} steps, in iterations "
                           f"of {batch_size}; give at least {loaded['iteration'] * batch_size} to train on")
        if args.track and not args.eval_only:
            try:
                import wandb
            except ImportError:
                raise ArgError("--track: wandb is not installed (pip install wandb)")
        if args.capture_video:
            try:
                import hypermarl_extras as extras
            except ImportError:
                raise ArgError("--capture-video: needs hypermarl_extras.py beside this script")
            extras.default_mujoco_gl()  # before anything imports mujoco, which reads it once
            problem = extras.probe_capture_video("mujoco")
            if problem:
                raise ArgError(problem)
    except (ArgError, CheckpointError) as error:
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
    probe = evaluator.envs[0]  # shapes and masks
    n, A, S = probe.n_agents, probe.act_dim, probe.state_dim
    D = actor_obs_dim(args, probe)
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

    if args.eval_only:
        try:
            actor.load_state_dict(loaded["actor"])
            obs_norm.load_state_dict(loaded["obs_norm"])
            video = [] if args.capture_video else None
            eval_return, snd = evaluator(actor, obs_norm, video)
            print(f"eval/episodic_return={eval_return:.4f} diversity/snd={snd:.6f}")
            if video:
                path = os.path.join(args.runs_dir, new_run_folder(args.runs_dir, f"{loaded['run_name']}__eval"), "eval.mp4")
                extras.save_video(None, path, "eval/video", video, loaded["global_step"], evaluator.video_timing()[1])
                print(f"video: {path}")
        finally:
            evaluator.close()
        return 0

    T, E = args.num_steps, args.num_envs
    batch_size = T * E
    num_iterations = args.total_timesteps // batch_size
    global_step, start_iteration = 0, 1
    if loaded is not None:
        actor.load_state_dict(loaded["actor"])
        critics.load_state_dict(loaded["critics"])
        value_norm.load_state_dict(loaded["value_norm"])
        obs_norm.load_state_dict(loaded["obs_norm"])
        actor_optimizer.load_state_dict(loaded["actor_optimizer"])
        critic_optimizer.load_state_dict(loaded["critic_optimizer"])
        set_rng_state(loaded["rng"])
        global_step, start_iteration, run_name = loaded["global_step"], loaded["iteration"], loaded["run_name"]
        print(f"resume: {run_name} at step {global_step}" + (f"; changed: {', '.join(changes)}" if changes else ""))
    else:
        run_name = new_run_folder(args.runs_dir, f"mamujoco_{args.task.replace('|', '_')}__{args.exp_name}__"
                                                 f"{args.algo}_{args.actor}__{args.seed}")
    run_dir = os.path.join(args.runs_dir, run_name)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    config_table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{config_table}")
    print(f"run: {run_dir}")
    print(f"device: {device}" + (" (CUDA is not available)" if args.cuda and device.type != "cuda" else ""))
    print("config: " + " ".join(f"{key}={value}" for key, value in vars(args).items()))
    print(f"task: {args.task} agents={n} act_dims={probe.act_dims} local_obs_dims={probe.local_obs_dims} "
          f"state_dim={S} actor_obs_dim={D} critics={C}")
    print(f"parameters: actor {sum(p.numel() for p in actor.parameters())}, "
          f"critics {sum(p.numel() for p in critics.parameters())}")

    envs = make_vector_env(args)
    # Rollout storage, time-major
    obs = torch.zeros((T, n, E, D), device=device)
    states = torch.zeros((T, E, S), device=device)
    actions = torch.zeros((T, n, E, A), device=device)
    rewards = torch.zeros((T, 1, E), device=device)
    terminateds = torch.zeros((T, 1, E), device=device)
    dones = torch.zeros((T, 1, E), device=device)

    def capture_state(iteration):
        return dict(format=CHECKPOINT_FORMAT, args=dataclasses.asdict(args), run_name=run_name,
                    actor=actor.state_dict(), critics=critics.state_dict(), value_norm=value_norm.state_dict(),
                    obs_norm=obs_norm.state_dict(), actor_optimizer=actor_optimizer.state_dict(),
                    critic_optimizer=critic_optimizer.state_dict(), rng=rng_state(),
                    envs=vector_env_state(envs, flat, episode_return, episode_length),
                    global_step=global_step, iteration=iteration)

    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signum
        print(f"\nsignal {signum}: saving a checkpoint and stopping", flush=True)

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    flat, _ = envs.reset(seed=args.seed + 1000 * (start_iteration - 1))
    episode_return, episode_length = np.zeros(E), np.zeros(E, dtype=np.int64)
    if loaded is not None and len(loaded.get("envs", {}).get("sim", ())) == E:
        flat, episode_return, episode_length = load_vector_env_state(envs, loaded["envs"])
    elif loaded is not None:  # an older checkpoint, without the environments' states
        print("note: the checkpoint's environment states do not fit this run: new episodes start")
    start_time, start_step, printed_at = time.time(), global_step, 0.0
    print(f"plan: {num_iterations - start_iteration + 1} iterations of {batch_size} steps ({E} envs x {T}) up to "
          f"step {num_iterations * batch_size:,}, evaluating every {args.eval_interval:,}; an estimate of the time "
          f"follows the first iteration", flush=True)
    rollout_time = update_time = 0.0
    window_returns = []  # episodes that ended since the last progress line
    next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
    next_save = (global_step // args.save_interval + 1) * args.save_interval
    exit_code, next_iteration = 0, start_iteration
    try:
        for iteration in range(start_iteration, num_iterations + 1):
            if stop["signal"] is not None:  # between iterations the state is consistent: save it
                break
            tick = time.time()
            finished_returns, finished_lengths = [], []
            bootstrap_at, bootstrap_states = [], []
            with torch.no_grad():
                params = actor.generate()  # the parameters do not change during a rollout
                for step in range(T):
                    global_step += E
                    local, state = probe.split(flat)
                    obs_norm.update(local, state)
                    state_n = obs_norm.state(state)
                    x = actor_inputs(obs_norm.local(local) if local is not None else None, state_n, n)
                    obs[step] = torch.as_tensor(x, device=device)
                    states[step] = torch.as_tensor(state_n, device=device)
                    mean, std = actor(obs[step], params)
                    actions[step] = mean + std * torch.randn_like(mean)
                    # the sample itself, as HARL: the env rescales [-1, 1] to the joints' ranges
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
                # behaviour log-probs and values in one batched pass: the weights did not change
                logprobs = actor.log_prob_entropy(obs.transpose(0, 1).reshape(n, T * E, D),
                                                  actions.transpose(0, 1).reshape(n, T * E, A), params)[0]
                values_n = critics(states.reshape(T * E, S)).reshape(C, T, E)  # normalised units
                values = value_norm.denormalize(values_n).float().transpose(0, 1)  # (T, C, E)
                last_value = value_norm.denormalize(critics(torch.as_tensor(obs_norm.state(probe.split(flat)[1]),
                                                                            device=device))).float()
                next_values = torch.cat([values[1:], last_value.unsqueeze(0)])
                bootstrap = torch.zeros_like(values)
                if bootstrap_at:
                    v_final = value_norm.denormalize(critics(torch.as_tensor(np.concatenate(bootstrap_states),
                                                                             device=device))).float()
                    steps_, envs_ = zip(*bootstrap_at)
                    bootstrap[list(steps_), :, list(envs_)] = v_final.T
                next_values = torch.where(dones.bool(), bootstrap, next_values)
                advantages, returns = compute_gae(rewards.expand(-1, C, -1).contiguous(), values, next_values, terminateds, dones,
                                                  args.gamma, args.gae_lambda)
            rollout_seconds = time.time() - tick
            rollout_time += rollout_seconds
            if iteration == start_iteration:  # an iteration can take minutes on a CPU: say so early
                print(f"iteration {iteration}: rollout took {rollout_seconds:.1f} s; updating "
                      f"({args.update_epochs} actor and {args.critic_epochs} critic epochs)", flush=True)
            tick = time.time()
            torch.set_num_threads(args.update_threads)  # the environment workers wait: use every core

            # agent-major batch; advantages of agent i come from its own critic (per-agent) or the shared one
            critic_of_agent = torch.arange(n) if C == n else torch.zeros(n, dtype=torch.long)
            adv = advantages.transpose(0, 1).reshape(C, T * E)[critic_of_agent.to(device)]
            adv = (adv - adv.mean()) / (adv.std() + 1e-5)  # HARL: normalised over the whole batch
            batch = dict(obs=obs.transpose(0, 1).reshape(n, T * E, D), actions=actions.transpose(0, 1).reshape(n, T * E, A),
                         logprobs=logprobs, advantages=adv, state=states.reshape(T * E, S),
                         values=values_n.reshape(C, T * E), returns=returns.transpose(0, 1).reshape(C, T * E))
            interference = None
            if (iteration - 1) % args.interference_interval == 0:
                interference = interference_metric(actor, batch, args)
            try:
                if args.algo == "happo":
                    order = list(range(n)) if args.fixed_order else torch.randperm(n).tolist()
                    stats, _ = happo_actor_update(actor, actor_optimizer, batch, args, order)
                else:
                    stats = mappo_actor_update(actor, actor_optimizer, batch, args)
                stats["value_loss"] = critic_update(critics, critic_optimizer, value_norm, batch, args)
            except FloatingPointError as error:
                print(f"error: {error} at update {iteration} (global step {global_step}); stopping. Last good "
                      f"checkpoint: {checkpoint_path if args.save_model else 'none (no --save-model)'}", file=sys.stderr)
                exit_code = 1
                break
            update_seconds = time.time() - tick
            update_time += update_seconds
            torch.set_num_threads(args.torch_threads)

            # Logging (CleanRL names)
            if finished_returns:
                writer.add_scalar("charts/episodic_return", float(np.mean(finished_returns)), global_step)
                writer.add_scalar("charts/episodic_length", float(np.mean(finished_lengths)), global_step)
            for key in ("value_loss", "policy_loss", "entropy", "approx_kl", "clipfrac"):
                writer.add_scalar(f"losses/{key}", stats[key], global_step)
            writer.add_scalar("grad/actor_var", stats["actor_var"], global_step)
            writer.add_scalar("grad/actor_norm", stats["actor_norm"], global_step)
            if interference is not None:
                writer.add_scalar("grad/interference", interference, global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("perf/rollout_seconds", rollout_seconds, global_step)  # this iteration's split
            writer.add_scalar("perf/update_seconds", update_seconds, global_step)

            line = None
            if global_step >= next_eval or iteration == num_iterations:
                next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
                video = [] if args.capture_video else None
                eval_return, snd = evaluator(actor, obs_norm, video)
                if video:
                    extras.save_video(writer, os.path.join(run_dir, "videos", f"eval_{global_step}.mp4"), "eval/video",
                                      video, global_step, evaluator.video_timing()[1])
                writer.add_scalar("eval/episodic_return", eval_return, global_step)
                writer.add_scalar("diversity/snd", snd, global_step)
                line = f"eval_return={eval_return:.3f} snd={snd:.4f}"
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
                save_checkpoint(checkpoint_path, capture_state(iteration + 1))
            next_iteration = iteration + 1
        if exit_code == 0 and (args.save_model or stop["signal"] is not None):
            save_checkpoint(checkpoint_path, capture_state(next_iteration))
            print(f"checkpoint: {checkpoint_path} (continue with --resume {checkpoint_path})")
    except BaseException:
        # An exception (a second Ctrl-C) can cut a step or a get_attr after some of the workers' replies
        # were read: a polite close would wait for those again, forever. Stop the workers instead.
        envs.close(terminate=True)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        envs.close()
        evaluator.close()
        writer.close()
        if args.track:
            wandb.finish()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
