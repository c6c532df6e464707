"""The first PPO update on Dispersion, per family and --hypernet-init: why HyperMARL starts slowly there.

For each configuration and seed, one training iteration of the script (its main(), the paper's
Dispersion settings: 4 agents, 16 environments x 128 steps = one batch of 2,048 steps) and three numbers:
- entropy: the initial policy's (before any update), in nats, mean over every agent and observation
  of the first rollout (its first step is the reset); a uniform policy over the 9 actions has ln 9 = 2.20;
- approx_kl, clipfrac: the first update's, as TensorBoard logs them at iteration 1 (`losses/approx_kl`,
  `losses/clipfrac`: CleanRL's, of the update's last minibatch).
The run's final evaluation is cut to one episode (it comes after the update and changes none of them).

    python benchmark/first_update.py            # under a minute on 2 cores

Writes first_update.md (and prints it) to a new folder runs/first_update_<time>, or to the file --out names.
"""

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sps import OneLineParser, at_least, output_file, write_report  # noqa: E402  (benchmark/ is on sys.path when run as a script)

# (family, --hypernet-init or None): matched is for --hypernet mlp only (the linear one's scaled init is exact)
CONFIGS = [("fups", None), ("nops", None)] + [("mlp", init) for init in ("scaled", "matched", "flax", "pytorch")] + [
    ("linear", init) for init in ("scaled", "flax", "pytorch")]


def first_update(script, family: str, init, seed: int) -> dict:
    """entropy, approx_kl and clipfrac of one configuration's first iteration (script.main, in this process)."""
    measured, update = {}, script.ppo_update

    def measuring_update(agent, optimizer, batch, args, step):
        with torch.no_grad():  # the policy that collected the batch; the actions are given: no random draw
            _, _, entropy, _ = agent.get_action_and_value(batch["obs"], agent.generate(batch["obs"]), batch["actions"])
        measured["entropy"] = float(entropy.mean())
        stats = update(agent, optimizer, batch, args, step)
        measured["approx_kl"], measured["clipfrac"] = stats["losses/approx_kl"], stats["losses/clipfrac"]
        return stats

    argv = ["--scenario", "dispersion", "--hypernet", family, "--seed", seed, "--total-timesteps", 2048,
            "--eval-interval", 10**9, "--eval-episodes", 1, "--snd-samples", 10, "--no-cuda"]
    argv += ["--hypernet-init", init] if init else []
    script.ppo_update = measuring_update  # main() looks it up at every iteration
    try:
        with tempfile.TemporaryDirectory() as runs_dir, contextlib.redirect_stdout(io.StringIO()):
            code = script.main([str(a) for a in argv] + ["--runs-dir", runs_dir])
    finally:
        script.ppo_update = update
    if code != 0 or len(measured) != 3:
        raise RuntimeError(f"{script.__name__} {' '.join(map(str, argv))}: exit status {code}")
    return measured


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def mean(values):
    return sum(values) / len(values)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="ippo_hyper_vmas", choices=["ippo_hyper_vmas", "mappo_hyper_vmas"])
    parser.add_argument("--seeds", type=at_least(0, 2**32 - 10_000), nargs="+", default=[1, 2, 3],
                        help="seeds (default: 1 2 3)")  # the scripts' range: the evaluation uses seed + 10000
    parser.add_argument("--out", default=None,
                        help="the Markdown file to write (default: first_update.md in a new folder runs/first_update_<time>)")
    opts = parser.parse_args(argv)
    command = " ".join(["python benchmark/first_update.py", *(argv if argv is not None else sys.argv[1:])])
    opts.out = output_file(parser, opts.out, "first_update", "first_update.md")
    script = __import__(opts.script)
    torch.set_num_threads(1)  # float reductions depend on the thread count: one, as the tests
    start = time.time()
    rows = []
    for family, init in CONFIGS:
        runs = [first_update(script, family, init, seed) for seed in opts.seeds]
        rows.append((family, init, {key: mean([run[key] for run in runs]) for key in runs[0]}, runs))
        print(f"{family} {init or '-'}: {rows[-1][2]}", file=sys.stderr, flush=True)

    def number(x, digits):  # a number too small for `digits` decimals keeps two significant ones
        return f"{x:.{digits}f}" if abs(x) >= 10**-digits or x == 0 else f"{x:.1e}"

    def per_seed(runs, key, digits):
        return " ".join(number(run[key], digits) for run in runs)

    lines = ["# The first PPO update on Dispersion, per family and --hypernet-init", "", f"`{command}`", "",
             f"{time.strftime('%Y-%m-%d')}, torch {torch_version()}, {opts.script}.py, one CPU thread; Dispersion "
             f"with the script's defaults (4 agents, 16 environments x 128 steps), seeds {' '.join(map(str, opts.seeds))}."
             " Entropy: the initial policy's, mean over every agent and observation of the first rollout (nats; "
             f"uniform over 9 actions: ln 9 = {math.log(9):.2f}). approx_kl, clipfrac: the first update's "
             "(TensorBoard's `losses/approx_kl`, `losses/clipfrac` at iteration 1). Mean over the seeds, then per seed.",
             "", "| family | --hypernet-init | entropy | approx_kl | clipfrac | entropy per seed | approx_kl per seed "
             "| clipfrac per seed |", "|---|---|---|---|---|---|---|---|"]
    for family, init, avg, runs in rows:
        lines.append(f"| {family} | {init or '-'} | {avg['entropy']:.3f} | {number(avg['approx_kl'], 4)} | "
                     f"{number(avg['clipfrac'], 3)} | {per_seed(runs, 'entropy', 3)} | {per_seed(runs, 'approx_kl', 4)} | "
                     f"{per_seed(runs, 'clipfrac', 3)} |")
    name = {(family, init): f"{family}" + (f" {init}" if init else "") for family, init, _, _ in rows}
    by_kl = sorted(rows, key=lambda row: row[2]["approx_kl"])
    uniform = [name[row[:2]] for row in rows if row[2]["entropy"] > math.log(9) - 0.01]
    peaked = sorted((row for row in rows if row[2]["entropy"] <= math.log(9) - 0.01), key=lambda row: row[2]["entropy"])
    lower = ["{} ({:.3f})".format(name[row[:2]], row[2]["entropy"]) for row in peaked]
    lines += ["", f"The first update moves the policy most with {name[by_kl[-1][:2]]} (mean approx_kl "
              f"{number(by_kl[-1][2]['approx_kl'], 4)}, clipfrac {number(by_kl[-1][2]['clipfrac'], 3)}) and least with "
              f"{name[by_kl[0][:2]]} ({number(by_kl[0][2]['approx_kl'], 4)}, {number(by_kl[0][2]['clipfrac'], 3)}). "
              f"The initial policy is within 0.01 nats of uniform with {', '.join(uniform) or 'none'}; "
              + (f"lower with {', '.join(lower)}." if lower else "no configuration starts lower."),
              "", f"({time.time() - start:.0f} s on {os.cpu_count()} CPU cores)"]
    text = "\n".join(lines) + "\n"
    write_report(opts.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
