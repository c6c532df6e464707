"""Summarise mappo_hyper_mamujoco.py runs: evaluation curves (CSV), a plot and a Markdown table.

Usage: python benchmark/mamujoco_summarize.py RUNS_DIR [--out FOLDER] [--name mamujoco_halfcheetah]
(default --out: a new folder runs/mamujoco_summarize_<time>; --out benchmark/results replaces the committed files)
Reads every run's TensorBoard events (eval/episodic_return, diversity/snd, charts/SPS) and groups
runs by algorithm and actor family (from the run name: mamujoco_TASK__EXP__ALGO_HYPERNET__SEED__TIME;
runs older than --hypernet name independent actors "ind", today's "nops").
"""

import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sps import OneLineParser, new_output_folder  # noqa: E402  (bad input: one line, exit 2)

LABELS = {"mappo_mlp": "HyperMARL MLP (MAPPO)", "mappo_linear": "HyperMARL linear (MAPPO)",
          "mappo_nops": "Ind. actors (MAPPO)", "mappo_ind": "Ind. actors (MAPPO)", "happo_nops": "HAPPO",
          "happo_ind": "HAPPO", "mappo_fups": "FuPS (MAPPO)"}


def read_run(run_dir):
    """A run's scalars {tag: [(step, value)]} and its flags {name: value as text} (the script's
    "hyperparameters" text: the settings the run really used, whatever the script's defaults now)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    config = {}
    if "hyperparameters/text_summary" in acc.Tags()["tensors"]:
        text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
        config = dict(row.strip("|").split("|", 1) for row in text.splitlines()[2:] if row.count("|") >= 3)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}, config


def flag(runs, key, method=None):
    """The value of a flag in the runs (of one method), as logged; each value if they differ."""
    values = {c["config"].get(key, "?") for (_, m, _), c in runs.items() if method in (None, m)}
    return " / ".join(sorted(values, key=lambda v: (len(v), v)))


def main():
    parser = OneLineParser(description="Summarise mappo_hyper_mamujoco.py runs: CSV, plot and Markdown table.")
    parser.add_argument("runs_dir")
    parser.add_argument("--out", default=None, help="output folder (default: a new runs/mamujoco_summarize_<time>)")
    parser.add_argument("--name", default="mamujoco_halfcheetah")
    opts = parser.parse_args()
    if not os.path.isdir(opts.runs_dir):
        parser.error(f"runs_dir: no such folder {opts.runs_dir!r}")
    rows, runs = [], {}
    for name in sorted(os.listdir(opts.runs_dir)):
        parts = name.split("__")
        if len(parts) != 5 or not parts[0].startswith("mamujoco_"):
            continue
        task, method, seed = parts[0][len("mamujoco_"):], parts[2], int(parts[3])
        scalars, config = read_run(os.path.join(opts.runs_dir, name))
        if "eval/episodic_return" not in scalars:
            continue
        snd = dict(scalars.get("diversity/snd", []))
        sps = [v for _, v in scalars.get("charts/SPS", [])]
        for step, value in scalars["eval/episodic_return"]:
            rows.append(dict(task=task, method=method, seed=seed, step=step, eval_return=value, snd=snd.get(step, float("nan"))))
        runs[(task, method, seed)] = dict(curve=scalars["eval/episodic_return"], sps=sps[-1] if sps else float("nan"),
                                          snd=scalars.get("diversity/snd", [(0, float("nan"))])[-1][1], config=config)
    if not runs:
        print(f"error: runs_dir: {opts.runs_dir!r} holds no mappo_hyper_mamujoco.py run with evaluations", file=sys.stderr)
        sys.exit(2)
    if opts.out is None:  # never over the committed results unless asked to, never a folder in use
        opts.out = new_output_folder("mamujoco_summarize")
    os.makedirs(opts.out, exist_ok=True)
    csv_path = os.path.join(opts.out, f"{opts.name}_eval.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "method", "seed", "step", "eval_return", "snd"])
        writer.writeheader()
        writer.writerows(rows)

    methods = sorted({m for _, m, _ in runs}, key=lambda m: list(LABELS).index(m) if m in LABELS else 99)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    table = ["| method | seeds | final eval return per seed | mean final | mean best | final SND | SPS |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        seeds = sorted(s for t, m, s in runs if m == method)
        curves = [runs[(t, m, s)] for (t, m, s) in runs if m == method]
        steps = sorted(set.intersection(*[set(st for st, _ in c["curve"]) for c in curves]))
        values = np.array([[dict(c["curve"])[st] for st in steps] for c in curves])
        label = LABELS.get(method, method)
        ax.plot(np.array(steps) / 1e3, values.mean(0), label=f"{label} (n={len(curves)})")
        ax.fill_between(np.array(steps) / 1e3, values.min(0), values.max(0), alpha=0.2)
        finals = [c["curve"][-1][1] for c in curves]
        bests = [max(v for _, v in c["curve"]) for c in curves]
        table.append(f"| {label} | {', '.join(map(str, seeds))} | {', '.join(f'{x:.1f}' for x in finals)} | "
                     f"{np.mean(finals):.1f} | {np.mean(bests):.1f} | {np.mean([c['snd'] for c in curves]):.3f} | "
                     f"{np.mean([c['sps'] for c in curves]):.0f} |")
    ax.set_xlabel("environment steps (thousands)")
    tasks = ", ".join(sorted({t for t, _, _ in runs}))
    ax.set_ylabel(f"evaluation return ({flag(runs, 'eval_episodes')} deterministic episodes)")
    ax.set_title(f"{tasks}, MuJoCo v5 (mean over seeds, band: min-max)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(opts.out, f"{opts.name}.png"), dpi=120)
    max_step = max(r["step"] for r in rows)
    n_seeds = " / ".join(sorted({str(sum(1 for _, m, _ in runs if m == method)) for method in methods}))
    clips = ", ".join(f"{LABELS.get(m, m)} {flag(runs, 'clip_coef', m)}" for m in methods)
    envs, steps = flag(runs, "num_envs"), flag(runs, "num_steps")
    interval, episodes = flag(runs, "eval_interval"), flag(runs, "eval_episodes")
    header = [f"# {opts.name}: mappo_hyper_mamujoco.py, {tasks}", "",
              f"Budget: {max_step:,} environment steps per run (the paper trains 10M), the task's hyperparameters "
              f"of Tables 17-21 (clip: {clips}), {envs} environments x {steps} steps per update, evaluation "
              f"every {interval} steps over {episodes} deterministic episodes (seeds 10000+k, the same every "
              "time), as each run's logged flags say. Commands: "
              f"benchmark/{opts.name}_commands.sh; curves: {opts.name}_eval.csv and {opts.name}.png; this table: "
              "benchmark/mamujoco_summarize.py.", "",
              "Final = last evaluation; best = best evaluation of a run; SND = Jensen-Shannon system neural "
              "diversity (base 2, [0, 1]) of the final policy on evaluation states; SPS = training env-steps/s "
              "(2-core CPU shared with other jobs, so only roughly comparable).", "",
              f"With {n_seeds} seeds at {max_step / 1e7:.0%} of the paper's budget, differences between methods "
              "within the seed spread are not a ranking.", "",
              "Gymnasium-Robotics runs the MuJoCo v5 tasks, the paper the v2 ones (contact costs, friction and "
              "healthy reward differ): these returns are not comparable with Table 4's.", ""]
    with open(os.path.join(opts.out, f"{opts.name}.md"), "w") as f:
        f.write("\n".join(header + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
