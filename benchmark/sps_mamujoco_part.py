"""SPS of mappo_hyper_mamujoco.py (to be merged into benchmark/sps.py by the lead).

measure_mamujoco(task, actor, num_envs, ...) returns
  random_sps: env-steps/s of the same vectorised environments (same AsyncVectorEnv, same
              SAME_STEP autoreset) stepped with uniformly random actions;
  train_sps:  env-steps/s of a full training run (rollout + updates), as charts/SPS;
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
sys.path.insert(0, ROOT)


def random_sps(task: str, num_envs: int, steps: int = 2000, async_envs: bool = True) -> float:
    import mappo_hyper_mamujoco as m

    args = m.Args(task=task, num_envs=num_envs, async_envs=async_envs)
    envs = m.make_vector_env(args)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    acts = rng.uniform(low, high, size=(64, num_envs, *low.shape)).astype(np.float32)
    for k in range(20):  # warm-up
        envs.step(acts[k % 64])
    t = time.perf_counter()
    for k in range(steps):
        envs.step(acts[k % 64])
    dt = time.perf_counter() - t
    envs.close()
    return steps * num_envs / dt


def train_sps(task: str, actor: str = "mlp", num_envs: int = 4, total_timesteps: int = 20000,
              extra=()) -> float:
    """SPS of a training run, from its last `SPS=` line (wall time after start-up)."""
    cmd = [sys.executable, os.path.join(ROOT, "mappo_hyper_mamujoco.py"), "--task", task,
           "--actor", actor, "--num-envs", str(num_envs), "--total-timesteps", str(total_timesteps),
           "--eval-interval", "0", "--eval-episodes", "1", *extra]
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(cmd, cwd=d, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if " SPS=" in ln][-1]
    return float(line.split(" SPS=")[1].split()[0])


def measure_mamujoco(task="HalfCheetah-2x3", actor="mlp", num_envs=4, total_timesteps=20000, extra=()):
    r = random_sps(task, num_envs)
    s = train_sps(task, actor, num_envs, total_timesteps, extra)
    return {"task": task, "actor": actor, "num_envs": num_envs, "random_sps": r, "train_sps": s,
            "ratio": s / r}


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    res = measure_mamujoco("HalfCheetah-2x3", "mlp", 4, 10000 if quick else 40000)
    print(f"HalfCheetah-2x3 mlp: train {res['train_sps']:.0f} / random {res['random_sps']:.0f} "
          f"= {res['ratio']:.2f}x (target >= 0.5)")
    steps = 4000 if quick else 20000
    h = train_sps("Humanoid-17x1", "mlp", 4, steps)
    i = train_sps("Humanoid-17x1", "ind", 4, steps)
    print(f"Humanoid-17x1: mlp {h:.0f} / ind {i:.0f} = {h / i:.2f}x (target >= 0.9)")
