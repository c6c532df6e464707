"""Tables 2 and 6 of the paper (and HyperMARL rows): every game x n x family x seed of
reinforce_matrix_games.py, with the paper's values beside ours, and a plot of the learning curves.

    python benchmark/matrix_games.py                               # a new folder runs/matrix_games_<time>
    python benchmark/matrix_games.py --out benchmark/results       # regenerates the committed results
                                                                   # (TensorBoard logs: benchmark/results/runs, ignored by git)
    python benchmark/matrix_games.py --games synchronisation --n-agents 8 --hypernets fups-noid fups --num-seeds 100
    python benchmark/matrix_games.py --hypernets nops fups-noid fups --returns raw --out /tmp/raw

--hypernets takes reinforce_matrix_games.py's --hypernet values: nops, fups-noid (Table 2's FuPS), fups
(FuPS+ID), linear, mlp. Any other flag is the script's, checked by tyro as there (--returns, --reward,
--num-trials, --seed, --num-seeds, --runs-dir for the TensorBoard logs, ...); --num-seeds defaults to
5 here (Table 8), and --runs-dir to the folder runs/ inside --out. Writes to --out:
  matrix_games_sweep.md    Tables 2 and 6 (ours, the paper's value in brackets, a mark where they differ
                           by more than one std), seeds at the optimum, parameters, gradient statistics, SND
  matrix_games_sweep.json  per-seed final values and learning curves
  matrix_games_n<N>.png    evaluation reward against training trials at the largest n
  runs/                    one TensorBoard run per game x n x family x seed (unless --runs-dir says elsewhere)
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import typing

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reinforce_matrix_games as mg  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
from sps import OneLineParser, at_least, check_writable, new_output_folder, write_report  # noqa: E402

GAMES = typing.get_args(typing.get_type_hints(mg.Args)["game"])
# The families in the paper's row order (tables, plot), with the paper's names.
NAMES = {"nops": "NoPS", "fups-noid": "FuPS", "fups": "FuPS+ID", "linear": "HyperMARL (linear)",
         "mlp": "HyperMARL (MLP)"}
# Table 8: total parameters per family.
PAPER_PARAMS = {"nops": {2: 36, 4: 112, 8: 384}, "fups-noid": {2: 34, 4: 100, 8: 328}, "fups": {2: 42, 4: 148, 8: 552}}
# Table 2 (argmax evaluation) and Table 6 (sampled actions): (mean, std) over 5 seeds for n = 2, 4, 8.
PAPER_TABLE2 = {
    ("specialisation", "nops"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (1.00, 0.00)},
    ("specialisation", "fups-noid"): {2: (0.50, 0.00), 4: (0.25, 0.00), 8: (0.13, 0.00)},
    ("specialisation", "fups"): {2: (1.00, 0.00), 4: (0.95, 0.10), 8: (0.53, 0.09)},
    ("synchronisation", "nops"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (0.13, 0.00)},
    ("synchronisation", "fups-noid"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (1.00, 0.00)},
    ("synchronisation", "fups"): {2: (1.00, 0.00), 4: (1.00, 0.00), 8: (0.30, 0.35)},
}
PAPER_TABLE6 = {
    ("specialisation", "nops"): {2: (.9996, .0004), 4: (.9988, .0007), 8: (.9989, .0008)},
    ("specialisation", "fups-noid"): {2: (.7493, .0062), 4: (.6826, .0039), 8: (.6545, .0025)},
    ("specialisation", "fups"): {2: (.9999, .0002), 4: (.9995, .0003), 8: (.7275, .0293)},
    ("synchronisation", "nops"): {2: (.9993, .0004), 4: (.9976, .0022), 8: (.1250, 0.0)},
    ("synchronisation", "fups-noid"): {2: (.9999, .0002), 4: (1.0, 0.0), 8: (.3000, .3500)},
    ("synchronisation", "fups"): {2: (.9999, 0.0), 4: (.9999, .0003), 8: (.1250, 0.0)},
}
SOLVED = 0.99  # a seed "solves" a game when its evaluation reward is at least this


def expected_team_reward(game: str, probs: torch.Tensor) -> torch.Tensor:
    """Exact expected mean-over-agents reward of independent policies probs (..., n_agents, n_foods)."""
    n = probs.shape[-2]
    if game == "specialisation":  # E[distinct foods] / n
        return (1.0 - (1.0 - probs).prod(-2)).sum(-1) / n
    p_match = probs.prod(-2).sum(-1)
    return p_match + (1.0 - p_match) / n


def format_cell(ours, paper, digits):
    """'mean ± std (paper m ± s)' + ' ✗' when |ours - paper| > max(std ours, std paper) + the paper's rounding."""
    mean, std = float(np.mean(ours)), float(np.std(ours))  # np.std (ddof 0): the paper's 0.30 ± 0.35 is 1 of 5 seeds
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if paper is None:
        return text, None
    unit = 10 ** -digits  # the paper rounds mean and std to this: half a unit of slack on each
    off = abs(mean - paper[0]) > max(std, paper[1] + 0.5 * unit) + 0.5 * unit + 1e-12
    return text + f" ({paper[0]:.{digits}f} ± {paper[1]:.{digits}f})" + (" ✗" if off else ""), off


def game_tables(games, hypernets, ns, cell) -> list[str]:
    """One markdown table per game (rows: families, columns: n); cell(game, hypernet, n) -> text."""
    header = "| Method | " + " | ".join(str(n) for n in ns) + " |\n|---|" + "---|" * len(ns)
    lines = []
    for game in games:
        lines += [f"**{game.capitalize()} game**\n", header]
        for hypernet in hypernets:
            lines.append(f"| {NAMES[hypernet]} | " + " | ".join(cell(game, hypernet, n) for n in ns) + " |")
        lines.append("")
    return lines


def sweep_tables(results: list[dict], args) -> tuple[str, list[str]]:
    """Markdown in the layout of Tables 2 and 6 (rows: families, columns: n), plus parameters and gradients."""
    by_key = {(r["game"], r["hypernet"], r["n_agents"]): r for r in results}
    ns = sorted({r["n_agents"] for r in results})
    hypernets = [h for h in NAMES if any(r["hypernet"] == h for r in results)]
    games = [g for g in GAMES if any(r["game"] == g for r in results)]
    lines, misses = [], []
    for title, key, paper_table, digits in (
            ("Table 2 (argmax evaluation)", "argmax", PAPER_TABLE2, 2),
            ("Table 6 (sampled actions)", "sampled", PAPER_TABLE6, 4)):

        def paper_cell(game, hypernet, n):
            r = by_key.get((game, hypernet, n))
            if r is None:
                return "—"
            text, off = format_cell(r[key], paper_table.get((game, hypernet), {}).get(n), digits)
            if off:
                misses.append(f"{title.split(' (')[0]} {game} {NAMES[hypernet]} n={n}: {text}")
            return text

        lines.append(f"### {title}: ours mean ± std over {args.num_seeds} seeds (paper's value), ✗ = more than one std away\n")
        lines += game_tables(games, hypernets, ns, paper_cell)

    def solved_cell(game, hypernet, n):
        r = by_key.get((game, hypernet, n))
        if r is None:
            return "—"
        return " / ".join(str(sum(v >= SOLVED for v in r[key])) for key in ("argmax", "sampled")) + f" of {len(r['argmax'])}"

    lines.append(f"### Seeds at the optimum (evaluation reward ≥ {SOLVED}): argmax / sampled\n")
    lines += game_tables(games, hypernets, ns, solved_cell)
    lines += ["### Parameters per method (Table 8 in brackets)\n",
              "| Method | " + " | ".join(str(n) for n in ns) + " |\n|---|" + "---|" * len(ns)]
    for hypernet in hypernets:
        cells = []
        for n in ns:
            paper = PAPER_PARAMS.get(hypernet, {}).get(n)
            cells.append(f"{mg.count_params(hypernet, n, args)}" + (f" ({paper})" if paper is not None else ""))
        lines.append(f"| {NAMES[hypernet]} | " + " | ".join(cells) + " |")
    lines.append("")
    for title, key, fmt in (("Gradient variance (variance across all policy parameters of each update's gradient, averaged over training)", "grad_var", ".2e"),
                            ("Interference (mean pairwise cosine similarity of the agents' gradients, averaged over training)", "interference", ".3f"),
                            ("SND (mean pairwise Jensen-Shannon distance between agents' final policies)", "snd", ".3f")):

        def stat_cell(game, hypernet, n, key=key, fmt=fmt):
            r = by_key.get((game, hypernet, n))
            return "—" if r is None else f"{np.mean(r[key]):{fmt}} ± {np.std(r[key]):{fmt}}"

        lines.append(f"### {title}\n")
        lines += game_tables(games, hypernets, ns, stat_cell)
    return "\n".join(lines), misses


def rounded(value, digits=6):
    """Floats rounded (significant digits) for a compact JSON."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def plot_curves(results: list[dict], n_agents: int, path: str) -> None:
    """Evaluation reward against training trials per family at n_agents, both games, argmax and sampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = [g for g in GAMES if any(r["game"] == g and r["n_agents"] == n_agents for r in results)]
    fig, axes = plt.subplots(len(games), 2, figsize=(10, 3.6 * len(games)), squeeze=False)
    for row, game in enumerate(games):
        for col, (key, label) in enumerate((("argmax", "argmax actions (Table 2)"), ("sampled", "sampled actions (Table 6)"))):
            ax = axes[row][col]
            for k, hypernet in enumerate(NAMES):
                r = next((r for r in results if (r["game"], r["hypernet"], r["n_agents"]) == (game, hypernet, n_agents)), None)
                if r is None:
                    continue
                x = np.array(r["curve"]["trials"])
                y = np.array(r["curve"][key])  # (S, T)
                mean, std = y.mean(0), y.std(0)
                # layered widths and dashes keep coinciding curves visible
                line, = ax.plot(x, mean, label=NAMES[hypernet], linewidth=3.2 - 0.6 * k,
                                linestyle=["-", "-", "--", "-.", ":"][k])
                ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=line.get_color(), alpha=0.15)
            ax.set_title(f"{game.capitalize()}, n = {n_agents}: {label}")
            ax.set_xlabel("training trials")
            ax.set_ylabel("evaluation reward (mean over agents)")
            ax.set_ylim(0, 1.05)
            ax.grid(True, linestyle="--", alpha=0.5)
    for ax in axes.flat:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--games", nargs="+", default=list(GAMES), choices=GAMES)
    parser.add_argument("--n-agents", nargs="+", type=at_least(2), default=[2, 4, 8])
    parser.add_argument("--hypernets", nargs="+", default=list(NAMES), choices=list(NAMES),
                        help="the families to train (reinforce_matrix_games.py's --hypernet; default: all)")
    parser.add_argument("--out", default=None, help="output folder (default: a new folder runs/matrix_games_<time>)")
    opts, rest = parser.parse_known_args(argv)
    for flag, instead in (("--game", "--games"), ("--hypernet", "--hypernets"), ("--save-model", None)):
        if any(item == flag or item.startswith(flag + "=") for item in rest):
            parser.error(f"{flag}: the sweep sets it" + (f"; use {instead}" if instead else ""))
    if not any(item == "--num-seeds" or item.startswith("--num-seeds=") for item in rest):
        rest += ["--num-seeds", "5"]  # Table 8
    if opts.out is not None:
        check_writable(parser, "--out", opts.out)
    runs_dir_given = any(item == "--runs-dir" or item.startswith("--runs-dir=") for item in rest)
    if not runs_dir_given:  # checked where it will be: inside --out, or inside the new folder in runs/
        rest += ["--runs-dir", os.path.join(opts.out or "runs", "runs")]
    args = tyro.cli(mg.Args, args=rest, prog="python reinforce_matrix_games.py")  # a bad choice or type: exit 2
    try:  # the script's own checks, of the families and numbers of agents the sweep trains
        for n in opts.n_agents:
            mg.check_args(dataclasses.replace(args, n_agents=n), mg.flags_given(rest), hypernets=opts.hypernets)
    except ValueError as error:
        parser.error(str(error))
    try:  # the plot comes after the whole sweep: fail now, not then
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("matplotlib is not installed (pip install -r requirements-dev.txt); the sweep ends with a plot")
    out = opts.out or new_output_folder("matrix_games")
    if not runs_dir_given:
        args.runs_dir = os.path.join(out, "runs")

    torch.set_num_threads(args.num_threads)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    start, results = time.time(), []
    total = len(opts.n_agents) * len(opts.games) * len(opts.hypernets)
    for n in opts.n_agents:
        for game in opts.games:
            for hypernet in opts.hypernets:
                writers = mg.make_writers(args, game, n, hypernet, seeds)
                t0 = time.time()
                try:
                    trained = mg.train(game, hypernet, n, seeds, args, writers)
                finally:
                    for writer in writers:
                        writer.close()
                with torch.no_grad():  # Theorem B.1: the exact expected reward of the final policies
                    expected = expected_team_reward(game, torch.softmax(trained.pop("population").logits(), -1))
                result = dict(game=game, hypernet=hypernet, n_agents=n, seeds=seeds, updates=args.num_trials // args.batch_size,
                              params=mg.count_params(hypernet, n, args), expected=expected.tolist(), **trained)
                results.append(result)
                elapsed = time.time() - start
                eta = f" eta {mg.duration(elapsed / len(results) * (total - len(results)))}" if len(results) < total else ""
                print(f"[{len(results)}/{total}] {game:15s} n={n} {NAMES[hypernet]:18s} params={result['params']:4d} "
                      f"argmax {np.mean(result['argmax']):.3f} ± {np.std(result['argmax']):.3f}  "
                      f"sampled {np.mean(result['sampled']):.4f} ± {np.std(result['sampled']):.4f}  "
                      f"grad var {np.mean(result['grad_var']):.2e}  interference {np.mean(result['interference']):.3f}  "
                      f"({time.time() - t0:.1f} s; elapsed {mg.duration(elapsed)}{eta})", flush=True)
    runtime = time.time() - start
    tables, misses = sweep_tables(results, args)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    command = " ".join(["python benchmark/matrix_games.py", *argv])
    header = (f"# Specialisation and Synchronisation games: REINFORCE sweep\n\n"
              f"Generated by `{command}`.\n\n"
              f"- Runtime: {runtime:.1f} s for {len(results)} configurations x {args.num_seeds} seeds "
              f"({args.num_trials} trials, batch {args.batch_size}, {args.num_trials // args.batch_size} updates each)\n"
              f"- Reward: {args.reward}; returns: {args.returns}\n"
              f"- Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.num_threads} thread(s)\n"
              f"- Seeds: {seeds}; evaluation: {args.eval_trials} trials\n\n")
    miss_text = "### Cells more than one std from the paper\n\n" + ("\n".join(f"- {m}" for m in misses) if misses else "- none") + "\n"
    os.makedirs(out, exist_ok=True)
    md_path = os.path.join(out, "matrix_games_sweep.md")
    write_report(md_path, header + tables + "\n" + miss_text)
    json_path = os.path.join(out, "matrix_games_sweep.json")
    write_report(json_path, json.dumps(rounded(dict(command=command, runtime_s=runtime, machine=cpu,
                                                    args=dataclasses.asdict(args), results=results))))
    png_path = os.path.join(out, f"matrix_games_n{max(opts.n_agents)}.png")
    plot_curves(results, max(opts.n_agents), png_path)
    print(tables)
    print(miss_text)
    print(f"sweep: {len(results)} configurations x {args.num_seeds} seeds in {runtime:.1f} s; wrote {md_path}, {json_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
