"""What the authors' NoPS sampling bug costs: one random key for every step of a rollout.

The authors' NoPS (JAX) passes the same, unsplit random key to action sampling at every step of a
rollout, so each environment and agent draws the same noise at every step of it (a new key comes with
the next rollout). This repository does not copy that; this tool measures its effect. It trains the
script (its main(), in this process) twice per seed: as it is, and with `sample_action` drawing its
noise once per rollout (the first step's Gumbel or Gaussian noise, reused for the other steps of the
same rollout, per environment and agent). Score of a run: its mean evaluation return over its last
three evaluations (benchmark/aggregate.py's window at the budget).

    python benchmark/repeated_key.py --seeds 1 30 --budget 500000    # about 10 minutes on 2 cores

Writes repeated_key.md (and prints it) to a new folder runs/repeated_key_<time>, or to the file --out names.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sps import OneLineParser, at_least, output_file, write_report  # noqa: E402  (benchmark/ is on sys.path when run as a script)


def repeated_noise(num_steps: int):
    """The script's sample_action (Gumbel-max for logits, mean + std * noise for a Gaussian) with one
    draw of noise per rollout: the draw of its first step (every num_steps-th call: a rollout samples
    once per step, every environment and agent at once) replayed at its other steps, as one unsplit
    key gives the same noise at every step."""
    state = {"calls": 0, "noise": None}

    def sample_action(dist, discrete: bool) -> torch.Tensor:
        if state["calls"] % num_steps == 0:
            state["noise"] = torch.rand_like(dist) if discrete else torch.randn_like(dist[0])
        state["calls"] += 1
        if discrete:
            return torch.argmax(dist - torch.log(-torch.log(state["noise"])), dim=-1)
        mean, std = dist
        return mean + std * state["noise"]

    return sample_action


def run_argv(family: str, seed: int, budget: int) -> list[str]:
    return [str(a) for a in ("--scenario", "dispersion", "--hypernet", family, "--seed", seed, "--total-timesteps",
                             budget, "--no-cuda")]


def train(script, family: str, seed: int, budget: int, repeated: bool) -> list:
    """[(step, mean evaluation return)] of one run of script.main, with the sampling as given."""
    argv = run_argv(family, seed, budget)
    args = script.Args()
    original = script.sample_action
    if repeated:
        script.sample_action = repeated_noise(args.num_steps)  # main() looks it up at every step
    try:
        with tempfile.TemporaryDirectory() as runs_dir, contextlib.redirect_stdout(io.StringIO()):
            code = script.main(argv + ["--runs-dir", runs_dir])
            (folder,) = os.listdir(runs_dir)
            with open(os.path.join(runs_dir, folder, "evaluations.jsonl")) as f:
                evaluations = [json.loads(line) for line in f]
    finally:
        script.sample_action = original
    if code != 0:
        raise RuntimeError(f"{script.__name__} {' '.join(argv)}: exit status {code}")
    return [(e["step"], float(np.mean(e["episode_returns"]))) for e in evaluations]


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="ippo_hyper_vmas", choices=["ippo_hyper_vmas", "mappo_hyper_vmas"])
    parser.add_argument("--hypernet", default="nops", choices=["mlp", "linear", "fups", "nops", "dico"],
                        help="the family (default: nops, the authors' case)")
    parser.add_argument("--seeds", type=at_least(0, 2**32 - 10_000), nargs="+", default=[1, 30], help="seeds (default: 1 30)")
    parser.add_argument("--budget", type=at_least(1), default=500_000, help="steps per run (default %(default)s)")
    parser.add_argument("--out", default=None,
                        help="the Markdown file to write (default: repeated_key.md in a new folder runs/repeated_key_<time>)")
    opts = parser.parse_args(argv)
    command = " ".join(["python benchmark/repeated_key.py", *(argv if argv is not None else sys.argv[1:])])
    if len(set(opts.seeds)) < len(opts.seeds):
        parser.error(f"--seeds: each seed once, got {' '.join(map(str, opts.seeds))}")
    script = __import__(opts.script)
    for seed in opts.seeds:  # the script's own checks of every run's flags, before the first trains
        try:
            script.read_command_line(run_argv(opts.hypernet, seed, opts.budget))
        except ValueError as error:
            parser.error(str(error).replace("--total-timesteps", "--budget"))
    opts.out = output_file(parser, opts.out, "repeated_key", "repeated_key.md")  # a new folder: after every check
    torch.set_num_threads(1)
    start, rows, scores = time.time(), [], {False: [], True: []}
    for seed in opts.seeds:
        for repeated in (False, True):
            curve = train(script, opts.hypernet, seed, opts.budget, repeated)
            score = float(np.mean([r for _, r in curve[-3:]]))
            scores[repeated].append(score)
            sampling = "one draw per rollout (the authors' key)" if repeated else "a draw per step (ours)"
            rows.append(f"| {seed} | {sampling} | "
                        f"{score:.3f} | {' / '.join(f'{r:.3f}' for _, r in curve)} |")
    lines = [f"# {opts.hypernet} with one random draw per rollout, as the authors' unsplit key", "", f"`{command}`", "",
             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {opts.script}.py on Dispersion (4 agents, the "
             f"script's defaults), --hypernet {opts.hypernet}, {opts.budget:,} steps, one CPU thread. Score: the mean "
             "evaluation return (32 deterministic episodes) over the run's last three evaluations.", "",
             "| seed | sampling | score | every evaluation's mean return |", "|---|---|---|---|", *rows, "",
             f"Mean score over the seeds: {np.mean(scores[False]):.3f} with a draw per step, {np.mean(scores[True]):.3f} "
             f"with one draw per rollout. ({time.time() - start:.0f} s)", ""]
    text = "\n".join(lines)
    write_report(opts.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
