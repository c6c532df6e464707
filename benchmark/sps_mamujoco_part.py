"""SPS of mappo_hyper_mamujoco.py, for the lead to merge into benchmark/sps.py.

measure_mamujoco(task, actor, ...) returns
  random_sps: env-steps/s of the same vectorised environments (the same make_vector_env: AsyncVectorEnv
              worker processes, SAME_STEP autoreset) stepped with uniformly random actions;
  train_sps:  env-steps/s of a training run (rollout + updates, as charts/SPS), read from its last
              progress line;
  ratio:      train_sps / random_sps.
Targets (issue 5): ratio >= 0.5 for HalfCheetah-2x3 on 2 cores; HyperMARL MLP vs independent
actors at 17 agents (Humanoid-17x1) >= 0.9.

Usage: python benchmark/sps_mamujoco_part.py [--quick]
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_sps(task: str, num_envs: int = 4, steps: int = 2000, async_envs: bool = True) -> float:
    sys.path.insert(0, ROOT)
    import mappo_hyper_mamujoco as mj

    envs = mj.make_vector_env(mj.Args(task=task, num_envs=num_envs, async_envs=async_envs))
    envs.reset(seed=0)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    actions = np.random.default_rng(0).uniform(low, high, (64, num_envs) + low.shape).astype(np.float32)
    for k in range(20):  # warm-up
        envs.step(actions[k % 64])
    start = time.perf_counter()
    for k in range(steps):
        envs.step(actions[k % 64])
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed


def train_sps(task: str, actor: str = "mlp", algo: str = "mappo", num_envs: int = 4,
              total_timesteps: int = 20000, extra=()) -> float:
    """charts/SPS of a training run (the SPS on the last progress line, measured before its evaluation)."""
    cmd = [sys.executable, os.path.join(ROOT, "mappo_hyper_mamujoco.py"), "--task", task, "--actor", actor,
           "--algo", algo, "--num-envs", str(num_envs), "--total-timesteps", str(total_timesteps),
           "--eval-interval", str(10 * total_timesteps), "--eval-episodes", "1", "--no-cuda", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if " SPS=" in ln][-1]
    return float(line.split(" SPS=")[1].split()[0])


def measure_mamujoco(task="HalfCheetah-2x3", actor="mlp", algo="mappo", num_envs=4, total_timesteps=20000, extra=()):
    r = random_sps(task, num_envs)
    s = train_sps(task, actor, algo, num_envs, total_timesteps, extra)
    return dict(task=task, actor=actor, algo=algo, num_envs=num_envs, random_sps=r, train_sps=s, ratio=s / r)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    steps = 10_000 if quick else 40_000
    for extra in ((), ("--update-epochs", "5", "--critic-epochs", "5")):
        res = measure_mamujoco("HalfCheetah-2x3", "mlp", "mappo", 4, steps, extra)
        print(f"HalfCheetah-2x3 mlp {' '.join(extra) or '(Table 20: 15+15 epochs)'}: train {res['train_sps']:.0f} "
              f"/ random {res['random_sps']:.0f} = {res['ratio']:.2f}x (target >= 0.5)", flush=True)
    steps = 4_000 if quick else 20_000
    mlp = train_sps("Humanoid-17x1", "mlp", "mappo", 4, steps)
    ind = train_sps("Humanoid-17x1", "ind", "mappo", 4, steps)
    print(f"Humanoid-17x1 (17 agents): HyperMARL mlp {mlp:.0f} / ind {ind:.0f} = {mlp / ind:.2f}x (target >= 0.9)")
