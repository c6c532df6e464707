"""Same seed, same numbers: a regression check for redesigns of the training scripts.

Runs a short training of every family (VMAS Dispersion with IPPO and MAPPO, MaMuJoCo
HalfCheetah-2x3 with MAPPO and HAPPO, the matrix game) through the scripts' command lines
only, so that renaming their functions does not break it, then reads every scalar of each
run's TensorBoard event file except the wall-clock ones (charts/SPS, perf/*). The JSON it
writes maps config name -> {tag: [[step, value], ...]}; a sha256 digest of each config's
entry is printed beside it. Each run is single-threaded, on the CPU, with seed 1.

    # numbers of a checkout (default: the repository holding this file); 2-3 minutes on 2 cores
    python benchmark/same_numbers.py --out /tmp/after.json
    python benchmark/same_numbers.py --repo /tmp/before --out /tmp/before.json
    python benchmark/same_numbers.py --only ippo_mlp mamujoco_happo_nops   # some configs
    # identical or not, per config, with the first differing tag and step (exit status 1 if any differ)
    python benchmark/same_numbers.py --compare benchmark/results/same_numbers_before.json /tmp/after.json

benchmark/results/same_numbers_before.json holds the numbers of the code just before the redesign (torch 2.13.0
CPU, requirements.txt's pins).
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

VMAS_SMALL = ["--scenario", "dispersion", "--n-agents", "4", "--num-envs", "8", "--num-steps", "16",
              "--total-timesteps", "384", "--num-minibatches", "2", "--update-epochs", "2",
              "--eval-interval", "128", "--eval-episodes", "4", "--snd-samples", "50", "--max-steps", "20",
              "--actor-hidden-dims", "32", "32", "--critic-hidden-dims", "32", "32"]
MAMUJOCO_SMALL = ["--task", "HalfCheetah-2x3", "--num-envs", "2", "--no-async-envs", "--num-steps", "32",
                  "--total-timesteps", "192", "--max-episode-steps", "40", "--update-epochs", "2",
                  "--critic-epochs", "2", "--num-minibatches", "2", "--actor-hidden-dims", "16", "16",
                  "--critic-hidden-dims", "16", "16", "--eval-interval", "64", "--eval-episodes", "2",
                  "--snd-samples", "20", "--snd-gaussian-samples", "8", "--interference-interval", "1",
                  "--interference-samples", "16", "--torch-threads", "1", "--update-threads", "1"]
MATRIX_SMALL = ["--game", "specialisation", "--n-agents", "4", "--num-trials", "400"]


class OneLineParser(argparse.ArgumentParser):
    """Bad input: one line, exit status 2, nothing written (sps.py's, without its torch import)."""

    def error(self, message):
        print(f"error: {message.removeprefix('argument ')}", file=sys.stderr)  # "error: --flag: ..."
        sys.exit(2)


def configs():
    """name -> (script, flags)."""
    out = {}
    for script, fam in (("ippo_hyper_vmas.py", "ippo"), ("mappo_hyper_vmas.py", "mappo")):
        for hypernet in ("mlp", "linear", "fups", "nops", "dico"):
            out[f"{fam}_{hypernet}"] = (script, VMAS_SMALL + ["--hypernet", hypernet])
    ippo_extra = {
        "ippo_dico_continuous_snd0.5": ["--hypernet", "dico", "--continuous-actions", "--dico-snd-des", "0.5"],
        "ippo_mlp_agent+obs": ["--hypernet", "mlp", "--hypernet-input", "agent+obs"],  # w/o GD ablation
        "ippo_mlp_continuous": ["--hypernet", "mlp", "--continuous-actions"],
        "ippo_nops_continuous": ["--hypernet", "nops", "--continuous-actions"],
        "ippo_mlp_init_matched": ["--hypernet", "mlp", "--hypernet-init", "matched"],
    }
    for name, flags in ippo_extra.items():
        out[name] = ("ippo_hyper_vmas.py", VMAS_SMALL + flags)
    for algo, hypernet in (("mappo", "mlp"), ("mappo", "fups"), ("mappo", "nops"), ("happo", "nops")):
        out[f"mamujoco_{algo}_{hypernet}"] = ("mappo_hyper_mamujoco.py",
                                              MAMUJOCO_SMALL + ["--algo", algo, "--hypernet", hypernet])
    for hypernet in ("nops", "fups", "fups-noid", "linear", "mlp"):
        out[f"matrix_{hypernet}"] = ("reinforce_matrix_games.py", MATRIX_SMALL + ["--hypernet", hypernet])
    return out


def cpu_flag(script):
    """--no-cuda, but for the matrix games: they always run on the CPU and have no such flag."""
    return [] if script == "reinforce_matrix_games.py" else ["--no-cuda"]


def wall_clock(tag):
    return tag == "charts/SPS" or tag.startswith("perf/")


def read_scalars(run_dir):
    """{tag: [[step, value], ...]} of every non-wall-clock scalar in run_dir's event file(s)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)]
            for tag in sorted(acc.Tags()["scalars"]) if not wall_clock(tag)}


def run_config(repo, script, flags):
    runs = tempfile.mkdtemp(prefix="same_numbers_")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONHASHSEED="0")
    try:
        cmd = [sys.executable, script, *flags, "--seed", "1", *cpu_flag(script), "--runs-dir", runs]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: " + proc.stderr.strip()[-2000:]}
        run_dirs = sorted({root for root, _, files in os.walk(runs) if any("tfevents" in f for f in files)})
        if len(run_dirs) != 1:
            return {"error": f"expected one run folder, found {len(run_dirs)}"}
        return read_scalars(run_dirs[0])
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def digest(entry):
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def first_difference(a, b):
    """(tag, step, value in a, value in b) of the earliest differing point, or None."""
    diffs = []
    for tag in sorted(set(a) | set(b)):
        pa, pb = dict((s, v) for s, v in a.get(tag, [])), dict((s, v) for s, v in b.get(tag, []))
        if len(a.get(tag, [])) != len(pa) or len(b.get(tag, [])) != len(pb):  # repeated steps: compare lists
            if a.get(tag) != b.get(tag):
                diffs.append((-1, tag, "points", a.get(tag), b.get(tag)))
            continue
        for step in sorted(set(pa) | set(pb)):
            if step not in pa or step not in pb or not same(pa[step], pb[step]):
                diffs.append((step, tag, step, pa.get(step, "missing"), pb.get(step, "missing")))
                break
    if not diffs:
        return None
    _, tag, step, va, vb = min(diffs, key=lambda d: (d[0], d[1]))
    return tag, step, va, vb


def read_results(parser, path):
    """A file this script wrote, {config: {tag: [[step, value], ...]} or {"error": why}}, else one line, exit 2."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON; RecursionError: nested too deep
        parser.error(f"--compare: cannot read {path!r} ({str(error)[:200]})")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    points = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(p, list) and len(p) == 2 and number(p[0]) and (number(p[1]) or p[1] is None) for p in v)
    if not isinstance(results, dict) or not all(
            isinstance(entry, dict) and all(points(v) or tag == "error" for tag, v in entry.items())
            for entry in results.values()):
        parser.error(f"--compare: {path!r} is not a file of same_numbers.py's ({{config: {{tag: [[step, value], ...]}}}})")
    return results


def compare(path_a, path_b, a, b, ignore=()):
    """Prints, per config, whether a and b hold the same numbers (the tags in ignore left out); 1 if any differ."""
    a, b = ({name: {tag: v for tag, v in entry.items() if tag not in ignore} for name, entry in r.items()} for r in (a, b))
    differ = 0
    for name in list(a) + [n for n in b if n not in a]:
        if name not in a or name not in b:
            print(f"{name:32s} only in {path_a if name in a else path_b}")
            differ += 1
            continue
        failed = [path for path, results in ((path_a, a), (path_b, b)) if "error" in results[name]]
        if failed:  # a config that failed has no numbers to compare
            print(f"{name:32s} FAILED in {' and '.join(failed)}")
            differ += 1
            continue
        diff = first_difference(a[name], b[name])
        if diff is None:
            print(f"{name:32s} identical ({sum(len(v) for v in a[name].values())} values, {digest(a[name])})")
        else:
            differ += 1
            tag, step, va, vb = diff
            print(f"{name:32s} DIFFERENT: first at tag {tag} step {step}: {va} vs {vb}")
    print(f"{len(set(a) | set(b)) - differ} identical, {differ} different")
    return 1 if differ else 0


def main():
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="repository root whose scripts are run (default: the one holding this file)")
    parser.add_argument("--out", default="same_numbers.json", help="JSON file written")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these configs")
    parser.add_argument("--list", action="store_true", help="print the configs' command lines and exit")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two JSON files")
    parser.add_argument("--ignore", nargs="+", metavar="TAG", default=[],
                        help="with --compare: leave these tags out (e.g. diversity/snd)")
    args = parser.parse_args()
    if args.ignore and not args.compare:
        parser.error("--ignore: only with --compare")
    runs = [flag for flag, given in (("--only", args.only), ("--list", args.list), ("--out", args.out != "same_numbers.json"),
                                       ("--repo", args.repo != parser.get_default("repo"))) if given]
    if args.compare and runs:
        parser.error(f"{runs[0]}: not with --compare, which reads two files and runs nothing")
    if args.compare:
        return compare(*args.compare, *(read_results(parser, path) for path in args.compare), ignore=set(args.ignore))
    todo = configs()
    if args.only:
        unknown = set(args.only) - set(todo)
        if unknown:
            parser.error(f"--only: unknown configs {sorted(unknown)}; --list shows them")
        todo = {n: c for n, c in todo.items() if n in args.only}
    if args.list:
        for name, (script, flags) in todo.items():
            print(f"{name}: python {script} {' '.join([*flags, '--seed', '1', *cpu_flag(script)])} --runs-dir TMP")
        return 0
    missing = sorted({script for script, _ in todo.values() if not os.path.isfile(os.path.join(args.repo, script))})
    if missing:  # else every config fails, one after the other
        parser.error(f"--repo: {args.repo!r} has no {missing[0]} (a checkout of this repository, its root)")
    from sps import output_file  # here, not at the top: it imports torch, which --compare and --list do without

    args.out = output_file(parser, args.out, "same_numbers", "same_numbers.json")  # now, not after the runs
    results, start = {}, time.time()
    for name, (script, flags) in todo.items():
        t0 = time.time()
        results[name] = run_config(args.repo, script, flags)
        note = f"ERROR {results[name]['error'][-300:]}" if "error" in results[name] else ""
        print(f"{name:32s} {digest(results[name])}  {time.time() - t0:5.1f} s {note}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"{len(results)} configs in {time.time() - start:.0f} s, written to {args.out}; "
          f"all: {digest(results)}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
