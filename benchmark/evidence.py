"""Multi-seed comparison of the families on one VMAS task: data (CSV), plot (PNG) and table (Markdown).

    python benchmark/evidence.py --script ippo_hyper_vmas --total-timesteps 1000000 --jobs 2
    python benchmark/evidence.py --script mappo_hyper_vmas --total-timesteps 1000000 --jobs 2

Runs every family x seed (--jobs at a time, one torch thread each), keeps the TensorBoard logs
under --work-dir (default: a new folder runs/evidence_<name>_<time>), and writes to --out (default:
the --work-dir; `--out benchmark/results` regenerates the committed results):
  <name>.csv  one row per run and evaluation: step, eval return, SND, gradient variance, interference
  <name>.png  evaluation return against steps: IQM over seeds with a 95% stratified bootstrap CI
  <name>.md   final return (IQM and CI from rliable, mean +- std), final SND, mean gradient variance,
              mean interference, and the commands that produced them.
--aggregate-only rebuilds the outputs from the logs of an earlier --work-dir; with --work-dir of an
earlier run, the runs that finished are skipped and the others run again (a run that fails stops the
tool before it aggregates).
"""

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
from sps import OneLineParser, at_least, check_writable, new_output_folder  # noqa: E402

FAMILIES = ["mlp", "linear", "nops", "fups"]


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


PAPER_SEEDS = [30, 1, 42, 72858, 2300658]  # Table 9's SEEDS


def command(opts, family, seed):
    return [sys.executable, os.path.join(ROOT, f"{opts.script}.py"), "--hypernet", family, "--seed", str(seed),
            "--total-timesteps", str(opts.total_timesteps), "--eval-interval", str(opts.eval_interval),
            "--exp-name", opts.name, "--runs-dir", os.path.join(opts.work_dir, f"{family}_{seed}"), *opts.extra]


def finished(opts, family, seed):
    """A run whose log reached its last iteration: a killed or failed run is run again."""
    log = os.path.join(opts.work_dir, f"{family}_{seed}.log")
    return os.path.isfile(log) and re.search(r"iteration=(\d+)/\1 ", open(log).read()) is not None


def run_all(opts):
    pending = [(f, s) for s in opts.seeds for f in opts.families]
    running, failed = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running:
        while pending and len(running) < opts.jobs:
            family, seed = pending.pop(0)
            if finished(opts, family, seed):
                print(f"skip {family} seed {seed}: already finished")
                continue
            shutil.rmtree(os.path.join(opts.work_dir, f"{family}_{seed}"), ignore_errors=True)  # a partial run
            log = open(os.path.join(opts.work_dir, f"{family}_{seed}.log"), "w")
            print("run:", " ".join(command(opts, family, seed)), flush=True)
            running.append((subprocess.Popen(command(opts, family, seed), stdout=log, stderr=subprocess.STDOUT, env=env),
                            family, seed, time.time()))
        for item in list(running):
            process, family, seed, started = item
            if process.poll() is not None:
                running.remove(item)
                print(f"done {family} seed {seed}: exit {process.returncode}, {time.time() - started:.0f} s", flush=True)
                if process.returncode != 0:
                    failed.append(f"{family} seed {seed} (see {family}_{seed}.log)")
        time.sleep(1)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; nothing aggregated", file=sys.stderr)
        sys.exit(1)


def collect(opts):
    rows = []
    for family in opts.families:
        for seed in opts.seeds:
            base = os.path.join(opts.work_dir, f"{family}_{seed}")
            (run,) = os.listdir(base)
            data = scalars(os.path.join(base, run))
            var = dict(data["grad/actor_var"])
            interference = dict(data["grad/interference"])
            sps = [v for _, v in data["charts/SPS"]]
            for (step, ret), (_, snd) in zip(data["eval/episodic_return"], data["diversity/snd"]):
                upto = [v for s, v in var.items() if s <= step]
                inter = [v for s, v in interference.items() if s <= step]
                rows.append(dict(family=family, seed=seed, step=step, eval_return=ret, snd=snd,
                                 actor_grad_var_mean=float(np.mean(upto)), interference_mean=float(np.mean(inter)),
                                 sps=sps[-1]))
    return rows


def aggregate(opts, rows):
    from rliable import library as rly
    from rliable import metrics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, opts.name)
    with open(f"{path}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def series(family):
        per_seed = [[r for r in rows if r["family"] == family and r["seed"] == s] for s in opts.seeds]
        steps = [r["step"] for r in per_seed[0]]
        length = min(len(p) for p in per_seed)
        return steps[:length], np.array([[r["eval_return"] for r in p[:length]] for p in per_seed])

    iqm = lambda x: np.array([metrics.aggregate_iqm(x[:, i]) for i in range(x.shape[1])])  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 4))
    finals = {}
    for family in opts.families:
        steps, returns = series(family)
        point, ci = rly.get_interval_estimates({family: returns[:, :, None]}, iqm, reps=2000)
        ax.plot(steps, point[family], label=family)
        ax.fill_between(steps, ci[family][0], ci[family][1], alpha=0.2)
        finals[family] = returns[:, -1]
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return (IQM, 95% CI)")
    ax.set_title(opts.title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{path}.png", dpi=120)

    final_iqm, final_ci = rly.get_interval_estimates({f: v[:, None] for f, v in finals.items()},
                                                     lambda x: np.array([metrics.aggregate_iqm(x)]), reps=2000)
    driver = " ".join(["python benchmark/evidence.py --script", opts.script]
                      + (["--families", *opts.families] if opts.families != FAMILIES else [])
                      + (["--seeds", *map(str, opts.seeds)] if opts.seeds != PAPER_SEEDS else [])
                      + ["--total-timesteps", str(opts.total_timesteps), "--eval-interval", str(opts.eval_interval),
                         "--jobs", str(opts.jobs)]
                      + (["--name", opts.name] if opts.name != f"{opts.script}_dispersion4" else [])
                      + (["--", *opts.extra] if opts.extra else []))
    lines = [f"# {opts.title}", "", f"Produced by `{driver}` ({opts.jobs} runs at a time, one torch thread each, "
             "on a 2-core CPU shared with other jobs: the SPS column is only indicative).", "",
             "Commands (one per family and seed):", "", "```"]
    lines += [" ".join(["python", f"{opts.script}.py"] + command(opts, f, "SEED")[2:]).replace(opts.work_dir, "runs")
              for f in opts.families]
    lines += ["```", "", f"Seeds: {opts.seeds}. Data: `{opts.name}.csv`; plot: `{opts.name}.png`.", "",
              "| family | final eval return IQM [95% CI] | mean +- std | final SND | mean actor grad variance "
              "| mean interference | SPS |", "|---|---|---|---|---|---|---|"]
    for family in opts.families:
        last = [max((r for r in rows if r["family"] == family and r["seed"] == s), key=lambda r: r["step"])
                for s in opts.seeds]
        values = finals[family]
        lo, hi = final_ci[family][0][0], final_ci[family][1][0]
        snd = np.array([r["snd"] for r in last])
        gvar = np.array([r["actor_grad_var_mean"] for r in last])
        inter = np.array([r["interference_mean"] for r in last])
        sps = np.array([r["sps"] for r in last])
        lines.append(f"| {family} | {final_iqm[family][0]:.3f} [{lo:.3f}, {hi:.3f}] | {values.mean():.3f} +- "
                     f"{values.std():.3f} | {snd.mean():.3f} +- {snd.std():.3f} | {gvar.mean():.2e} +- {gvar.std():.1e} "
                     f"| {inter.mean():.3f} | {sps.mean():,.0f} |")
    text = "\n".join(lines) + "\n"
    with open(f"{path}.md", "w") as f:
        f.write(text)
    print(text)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="ippo_hyper_vmas", choices=["ippo_hyper_vmas", "mappo_hyper_vmas"])
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=PAPER_SEEDS,
                        help="seeds (default: the paper's five, Table 9: %(default)s)")
    parser.add_argument("--total-timesteps", type=at_least(1), default=1_000_000)
    parser.add_argument("--eval-interval", type=at_least(1), default=50_000)
    parser.add_argument("--jobs", type=at_least(1), default=2)
    parser.add_argument("--name", default=None, help="output name (default: <script>_dispersion4)")
    parser.add_argument("--work-dir", default=None,
                        help="where the runs' logs go (default: a new folder runs/evidence_<name>_<time>); "
                             "an earlier run's folder resumes it")
    parser.add_argument("--out", default=None, help="folder for <name>.csv, .png and .md (default: the --work-dir)")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the outputs from --work-dir's logs")
    parser.add_argument("extra", nargs="*", help="more flags for the script, after --")
    opts = parser.parse_args()
    opts.name = opts.name or f"{opts.script}_dispersion4"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", opts.name):
        parser.error(f"--name: must be a plain name (letters, digits, '.', '_', '-'), got {opts.name!r}")
    if opts.aggregate_only and opts.work_dir is None:
        parser.error("--aggregate-only: needs --work-dir, the folder of the runs to aggregate")
    if opts.aggregate_only and not os.path.isdir(opts.work_dir):
        parser.error(f"--work-dir: no such folder {opts.work_dir!r}")
    check_writable(parser, "--work-dir", opts.work_dir or "runs")
    if opts.out is not None:
        check_writable(parser, "--out", opts.out)
    opts.title = f"{opts.script.split('_')[0].upper()} on Dispersion (4 agents), {opts.total_timesteps:,} steps"
    if opts.work_dir is None:
        opts.work_dir = new_output_folder(f"evidence_{opts.name}")
    os.makedirs(opts.work_dir, exist_ok=True)
    opts.out = opts.out or opts.work_dir
    if not opts.aggregate_only:
        run_all(opts)
    aggregate(opts, collect(opts))


if __name__ == "__main__":
    main()
