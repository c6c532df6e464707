"""Side-by-side evaluation videos of VMAS checkpoints, as one looping GIF (the README's Dispersion picture).

Each checkpoint is evaluated by its script with --eval-only --capture-video --seed S (the first
evaluation episode of seed S: the same initial state for every checkpoint), and the episodes are laid
out with one column per checkpoint, under its label, and one row per seed.

  python benchmark/compare_videos.py --checkpoints mlp.pt fups.pt --labels "HyperMARL (MLP)" FuPS --out cmp.gif
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sps import OneLineParser, at_least, check_writable  # noqa: E402  (one line, exit 2 for bad flags, like every tool here)


def episode_frames(script: str, checkpoint: str, seed: int, work_dir: str) -> list:
    import imageio.v2 as imageio

    command = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--eval-only", "--checkpoint", checkpoint,
               "--capture-video", "--runs-dir", work_dir, "--seed", str(seed)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:  # the script's last line: its own "error: ..." for a checkpoint it refuses
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1].removeprefix("error: ")
        print(f"error: --checkpoints: {checkpoint}: {why}", file=sys.stderr)
        sys.exit(2)
    print(result.stdout.strip().splitlines()[0], f"({checkpoint}, seed {seed})")
    (path,) = glob.glob(os.path.join(work_dir, "*", "eval.mp4"))
    return [np.asarray(frame) for frame in imageio.get_reader(path)]


def labelled(frame: np.ndarray, label: str, scale: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame[::scale, ::scale])
    ImageDraw.Draw(image).text((8, 6), label, fill=(0, 0, 0), font=ImageFont.load_default(size=40 // scale))
    return np.asarray(image)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="VMAS checkpoints (--save-model)")
    parser.add_argument("--labels", nargs="+", required=True, help="one label per checkpoint")
    parser.add_argument("--script", default="ippo_hyper_vmas", choices=["ippo_hyper_vmas", "mappo_hyper_vmas"])
    parser.add_argument("--seeds", nargs="+", type=at_least(0, 2**32 - 10_000), default=[1],
                        help="one row of episodes per evaluation seed")
    parser.add_argument("--scale", type=at_least(1, 41), default=2,
                        help="keep every scale-th pixel (700 px frames -> 350); at most 40, the label's font size")
    parser.add_argument("--out", required=True, help="the .gif file to write")
    opts = parser.parse_args(argv)
    if len(opts.labels) != len(opts.checkpoints):
        parser.error(f"--labels: one per checkpoint ({len(opts.checkpoints)}), got {len(opts.labels)}")
    missing = [path for path in opts.checkpoints if not os.path.isfile(path)]
    if missing:
        parser.error(f"--checkpoints: no such file {missing[0]!r}")
    folder = os.path.dirname(os.path.abspath(opts.out))
    if not opts.out.endswith(".gif") or not os.path.isdir(folder) or os.path.isdir(opts.out):
        parser.error(f"--out: must be a .gif file in an existing, writable folder, got {opts.out!r}")
    check_writable(parser, "--out", folder)  # now, not after every episode

    import hypermarl_extras as extras

    rows = []
    for seed in opts.seeds:
        row = []
        for checkpoint, label in zip(opts.checkpoints, opts.labels):
            with tempfile.TemporaryDirectory() as work_dir:
                frames = episode_frames(opts.script, checkpoint, seed, work_dir)
            row.append([labelled(frame, f"{label}, seed {seed}", opts.scale) for frame in frames])
        rows.append(row)
    length = max(len(frames) for row in rows for frames in row)
    # a finished episode holds its last frame
    rows = [[frames + frames[-1:] * (length - len(frames)) for frames in row] for row in rows]
    frames = [np.concatenate([np.concatenate([frames[t] for frames in row], axis=1) for row in rows], axis=0)
              for t in range(length)]
    with open(opts.out, "wb") as f:
        f.write(extras.gif_bytes(frames, fps=10))  # VMAS steps at dt = 0.1 s: real time
    print(f"wrote {opts.out} ({length} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
