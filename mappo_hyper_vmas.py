"""HyperMARL with MAPPO on VMAS (Dispersion, Navigation), with its baselines and metrics.

HyperMARL (Tessera, Rahman & Albrecht) generates every agent's actor and critic weights with a
hypernetwork conditioned on that agent's embedding, so all agents share one set of trainable
parameters yet each acts with its own network. MAPPO: every agent's critic sees the global state
(section 3's critic_input); everything else is ippo_hyper_vmas.py line for line. Read top to bottom:

    1. Arguments        5. Metrics (SND, gradient variance, interference)
    2. Input validation 6. Algorithm (GAE, PPO update)
    3. Environment      7. Checkpoints
    4. Networks         8. Main (the training loop)

Quick start:  python mappo_hyper_vmas.py --n-agents 4 --hypernet mlp --total-timesteps 300000
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import os
import pickle
import random
import re
import signal
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


# ===== 1. Arguments =====
# A flag whose default depends on others (the scenario, the family) is None here and filled in by
# resolve_args; its docstring names the real default, so tyro's own "(default: None)" is hidden.
DOC_DEFAULT = tyro.conf.arg(help_behavior_hint="")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (the evaluation environment uses seed + 10000)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available (networks and VMAS alike)"""
    compile: bool = False
    """if toggled, torch.compile the rollout's policy step and the minibatch gradient step (LeanRL's recipe): the first iteration compiles (about a minute), later ones launch far fewer GPU kernels; same numbers as eager up to float rounding"""
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
    """path of a checkpoint to continue training from; the run's flags come from it, and only --total-timesteps, --eval-interval, --save-interval, --print-interval, --save-model, --runs-dir, --capture-video, --cuda, --compile and the wandb flags may change"""
    eval_only: bool = False
    """if toggled, only evaluate --checkpoint (return and SND) and exit; writes nothing (with --capture-video: the video, in a new runs_dir folder)"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    snd_obs_file: Optional[str] = None
    """[--eval-only] compute SND on every observation of this .npz file (key obs, (N, obs_dim) or (N, n_agents, obs_dim); benchmark/snd_dataset.py builds it, appendix D.1.2)"""

    # Environment (VMAS). None = the paper's value for the scenario (Tables 11 and 16).
    scenario: str = "dispersion"
    """VMAS scenario: dispersion | navigation"""
    n_agents: int = 4
    """number of agents (at least 2)"""
    max_steps: int = 100
    """episode time limit (truncation, bootstrapped from V(next state))"""
    continuous_actions: Annotated[Optional[bool], DOC_DEFAULT] = None
    """continuous (Gaussian) or discrete (categorical) actions (default: dispersion discrete, navigation continuous)"""
    n_food: Annotated[Optional[int], DOC_DEFAULT] = None
    """[dispersion] number of food items (default: n_agents)"""
    share_reward: bool = False
    """[dispersion] one team reward instead of per-agent rewards"""
    penalise_by_time: bool = True
    """[dispersion] -0.01 per step without food (Table 11: on)"""
    food_radius: Annotated[Optional[float], DOC_DEFAULT] = None
    """[dispersion] food radius (default: 0.08)"""
    agents_with_same_goal: Annotated[Optional[int], DOC_DEFAULT] = None
    """[navigation] how many agents share the first goal: 1 (all different) .. n_agents (all same) (default: 1)"""
    split_goals: bool = False
    """[navigation] two groups of n/2 agents, one goal each"""
    observe_all_goals: bool = True
    """[navigation] every agent observes every goal (Table 16: on)"""
    shared_rew: bool = False
    """[navigation] one team reward instead of per-agent rewards"""
    collisions: bool = False
    """[navigation] agents collide and carry a LIDAR"""
    lidar_range: Annotated[Optional[float], DOC_DEFAULT] = None
    """[navigation] LIDAR range, only with --collisions (default: 0.35)"""
    agent_radius: Annotated[Optional[float], DOC_DEFAULT] = None
    """[navigation] agent radius (default: 0.1)"""

    # PPO. None = the paper's value for the scenario (Table 9 Dispersion, Table 12 Navigation).
    total_timesteps: Annotated[Optional[int], DOC_DEFAULT] = None
    """total environment steps (Dispersion 20M, Navigation 10M)"""
    learning_rate: Annotated[Optional[float], DOC_DEFAULT] = None
    """Adam learning rate (Dispersion 5e-4, Navigation 5e-5 or Table 15's value for the family and goal setting)"""
    num_envs: Annotated[Optional[int], DOC_DEFAULT] = None
    """parallel VMAS environments (Dispersion 16, Navigation 600)"""
    num_steps: Annotated[Optional[int], DOC_DEFAULT] = None
    """steps per environment per rollout (Dispersion 128, Navigation 100)"""
    anneal_lr: bool = False
    """if toggled, the learning rate decays linearly to 0"""
    gamma: Annotated[Optional[float], DOC_DEFAULT] = None
    """discount factor (Dispersion 0.99, Navigation 0.9)"""
    gae_lambda: Annotated[Optional[float], DOC_DEFAULT] = None
    """GAE lambda (Dispersion 0.95, Navigation 0.9)"""
    num_minibatches: Annotated[Optional[int], DOC_DEFAULT] = None
    """minibatches per epoch (Dispersion 2, Navigation 30)"""
    update_epochs: Annotated[Optional[int], DOC_DEFAULT] = None
    """PPO epochs per rollout (Dispersion 4, Navigation 45)"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: Annotated[Optional[float], DOC_DEFAULT] = None
    """surrogate clipping coefficient (0.2; Navigation with 4 or 8 agents: Table 15's value for the family and goal setting)"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped like the policy (CleanRL)"""
    ent_coef: Annotated[Optional[float], DOC_DEFAULT] = None
    """entropy bonus (Dispersion 0.01, Navigation 0.0)"""
    vf_coef: Annotated[Optional[float], DOC_DEFAULT] = None
    """value loss coefficient (Dispersion 0.5, Navigation 1.0)"""
    max_grad_norm: Annotated[Optional[float], DOC_DEFAULT] = None
    """global gradient-norm clip (Dispersion 0.5, Navigation 5.0)"""
    actor_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """hidden layers of every agent's actor (Dispersion 64 64, Navigation 256 256)"""
    critic_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """hidden layers of every agent's critic (Dispersion 64 64, Navigation 256 256)"""
    activation: Annotated[Optional[str], DOC_DEFAULT] = None
    """activation of actor and critic: relu | tanh (Dispersion relu, Navigation tanh)"""

    # Families and HyperMARL options
    hypernet: str = "mlp"
    """actor/critic family: mlp | linear (HyperMARL) | fups (shared + one-hot ID) | nops (one network per agent) | dico"""
    hypernet_embedding_dim: Annotated[Optional[int], DOC_DEFAULT] = None
    """[mlp] size of the learned agent embedding (default: 8, Tables 10/13)"""
    hypernet_hidden_dims: Annotated[Optional[list[int]], DOC_DEFAULT] = None
    """[mlp] hidden layers of the hypernetwork (default: 64)"""
    hypernet_embedding: Annotated[Optional[str], DOC_DEFAULT] = None
    """[mlp] learned (orthogonally initialised, default) | onehot (ablation)"""
    hypernet_init: Annotated[Optional[str], DOC_DEFAULT] = None
    """[mlp, linear] scaled (section 4.3 as the authors' code does it, default) | matched (ours, mlp only: unit-norm hidden features, every generated layer at the target's scale) | default (PyTorch init: w/o RF)"""
    hypernet_input: Annotated[Optional[str], DOC_DEFAULT] = None
    """[mlp, linear] agent (gradient decoupling, default) | agent+obs (ablation w/o GD: per-sample weights)"""
    dico_snd_des: Annotated[Optional[float], DOC_DEFAULT] = None
    """[dico] desired SND; -1 = unconstrained (default: Table 14 for the goal setting, else -1)"""

    # Evaluation and metrics
    eval_interval: Annotated[Optional[int], DOC_DEFAULT] = None
    """environment steps between evaluations (Dispersion 100k, Navigation 120k)"""
    eval_episodes: Annotated[Optional[int], DOC_DEFAULT] = None
    """evaluation episodes (Dispersion 32, Navigation 200)"""
    eval_deterministic: Annotated[Optional[bool], DOC_DEFAULT] = None
    """evaluate with the mode (argmax / mean) instead of sampled actions (default: Dispersion True, the authors' code; Navigation False, its baselines' configs, appendix D.1.1)"""
    snd_samples: int = 1000
    """observations (from evaluation rollouts) on which SND is computed"""
    snd_gaussian_samples: int = 64
    """Monte Carlo samples per observation for the Gaussian Jensen-Shannon estimator"""
    interference_samples: int = 512
    """samples (per agent) of each update's first minibatch on which grad/interference is measured"""
    print_interval: int = 10
    """print a progress line every this many iterations (and at every evaluation)"""


SCENARIOS = ("dispersion", "navigation")
FAMILIES = ("mlp", "linear", "fups", "nops", "dico")
SCENARIO_OPTIONS = {
    # Table 11 (Dispersion) and Table 16 (Navigation) settings of the paper.
    "dispersion": dict(n_food=None, share_reward=False, penalise_by_time=True, food_radius=0.08),
    "navigation": dict(
        agents_with_same_goal=1, split_goals=False, observe_all_goals=True, shared_rew=False,
        collisions=False, lidar_range=0.35, agent_radius=0.1,
    ),
}
PAPER_DEFAULTS = {
    # Table 9 (Dispersion, MAPPO) and Table 12 (Navigation); eval protocol of appendix D.1.1.
    "dispersion": dict(
        total_timesteps=20_000_000, learning_rate=5e-4, num_envs=16, num_steps=128, gamma=0.99,
        gae_lambda=0.95, num_minibatches=2, update_epochs=4, ent_coef=0.01, vf_coef=0.5,
        max_grad_norm=0.5, actor_hidden_dims=[64, 64], critic_hidden_dims=[64, 64],
        activation="relu", continuous_actions=False, eval_interval=100_000, eval_episodes=32,
        clip_coef=0.2, eval_deterministic=True,
    ),
    "navigation": dict(
        # Table 12 prints 10^6 timesteps; appendix D.1.1 says 10M for Navigation: we follow D.1.1.
        total_timesteps=10_000_000, learning_rate=5e-5, num_envs=600, num_steps=100, gamma=0.9,
        gae_lambda=0.9, num_minibatches=30, update_epochs=45, ent_coef=0.0, vf_coef=1.0,
        max_grad_norm=5.0, actor_hidden_dims=[256, 256], critic_hidden_dims=[256, 256],
        activation="tanh", continuous_actions=True, eval_interval=120_000, eval_episodes=200,
        clip_coef=0.2, eval_deterministic=False,  # the baselines sample at evaluation (D.1.1)
    ),
}
# Table 15: (CLIP_EPS, LR) selected per family for Navigation with 4 and 8 agents, by goal setting:
# "same" (all agents share one goal), "different" (one goal each), "half" (Table 15's "Two Goals" /
# "Four Goals": half the agents share a goal, as the authors' run scripts set it up).
NAVIGATION_SWEEP = {
    "fups": {8: dict(same=(0.2, 5e-5), different=(0.1, 5e-5), half=(0.1, 5e-5)),
             4: dict(same=(0.2, 5e-5), different=(0.2, 5e-5), half=(0.2, 5e-5))},
    "linear": {8: dict(same=(0.2, 5e-5), different=(0.1, 5e-5), half=(0.1, 5e-5)),
               4: dict(same=(0.2, 5e-5), different=(0.1, 5e-5), half=(0.1, 5e-5))},
    "mlp": {8: dict(same=(0.2, 5e-5), different=(0.1, 5e-5), half=(0.1, 5e-5)),
            4: dict(same=(0.1, 5e-5), different=(0.1, 5e-5), half=(0.1, 5e-5))},
    "nops": {8: dict(same=(0.1, 5e-5), different=(0.2, 5e-5), half=(0.1, 5e-5)),
             4: dict(same=(0.1, 5e-5), different=(0.2, 5e-5), half=(0.1, 5e-5))},
    "dico": {8: dict(same=(0.2, 5e-5), different=(0.1, 2.5e-4), half=(0.1, 2.5e-4)),
             4: dict(same=(0.2, 5e-5), different=(0.1, 2.5e-4), half=(0.1, 5e-4))},
}
HYPERNET_DEFAULTS = dict(
    hypernet_embedding_dim=8, hypernet_hidden_dims=[64], hypernet_embedding="learned",
    hypernet_init="scaled", hypernet_input="agent",
)  # Tables 10 and 13 (MAPPO column)
MAX_SEED = 2**32 - 1 - 10_000  # NumPy takes seeds below 2**32, and the evaluation environment uses seed + 10000
# Flags that define the model and the environment: --eval-only takes them from its checkpoint.
COMPAT_FIELDS = (
    "scenario", "n_agents", "max_steps", "continuous_actions", "n_food", "share_reward",
    "penalise_by_time", "food_radius", "agents_with_same_goal", "split_goals", "observe_all_goals",
    "shared_rew", "collisions", "lidar_range", "agent_radius", "actor_hidden_dims",
    "critic_hidden_dims", "activation", "hypernet", "hypernet_embedding_dim", "hypernet_hidden_dims",
    "hypernet_embedding", "hypernet_init", "hypernet_input", "dico_snd_des",
)
# What --resume may change (budget, logging, cadence, device); every other flag is the checkpoint's.
RESUME_MAY_CHANGE = ("total_timesteps", "eval_interval", "save_interval", "save_model", "print_interval",
                     "runs_dir", "track", "wandb_project_name", "wandb_entity", "cuda", "compile", "capture_video")
# Flags that say what to do with a checkpoint, not what the run is.
INVOCATION_FIELDS = ("resume", "eval_only", "checkpoint", "snd_obs_file")


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


def default_dico_snd(args: Args) -> float:
    # Table 14: 0 when all agents share a goal, 1.2 for two agents with different goals, else -1.
    if args.scenario == "navigation":
        if args.agents_with_same_goal == args.n_agents:
            return 0.0
        if args.n_agents == 2 and args.agents_with_same_goal == 1:
            return 1.2
    return -1.0


def navigation_goal_setting(args: Args) -> Optional[str]:
    """Table 15's goal setting of a Navigation run: same, different, half, or None (none of them)."""
    n, same = args.n_agents, args.agents_with_same_goal
    same = SCENARIO_OPTIONS["navigation"]["agents_with_same_goal"] if same is None else same
    return {n: "same", 1: "different"}.get(same, "half" if 2 * same == n else None)


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
    if args.snd_obs_file is not None and not args.eval_only:
        raise ArgError("--snd-obs-file: only with --eval-only")
    for flag, path in (("--resume", args.resume), ("--checkpoint", args.checkpoint), ("--snd-obs-file", args.snd_obs_file)):
        if path is not None and not os.path.isfile(path):
            raise ArgError(f"{flag}: {path!r} is a folder, not a file" if os.path.isdir(path) else f"{flag}: no such file {path!r}")


def check_given_flags(args: Args) -> None:
    """The flags of a new run, as given: each only where it applies (a checkpoint's run passed them)."""
    if args.scenario not in SCENARIOS:
        raise ArgError(f"--scenario: must be one of {', '.join(SCENARIOS)}, got {args.scenario!r}")
    if args.hypernet not in FAMILIES:
        raise ArgError(f"--hypernet: must be one of {', '.join(FAMILIES)}, got {args.hypernet!r}")
    other = [s for s in SCENARIOS if s != args.scenario][0]
    field_defaults = {field.name: field.default for field in dataclasses.fields(Args)}
    for name in SCENARIO_OPTIONS[other]:
        if getattr(args, name) != field_defaults[name]:
            raise ArgError(f"--{name.replace('_', '-')}: is a {other} option, not for --scenario {args.scenario}")
    for name in HYPERNET_DEFAULTS:
        mlp_only = name not in ("hypernet_init", "hypernet_input")
        allowed = ("mlp",) if mlp_only else ("mlp", "linear")
        if getattr(args, name) is not None and args.hypernet not in allowed:
            raise ArgError(f"--{name.replace('_', '-')}: only with --hypernet {' or '.join(allowed)}, got --hypernet {args.hypernet}")
    if args.dico_snd_des is not None and args.hypernet != "dico":
        raise ArgError(f"--dico-snd-des: only with --hypernet dico, got --hypernet {args.hypernet}")
    if args.lidar_range is not None and not args.collisions:
        raise ArgError("--lidar-range: only with --collisions (agents carry a LIDAR only then)")
    if args.save_interval is not None and not args.save_model:
        raise ArgError("--save-interval: only with --save-model")


def fill_defaults(args: Args) -> Args:
    """The paper's value for every flag left at None, then the checks of the values."""
    values = dict(PAPER_DEFAULTS[args.scenario])
    values.update(SCENARIO_OPTIONS[args.scenario])
    if args.hypernet == "mlp":
        values.update(HYPERNET_DEFAULTS)
    elif args.hypernet == "linear":
        values.update({k: HYPERNET_DEFAULTS[k] for k in ("hypernet_init", "hypernet_input")})
    if args.scenario == "navigation":
        tuned = NAVIGATION_SWEEP[args.hypernet].get(args.n_agents, {}).get(navigation_goal_setting(args))
        if tuned is not None:
            values["clip_coef"], values["learning_rate"] = tuned
    for name, default in values.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.scenario == "dispersion" and args.n_food is None:
        args.n_food = args.n_agents
    if args.save_interval is None:
        args.save_interval = args.eval_interval
    if args.hypernet == "dico" and args.dico_snd_des is None:
        args.dico_snd_des = default_dico_snd(args)
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
    if not 0 <= args.seed <= MAX_SEED:
        raise ArgError(f"--seed: must be between 0 and {MAX_SEED}, got {args.seed}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.exp_name):
        raise ArgError(f"--exp-name: must be a plain name (letters, digits, '.', '_', '-'), got {args.exp_name!r}")
    if args.n_agents < 2:
        raise ArgError(f"--n-agents: must be at least 2, got {args.n_agents}")
    for name in ("max_steps", "total_timesteps", "learning_rate", "num_envs", "num_steps",
                 "num_minibatches", "update_epochs", "clip_coef", "max_grad_norm", "eval_interval",
                 "eval_episodes", "snd_samples", "snd_gaussian_samples", "interference_samples", "print_interval",
                 "save_interval"):
        positive(name)
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ArgError(f"--{name.replace('_', '-')}: must be in [0, 1], got {getattr(args, name)}")
    for name in ("ent_coef", "vf_coef"):
        if getattr(args, name) < 0:
            raise ArgError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    for name in ("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims"):
        dims = getattr(args, name)
        if dims is not None and (len(dims) == 0 or min(dims) <= 0):
            raise ArgError(f"--{name.replace('_', '-')}: must be one or more positive sizes, got {dims}")
    if args.activation not in ("relu", "tanh"):
        raise ArgError(f"--activation: must be relu or tanh, got {args.activation!r}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        raise ArgError(f"--num-minibatches: must divide num_envs * num_steps = {batch_size}, got {args.num_minibatches}")
    if args.total_timesteps < batch_size:
        raise ArgError(f"--total-timesteps: must be at least num_envs * num_steps = {batch_size}, got {args.total_timesteps}")
    if args.hypernet == "mlp":
        positive("hypernet_embedding_dim")
        if args.hypernet_embedding not in ("learned", "onehot"):
            raise ArgError(f"--hypernet-embedding: must be learned or onehot, got {args.hypernet_embedding!r}")
    if args.hypernet in ("mlp", "linear"):
        if args.hypernet_init not in ("scaled", "matched", "default"):
            raise ArgError(f"--hypernet-init: must be scaled, matched or default, got {args.hypernet_init!r}")
        if args.hypernet_init == "matched" and args.hypernet != "mlp":  # the linear one's scaled init is already exact
            raise ArgError(f"--hypernet-init: matched is for --hypernet mlp, got --hypernet {args.hypernet}")
        if args.hypernet_input not in ("agent", "agent+obs"):
            raise ArgError(f"--hypernet-input: must be agent or agent+obs, got {args.hypernet_input!r}")
    if args.hypernet == "dico" and not (args.dico_snd_des == -1 or args.dico_snd_des >= 0):
        raise ArgError(f"--dico-snd-des: must be -1 (unconstrained) or >= 0, got {args.dico_snd_des}")
    if args.scenario == "dispersion":
        positive("n_food")
        positive("food_radius")
    else:
        check_navigation(args)
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


def check_navigation(args: Args) -> None:
    n, same = args.n_agents, args.agents_with_same_goal
    for name in ("lidar_range", "agent_radius"):
        if not getattr(args, name) > 0:
            raise ArgError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if not 1 <= same <= n:
        raise ArgError(f"--agents-with-same-goal: must be between 1 and n_agents = {n}, got {same}")
    if same > 1 and args.collisions:
        raise ArgError("--collisions: agents cannot share a goal with collisions on (VMAS asserts it); use --agents-with-same-goal 1")
    if args.split_goals and (n % 2 or same != n // 2):
        raise ArgError(f"--split-goals: needs an even n_agents and --agents-with-same-goal n/2, got n={n}, same={same}")


# ===== 3. Environment =====
def scenario_kwargs(args: Args) -> dict:
    """The keyword arguments VMAS's scenario receives (names exactly as VMAS spells them)."""
    kwargs = {"n_agents": args.n_agents}
    kwargs.update({name: getattr(args, name) for name in SCENARIO_OPTIONS[args.scenario]})
    return kwargs


class VmasEnv:
    """VMAS with agent-major tensors, terminated/truncated kept apart and in-place auto-reset.

    step() returns the next observations (fresh ones for environments that just ended, so the
    first action of a new episode sees its own observation) and, separately, the final
    observations of the ended episodes (to bootstrap V(next state) after a time limit).
    Returns and lengths of ended episodes are summed on the device and read once per iteration
    (take_ended_episodes), so stepping never waits for the GPU on their account.
    Each instance owns its random stream: VMAS keeps one stream for all environments, which would
    otherwise tie the training and evaluation environments together.
    """

    def __init__(self, args: Args, num_envs: int, seed: int, device: torch.device):
        import vmas
        from vmas.simulator.environment import Environment

        self._shared_rng = Environment.vmas_random_state
        self._rng = list(self._shared_rng)
        with self.own_rng(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.env = vmas.make_env(
                args.scenario, num_envs=num_envs, device=device,
                continuous_actions=args.continuous_actions, max_steps=args.max_steps, seed=seed,
                terminated_truncated=True, **scenario_kwargs(args),
            )
        unused = [str(w.message) for w in caught if "not used" in str(w.message)]
        if unused:  # VMAS only warns about keyword arguments it ignores: refuse them instead.
            raise ArgError(f"--scenario {args.scenario}: {unused[0]}")
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
        self.ended_returns = torch.zeros(self.n_agents, device=device)  # sums over the episodes that ended
        self.ended_lengths = torch.zeros((), dtype=torch.long, device=device)
        self.ended_count = torch.zeros((), dtype=torch.long, device=device)
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

    def reset(self) -> torch.Tensor:
        with self.own_rng():
            self.obs = torch.stack(self.env.reset())
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
        """Fresh initial states for the ended environments at the cost of one batched reset, whatever
        their number: VMAS resets the whole batch, then the environments that go on get their state
        back with one masked write per tensor. (VMAS's reset_at(i) resets one environment per call, a
        Python loop of small kernels once episodes fall out of step.)"""
        going_on = [(holder, key, value.clone()) for holder in self._state_holders().values()
                    for key, value in vars(holder).items() if isinstance(value, torch.Tensor)]
        fresh_obs = torch.stack(self.env.reset())
        for holder, key, old in going_on:
            if old.dim() > 0 and old.shape[0] == self.num_envs:  # one row per environment
                ended = done.view((-1,) + (1,) * (old.dim() - 1))
                setattr(holder, key, torch.where(ended, getattr(holder, key), old))
            else:  # shared by all environments (gravity): never reset
                setattr(holder, key, old)
        return torch.where(done[None, :, None], fresh_obs, obs)

    def take_ended_episodes(self):
        """(mean return per agent, mean length) of the episodes that ended since the last call, or
        None if none did; the one host sync for them, once per iteration."""
        count = int(self.ended_count)
        result = None
        if count:
            result = ((self.ended_returns / count).tolist(), float(self.ended_lengths) / count)
        self.ended_returns.zero_()
        self.ended_lengths.zero_()
        self.ended_count.zero_()
        return result

    # -- exact save/restore of the simulator (for checkpoints that resume bit for bit) --
    def _state_holders(self):
        env = self.env
        holders = {"env": env, "scenario": env.scenario, "world": env.world}
        for i, entity in enumerate(env.world.entities):
            holders[f"entity{i}"] = entity
            holders[f"entity{i}.state"] = entity.state
        return holders

    def state_dict(self) -> dict:
        tensors = {}
        for name, holder in self._state_holders().items():
            for key, value in vars(holder).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.clone()
        return dict(tensors=tensors, rng=rng_to_tensors(self._rng), obs=self.obs.clone(),
                    episode_return=self.episode_return.clone(), episode_length=self.episode_length.clone())

    def load_state_dict(self, state: dict) -> None:
        holders = self._state_holders()
        for path, value in state["tensors"].items():
            name, key = path.split("/")
            setattr(holders[name], key, value.clone().to(self.device))
        self._rng = rng_from_tensors(state["rng"])
        self.obs = state["obs"].to(self.device)
        self.episode_return = state["episode_return"].to(self.device)
        self.episode_length = state["episode_length"].to(self.device)


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
    """One network per agent, whatever the family: x (n_agents, batch, in) -> (n_agents, batch, out)."""

    def __init__(self, args, family, n_agents, sizes, gains, activation):
        super().__init__()
        self.generator = make_generator(args, family, n_agents, sizes, gains)
        self.activation = activation
        self.per_sample = getattr(args, "hypernet_input", None) == "agent+obs" and family in ("mlp", "linear")

    def generate(self, x=None):
        """Every agent's (W, b); None for per-sample weights, which forward() makes from x."""
        return None if self.per_sample else self.generator()

    def forward(self, x, params=None):
        if params is None:
            params = self.generator(x if self.per_sample else None)
        return batched_mlp(x, params, self.activation)


def torch_default_init_(net) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases: DiCo's
    networks are torchrl MLPs, which keep it (no orthogonal init)."""
    with torch.no_grad():
        if isinstance(net, SharedNet):
            for layer in net.layers:
                layer.reset_parameters()
            return
        for weight, bias in zip(net.weights, net.biases):
            bound = weight.shape[1] ** -0.5
            weight.uniform_(-bound, bound)
            bias.uniform_(-bound, bound)


class DiCoMLP(nn.Module):
    """DiCo (Bettini et al. 2024) as its authors' code runs it (proroklab/ControllingBehavioralDiversity):
    pi_i(o) = shared(o) + (SND_des / SND_hat) * deviation_i(o).

    Gaussian actions: the shared network outputs a mean, squashed by tanh into the action box
    [-1, 1] (their process_shared), and a state-dependent std (torchrl's "biased_softplus_1.0":
    softplus(x + b) + 0.01 with softplus(b) = 0.99, so std 1 at x = 0); the per-agent deviation
    networks (nothing shared) output mean offsets only; actions follow a TanhNormal (Agent.squash).
    SND_hat is their running estimate: every forward pass with gradient (a training minibatch)
    moves it by tau = 0.01 (their config) toward the mean pairwise L2 distance between the deviation
    outputs, every agent's network applied to every agent's observation; the first value is the
    measured one (bootstrap_from_desired_snd: False); the gradient flows through the new term, the
    stored estimate is detached. Passes without gradient (rollouts, evaluation) use the stored value
    (ratio 1 before the first update). SND_des = -1: ratio 1 (unconstrained); 0: ratio 0 (shared only).
    Discrete actions (not in the paper nor in DiCo's code): logits = shared + ratio * deviation.
    """

    TAU = 0.01
    STD_BIAS = math.log(math.expm1(0.99))  # softplus(STD_BIAS) + 0.01 = 1

    def __init__(self, args, n_agents, sizes, gains, activation, snd_des, discrete):
        super().__init__()
        act_dim = sizes[-1]
        self.shared = SharedNet(n_agents, list(sizes[:-1]) + [act_dim if discrete else 2 * act_dim], gains, use_id=False)
        self.deviation = IndependentNets(n_agents, sizes, gains)
        torch_default_init_(self.shared)
        torch_default_init_(self.deviation)
        self.activation, self.snd_des, self.discrete = activation, snd_des, discrete
        self.register_buffer("snd_hat", torch.tensor(float("nan")))  # in the checkpoint with the weights

    def generate(self, x=None):
        return self.shared(), self.deviation()

    def deviation_snd(self, x, deviation_params) -> torch.Tensor:
        """Mean pairwise L2 distance between the agents' deviation outputs on all observations of x."""
        n = x.shape[0]
        outputs = batched_mlp(x.reshape(1, -1, x.shape[-1]).expand(n, -1, -1), deviation_params, self.activation)
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        return torch.linalg.vector_norm(outputs[i] - outputs[j], dim=-1).mean()

    # Eager under --compile: a compiled backward would read SND_hat after the in-place update below
    # (torch 2.13; measured: first-minibatch gradients off by up to 140%).
    @torch.compiler.disable
    def scaling_ratio(self, x, deviation_params, update_estimate=True):
        if self.snd_des <= 0:
            return 0.0 if self.snd_des == 0 else 1.0
        estimate = self.snd_hat
        # torch.where, not `if`: a Python test of a CUDA value would sync every rollout step and minibatch
        if torch.is_grad_enabled():
            measured = self.deviation_snd(x, deviation_params)
            estimate = torch.where(self.snd_hat.isnan(), measured, (1 - self.TAU) * self.snd_hat + self.TAU * measured)
            if update_estimate:
                self.snd_hat.copy_(estimate.detach())
        return torch.where(estimate.isnan(), 1.0, self.snd_des / estimate)

    def forward(self, x, params=None, update_estimate=True):
        shared_params, deviation_params = params if params is not None else self.generate()
        out = batched_mlp(x, shared_params, self.activation)
        if not self.discrete:
            loc, pre_std = out.chunk(2, -1)
            out = torch.tanh(loc)  # process_shared
            std = F.softplus(pre_std + self.STD_BIAS) + 0.01
        ratio = self.scaling_ratio(x, deviation_params, update_estimate)
        if not (isinstance(ratio, float) and ratio == 0.0):
            out = out + ratio * batched_mlp(x, deviation_params, self.activation)
        return out if self.discrete else (out, std)


def dico_action_space_loss(agent, obs: torch.Tensor) -> torch.Tensor:
    """DiCo's extra loss (their ActionSpaceLoss callback, own Adam): the squared largest (over agents)
    L2 overflow of the Gaussian mean outside the action box [-1, 1], averaged over the minibatch."""
    loc, _ = agent.actor(obs, update_estimate=False)
    overflow = torch.linalg.vector_norm(loc - loc.detach().clamp(-1.0, 1.0), dim=-1)
    return overflow.max(0).values.square().mean()


def critic_input(obs: torch.Tensor) -> torch.Tensor:
    """MAPPO: every agent's critic sees the global state, (n_agents, batch, n_agents * obs_dim).

    VMAS has no global state: as in the paper it is the concatenation of all agents' observations
    of the same time step (agent-major data keeps them at the same batch index).
    """
    n, batch, obs_dim = obs.shape
    state = obs.transpose(0, 1).reshape(batch, n * obs_dim)
    return state.unsqueeze(0).expand(n, -1, -1)


class Agent(nn.Module):
    """Every agent's actor and critic."""

    def __init__(self, args: Args, obs_dim: int, act_dim: int, discrete: bool, critic_in_dim: int):
        super().__init__()
        n = args.n_agents
        activation = torch.relu if args.activation == "relu" else torch.tanh
        actor_sizes = [obs_dim] + list(args.actor_hidden_dims) + [act_dim]
        critic_sizes = [critic_in_dim] + list(args.critic_hidden_dims) + [1]
        actor_gains = [np.sqrt(2)] * len(args.actor_hidden_dims) + [0.01]
        critic_gains = [np.sqrt(2)] * len(args.critic_hidden_dims) + [1.0]
        # DiCo's TanhNormal: the stored action is the Gaussian sample u, the environment gets tanh(u).
        self.discrete, self.squash = discrete, args.hypernet == "dico" and not discrete
        if args.hypernet == "dico":
            self.actor = DiCoMLP(args, n, actor_sizes, actor_gains, activation, args.dico_snd_des, discrete)
            # BenchMARL's IPPO (DiCo's config) gives every agent its own critic; its MAPPO shares one
            # centralised critic (here with a one-hot ID, since rewards are per agent).
            centralised = critic_in_dim != obs_dim
            self.critic = PerAgentMLP(args, "fups" if centralised else "nops", n, critic_sizes, critic_gains, activation)
            torch_default_init_(self.critic.generator)
        else:
            self.actor = PerAgentMLP(args, args.hypernet, n, actor_sizes, actor_gains, activation)
            self.critic = PerAgentMLP(args, args.hypernet, n, critic_sizes, critic_gains, activation)
        if not discrete and args.hypernet != "dico":  # state-independent log-std, per agent only for NoPS
            self.actor_logstd = nn.Parameter(torch.zeros(n if args.hypernet == "nops" else 1, 1, act_dim))

    def actor_parameters(self):
        params = list(self.actor.parameters())
        return params + ([self.actor_logstd] if hasattr(self, "actor_logstd") else [])

    def env_action(self, action):
        return torch.tanh(action) if self.squash else action

    def generate(self):
        """Every agent's weights, generated once and reused for a whole rollout or minibatch."""
        return self.actor.generate(), self.critic.generate()

    def get_value(self, critic_x, params=None):
        return self.critic(critic_x, None if params is None else params[1]).squeeze(-1)

    def policy(self, x, params=None):
        """Logits (discrete) or (mean, std) (continuous), each (n_agents, batch, act)."""
        out = self.actor(x, None if params is None else params[0])
        if self.discrete or isinstance(out, tuple):  # DiCo's std comes from its shared network
            return out
        return out, self.actor_logstd.exp().expand_as(out)

    def get_action_and_value(self, x, action=None, params=None):
        dist = self.policy(x, params)
        if action is None:
            action = sample_action(dist, self.discrete)
        logprob, entropy = log_prob_entropy(dist, action, self.discrete)
        if self.squash:  # TanhNormal: minus log|d tanh(u)/du|; the entropy is its one-sample estimate at u
            log_jacobian = (2 * (math.log(2.0) - action - F.softplus(-2 * action))).sum(-1)
            logprob, entropy = logprob - log_jacobian, entropy + log_jacobian.detach()
        return action, logprob, entropy, self.get_value(critic_input(x), params)

    def act_deterministic(self, x, params=None):
        dist = self.policy(x, params)
        return dist.argmax(-1) if self.discrete else dist[0]


def sample_action(dist, discrete: bool, generator=None) -> torch.Tensor:
    if discrete:  # Gumbel-max: a categorical sample without building a Distribution object
        uniform = torch.rand(dist.shape, generator=generator, dtype=dist.dtype, device=dist.device)
        return torch.argmax(dist - torch.log(-torch.log(uniform)), dim=-1)
    mean, std = dist
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)


def log_prob_entropy(dist, action, discrete: bool):
    if discrete:
        logp = torch.log_softmax(dist, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy
    mean, std = dist
    log_std = torch.log(std)
    logprob = (-((action - mean) ** 2) / (2 * std**2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)
    return logprob, entropy


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


def bootstrap_values(agent, final_obs, truncated, params) -> torch.Tensor:
    """V(final observation) where an episode reached its time limit, 0 elsewhere, (T, n_agents, E):
    the critic runs once after the rollout, on those steps only (a termination bootstraps from 0)."""
    values = torch.zeros(final_obs.shape[:3], device=final_obs.device)
    t, e = truncated[:, 0].nonzero(as_tuple=True)  # one host sync per rollout
    if len(t):
        x = final_obs[t, :, e].transpose(0, 1)  # (n_agents, ended, obs_dim)
        values[t, :, e] = agent.get_value(critic_input(x), params).T
    return values


def ppo_loss(agent, params, mb: dict, args: Args):
    """CleanRL's clipped surrogate, clipped value loss and entropy bonus, kept per agent."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], mb["actions"], params)
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    advantages = mb["advantages"]
    if args.norm_adv:
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
    stats = dict(policy_loss=pg_loss_per_agent.mean(), value_loss=v_loss, entropy=entropy_per_agent.mean(),
                 old_approx_kl=old_approx_kl, approx_kl=approx_kl, clipfrac=clipfrac)
    return loss, actor_loss_per_agent, stats


def clip_grad_norm(params, norms, max_norm: float) -> None:
    """nn.utils.clip_grad_norm_ from the per-tensor norms already computed for the metrics (the same
    global norm and result); unconditional, so that it never waits for the GPU (a factor of 1 is exact)."""
    total_norm = torch.linalg.vector_norm(torch.stack(norms))
    nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)


def gradient_step(agent, mb: dict, args: Args):
    """One minibatch: generate the weights, the loss, its gradient and the paper's gradient variance
    over the actor's gradient, then the clip (the optimiser steps after). With --compile this is
    what torch.compile fuses: on a GPU the eager step is thousands of tiny kernel launches."""
    params = agent.generate()
    loss, _, stats = ppo_loss(agent, params, mb, args)
    loss.backward()
    actor_ids = {id(p) for p in agent.actor_parameters()}
    with_grad = [p for p in agent.parameters() if p.grad is not None]
    norms = [torch.linalg.vector_norm(p.grad) for p in with_grad]  # one pass, for metrics and clip
    actor_grads = [(p.grad, norm) for p, norm in zip(with_grad, norms) if id(p) in actor_ids]
    variance, norm = gradient_variance_and_norm(*zip(*actor_grads))
    clip_grad_norm(with_grad, norms, args.max_grad_norm)
    return loss.detach(), stats, variance, norm


def interference_of(agent, mb: dict, args: Args) -> float:
    """The gradient-interference metric on the first --interference-samples of a minibatch (eager:
    its batched per-agent gradients stay outside --compile); DiCo's SND_hat is left as it was."""
    subset = {key: value[:, : args.interference_samples] for key, value in mb.items()}
    snd_hat = getattr(agent.actor, "snd_hat", None)
    saved = None if snd_hat is None else snd_hat.clone()
    interference = gradient_interference(ppo_loss(agent, agent.generate(), subset, args)[1], agent.actor_parameters())
    if saved is not None:
        snd_hat.copy_(saved)
    return interference


def ppo_update(agent, optimizer, batch: dict, args: Args, batch_size: int, action_optimizer=None, step=gradient_step):
    """update_epochs passes over the rollout in minibatches; weights are generated once per minibatch.
    action_optimizer (DiCo, Gaussian actions): after each minibatch's PPO step, one step of DiCo's
    action-space loss with its own Adam and the same gradient clip, as their callback does.
    step: gradient_step, or its torch.compile'd version."""
    minibatch_size = batch_size // args.num_minibatches
    grad_vars, grad_norms, totals = [], [], {}
    finite = torch.ones((), dtype=torch.bool, device=batch["obs"].device)
    for epoch in range(args.update_epochs):
        order = torch.randperm(batch_size, device=batch["obs"].device)
        for start in range(0, batch_size, minibatch_size):
            idx = order[start: start + minibatch_size]
            mb = {key: value[:, idx] for key, value in batch.items()}
            if epoch == 0 and start == 0:  # part of one minibatch per update is enough for this metric
                interference = interference_of(agent, mb, args)
            optimizer.zero_grad()
            loss, stats, variance, norm = step(agent, mb, args)
            optimizer.step()
            finite &= torch.isfinite(loss)  # checked once, after the update: no host sync per minibatch
            grad_vars.append(variance)
            grad_norms.append(norm)
            if action_optimizer is not None:
                stats["dico_action_loss"] = action_loss = dico_action_space_loss(agent, mb["obs"])
                action_optimizer.zero_grad()
                action_loss.backward()
                nn.utils.clip_grad_norm_(agent.actor.parameters(), args.max_grad_norm)
                action_optimizer.step()
            for key, value in stats.items():
                totals[key] = value.detach()
    if not finite:
        raise FloatingPointError("loss is not finite")
    totals["actor_var"] = torch.stack(grad_vars).mean()
    totals["actor_norm"] = torch.stack(grad_norms).mean()
    return {key: float(value) for key, value in totals.items()} | {"interference": interference}


# ===== 7. Checkpoints =====
CHECKPOINT_FORMAT = "hypermarl-mappo-vmas/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: reported as one line, exit status 2."""


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_snd_obs(path: str, obs_dim: int):
    """The observations of an SND dataset (.npz, key obs) as an (N, obs_dim) tensor, or why not (a str)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("a .npy array, not an .npz archive")
        with data:
            obs = np.asarray(data["obs"], dtype=np.float32)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:  # EOFError: an empty file
        return f"{path!r} is not an .npz file with an obs array ({str(error).splitlines()[0][:120]})"
    if obs.ndim not in (2, 3) or obs.shape[-1] != obs_dim or obs.size == 0:
        return f"{path!r} holds observations of shape {obs.shape}; this scenario's have {obs_dim} features"
    if not np.isfinite(obs).all():
        return f"{path!r} holds non-finite observations"
    return torch.from_numpy(obs.reshape(-1, obs_dim))


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
    required = {"format", "args", "run_name", "model", "optimizer", "env", "rng", "global_step", "iteration"}
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


def evaluate(agent, eval_env: VmasEnv, initial_rng: list, args: Args, seed: int, snd_obs=None, keep_obs=False,
             video=None):
    """Episodes on the evaluation environment, which starts from the same random state every time
    (so evaluations differ only by the policy), with the mode or, --eval-deterministic False, with
    actions sampled from a generator seeded with seed (so evaluation never touches the training RNG).
    Then SND (Eq. 9) on snd_obs (an (N, obs_dim) tensor, appendix D.1.2's shared dataset) or on
    --snd-samples of the episodes' observations. Returns (mean return, per-agent returns, SND,
    with keep_obs the episodes' observations (N, n_agents, obs_dim), else None). A list as video
    receives the frames of the first episode (rendering draws no random numbers)."""
    eval_env._rng = list(initial_rng)
    obs = eval_env.reset()
    n, num_envs = args.n_agents, eval_env.num_envs
    returns = torch.zeros(n, num_envs, device=obs.device)
    active = torch.ones(num_envs, dtype=torch.bool, device=obs.device)
    seen = []
    generator = torch.Generator(device=obs.device).manual_seed(seed)
    if video is not None:
        video.append(eval_env.env.render(mode="rgb_array", env_index=0))
    with torch.no_grad():
        params = agent.generate()
        for _ in range(args.max_steps):
            seen.append(obs[:, active])
            if args.eval_deterministic:
                action = agent.act_deterministic(obs, params)
            else:
                action = sample_action(agent.policy(obs, params), agent.discrete, generator)
            obs, reward, terminated, truncated, _ = eval_env.step(agent.env_action(action))
            if video is not None and active[0] and not (terminated[0] or truncated[0]):  # else it is reset
                video.append(eval_env.env.render(mode="rgb_array", env_index=0))
            returns += reward * active
            active &= ~(terminated | truncated)
            if not active.any():
                break
        if snd_obs is None:
            pool = torch.cat([step.reshape(-1, step.shape[-1]) for step in seen])
            pool = pool[torch.randperm(pool.shape[0], generator=generator, device=obs.device)[: args.snd_samples]]
        else:  # the episodes' own observations are not needed: no copy of them
            pool = snd_obs.to(obs.device)
        snd = 0.0
        for chunk in pool.split(10_000):  # chunks keep a million-observation dataset in memory
            # Eq. (9) evaluates every agent's policy on the same observations.
            dist = agent.policy(chunk.expand(n, -1, -1), params)
            snd += system_neural_diversity(dist, agent.discrete, args.snd_gaussian_samples, generator) * len(chunk)
        snd /= pool.shape[0]
    episodes_obs = torch.cat(seen, 1).transpose(0, 1) if keep_obs else None
    return returns.mean(0).mean().item(), returns.mean(1).tolist(), snd, episodes_obs


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
            if args.anneal_lr and any(change.startswith("--total-timesteps") for change in changes):
                raise ArgError("--total-timesteps: the run anneals its learning rate over its budget (--anneal-lr); "
                               "a new budget would change the schedule")
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
            problem = extras.probe_capture_video("vmas")
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
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    try:
        envs = VmasEnv(args, args.num_envs, args.seed, device) if not args.eval_only else None
        eval_env = VmasEnv(args, args.eval_episodes, args.seed + 10_000, device)
    except ArgError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    eval_rng = list(eval_env._rng)
    obs_dim, act_dim, discrete = eval_env.obs_dim, eval_env.act_dim, eval_env.discrete
    critic_in_dim = critic_input(torch.zeros(args.n_agents, 1, obs_dim)).shape[-1]
    agent = Agent(args, obs_dim, act_dim, discrete, critic_in_dim).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)

    # DiCo's action-space loss has its own Adam (their callback: lr 3e-5, torch's default eps).
    action_optimizer = torch.optim.Adam(agent.actor.parameters(), lr=3e-5) if agent.squash else None
    # --compile: the two functions that run thousands of times per iteration (the optimiser step stays
    # eager: fused Adam is already one kernel, and a compiled one would recompile whenever --anneal-lr moves lr).
    policy_step, update_step = agent.get_action_and_value, gradient_step
    if args.compile:
        torch._inductor.config.fallback_random = True  # eager's random numbers: the actions of an eager run
        policy_step, update_step = torch.compile(policy_step), torch.compile(update_step)

    if args.eval_only:
        agent.load_state_dict(loaded["model"])
        snd_obs = None
        if args.snd_obs_file:
            snd_obs = load_snd_obs(args.snd_obs_file, obs_dim)
            if isinstance(snd_obs, str):
                print(f"error: --snd-obs-file: {snd_obs}", file=sys.stderr)
                return 2
        video = [] if args.capture_video else None
        ret, per_agent, snd, _ = evaluate(agent, eval_env, eval_rng, args, args.seed + 10_000, snd_obs, video=video)
        print(f"eval/episodic_return={ret:.4f} diversity/snd={snd:.6f} per_agent={[round(r, 4) for r in per_agent]}")
        if video:
            path = os.path.join(args.runs_dir, new_run_folder(args.runs_dir, f"{loaded['run_name']}__eval"), "eval.mp4")
            extras.save_video(None, path, "eval/video", video, loaded["global_step"], 1 / eval_env.env.world.dt)
            print(f"video: {path}")
        return 0

    num_iterations = args.total_timesteps // batch_size
    n = args.n_agents
    global_step, start_iteration = 0, 1
    next_obs = envs.reset()
    if loaded is not None:
        agent.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        if action_optimizer is not None:
            action_optimizer.load_state_dict(loaded["action_optimizer"])
        envs.load_state_dict(loaded["env"])
        next_obs = envs.obs
        set_rng_state(loaded["rng"])
        global_step, start_iteration, run_name = loaded["global_step"], loaded["iteration"], loaded["run_name"]
        print(f"resume: {run_name} at step {global_step}" + (f"; changed: {', '.join(changes)}" if changes else ""))
    else:
        run_name = new_run_folder(args.runs_dir, f"vmas_{args.scenario}__{args.exp_name}__{args.hypernet}__{args.seed}")
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
    n_params = sum(p.numel() for p in agent.parameters())
    print(f"parameters: actor {sum(p.numel() for p in agent.actor_parameters())}, total {n_params}")

    # Rollout storage, time-major (T, n_agents, num_envs, ...)
    T, E = args.num_steps, args.num_envs
    obs = torch.zeros((T, n, E, obs_dim), device=device)
    actions = torch.zeros((T, n, E) + (() if discrete else (act_dim,)), device=device,
                          dtype=torch.long if discrete else torch.float)
    logprobs = torch.zeros((T, n, E), device=device)
    rewards = torch.zeros((T, n, E), device=device)
    values = torch.zeros((T, n, E), device=device)
    final_obs = torch.zeros((T, n, E, obs_dim), device=device)  # differs from obs[t + 1] where an episode ended
    terminateds = torch.zeros((T, 1, E), device=device)
    truncateds = torch.zeros((T, 1, E), device=device)

    def capture_state(iteration):
        return dict(format=CHECKPOINT_FORMAT, args=dataclasses.asdict(args), run_name=run_name,
                    model=agent.state_dict(), optimizer=optimizer.state_dict(), env=envs.state_dict(),
                    rng=rng_state(), global_step=global_step, iteration=iteration,
                    action_optimizer=action_optimizer.state_dict() if action_optimizer else {})

    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signum
        print(f"\nsignal {signum}: saving a checkpoint and stopping", flush=True)

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    start_time, start_step, printed_at = time.time(), global_step, 0.0
    print(f"plan: {num_iterations - start_iteration + 1} iterations of {batch_size} steps ({E} envs x {T}) up to "
          f"step {num_iterations * batch_size:,}, evaluating every {args.eval_interval:,}; an estimate of the time "
          f"follows the first iteration", flush=True)
    next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
    next_save = (global_step // args.save_interval + 1) * args.save_interval
    exit_code, next_iteration = 0, start_iteration
    try:
        for iteration in range(start_iteration, num_iterations + 1):
            if stop["signal"] is not None:  # between iterations the state is consistent: save it
                break
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            rollout_start = time.perf_counter()
            with torch.no_grad():
                params = agent.generate()  # the parameters do not change during a rollout
                for step in range(T):
                    global_step += E
                    obs[step] = next_obs
                    action, logprob, _, value = policy_step(next_obs, params=params)
                    values[step], actions[step], logprobs[step] = value, action, logprob
                    next_obs, reward, terminated, truncated, final_obs[step] = envs.step(agent.env_action(action))
                    rewards[step], terminateds[step, 0], truncateds[step, 0] = reward, terminated, truncated
                dones = torch.maximum(terminateds, truncateds)
                next_values = torch.cat([values[1:], agent.get_value(critic_input(next_obs), params).unsqueeze(0)])
                next_values = torch.where(dones.bool(), bootstrap_values(agent, final_obs, truncateds, params), next_values)
                advantages, returns = compute_gae(rewards, values, next_values, terminateds, dones,
                                                  args.gamma, args.gae_lambda)

            def agent_major(x):  # (T, n, E, ...) -> (n, T * E, ...)
                return x.transpose(0, 1).reshape((n, T * E) + x.shape[3:])

            batch = dict(obs=agent_major(obs), actions=agent_major(actions),
                         logprobs=agent_major(logprobs), advantages=agent_major(advantages),
                         returns=agent_major(returns), values=agent_major(values))
            update_start = time.perf_counter()
            if iteration == start_iteration:  # an iteration can take minutes (Navigation on a CPU): say so early
                print(f"iteration {iteration}: rollout took {update_start - rollout_start:.1f} s; updating "
                      f"({args.update_epochs} epochs x {args.num_minibatches} minibatches)", flush=True)
            try:
                stats = ppo_update(agent, optimizer, batch, args, T * E, action_optimizer, update_step)
            except FloatingPointError:
                print(f"error: the loss became NaN/inf at update {iteration} (global step {global_step}); "
                      f"stopping. Last good checkpoint: {checkpoint_path if args.save_model else 'none (no --save-model)'}",
                      file=sys.stderr)
                exit_code = 1  # the checkpoint on disk (if any) is the last good one: leave it
                break

            update_end = time.perf_counter()
            # Logging (CleanRL names; perf/* splits the time between collection and update)
            writer.add_scalar("perf/rollout_seconds", update_start - rollout_start, global_step)
            writer.add_scalar("perf/update_seconds", update_end - update_start, global_step)
            ended = envs.take_ended_episodes()
            if ended:
                ended_returns, ended_length = ended
                writer.add_scalar("charts/episodic_return", sum(ended_returns) / n, global_step)
                for i in range(n):
                    writer.add_scalar(f"charts/episodic_return_agent{i}", ended_returns[i], global_step)
                writer.add_scalar("charts/episodic_length", ended_length, global_step)
            y_pred, y_true = values.flatten(), returns.flatten()
            var_y = torch.var(y_true)
            explained_var = float("nan") if var_y == 0 else float(1 - torch.var(y_true - y_pred) / var_y)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for key in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
                writer.add_scalar(f"losses/{key}", stats[key], global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            writer.add_scalar("grad/actor_var", stats["actor_var"], global_step)
            writer.add_scalar("grad/actor_norm", stats["actor_norm"], global_step)
            writer.add_scalar("grad/interference", stats["interference"], global_step)
            if args.hypernet == "dico" and args.dico_snd_des > 0:
                writer.add_scalar("diversity/dico_snd_hat", float(agent.actor.snd_hat), global_step)
            if "dico_action_loss" in stats:
                writer.add_scalar("losses/dico_action_loss", stats["dico_action_loss"], global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)

            line = None
            if global_step >= next_eval or iteration == num_iterations:
                next_eval = (global_step // args.eval_interval + 1) * args.eval_interval
                video = [] if args.capture_video else None
                eval_return, eval_per_agent, snd, _ = evaluate(agent, eval_env, eval_rng, args, args.seed + 10_000,
                                                               video=video)
                if video:
                    extras.save_video(writer, os.path.join(run_dir, "videos", f"eval_{global_step}.mp4"), "eval/video",
                                      video, global_step, 1 / eval_env.env.world.dt)
                writer.add_scalar("eval/episodic_return", eval_return, global_step)
                for i, value in enumerate(eval_per_agent):
                    writer.add_scalar(f"eval/episodic_return_agent{i}", value, global_step)
                writer.add_scalar("diversity/snd", snd, global_step)
                line = f"eval_return={eval_return:.3f} snd={snd:.4f}"
            elapsed = time.time() - start_time
            if line or iteration % args.print_interval == 0 or iteration == start_iteration or elapsed - printed_at >= 60:
                printed_at = elapsed
                train_return = f"{sum(ended[0]) / n:.3f}" if ended else "no_episode_ended"
                eta = elapsed / (global_step - start_step) * (num_iterations * batch_size - global_step)
                print(f"global_step={global_step} iteration={iteration}/{num_iterations} episodic_return={train_return} "
                      f"SPS={sps} elapsed={duration(elapsed)} eta={duration(eta)}" + (f" {line}" if line else ""), flush=True)
            if args.save_model and global_step >= next_save and iteration < num_iterations:
                next_save = (global_step // args.save_interval + 1) * args.save_interval
                save_checkpoint(checkpoint_path, capture_state(iteration + 1))
            next_iteration = iteration + 1
        if exit_code == 0 and (args.save_model or stop["signal"] is not None):
            save_checkpoint(checkpoint_path, capture_state(next_iteration))
            print(f"checkpoint: {checkpoint_path} (continue with --resume {checkpoint_path})")
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        writer.close()
        if args.track:
            wandb.finish()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
