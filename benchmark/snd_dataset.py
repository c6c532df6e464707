"""Build appendix D.1.2's shared SND dataset: observations from several checkpoints' rollouts.

The paper measures every method's SND on one dataset of observations, collected by rolling out
IPPO-NoPS and IPPO-FuPS checkpoints (5M and 20M steps) for 10,000 episodes each and sampling
1M observations from the pool. This script does the same for any checkpoints of one scenario:

    python benchmark/snd_dataset.py --checkpoints nops_5M.pt nops_20M.pt fups_5M.pt fups_20M.pt \
        --out snd_dispersion4.npz                    # 10,000 episodes each, 1M observations
    python ippo_hyper_vmas.py --eval-only --checkpoint mlp.pt --snd-obs-file snd_dispersion4.npz

Each checkpoint is rolled out with its script's `evaluate` (the scenario's evaluation mode; the
environment seeded with --seed), whose environment records what the policy saw. The file holds `obs`, (rows, n_agents, obs_dim): rows are whole
time steps (every agent's observation), --samples // n_agents of them drawn without replacement
from the pool, as the authors' code samples 1e6 // n_agents rows and flattens the agent axis. It also
holds `recipe`, what it was built from (JSON: the script, each checkpoint's path and SHA-256, the
episodes, samples and seed), by which `launch.py table3a` knows whether it may reuse the file.
"""

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import sys
import zipfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hypermarl_extras as extras  # noqa: E402
from sps import at_least, check_writable, script_args  # noqa: E402  (os.access alone says yes to root everywhere, /proc included)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line, exit status 2, nothing written."""

    def error(self, message):
        print(f"error: {message.removeprefix('argument ')}", file=sys.stderr)  # "error: --flag: ..."
        sys.exit(2)


def record_observations(env) -> list:
    """Wraps env's reset and step (on this instance): the returned list receives, at every step, the
    observations the policy acted on, (n_agents, episodes still running, obs_dim), as evaluate's loop
    sees them (an ended episode's environment is reset in place and no longer counts)."""
    seen, reset, step = [], env.reset, env.step
    running = {}

    def recording_reset():
        running["obs"] = reset()
        running["active"] = torch.ones(env.num_envs, dtype=torch.bool, device=env.device)
        return running["obs"]

    def recording_step(actions):
        seen.append(running["obs"][:, running["active"]])
        result = step(actions)  # (obs, reward, terminated, truncated, final_obs)
        running["obs"], running["active"] = result[0], running["active"] & ~(result[2] | result[3])
        return result

    env.reset, env.step = recording_reset, recording_step
    return seen


def rollout_observations(script, path: str, episodes: int, seed: int) -> torch.Tensor:
    """(N, n_agents, obs_dim) observations of `episodes` evaluation episodes of one checkpoint."""
    state = extras.load_checkpoint(path, "--checkpoints", script.CHECKPOINT_FORMAT,  # weights_only; one line
                                   script.CHECKPOINT_KEYS)
    saved = {k: v for k, v in state["args"].items() if k in {f.name for f in script.dataclasses.fields(script.Args)}}
    args = script.Args(**saved)
    args.eval_episodes, args.seed = episodes, seed
    env = script.VmasEnv(args, episodes, seed, torch.device("cpu"))
    agent = script.make_agent(args, env.obs_dim, env.act_dim, env.discrete)
    if where := extras.nonfinite(state["model"], agent.state_dict()):  # an edited or damaged file
        raise extras.CheckpointError(f"--checkpoints: {path!r} holds NaN or inf (in model/{where}): refused")
    agent.load_state_dict(state["model"])
    args.snd_samples = 1  # the SND of the rollout itself is not needed here
    seen = record_observations(env)
    script.evaluate(agent, env, args, seed)
    return torch.cat(seen, 1).transpose(0, 1)


def recipe(checkpoints: list, episodes: int, samples: int, seed: int, script: str = "ippo_hyper_vmas") -> dict:
    """What a dataset is built from; the same recipe makes the same file. A checkpoint is named by its
    contents too: a run continued to a larger budget keeps its path, not its weights or step."""
    def source(path):
        with open(path, "rb") as f:
            return {"path": os.path.abspath(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}

    return {"script": script, "checkpoints": [source(p) for p in checkpoints], "episodes": episodes,
            "samples": samples, "seed": seed}


def built_from(path: str):
    """The recipe a dataset holds, or None (no such file, or one without a recipe)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["recipe"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile):  # TypeError: a bare .npy
        return None


def save(path: str, obs, made_from: dict) -> None:
    """Through a temporary file: a file at path is always whole (table3a reuses it by its recipe)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:  # a file, not a name: numpy appends .npz to a name
            np.savez_compressed(f, obs=obs, recipe=np.array(json.dumps(made_from)))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="ippo_hyper_vmas", choices=["ippo_hyper_vmas", "mappo_hyper_vmas"])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints of one scenario")
    parser.add_argument("--episodes", type=at_least(1), default=10_000, help="episodes per checkpoint (paper: 10,000)")
    parser.add_argument("--samples", type=at_least(1), default=1_000_000, help="observations in the file (paper: 1M)")
    parser.add_argument("--seed", type=at_least(0, below=2**32), default=0, help="seed of the rollouts and of the sampling")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    opts = parser.parse_args(argv)
    for path in opts.checkpoints:
        if not os.path.isfile(path):
            parser.error(f"--checkpoints: no such file {path!r}")
    # Checked before the rollouts: numpy would append .npz to any other name, and a missing folder
    # would only fail after hours of rollouts.
    if not opts.out.endswith(".npz") or os.path.isdir(opts.out):
        parser.error(f"--out: must be an .npz file name, got {opts.out!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(opts.out))):
        parser.error(f"--out: no such folder {os.path.dirname(opts.out)!r}")
    check_writable(parser, "--out", os.path.dirname(os.path.abspath(opts.out)))
    script = __import__(opts.script)
    try:  # the script's own checks of so many episodes (its memory check), before the rollouts
        script_args(script, ["--eval-episodes", str(opts.episodes)])
    except ValueError as error:
        parser.error(f"--episodes: {error}")
    torch.manual_seed(opts.seed)
    pools = []
    try:
        for path in opts.checkpoints:
            pools.append(rollout_observations(script, path, opts.episodes, opts.seed))
            print(f"{path}: {pools[-1].shape[0]:,} time steps", flush=True)
    except (ValueError, RuntimeError, KeyError, TypeError, EOFError, OSError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:  # ValueError includes ArgError, CheckpointError, VmasEnv's --scenario
        why = extras.first_line(error, limit=1000 if isinstance(error, extras.ArgError) else 120)
        parser.error(why if isinstance(error, extras.ArgError) or why.startswith("--scenario ")
                     else f"--checkpoints: cannot load ({why})")
    if len({pool.shape[1:] for pool in pools}) != 1:
        parser.error(f"--checkpoints: observations of different shapes {sorted({tuple(p.shape[1:]) for p in pools})}")
    pool = torch.cat(pools)
    rows = min(pool.shape[0], max(1, opts.samples // pool.shape[1]))
    generator = torch.Generator().manual_seed(opts.seed)
    obs = pool[torch.randperm(pool.shape[0], generator=generator)[:rows]].numpy()
    save(opts.out, obs, recipe(opts.checkpoints, opts.episodes, opts.samples, opts.seed, opts.script))
    print(f"{opts.out}: obs {obs.shape} ({obs.shape[0] * obs.shape[1]:,} observations of {pool.shape[0]:,} time steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
