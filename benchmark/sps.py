"""Training speed (env-steps/s) of the scripts, and its ratios between families and to random actions.

Every measurement runs the real script in its own process and reads its per-iteration timings
(perf/rollout_seconds + perf/update_seconds in TensorBoard) for iterations 2.. (the first warms
up); a run's SPS is batch * iterations / their total time. Each configuration runs --repeats
times, interleaved with the others so that machine noise spreads evenly; tables give the median
and the ratio of medians.

    python benchmark/sps.py                  # everything (about 1.5 hours on 2 cores: 64 agents alone take 50 min)
    python benchmark/sps.py --only dispersion navigation
    python benchmark/sps.py --quick          # 1 repeat, fewer iterations: a smoke test

Writes sps.md (and prints it) to a new folder runs/sps_<time>, or to the file --out names.
"""

import argparse
import contextlib
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VMAS_SCRIPTS = ("ippo_hyper_vmas", "mappo_hyper_vmas")
FAMILIES = ("mlp", "linear", "nops", "fups")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the repository's convention for bad input: one line, exit status 2."""

    def error(self, message):
        print(f"error: {message.removeprefix('argument ')}", file=sys.stderr)  # "error: --flag: ..."
        sys.exit(2)


def at_least(minimum):
    def parse(text):
        value = int(text)  # a ValueError here becomes argparse's "invalid value" message
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def check_writable(parser, flag, folder):
    """Fails now, not after the benchmark: the nearest existing folder on the way must be a
    folder this process may write into."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"{flag}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"{flag}: {existing!r} is not writable")


def new_output_folder(tool, parent="runs"):
    """parent/<tool>_<time>[_k], never one that exists: mkdir is atomic, so two runs started in the
    same second get a folder each, and committed results are only written with an explicit --out."""
    os.makedirs(parent, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in itertools.count():
        path = os.path.join(parent, f"{tool}_{stamp}" + (f"_{k}" if k else ""))
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            return path


def output_file(parser, out, tool, filename):
    """--out if given (checked now, before any work), else filename in a new folder runs/<tool>_<time>."""
    if out is None:
        check_writable(parser, "--out", "runs")
        return os.path.join(new_output_folder(tool), filename)
    if os.path.isdir(out):
        parser.error(f"--out: {out!r} is a folder; give the name of the file to write")
    check_writable(parser, "--out", os.path.dirname(os.path.abspath(out)))
    return out


def timed_run(script, argv, iterations, batch):
    """One training run of script.py in its own process, evaluation off; returns the seconds of
    collection and of update of iterations 2.. (the first warms up), from its perf/* scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), *argv, "--runs-dir", tmp,
               "--total-timesteps", str(batch * iterations), "--eval-interval", str(10**12),
               "--eval-episodes", "1", "--print-interval", str(10**6)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        (run,) = os.listdir(tmp)
        accumulator = EventAccumulator(os.path.join(tmp, run))
        accumulator.Reload()
    rollout = [e.value for e in accumulator.Scalars("perf/rollout_seconds")]
    update = [e.value for e in accumulator.Scalars("perf/update_seconds")]
    return rollout[1:], update[1:]


def run_vmas(script, argv, iterations, batch):
    """One training run; returns (SPS over iterations 2.., update share of the time)."""
    rollout, update = timed_run(script, argv, iterations, batch)
    total = sum(rollout) + sum(update)
    return batch * len(rollout) / total, sum(update) / total


def random_action_sps(scenario_argv, steps, repeats):
    """The same VMAS environments (same wrapper, resets included) stepped with random actions."""
    import ippo_hyper_vmas as script

    args = script.resolve_args(script.parse_args(scenario_argv))
    results = []
    for repeat in range(repeats):
        env = script.VmasEnv(args, args.num_envs, repeat, torch.device("cpu"))
        env.reset()
        shape = (args.n_agents, args.num_envs) + (() if env.discrete else (env.act_dim,))
        start = time.perf_counter()
        for _ in range(steps):
            if env.discrete:
                action = torch.randint(0, env.act_dim, shape)
            else:
                action = torch.rand(shape) * 2 - 1
            env.step(action)
        results.append(steps * args.num_envs / (time.perf_counter() - start))
    return statistics.median(results)


def family_table(title, script_argv, batch, iterations, repeats, scripts=VMAS_SCRIPTS, families=FAMILIES):
    """SPS of every family, median over repeats, and each family's ratio to FuPS."""
    samples = {(s, f): [] for s in scripts for f in families}
    shares = {(s, f): [] for s in scripts for f in families}
    for _ in range(repeats):
        for s in scripts:
            for f in families:
                sps, share = run_vmas(s, script_argv + ["--hypernet", f], iterations, batch)
                samples[(s, f)].append(sps)
                shares[(s, f)].append(share)
    lines = [f"### {title}", "", f"`{' '.join(script_argv)}`, {iterations} iterations x {repeats} repeats", "",
             "| script | family | SPS (median) | ratio to fups | update share |", "|---|---|---|---|---|"]
    for s in scripts:
        base = statistics.median(samples[(s, "fups")])
        for f in families:
            median = statistics.median(samples[(s, f)])
            lines.append(f"| {s} | {f} | {median:,.0f} | {median / base:.2f} | "
                         f"{statistics.median(shares[(s, f)]):.0%} |")
    return lines + [""], samples


def end_to_end_table(script_argv, batch, iterations, repeats, samples):
    random_sps = random_action_sps(script_argv, 128 * max(iterations - 1, 1), repeats)
    lines = ["### End to end against random actions (Dispersion, paper settings)", "",
             f"random-action SPS of the same 16 environments: {random_sps:,.0f}", "",
             "| script | family | training SPS | ratio to random actions |", "|---|---|---|---|"]
    for (s, f), values in samples.items():
        median = statistics.median(values)
        lines.append(f"| {s} | {f} | {median:,.0f} | {median / random_sps:.2f} |")
    return lines + [""]


def mamujoco_tables(repeats, quick):
    """mappo_hyper_mamujoco.py: training against random actions, HyperMARL against independent actors."""
    import mappo_hyper_mamujoco as mj

    def random_sps(task, num_envs, steps, async_envs):
        envs = mj.make_vector_env(mj.Args(task=task, num_envs=num_envs, async_envs=async_envs))
        envs.reset(seed=0)
        low, high = envs.single_action_space.low, envs.single_action_space.high
        actions = np.random.default_rng(0).uniform(low, high, (64, num_envs) + low.shape).astype(np.float32)
        for k in range(100):
            envs.step(actions[k % 64])
        start = time.perf_counter()
        for k in range(steps):
            envs.step(actions[k % 64])
        elapsed = time.perf_counter() - start
        envs.close()
        return steps * num_envs / elapsed

    def train(task, actor, algo, num_envs, iterations, async_envs):
        """(SPS, collection and update microseconds per environment step) over iterations 2.."""
        batch = num_envs * 500
        argv = ["--task", task, "--actor", actor, "--algo", algo, "--num-envs", str(num_envs), "--num-steps", "500",
                "--async-envs" if async_envs else "--no-async-envs"]
        rollout, update = timed_run("mappo_hyper_mamujoco", argv, iterations, batch)
        steps = batch * len(rollout)
        return steps / (sum(rollout) + sum(update)), 1e6 * sum(rollout) / steps, 1e6 * sum(update) / steps

    iterations = 4 if quick else 12
    random_steps = 1000 if quick else 10_000
    lines = ["### MaMuJoCo (mappo_hyper_mamujoco.py), HalfCheetah-2x3, 4 environments", "",
             "HARL's HalfCheetah settings (15 actor and 15 critic full-batch epochs, [128, 128, 128] "
             "networks), 500 steps x 4 environments per iteration, the update on every core "
             "(`--update-threads`), collection on 1 thread. Times are per environment step.", "",
             "| actor | algo | vector env | training SPS | random-action SPS | ratio | collection µs | "
             "update µs | bound |", "|---|---|---|---|---|---|---|---|---|"]
    configs = [("mlp", "mappo", True), ("ind", "mappo", True), ("ind", "happo", True), ("fups", "mappo", True),
               ("mlp", "mappo", False), ("ind", "mappo", False)]
    results = {c: [] for c in configs}
    randoms = {True: [], False: []}
    for _ in range(repeats):
        for async_envs in (True, False):
            randoms[async_envs].append(random_sps("HalfCheetah-2x3", 4, random_steps, async_envs))
        for c in configs:
            results[c].append(train("HalfCheetah-2x3", c[0], c[1], 4, iterations, c[2]))
    for (actor, algo, async_envs), values in results.items():
        sps, roll, upd = (statistics.median(v) for v in zip(*values))
        rand = statistics.median(randoms[async_envs])
        env_us = 1e6 / rand
        lines.append(f"| {actor} | {algo} | {'async' if async_envs else 'sync'} | {sps:,.0f} | {rand:,.0f} | "
                     f"{sps / rand:.2f} | {roll:.0f} | {upd:.0f} | {env_us / (env_us + upd):.2f} |")
    lines += ["", "bound: the ratio if collection cost no more than random stepping, "
              "random µs / (random µs + update µs).", ""]
    humanoid = {"mlp": [], "ind": []}
    for _ in range(repeats):  # interleaved, like the configurations above
        for actor in humanoid:
            humanoid[actor].append(train("Humanoid-17x1", actor, "mappo", 4, iterations, True)[0])
    humanoid = {actor: statistics.median(values) for actor, values in humanoid.items()}
    lines += ["### MaMuJoCo, Humanoid-17x1 (17 agents), 4 environments", "", "| actor | SPS |", "|---|---|"]
    lines += [f"| {a} | {v:,.0f} |" for a, v in humanoid.items()]
    lines += ["", f"HyperMARL (mlp) / independent actors at 17 agents: {humanoid['mlp'] / humanoid['ind']:.2f}", ""]
    return lines


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["dispersion", "scale", "navigation", "mamujoco"],
                        choices=["dispersion", "scale", "navigation", "mamujoco"])
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=at_least(4), default=6,
                        help="iterations per run (the first is not timed; Navigation and 64 agents run half as many)")
    parser.add_argument("--out", default=None, help="the Markdown file to write (default: sps.md in a new folder runs/sps_<time>)")
    opts = parser.parse_args()
    opts.out = output_file(parser, opts.out, "sps", "sps.md")
    repeats = 1 if opts.quick else opts.repeats
    iterations = 3 if opts.quick else opts.iterations
    started = time.time()
    lines = ["# Training speed", "", f"Command: `python benchmark/sps.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU", ""]
    def save():
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out, "w") as f:
            f.write("\n".join(lines + [f"Benchmark time so far: {(time.time() - started) / 60:.1f} min", ""]))

    if "dispersion" in opts.only:
        for n in (4, 8):
            argv = ["--scenario", "dispersion", "--n-agents", str(n)]
            table, samples = family_table(f"Dispersion, {n} agents, paper settings (16 envs x 128 steps, "
                                          "4 epochs x 2 minibatches)", argv, 16 * 128, iterations, repeats)
            lines += table
            if n == 4:
                lines += end_to_end_table(argv, 16 * 128, iterations, repeats, samples)
            save()
    if "scale" in opts.only:
        argv = ["--scenario", "dispersion", "--n-agents", "64"]
        lines += family_table("Dispersion, 64 agents and 64 food, paper settings", argv, 16 * 128,
                              max(iterations // 2, 2), repeats)[0]
        save()
    if "navigation" in opts.only:
        # Paper settings (600 envs x 100 steps, 30 minibatches) with 3 epochs instead of 45 so a
        # run takes seconds, not minutes: the per-gradient-step cost, which decides the ratios, is the same.
        argv = ["--scenario", "navigation", "--n-agents", "8", "--update-epochs", "3"]
        lines += family_table("Navigation, 8 agents, paper settings but 3 epochs (not 45)", argv, 600 * 100,
                              max(iterations // 2, 2), repeats)[0]
        save()
        argv = ["--scenario", "navigation", "--n-agents", "8"]
        sps, share = run_vmas("ippo_hyper_vmas", argv + ["--hypernet", "mlp"], 2, 600 * 100)
        lines += ["### Navigation, 8 agents, full paper settings (45 epochs x 30 minibatches), IPPO mlp", "",
                  f"SPS {sps:,.0f}; the update takes {share:.0%} of the time (collection the rest).", ""]
    if "mamujoco" in opts.only:
        lines += mamujoco_tables(repeats, opts.quick)
    save()
    print(open(opts.out).read())


if __name__ == "__main__":
    main()
