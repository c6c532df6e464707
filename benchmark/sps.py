"""Training speed (env-steps/s) of the scripts, and its ratios between families and to random actions.

Every measurement runs the real script in its own process and reads its per-iteration timings
(perf/rollout_seconds + perf/update_seconds in TensorBoard) for iterations 2.. (the first warms
up); a run's SPS is batch * iterations / their total time. Each configuration runs --repeats
times, interleaved with the others so that machine noise spreads evenly; tables give the median
and the ratio of medians.

    python benchmark/sps.py                  # everything (about 1.5 hours on 2 cores: 64 agents alone take 50 min,
                                             # not counting the envs section, whose 4096 environments take far longer)
    python benchmark/sps.py --only dispersion navigation
    python benchmark/sps.py --quick          # 1 repeat, fewer iterations: a smoke test
    python benchmark/sps.py --only envs --env-counts 16 600 4096 --device cuda   # scaling in the number of environments
    python benchmark/sps.py --only smax --repeats 2 --iterations 4   # SMAX 2s3z, IPPO and MAPPO, and random stepping

Writes sps.md (and prints it) to a new folder runs/sps_<time>, or to the file --out names.
"""

import argparse
import contextlib
import importlib
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


def at_least(minimum, below=None):
    """An int flag's type: at least minimum, below `below` if given, at most 2**53 (as the scripts)."""
    def parse(text):
        value = int(text)  # a ValueError here becomes argparse's "invalid value" message
        if below is None and value > 2**53:
            raise argparse.ArgumentTypeError(f"must be at most 2**53, got {value}")
        if below is not None and not minimum <= value < below:
            raise argparse.ArgumentTypeError(f"must be between {minimum} and {below - 1}, got {value}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def script_args(script, argv):
    """The Args a training script makes of argv: the paper's values for the flags not given, then its checks."""
    given = script.flags_given(argv)
    args = script.parse_args(argv, given)
    script.check_args(args, given)
    return args


def check_writable(parser, flag, folder):
    """Fails now, not after the benchmark: the nearest existing folder on the way must be a
    folder this process may write into."""
    try:  # bytes that are not UTF-8 reach Python as surrogates; TensorBoard and JSON fail on them at the end
        folder.encode()
    except UnicodeEncodeError:
        parser.error(f"{flag}: {folder!r} is not UTF-8 text")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"{flag}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or not can_create_in(existing):
        parser.error(f"{flag}: {existing!r} is not writable")


def can_create_in(folder) -> bool:
    """Whether a folder can be made in folder (and is, then removed): os.access says yes to root
    everywhere, /proc included, which refuses any new entry all the same."""
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".write_check_").cleanup()
        return True
    except OSError:
        return False


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
    return check_out_file(parser, out)


def check_out_file(parser, out):
    """--out, a file this tool may write: checked now, before any work."""
    if not out or out.endswith(os.sep):
        parser.error(f"--out: must name a file, got {out!r}")
    if os.path.isdir(out):
        parser.error(f"--out: {out!r} is a folder; give the name of the file to write")
    check_writable(parser, "--out", os.path.dirname(os.path.abspath(out)))
    return out


def write_report(path, text):
    """A result file written whole (a temporary file renamed), its folder made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class MissingFlag(Exception):
    """The script does not know a flag it was given (exit 2, "unrecognized" in its error)."""


def timed_run(script, argv, iterations, batch, desync_envs=None):
    """One training run of script.py in its own process, evaluation off; returns the seconds of
    collection and of update of iterations 2.. (the first warms up), from its perf/* scalars.
    desync_envs: run it through the --_child launcher, which desynchronises the episodes of the
    training environments (the ones with that many environments)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        launcher = [os.path.join(ROOT, f"{script}.py")]
        if desync_envs is not None:
            launcher = [os.path.abspath(__file__), "--_child", script, str(desync_envs)]
        cmd = [sys.executable, *launcher, *argv, "--runs-dir", tmp,
               "--total-timesteps", str(batch * iterations), "--eval-interval", str(10**12),
               "--eval-episodes", "1", "--print-interval", str(10**6)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode == 2 and "unrecognized" in result.stderr.lower():  # tyro: "Unrecognized options"
            raise MissingFlag(result.stderr.strip())
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)  # the run's own error, above the traceback
            raise subprocess.CalledProcessError(result.returncode, cmd, result.stdout, result.stderr)
        (run,) = os.listdir(tmp)
        accumulator = EventAccumulator(os.path.join(tmp, run))
        accumulator.Reload()
    rollout = [e.value for e in accumulator.Scalars("perf/rollout_seconds")]
    update = [e.value for e in accumulator.Scalars("perf/update_seconds")]
    return rollout[1:], update[1:]


def run_vmas(script, argv, iterations, batch, desync_envs=None):
    """One training run; returns (SPS over iterations 2.., update share of the time)."""
    rollout, update = timed_run(script, argv, iterations, batch, desync_envs)
    total = sum(rollout) + sum(update)
    return batch * len(rollout) / total, sum(update) / total


def random_action_sps(scenario_argv, steps, repeats):
    """The same VMAS environments (same wrapper, resets included) stepped with random actions."""
    import ippo_hyper_vmas as script

    args = script_args(script, scenario_argv)
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


# ----- the envs section: training and VMAS as the number of environments grows -----
ENVS_ARGV = ["--scenario", "dispersion", "--n-agents", "4", "--num-steps", "128", "--update-epochs", "4",
             "--num-minibatches", "2"]  # the paper's Dispersion settings but for --num-envs
ENVS_FAMILIES = ("fups", "mlp", "nops")
DESYNC_SEED = 12345


def desync_steps(vmas_env, max_steps, seed=DESYNC_SEED):
    """Episodes that end at different steps, as a trained policy's do: VMAS truncates an environment
    when its step counter (vmas_env.steps, one float per environment) reaches max_steps, so random
    counters in [0, max_steps) spread the ends over every step (about num_envs / max_steps each)."""
    counters = torch.randint(0, max_steps, vmas_env.steps.shape, generator=torch.Generator().manual_seed(seed))
    vmas_env.steps = counters.to(vmas_env.steps)  # its dtype and device


def child(argv):
    """python benchmark/sps.py --_child SCRIPT NUM_ENVS [SCRIPT's flags]: SCRIPT.main(flags) with the
    episodes of its training environments (the VmasEnv of NUM_ENVS environments, not the evaluation
    one) desynchronised after each reset() it asks for (the first, in practice: later ends are reset
    in place and keep the counters apart). timed_run's launcher; returns the script's exit status."""
    script, num_envs = importlib.import_module(argv[0]), int(argv[1])
    reset = script.VmasEnv.reset

    def desynchronised_reset(self):
        obs = reset(self)
        if self.num_envs == num_envs:
            desync_steps(self.env, self.env.max_steps)
        return obs

    script.VmasEnv.reset = desynchronised_reset
    return script.main(argv[2:])


def synchronize(device):
    if device.type == "cuda":  # CUDA runs asynchronously: the clock must wait for the work
        torch.cuda.synchronize(device)


def random_actions(space, n_agents, num_envs, device):
    """(n_agents, num_envs[, act_dim]) uniform actions of a VMAS action space."""
    if hasattr(space, "n"):
        return torch.randint(0, int(space.n), (n_agents, num_envs), device=device)
    low, high = (torch.as_tensor(bound, device=device) for bound in (space.low, space.high))
    return low + (high - low) * torch.rand((n_agents, num_envs) + tuple(low.shape), device=device)


RANDOM_SECONDS = 2.0


@torch.no_grad()  # as the training's rollout steps
def stepping_sps(step, num_envs, steps, device, warmup=10):
    """Env-steps per second of step(), over rounds of steps calls until RANDOM_SECONDS have passed:
    a few hundred steps of 16 environments take a tenth of a second, too short on a shared machine."""
    for _ in range(warmup):
        step()
    synchronize(device)
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < RANDOM_SECONDS:
        for _ in range(steps):
            step()
        synchronize(device)
        done += steps
    return done * num_envs / (time.perf_counter() - start)


def raw_vmas_sps(args, device, steps, desync):
    """vmas.make_env as VmasEnv calls it, random actions. Synchronised: env.reset() once every
    environment is done, as raw VMAS users do. Desynchronised: each ended environment gets its own
    env.reset_at(i), VMAS's way of resetting some environments (the loop VmasEnv avoids)."""
    import vmas

    import ippo_hyper_vmas as script

    env = vmas.make_env(args.scenario, num_envs=args.num_envs, device=device,
                        continuous_actions=args.continuous_actions, max_steps=args.max_steps, seed=args.seed,
                        terminated_truncated=True, n_agents=args.n_agents,
                        **{name: getattr(args, name) for name in script.SCENARIO_OPTIONS[args.scenario]})
    env.reset()
    if desync:
        desync_steps(env, args.max_steps)

    def step():
        actions = random_actions(env.action_space[0], args.n_agents, args.num_envs, device)
        _, _, terminated, truncated, _ = env.step(list(actions.unbind(0)))
        done = terminated | truncated
        if desync:
            for i in done.nonzero().flatten().tolist():
                env.reset_at(i)
        elif done.all():
            env.reset()

    return stepping_sps(step, args.num_envs, steps, device)


def vmas_env_sps(args, device, steps, desync):
    """The script's own VmasEnv (its batched resets of ended environments included), random actions."""
    import ippo_hyper_vmas as script

    env = script.VmasEnv(args, args.num_envs, args.seed, device)
    env.reset()
    if desync:
        desync_steps(env.env, args.max_steps)
    space = env.env.action_space[0]
    return stepping_sps(lambda: env.step(random_actions(space, args.n_agents, args.num_envs, device)),
                        args.num_envs, steps, device)


def envs_table(env_counts, device, desync, iterations, repeats):
    """Random-action SPS of raw VMAS and of VmasEnv, and training SPS (eager and --compile), per
    number of environments; medians over repeats, interleaved."""
    import ippo_hyper_vmas as script

    steps = 128 * (iterations - 1)  # as many collection steps as a training run times
    flags = ENVS_ARGV + ["--cuda" if device.type == "cuda" else "--no-cuda"]
    runs = [(family, compiled) for compiled in (False, True) for family in ENVS_FAMILIES]
    samples = {}
    for _ in range(repeats):
        for n in env_counts:
            args = script_args(script, ENVS_ARGV + ["--num-envs", str(n)])
            samples.setdefault((n, "raw"), []).append(raw_vmas_sps(args, device, steps, desync=False))
            if desync:
                samples.setdefault((n, "reset_at"), []).append(raw_vmas_sps(args, device, steps, desync=True))
            samples.setdefault((n, "wrapper"), []).append(vmas_env_sps(args, device, steps, desync))
            for family, compiled in runs:
                argv = flags + ["--num-envs", str(n), "--hypernet", family] + (["--compile"] if compiled else [])
                try:
                    sps, share = run_vmas("ippo_hyper_vmas", argv, iterations, n * 128, n if desync else None)
                except MissingFlag:  # the script has no --compile (yet): a gap in the table, not a crash
                    sps = share = None
                samples.setdefault((n, family, compiled), []).append(sps)
                samples.setdefault((n, family, compiled, "share"), []).append(share)

    def median(key):
        values = samples.get(key)
        return None if not values or None in values else statistics.median(values)

    def share(n, compiled):
        value = median((n, "mlp", compiled, "share"))
        return "n/a" if value is None else f"{value:.0%}"

    def cell(value):
        return "n/a" if value is None else f"{value:,.0f}"

    episodes = "desynchronised" if desync else "synchronised"
    command = f"python benchmark/sps.py {' '.join(sys.argv[1:])}".rstrip()
    launcher = " through `benchmark/sps.py --_child` (which desynchronises its training episodes)" if desync else ""
    lines = [f"### Dispersion, 4 agents, {' / '.join(map(str, env_counts))} environments "
             f"({device.type}, {episodes} episodes)", "", f"`{command}`", "",
             f"Training: `ippo_hyper_vmas.py {' '.join(flags)} --num-envs N --hypernet F [--compile]`{launcher}, "
             f"{iterations} iterations (the first not timed) x {repeats} repeats; random stepping: rounds of {steps} steps "
             f"for at least {RANDOM_SECONDS:.0f} s.", "",
             "| envs | raw VMAS random-action SPS | raw VMAS, reset_at loop | VmasEnv random-action SPS | "
             "training SPS fups / mlp / nops | same with --compile | training / VmasEnv | update share (mlp) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in env_counts:
        wrapper = median((n, "wrapper"))
        eager = " / ".join(cell(median((n, f, False))) for f in ENVS_FAMILIES)
        compiled = " / ".join(cell(median((n, f, True))) for f in ENVS_FAMILIES)
        ratios = {f: median((n, f, False)) / wrapper for f in ("mlp", "fups")}
        lines.append(f"| {n} | {cell(median((n, 'raw')))} | {cell(median((n, 'reset_at')))} | {cell(wrapper)} | "
                     f"{eager} | {compiled} | {ratios['mlp']:.2f} (fups {ratios['fups']:.2f}) | "
                     f"{share(n, False)} eager, {share(n, True)} compiled |")
    lines += ["",
              "- raw VMAS random-action SPS: `vmas.make_env` with VmasEnv's arguments, uniform random actions, "
              "synchronised episodes, `env.reset()` once every environment is done.",
              "- raw VMAS, reset_at loop: the same with desynchronised episodes, each ended environment reset "
              "by its own `env.reset_at(i)`" + ("." if desync else " (n/a: run without --no-desync)."),
              f"- VmasEnv random-action SPS: the script's wrapper ({episodes} episodes), uniform random actions, "
              "its one batched reset per step where environments ended.",
              f"- training SPS fups / mlp / nops: env-steps per second of training ({episodes} episodes), "
              "collection and update, iterations 2.., per hypernet family.",
              "- same with --compile: the script with `--compile`.",
              "- training / VmasEnv: eager mlp training SPS / VmasEnv random-action SPS (in brackets: fups).",
              "- update share (mlp): the update's share of the training time (collection the rest).", ""]
    return lines


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

    def train(task, hypernet, algo, num_envs, iterations, async_envs):
        """(SPS, collection and update microseconds per environment step) over iterations 2.."""
        batch = num_envs * 500
        argv = ["--task", task, "--hypernet", hypernet, "--algo", algo, "--num-envs", str(num_envs), "--num-steps", "500",
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
             "| hypernet | algo | vector env | training SPS | random-action SPS | ratio | collection µs | "
             "update µs | bound |", "|---|---|---|---|---|---|---|---|---|"]
    configs = [("mlp", "mappo", True), ("nops", "mappo", True), ("nops", "happo", True), ("fups", "mappo", True),
               ("mlp", "mappo", False), ("nops", "mappo", False)]
    results = {c: [] for c in configs}
    randoms = {True: [], False: []}
    for _ in range(repeats):
        for async_envs in (True, False):
            randoms[async_envs].append(random_sps("HalfCheetah-2x3", 4, random_steps, async_envs))
        for c in configs:
            results[c].append(train("HalfCheetah-2x3", c[0], c[1], 4, iterations, c[2]))
    for (hypernet, algo, async_envs), values in results.items():
        sps, roll, upd = (statistics.median(v) for v in zip(*values))
        rand = statistics.median(randoms[async_envs])
        env_us = 1e6 / rand
        lines.append(f"| {hypernet} | {algo} | {'async' if async_envs else 'sync'} | {sps:,.0f} | {rand:,.0f} | "
                     f"{sps / rand:.2f} | {roll:.0f} | {upd:.0f} | {env_us / (env_us + upd):.2f} |")
    lines += ["", "bound: the ratio if collection cost no more than random stepping, "
              "random µs / (random µs + update µs).", ""]
    humanoid = {"mlp": [], "nops": []}
    for _ in range(repeats):  # interleaved, like the configurations above
        for hypernet in humanoid:
            humanoid[hypernet].append(train("Humanoid-17x1", hypernet, "mappo", 4, iterations, True)[0])
    humanoid = {hypernet: statistics.median(values) for hypernet, values in humanoid.items()}
    lines += ["### MaMuJoCo, Humanoid-17x1 (17 agents), 4 environments", "", "| hypernet | SPS |", "|---|---|"]
    lines += [f"| {a} | {v:,.0f} |" for a, v in humanoid.items()]
    lines += ["", f"HyperMARL (mlp) / independent actors at 17 agents: {humanoid['mlp'] / humanoid['nops']:.2f}", ""]
    return lines


def smax_table(repeats, iterations):
    """ippo_hyper_smax.py (every family) and mappo_hyper_smax.py (FuPS, HyperMARL) on 2s3z at the paper's settings
    (128 environments x 128 steps), against the same 128 environments stepped with random available actions
    (the wrapper, auto-resets included)."""
    import ippo_hyper_smax as script

    batch = 128 * 128
    settings = [("ippo_hyper_smax", f) for f in ("fups", "mlp", "linear", "nops")] + [("mappo_hyper_smax", f) for f in ("fups", "mlp")]
    samples, shares, stepping = {s: [] for s in settings}, {s: [] for s in settings}, []
    for repeat in range(repeats):  # interleaved
        for name, family in settings:
            sps, share = run_vmas(name, ["--map", "2s3z", "--hypernet", family], iterations, batch)
            samples[name, family].append(sps)
            shares[name, family].append(share)
        env = script.SmaxEnv("2s3z", 128, repeat, torch.device("cpu"))
        _, _, avail = env.reset()
        for step in range(129):  # the first step compiles
            if step == 1:
                start = time.perf_counter()
            avail = env.step(script.sample_action(torch.where(avail, 0.0, -1e10)))[2]
        stepping.append(128 * 128 / (time.perf_counter() - start))
    random_sps = statistics.median(stepping)
    lines = ["### SMAX 2s3z, paper settings (128 envs x 128 steps, 4 epochs x 4 minibatches of whole sequences)", "",
             f"{iterations} iterations x {repeats} repeats; random available actions on the same 128 environments: "
             f"{random_sps:,.0f} steps/s. Update share: the PPO update's share of the time (the rest is the rollout: "
             "SMAX's steps and the policy's).", "",
             "| script | family | SPS (median) | ratio to its fups | ratio to random actions | update share |",
             "|---|---|---|---|---|---|"]
    for name, family in settings:
        median = statistics.median(samples[name, family])
        lines.append(f"| {name}.py | {family} | {median:,.0f} | {median / statistics.median(samples[name, 'fups']):.2f} | "
                     f"{median / random_sps:.2f} | {statistics.median(shares[name, family]):.0%} |")
    return lines + [""]


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = ["dispersion", "scale", "navigation", "mamujoco", "envs", "smax"]
    parser.add_argument("--only", nargs="+", default=sections, choices=sections)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=at_least(4), default=6,
                        help="iterations per run (the first is not timed; Navigation and 64 agents run half as many)")
    parser.add_argument("--env-counts", nargs="+", type=at_least(1), default=[16, 600, 4096],
                        help="envs section: numbers of environments (4096 trains slowly on a CPU: see --iterations)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="envs section: where VMAS and the training runs (--cuda / --no-cuda) run")
    parser.add_argument("--desync", action=argparse.BooleanOptionalAction, default=True,
                        help="envs section: episodes that end at different steps, as a trained policy's do")
    parser.add_argument("--out", default=None, help="the Markdown file to write (default: sps.md in a new folder runs/sps_<time>)")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda is not available on this machine")
    if "envs" in opts.only:  # the script's own checks of each count (its memory), before the output folder is made
        import ippo_hyper_vmas as script

        for n in opts.env_counts:  # as timed_run starts it: a budget of its iterations
            try:
                script_args(script, ENVS_ARGV + ["--num-envs", str(n), "--total-timesteps", str(n * 128 * opts.iterations)])
            except ValueError as error:
                parser.error(f"--env-counts: {n}: {error}")
    opts.out = output_file(parser, opts.out, "sps", "sps.md")
    repeats = 1 if opts.quick else opts.repeats
    iterations = 3 if opts.quick else opts.iterations
    started = time.time()
    lines = ["# Training speed", "", f"Command: `python benchmark/sps.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"
             + (f"; envs section on {torch.cuda.get_device_name()}" if opts.device == "cuda" else ""), ""]
    def save():
        write_report(opts.out, "\n".join(lines + [f"Benchmark time so far: {(time.time() - started) / 60:.1f} min", ""]))

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
    if "envs" in opts.only:
        lines += envs_table(opts.env_counts, torch.device(opts.device), opts.desync, iterations, repeats)
        save()
    if "smax" in opts.only:
        lines += smax_table(repeats, iterations)
    save()
    print(open(opts.out).read())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_child"]:  # timed_run's launcher (see child), not a user's flag
        sys.exit(child(sys.argv[2:]))
    main()
