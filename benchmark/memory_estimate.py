"""The memory check of the training scripts against real runs: each script refuses a run whose
memory_needed(args) exceeds the machine's (--no-memory-check tries anyway). That estimate is meant
as a lower bound, so that no run that fits is refused; this measures it.

Each configuration runs one short training (one iteration or a few updates, with its evaluation) in a
child process; the memory it used is the process's peak resident set during the run (Linux's VmHWM,
reset before it) minus its resident set before it (imports, interpreter). Ratio = used / estimated: at least 1 means the bound holds.
MaMuJoCo runs with --no-async-envs (its environments in the process, 1 MiB each); a worker
process's own memory (8 MiB in the estimate) is measured apart, from /proc/<pid>/smaps_rollup.

    python benchmark/memory_estimate.py                    # every configuration (about 21 minutes on 2 cores)
    python benchmark/memory_estimate.py --out results.md   # also write the table
"""

import argparse
import json
import os
import subprocess
import sys
import time

from sps import OneLineParser, check_out_file, write_report  # benchmark/ is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    ("ippo_hyper_vmas", "--n-agents 64 --total-timesteps 2048"),
    ("ippo_hyper_vmas", "--n-agents 16 --num-envs 256 --total-timesteps 32768"),
    ("ippo_hyper_vmas", "--n-agents 8 --hypernet linear --num-envs 64 --total-timesteps 8192"),
    ("ippo_hyper_vmas", "--n-agents 32 --hypernet nops --total-timesteps 2048"),
    ("ippo_hyper_vmas", "--n-agents 8 --hypernet-input agent+obs --num-envs 32 --total-timesteps 4096"),
    ("ippo_hyper_vmas", "--scenario navigation --n-agents 8 --num-envs 600 --num-steps 100 --total-timesteps 60000"),
    ("mappo_hyper_vmas", "--n-agents 32 --total-timesteps 2048"),
    ("mappo_hyper_vmas", "--n-agents 16 --hypernet nops --num-envs 64 --total-timesteps 8192"),
    ("mappo_hyper_vmas", "--n-agents 48 --hypernet fups --total-timesteps 2048"),
    ("mappo_hyper_vmas", "--n-agents 8 --hypernet dico --num-envs 64 --total-timesteps 8192"),
    ("mappo_hyper_mamujoco", "--task Humanoid-17x1 --num-envs 4 --num-steps 100 --total-timesteps 400 --eval-episodes 4"),
    ("mappo_hyper_mamujoco", "--task Humanoid-17x1 --hypernet-input agent+obs --num-envs 2 --num-steps 100 "
                             "--total-timesteps 200 --eval-episodes 2"),
    ("mappo_hyper_mamujoco", "--task Ant-4x2 --algo happo --num-envs 8 --num-steps 200 --total-timesteps 1600"),
    ("reinforce_matrix_games", "--n-agents 300 --hypernet nops --num-trials 50"),
    ("reinforce_matrix_games", "--n-agents 200 --hypernet linear --num-trials 50 --num-seeds 2"),
    ("reinforce_matrix_games", "--n-agents 128 --hypernet fups --num-trials 50"),
    ("ippo_hyper_smax", "--map 2s3z --total-timesteps 16384"),
    ("ippo_hyper_smax", "--map smacv2_20_units --hypernet nops --num-envs 64 --total-timesteps 8192"),
    ("mappo_hyper_smax", "--map 3s5z --total-timesteps 16384"),
    ("mappo_hyper_smax", "--map smacv2_10_units --hypernet fups --num-envs 64 --total-timesteps 8192"),
]
FAST = {"ippo_hyper_vmas": "--update-epochs 1", "mappo_hyper_vmas": "--update-epochs 1",
        "mappo_hyper_mamujoco": "--no-async-envs --update-epochs 1 --critic-epochs 1", "reinforce_matrix_games": "",
        "ippo_hyper_smax": "--update-epochs 1", "mappo_hyper_smax": "--update-epochs 1"}

# The child: the script's estimate for argv, then main(argv); prints one JSON line.
CHILD = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import importlib, torch
script = importlib.import_module(sys.argv[2])
argv = sys.argv[4:]
torch.set_num_threads(1)
if sys.argv[2] == "reinforce_matrix_games":
    import tyro
    estimate = script.memory_needed(tyro.cli(script.Args, args=argv))
else:  # by part
    estimate = sum(script.memory_needed(script.parse_args(argv, script.flags_given(argv))).values())
def status(key):  # bytes
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024
with open("/proc/self/clear_refs", "w") as f:  # "5": the peak resident set (VmHWM) starts again from now
    f.write("5")
before = status("VmRSS:")
with contextlib.redirect_stdout(io.StringIO()):
    code = script.main(argv + ["--runs-dir", sys.argv[3], "--no-memory-check"])
used = status("VmHWM:") - before
print(json.dumps(dict(code=code, estimate=estimate, used=used)))
"""


def measure(name: str, flags: str, runs_dir: str) -> dict:
    argv = [*flags.split(), *FAST[name].split()]
    done = subprocess.run([sys.executable, "-c", CHILD, ROOT, name, runs_dir, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {name} {flags}: the run failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_memory() -> float:
    """MiB of its own (private) memory a MaMuJoCo worker process holds at its peak (Humanoid-17x1)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import mappo_hyper_mamujoco as mj, gymnasium as gym, time\n"
            "envs = mj.make_vector_env(mj.Args(task='Humanoid-17x1', num_envs=2)); envs.reset(seed=0)\n"
            "for _ in range(200): envs.step(envs.action_space.sample())\n"
            "print(*[p.pid for p in envs.processes]); sys.stdout.flush(); time.sleep(3); envs.close()")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = child.stdout.readline().split()
    private = []
    for pid in pids:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:])
        private.append(sum(int(fields[key].split()[0]) for key in ("Private_Clean", "Private_Dirty")) / 1024)
    child.wait()
    return min(private)


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    opts = parser.parse_args(argv)
    if opts.out:
        check_out_file(parser, opts.out)  # before the runs, not after them
    runs_dir = os.path.join("/tmp", f"memory_estimate_{os.getpid()}")
    lines = ["# The memory check's estimate against real runs", "",
             "`python benchmark/memory_estimate.py --out benchmark/results/memory_estimate.md` "
             f"({time.strftime('%Y-%m-%d')}, torch {torch_version()}, {os.cpu_count()} CPU cores). Used: the peak resident set "
             "of the run's process during the run (VmHWM, reset before it) minus its resident set before the run; a ratio of at least 1 means the estimate is a lower "
             "bound, as the check needs (a run that fits is never refused).", "",
             "| script | flags | estimate (MiB) | used (MiB) | used / estimate |", "|-|-|-|-|-|"]
    start = time.time()
    for name, flags in CONFIGS:
        result = measure(name, flags, runs_dir)
        lines.append(f"| {name} | `{flags}` | {result['estimate'] / 2**20:,.0f} | {result['used'] / 2**20:,.0f} | "
                     f"{result['used'] / result['estimate']:.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"\nThe flags each run also had: {FAST}; every run `--no-memory-check`.")
    lines.append(f"\nA MaMuJoCo worker process's own memory: {worker_memory():.1f} MiB (the estimate counts 8).")
    print(lines[-1])
    print(f"({time.time() - start:.0f} s)")
    if opts.out:
        write_report(opts.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
