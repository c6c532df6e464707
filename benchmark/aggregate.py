"""Tables and plots of finished grid runs (benchmark/launch.py's summary.json files), with rliable.

    python benchmark/aggregate.py runs/grids/table4                          # a new folder runs/aggregate_<time>
    python benchmark/aggregate.py runs/grids --at 1000000 20000000 --out benchmark/results

PATHs are grid folders (searched for summary.json) or summary files. Per grid it writes <grid>.md and
<grid>_final.png (IQM + 95% CI per task and method), <grid>_curves.png (IQM + 95% CI per evaluation
step), <grid>_profile.png (performance profiles) and <grid>_poi.png (probability of improvement).
A run's score at a budget (--at; default: the last step every run of the grid reached) is the mean
episode return over a window of its evaluations, never one: those in the last --window of the budget
(default 10%), at least the last --min-evaluations (default 3). The window ends at the run's first
evaluation at or after the budget (the scripts evaluate at the first iteration past each multiple of
their interval), or at its final evaluation if it was trained to that budget (whole iterations stop
a little short of it); runs that did not reach a budget are left out of that budget's column. Every
table, ordering and probability of improvement uses these scores, and each .md says its windows;
Tables 2 and 6 of the matrix games keep the paper's protocol, the final evaluation. Runs of one grid's
method launched with different flags after `--` are different methods, named by those flags
("mlp --hypernet-init matched"), so that several launches compare in one table. Every CI is a 95% stratified bootstrap (--reps draws, numpy seeded
with --seed before each estimate: rliable draws from numpy's global RNG, not from its random_state).
"""

import argparse
import collections
import json
import math
import os
import re
import shlex
import sys

import numpy as np
import scipy.stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sps import OneLineParser, at_least, check_writable, new_output_folder  # noqa: E402

FORMAT = "hypermarl-summary/1"
TITLES = {"figure2-ippo": "IPPO on Dispersion, 4 agents (Figure 2)", "figure2-mappo": "MAPPO on Dispersion, 4 agents (Figure 2)",
          "figure4": "IPPO on Navigation (Figure 4)", "table4": "MAPPO variants on MaMuJoCo (Table 4)",
          "figure7": "HyperMARL ablations on Humanoid 17x1 (Figure 7)",
          "figure17-ippo": "IPPO ablations on Dispersion (Figure 17)",
          "figure17-mappo": "MAPPO ablations on Dispersion (Figure 17)", "table2-6": "Matrix games (Tables 2 and 6)",
          "figure6": "Recurrent IPPO and MAPPO on SMAX (Figure 6)"}
# Table 4: IQM (95% CI) of the mean episode return, MaMuJoCo v2. Columns HAPPO, FuPS, Ind. Actors, HyperMARL.
PAPER_TABLE4 = {
    "Humanoid-17x1": {"happo": (6501.15, 3015.88, 7229.79), "fups": (566.12, 536.36, 603.01),
                      "nops": (6188.46, 5006.13, 6851.74), "mlp": (6544.10, 3868.00, 6664.89)},
    "Walker2d-2x3": {"happo": (4748.06, 4366.94, 6230.81), "fups": (4574.39, 4254.21, 5068.32),
                     "nops": (4747.05, 3974.76, 6249.58), "mlp": (5064.86, 4635.10, 5423.42)},
    "HalfCheetah-2x3": {"happo": (6752.40, 6130.42, 7172.98), "fups": (6771.21, 6424.94, 7228.65),
                        "nops": (6650.31, 5714.68, 7229.61), "mlp": (7063.72, 6696.30, 7325.36)},
    "Ant-4x2": {"happo": (6031.92, 5924.32, 6149.22), "fups": (6148.58, 5988.63, 6223.88),
                "nops": (6046.23, 5924.62, 6216.57), "mlp": (5940.16, 5485.77, 6280.59)}}
PAPER_IQM = {"table4": PAPER_TABLE4}  # Figure 5 plots Table 4's Humanoid runs: its row and curves
# Table 3a: SND (mean, std over seeds) on Dispersion at 20M steps, about 1,000 times below Eq. (9) as
# written (docs/implementation.md, detail 12): its ordering compares, its values do not.
PAPER_SND = {"figure2-ippo": {"mlp": (6.3e-4, 2.0e-5), "linear": (6.4e-4, 7.0e-6), "nops": (6.9e-4, 7.0e-6),
                              "fups": (2.4e-4, 1.1e-4)},
             "figure2-mappo": {"mlp": (6.7e-4, 5.0e-6), "linear": (6.6e-4, 1.2e-5), "nops": (6.6e-4, 1.5e-5),
                               "fups": (3.7e-4, 8.1e-5)}}
ORDER = ["happo", "nops", "fups-noid", "fups", "dico", "linear", "mlp"]  # table rows: baselines first
# The fields the tables read besides marl_eval (launch.py's write_summary writes them all): (types, what is
# expected). OPTIONAL ones may be missing; null, where allowed, is "not logged".
NUMBER_OR_NULL = (int, float, type(None))
REQUIRED = {"grid": (str, "a grid name such as figure2-ippo"), "env": (str, "vmas, mamujoco, smax or matrix"),
            "task": (str, "a task name such as dispersion-4"), "method": (str, "a method name such as mlp"),
            "seed": (int, "a whole number")}
OPTIONAL = {"total_timesteps": (NUMBER_OR_NULL, "a number of steps or null"),
            "final_snd": (NUMBER_OR_NULL, "a number or null"), "sps": (NUMBER_OR_NULL, "a number or null"),
            "gradient": ((dict, type(None)), "an object of numbers or null"),
            "config": (dict, "an object of flags"), "argv": (list, "a list of flags")}


def find_summaries(parser, paths):
    files = set()
    for path in paths:
        if os.path.isfile(path):
            files.add(os.path.realpath(path))
        elif os.path.isdir(path):
            files |= {os.path.realpath(os.path.join(d, "summary.json")) for d, _, names in os.walk(path) if "summary.json" in names}
        else:
            parser.error(f"PATH: no such file or folder {path!r}")
    if not files:
        parser.error(f"PATH: no summary.json in {' '.join(paths)}")
    return sorted(files)


def load_run(path):
    """The summary with "evals": [(step, {metric: mean over episodes})] from its marl_eval layout."""
    try:
        with open(path) as f:
            s = json.load(f)
        if not isinstance(s, dict) or s.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        check_fields(s)
        s["evals"] = evaluations(s["marl_eval"][s["env"]][s["task"]][s["method"]][f"seed_{s['seed']}"])
        if not s["evals"] or any("return" not in m for _, m in s["evals"]):
            raise ValueError("no evaluation with a return in marl_eval")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        why = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"  # ours say what is wrong already
        raise ValueError(f"{path}: malformed summary.json ({why})".replace("\n", " ")) from None
    return s


def extra_flags(run) -> list:
    """The flags the launcher passed after `--` (its summary's argv: the grid's flags, the seed, the budget, then these)."""
    argv = [str(token) for token in run.get("argv", [])]
    budget = next((i for i, token in enumerate(argv) if token in ("--total-timesteps", "--num-trials")), None)
    return argv[budget + 2:] if budget is not None else []


def label_by_extra_flags(runs) -> None:
    """Runs of one grid, task and method made with different flags after `--` (two launches, say with and
    without --hypernet-init matched) are different methods here: such runs are named by those flags
    ("mlp --hypernet-init matched"); the runs without any keep the method's name."""
    groups = collections.defaultdict(list)
    for run in runs:
        groups[run["grid"], run["task"], run["method"]].append(run)
    for group in groups.values():
        if len({tuple(extra_flags(run)) for run in group}) > 1:
            for run in group:
                run["method"] = " ".join([run["method"], *extra_flags(run)])


def is_a(value, types) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)  # JSON's true is no number


def check_fields(s) -> None:
    """ValueError naming the first field the tables cannot read, and what it must be."""
    for name, (types, expected) in {**REQUIRED, **OPTIONAL}.items():
        if name in s or name in REQUIRED:
            if not is_a(s.get(name), types):
                raise ValueError(f"{name}: {'missing' if name not in s else f'got {s[name]!r}'[:60]}; expected {expected}")
    if not re.fullmatch(r"[\w-][\w.-]*", s["grid"]):  # it names the output files: no folder in it
        raise ValueError(f"grid: got {s['grid']!r}; expected a grid name such as figure2-ippo (letters, digits, - _ .)")
    if not all(is_a(v, NUMBER_OR_NULL) for v in (s.get("gradient") or {}).values()):
        raise ValueError("gradient: expected an object of numbers or nulls")


def evaluations(run) -> list:
    """[(step, {metric: mean over the episodes})] of the run's marl_eval entry, in step order; a metric
    the run did not log at a step ([None] or []) is left out of that evaluation."""
    evals = []
    for key, entry in run.items():
        if not key.startswith("step_"):
            continue
        if not isinstance(entry, dict) or not is_a(entry.get("step_count"), int):
            raise ValueError(f"marl_eval {key}: expected an object with a step_count (a whole number)")
        metrics = {}
        for metric, values in entry.items():
            if metric == "step_count":
                continue
            if not isinstance(values, list) or not all(is_a(v, NUMBER_OR_NULL) and (v is None or math.isfinite(v))
                                                       for v in values):  # JSON's Infinity and NaN: no return
                raise ValueError(f"marl_eval {key} {metric}: expected a list of finite numbers or nulls, got {values!r}"[:200])
            logged = [v for v in values if v is not None]
            if logged:
                metrics[metric] = float(np.mean(logged))
        evals.append((entry["step_count"], metrics))
    return sorted(evals, key=lambda e: e[0])


def reached(run, budget) -> bool:
    """An evaluation at or past the budget, or training to it (its last step may fall just short)."""
    return run["evals"][-1][0] >= budget or (run.get("total_timesteps") or 0) >= budget  # null: not logged


def window(run, budget, fraction, at_least):
    """The evaluations a score at budget averages: the one at budget (its first at or after it: a script
    evaluates at the first iteration past each multiple of its interval, 501,760 for 500,000 in 2,048-step
    iterations; else, for a run trained to this budget or more, its final one, as whole iterations stop short
    of the budget: 499,712 for 500,000) and those before it in the last `fraction` of the budget, widened to
    the last `at_least` evaluations; [] if the run never reached the budget."""
    if not reached(run, budget):
        return []
    at = next((i for i, (step, _) in enumerate(run["evals"]) if step >= budget), len(run["evals"]) - 1)
    upto = run["evals"][: at + 1]
    inside = [e for e in upto if e[0] >= (1 - fraction) * budget]
    return upto[-at_least:] if len(inside) < at_least else inside


def score(run, budget, metric="return", fraction=0.0, at_least=1):
    """The mean of the metric over the run's window at budget (window()); the defaults score its one
    evaluation at budget. None if the run never reached the budget or logged no such metric there."""
    values = [m[metric] for _, m in window(run, budget, fraction, at_least) if metric in m]
    return float(np.mean(values)) if values else None


def fraction(text):
    value = float(text)  # a ValueError here becomes argparse's "invalid value" message
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text}")
    return value


def seeded(opts, fn, *args, **kwargs):
    np.random.seed(opts.seed)  # rliable's StratifiedBootstrap draws with np.random.choice (global RNG)
    return fn(*args, **kwargs)


def cached(estimate):
    """The table and the plots ask for the same estimates: the same seed gives the same CI, so reuse it."""
    memo = {}

    def wrapper(opts, *arrays):
        key = (opts.seed, opts.reps, *((a.shape, a.tobytes()) for a in arrays))
        if key not in memo:
            memo[key] = estimate(opts, *arrays)
        return memo[key]

    return wrapper


@cached
def iqm_ci(opts, x):
    """IQM and its 95% stratified bootstrap CI of a (runs x tasks) array."""
    from rliable import library as rly, metrics

    point, ci = seeded(opts, rly.get_interval_estimates, {"x": x}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=opts.reps)
    return float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0])


@cached
def poi_ci(opts, x, y):
    """P(X > Y) + P(X = Y) / 2 averaged over tasks, with its CI (runs resampled independently)."""
    from rliable import library as rly, metrics

    point, ci = seeded(opts, rly.get_interval_estimates, {"p": [x, y]},
                       lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps=opts.reps)
    return float(point["p"][0]), float(ci["p"][0, 0]), float(ci["p"][1, 0])


def iqm_per_step(scores):
    """metrics.aggregate_iqm of scores[..., t] for every t at once (the same 25% trimmed mean)."""
    return scipy.stats.trim_mean(scores.reshape(-1, scores.shape[-1]), 0.25, axis=0)


def mean_of(values):
    """Mean of the values the runs logged (None: not logged)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def interval(v, digits=3):
    return f"{fmt(v[0], digits)} [{fmt(v[1], digits)}, {fmt(v[2], digits)}]"


def fmt(value, digits=3):
    """digits decimals; "e" notation when those would show nothing (gradient variances ~1e-4)."""
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:.2e}" if digits == "e" or 0 < abs(value) < 10 ** -digits else f"{value:,.{digits}f}"


class Grid:
    def __init__(self, name, runs, opts):
        self.name, self.runs = name, sorted(runs, key=lambda r: (r["task"], r["method"], r["seed"]))
        self.tasks = sorted({r["task"] for r in runs})
        self.methods = sorted({r["method"] for r in runs}, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
        self.budgets = opts.at or [min(r["evals"][-1][0] for r in runs)]  # the last step every run reached
        self.opts = opts
        self.unit = "trials" if all(r["env"] == "matrix" for r in runs) else "steps"  # the matrix games count trials
        self.wins = any("win" in m for r in runs for _, m in r["evals"])  # SMAX: each evaluation episode's win

    def of(self, task, method):
        return [r for r in self.runs if r["task"] == task and r["method"] == method]

    def of_method(self, method):
        return [r for r in self.runs if r["method"] == method]

    def scores(self, task, method, budget, metric="return", final=False):
        """Each run's score at budget: over its window (--window, --min-evaluations), or at its one
        evaluation at budget (final: the paper's protocol for Tables 2 and 6)."""
        fraction, at_least = (0.0, 1) if final else (self.opts.window, self.opts.min_evaluations)
        values = [score(r, budget, metric, fraction, at_least) for r in self.of(task, method)]
        return np.array([v for v in values if v is not None])

    def rectangles(self, budget):
        """(runs x tasks) min-max normalised scores per method: min/max over all runs of a task; a method
        keeps as many runs per task as its task with the fewest (rliable needs a rectangle)."""
        raw = {(t, m): self.scores(t, m, budget) for t in self.tasks for m in self.methods}
        span = {t: np.concatenate([raw[t, m] for m in self.methods]) for t in self.tasks}
        span = {t: (v.min(), v.max()) if len(v) else (0.0, 1.0) for t, v in span.items()}
        out = {}
        for m in self.methods:
            k = min(len(raw[t, m]) for t in self.tasks)
            if k:  # a method missing a task has no across-task score
                out[m] = np.stack([(raw[t, m][:k] - span[t][0]) / ((span[t][1] - span[t][0]) or 1.0) for t in self.tasks], 1)
        return out

    def count(self, task, method, budget):
        runs = self.of(task, method)
        n = len(self.scores(task, method, budget))
        short = sum(not reached(r, budget) for r in runs)
        why = [f"{short} did not reach {budget:,}"] * bool(short)
        why += [f"{len(runs) - n - short} without this metric"] * (len(runs) - n > short)
        return f"{n}" if n == len(runs) else f"{n} of {len(runs)} ({', '.join(why)})"

    def task_table(self, task):
        paper = PAPER_IQM.get(self.name, {}).get(task)
        win = " | win rate" if self.wins else ""
        head = "| method | " + " | ".join(f"{b:,} {self.unit}: IQM [95% CI] | mean ± std{win} | runs" for b in self.budgets)
        paper_snd = PAPER_SND.get(self.name)
        head += " | final SND | mean actor grad variance | SPS |" + (" paper IQM (95% CI) |" if paper else "")
        head += " paper SND (Table 3a) |" if paper_snd else ""
        lines = [head, "|---" * (head.count("|") - 1) + "|"]
        everything = np.concatenate([self.scores(task, m, b) for m in self.methods for b in self.budgets])
        d = 1 if len(everything) and np.abs(everything).max() >= 100 else 3  # one precision per table
        for m in self.methods:
            runs, cells = self.of(task, m), []
            if not runs:
                continue
            for b in self.budgets:
                x = self.scores(task, m, b)
                wins = [fmt(w.mean(), 2) if len(w := self.scores(task, m, b, "win")) else "—"] if self.wins else []
                if len(x):
                    cells += [interval(iqm_ci(self.opts, x[:, None]), d), f"{fmt(x.mean(), d)} ± {fmt(x.std(), d)}",
                              *wins, self.count(task, m, b)]
                else:
                    cells += ["—", "—", *wins, self.count(task, m, b)]
            cells += [fmt(mean_of(r.get("final_snd") for r in runs)),
                      fmt(mean_of((r.get("gradient") or {}).get("actor_var_mean") for r in runs), "e"),
                      fmt(mean_of(r.get("sps") for r in runs), 0)]
            if paper:
                p = paper.get(m)
                cells.append(f"{p[0]:,.2f} ({p[1]:,.2f}, {p[2]:,.2f})" if p else "not in the paper")
            if paper_snd:
                p = paper_snd.get(m)
                cells.append(f"{p[0]:.1e} ± {p[1]:.1e}" if p else "not in the paper")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines

    def across_and_poi(self):
        lines, rects = [], {b: self.rectangles(b) for b in self.budgets}
        if len(self.tasks) > 1:
            lines += ["## Across tasks", "", "IQM over runs x tasks of min-max normalised scores (per task: min and max over "
                      "all runs of that task at that budget, every method); a method keeps per task as many runs as its "
                      "task with the fewest.", "",
                      "| method | " + " | ".join(f"{b:,} {self.unit}: IQM [95% CI] | runs x tasks" for b in self.budgets) + " |",
                      "|---" * (1 + 2 * len(self.budgets)) + "|"]
            for m in self.methods:
                cells = []
                for b in self.budgets:
                    x = rects[b].get(m)
                    cells += ([interval(iqm_ci(self.opts, x)), f"{x.shape[0]} x {x.shape[1]}"] if x is not None
                              else ["—", "no score on every task"])
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["## Probability of improvement", "", "P(X > Y) + P(X = Y) / 2 over runs (Mann-Whitney), averaged over tasks, "
                  "95% CI; P(Y > X) = 1 - P(X > Y).", "",
                  "| X | Y | " + " | ".join(f"{b:,} {self.unit} [95% CI]" for b in self.budgets) + " |",
                  "|---|---|" + "---|" * len(self.budgets)]
        for i, x in enumerate(self.methods):
            for y in self.methods[i + 1:]:
                cells = [interval(poi_ci(self.opts, rects[b][x], rects[b][y])) if {x, y} <= rects[b].keys() else "—"
                         for b in self.budgets]
                lines.append(f"| {x} | {y} | " + " | ".join(cells) + " |")
        return lines + [""]

    def matrix_tables(self):
        """Tables 2 and 6 in the paper's layout (mean ± std over seeds, ddof 0 as the paper), imported values."""
        import matrix_games as mgb

        parsed = {t: re.fullmatch(r"(\w+)-n(\d+)", t) for t in self.tasks}
        keys = {t: (p[1], int(p[2])) for t, p in parsed.items() if p}
        games = [g for g in mgb.GAMES if any(g == k[0] for k in keys.values())]
        ns = sorted({k[1] for k in keys.values()})
        hypernets = [h for h in mgb.NAMES if h in self.methods]
        lines = []
        for title, metric, paper, digits in (("Table 2 (argmax evaluation)", "return", mgb.PAPER_TABLE2, 2),
                                             ("Table 6 (sampled actions)", "return_sampled", mgb.PAPER_TABLE6, 4)):
            for b in self.budgets:
                def cell(game, hypernet, n):
                    x = self.scores(f"{game}-n{n}", hypernet, b, metric, final=True)
                    return "—" if not len(x) else f"{mgb.format_cell(x, paper.get((game, hypernet), {}).get(n), digits)[0]} (n={len(x)})"

                lines += [f"## {title}, {b:,} {self.unit}: ours mean ± std over seeds (paper's value), ✗ = more than one std away", ""]
                lines += mgb.game_tables(games, hypernets, ns, cell)
        return lines

    def windows(self):
        """The window each budget's scores used, as steps from the first to the last evaluation averaged."""
        parts = []
        for b in self.budgets:
            spans = [window(r, b, self.opts.window, self.opts.min_evaluations) for r in self.runs]
            spans = [w for w in spans if w]
            if spans:
                lo, hi = min(w[0][0] for w in spans), max(w[-1][0] for w in spans)
                n = sorted({len(w) for w in spans})
                parts.append(f"at {b:,}: evaluations from {lo:,} to {hi:,} {self.unit} ({' or '.join(map(str, n))} per run)")
        return ("Windows: " + "; ".join(parts) + ".") if parts else ""

    def settings(self):
        """The flags the runs logged (summary "config"): the same for all, per method, or per run."""
        keys = sorted({k for r in self.runs for k in r.get("config", {})})
        same, by_method, per_run = [], [], []
        for k in keys:
            values = {m: {str(r.get("config", {}).get(k, "?")) for r in self.of_method(m)} for m in self.methods}
            union = set().union(*values.values())
            if len(union) == 1:
                same.append(f"{k}={union.pop()}")
            elif all(len(v) == 1 for v in values.values()):
                by_method.append(f"{k}: " + ", ".join(f"{m} {v.pop()}" for m, v in values.items()))
            else:
                per_run.append(k)
        return (["Settings the runs logged (summary \"config\"):", "", f"- all runs: {', '.join(same) or 'none logged'}"]
                + [f"- by method, {line}" for line in by_method]
                + ([f"- differ between runs of a method: {', '.join(per_run)}"] if per_run else []) + [""])

    def markdown(self):
        n_seeds = sorted({len(self.of(t, m)) for t in self.tasks for m in self.methods if self.of(t, m)})
        budget_note = ("budgets given with --at" if self.opts.at else "the last step every run reached")
        lines = [f"# {self.name}: {TITLES.get(self.name, 'grid ' + self.name)}", "",
                 f"{len(self.runs)} runs: {len(self.tasks)} task(s) x {len(self.methods)} method(s), "
                 f"{' / '.join(map(str, n_seeds))} seed(s) per task and method (seeds {sorted({r['seed'] for r in self.runs})}).", "",
                 f"Budget(s): {', '.join(f'{b:,}' for b in self.budgets)} {self.unit} ({budget_note}). Score of a run at a "
                 f"budget = mean of the episode returns over its evaluations in the last {self.opts.window:.0%} of the budget, "
                 f"at least its last {self.opts.min_evaluations} (the window ends at its first evaluation at or after the "
                 "budget, or at its final one if it was trained to that budget: whole iterations stop just short of it). "
                 + self.windows() + " A run that did not reach a budget is left out of that column (the runs column says "
                 "so). Tables, orderings and P(X > Y) all use these windowed scores; the curves show every evaluation. "
                 "IQM = 25% trimmed mean, std with ddof 0; CIs: 95% "
                 f"stratified bootstrap ({self.opts.reps} draws, seed {self.opts.seed}). Final SND: each run's last "
                 "evaluation; gradient variance: each run's mean over its training; SPS: each run's last logged value; "
                 "each averaged over the runs." + (" Win rate: the share of evaluation episodes won, over the same "
                                                   "windows, averaged over the runs." if self.wins else ""), ""] + self.settings()
        if self.name in PAPER_IQM:
            lines += ["Paper: Table 4's IQM (95% CI) (Figure 5 plots its Humanoid row), MaMuJoCo v2 at 10M steps; these "
                      "runs use Gymnasium-Robotics' v5 tasks, whose rewards differ, so the columns are not directly comparable.", ""]
        elif self.name == "table2-6":
            lines += ["Paper: Tables 2 and 6 (5 seeds each), values imported from benchmark/matrix_games.py.", ""]
        elif self.name in PAPER_SND:
            lines += ["Paper: Figure 2 plots the returns (no numbers); Table 3a gives each method's SND at 20M steps "
                      "(mean ± std), on a scale about 1,000 times below Eq. (9) as written: compare its ordering, not "
                      "its values (docs/implementation.md, detail 12).", ""]
        else:
            lines += ["Paper: " + ("figure only, no numbers in the paper." if self.name in TITLES else "not one of the paper's grids."), ""]
        for task in self.tasks:
            lines += [f"## {task}", ""] + self.task_table(task) + [""]
        lines += self.across_and_poi()
        if self.name == "table2-6":
            lines += self.matrix_tables()
        commits = collections.Counter((r.get("git_commit"), r.get("git_dirty")) for r in self.runs)
        lines += ["## Provenance", "", "Git commits: " + ", ".join(f"{c or 'unknown'}{' (dirty)' if d else ''}: {n} runs"
                                                               for (c, d), n in sorted(commits.items(), key=str)) + "", "",
                  "Commands (summary script + argv):", "", "```"]
        lines += [f"python {r.get('script', '?')} {shlex.join(map(str, r.get('argv', [])))}" for r in self.runs] + ["```", ""]
        return "\n".join(lines)

    def plots(self, out):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from rliable import library as rly, plot_utils

        budget, path = self.budgets[-1], os.path.join(out, self.name)
        colors = dict(zip(self.methods, plt.get_cmap("tab10").colors))
        # final: IQM + CI per task (and across tasks, normalised)
        none, rects = (np.nan,) * 3, self.rectangles(budget)
        est = {m: np.array([iqm_ci(self.opts, x[:, None]) if len(x := self.scores(t, m, budget)) else none for t in self.tasks]
                           + [iqm_ci(self.opts, rects[m]) if m in rects else none] * (len(self.tasks) > 1)) for m in self.methods}
        names = self.tasks + ["all tasks (normalised)"] * (len(self.tasks) > 1)
        fig, _ = plot_utils.plot_interval_estimates({m: e[:, 0] for m, e in est.items()}, {m: e[:, 1:].T for m, e in est.items()},
                                                    metric_names=names, algorithms=self.methods, colors=colors, row_height=0.6, wspace=0.3, max_ticks=3,
                                                    xlabel=f"return IQM at {budget:,} {self.unit}",
                                                    xlabel_y_coordinate=-0.9 / len(self.methods))  # below the tick labels
        fig.savefig(f"{path}_final.png", dpi=100, bbox_inches="tight")
        # curves: IQM + CI at every evaluation step the method's runs share
        cols = min(3, len(self.tasks))
        rows = (len(self.tasks) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
        for ax, t in zip(axes.flat, self.tasks):
            for m in self.methods:
                runs = self.of(t, m)
                if not runs:
                    continue
                steps = sorted(set.intersection(*[{s for s, _ in r["evals"]} for r in runs]))
                if not steps:  # no evaluation step common to all runs of the method
                    continue
                x = np.array([[dict(r["evals"])[s]["return"] for s in steps] for r in runs])[:, None, :]
                p, c = seeded(self.opts, rly.get_interval_estimates, {m: x}, iqm_per_step, reps=self.opts.reps)
                plot_utils.plot_sample_efficiency_curve(steps, p, c, algorithms=[m], colors=colors, ax=ax, xlabel=self.unit,
                                                        ylabel="return IQM", labelsize="medium", ticklabelsize="small",
                                                        marker="o" if len(steps) <= 20 else "", linewidth=1.5)
            ax.set_title(t)
            ax.legend(fontsize=7)
            ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # 500k, 2M: no crowded digits
        for ax in list(axes.flat)[len(self.tasks):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(f"{path}_curves.png", dpi=100)
        # performance profile and probability of improvement on the normalised scores
        taus = np.linspace(-0.05, 1.05, 56)
        prof, prof_ci = seeded(self.opts, rly.create_performance_profile, rects, taus, reps=self.opts.reps)
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_utils.plot_performance_profiles(prof, taus, performance_profile_cis=prof_ci, colors=colors, ax=ax,
                                             xlabel=r"min-max normalised score ($\tau$)")
        ax.legend([matplotlib.lines.Line2D([], [], color=colors[m]) for m in prof], list(prof), fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{path}_profile.png", dpi=100)
        pairs = {f"{x};{y}": poi_ci(self.opts, rects[x], rects[y]) for i, x in enumerate(self.methods)
                 for y in self.methods[i + 1:] if x in rects and y in rects}
        if pairs:
            ax = plot_utils.plot_probability_of_improvement({k: np.array([v[0]]) for k, v in pairs.items()},
                                                            {k: np.array([[v[1]], [v[2]]]) for k, v in pairs.items()},
                                                            pair_separator=";", figsize=(5, 0.5 + 0.4 * len(pairs)))
            ax.figure.savefig(f"{path}_poi.png", dpi=100, bbox_inches="tight")
        plt.close("all")


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="grid folders or summary.json files")
    parser.add_argument("--out", default=None, help="output folder (default: a new runs/aggregate_<time>)")
    parser.add_argument("--at", nargs="+", type=at_least(1), default=None, metavar="STEP",
                        help="budgets in environment steps (default: the last step every run of a grid reached)")
    parser.add_argument("--window", type=fraction, default=0.1, metavar="FRACTION",
                        help="a score averages the evaluations in this last fraction of the budget (default %(default)s)")
    parser.add_argument("--min-evaluations", type=at_least(1), default=3, metavar="K",
                        help="... widened to at least the last K evaluations (default %(default)s)")
    parser.add_argument("--reps", type=at_least(1), default=2000, help="bootstrap draws per CI (default %(default)s)")
    parser.add_argument("--seed", type=at_least(0, below=2**32), default=0,  # numpy's seeds
                        help="numpy seed before each bootstrap (default %(default)s)")
    opts = parser.parse_args()
    opts.at = sorted(set(opts.at)) if opts.at else None
    if opts.out is not None:
        check_writable(parser, "--out", opts.out)
    grids, seen, runs = collections.defaultdict(list), {}, []
    for path in find_summaries(parser, opts.paths):
        try:
            runs.append((path, load_run(path)))
        except ValueError as e:
            parser.error(str(e))
    label_by_extra_flags([run for _, run in runs])
    for path, run in runs:
        key = (run["grid"], run.get("task"), run.get("method"), run.get("seed"))
        if key in seen:  # the same run twice would count its seed twice
            parser.error(f"PATH: {seen[key]} and {path} are the same run {'/'.join(map(str, key))}")
        seen[key] = path
        grids[run["grid"]].append(run)
    out = opts.out or new_output_folder("aggregate")  # never over the committed results unless --out says so
    os.makedirs(out, exist_ok=True)
    for name, runs in sorted(grids.items()):
        grid = Grid(name, runs, opts)
        text = grid.markdown()
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(text)
        grid.plots(out)
        print(f"{name}: {len(runs)} runs -> {os.path.join(out, name)}.md and PNGs")


if __name__ == "__main__":
    main()
