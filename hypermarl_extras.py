"""What the training scripts need beyond training: checkpoints, resuming, run folders, signals, videos.

A library: it imports no script, and every call passes what it needs. The scripts import it when it is
there; without it a script copied alone still trains and checks its flags, and refuses the flags that
need this file (--save-model, --resume, --eval-only, --capture-video, ...).

Command line:
    ArgError / CheckpointError                   a bad flag or file: one line, exit status 2, nothing written
    read_checkpoint(args, given, fmt, keys, model_fields, may_change, check)   --resume / --eval-only's checkpoint
    resume_rules(args, loaded, changes)          a resumed run's budget, as (broken, message) pairs
    check_output(args, simulator)                --runs-dir writable, wandb for --track, a renderer for --capture-video
    machine_memory(cuda)                         bytes of the GPU's memory, or of RAM (or the cgroup's limit)
    memory_rule(args, need, flags, host_parts)   (broken, message): a run larger than the machine's memory
    first_line(error)                            an error's reason for a one-line message, cut at a word
    check_capture_video(simulator)               --capture-video: this machine renders off-screen
Run folders and signals:
    new_run_folder(runs_dir, prefix)             a fresh folder, safe for runs started in the same second
    open_run(args, prefix, loaded, changes)      a new run folder or the resumed one; TensorBoard, wandb
    StopOnSignal()                               Ctrl-C / SIGTERM: save and stop after the iteration
    signal_deaf_vector_env(fns, autoreset_mode)  MaMuJoCo's workers, alive through a Ctrl-C until the checkpoint
Checkpoints:
    save_checkpoint(path, state)                 atomic: a crash mid-write leaves the previous file
    load_checkpoint(path, flag, fmt, required)   weights_only=True; a foreign or tampered file is refused
    take_flags_from_checkpoint(...)              --resume / --checkpoint take the saved run's flags
    rng_state() / set_rng_state(state)           torch, NumPy, Python (and CUDA) generators
    rng_to_tensors(states) / rng_from_tensors(state)   the same as plain data
    load_snd_obs(path, obs_dim)                  an SND dataset (.npz) for --eval-only --snd-obs-file
    save_vmas_run(...) / restore_vmas_run(...)   a VMAS script's whole run, simulators included, bit for bit
    save_mamujoco_run(...) / restore_mamujoco_run(...)   the same for the MaMuJoCo script
    restoring(args, loaded, fresh)               around a restore: NaN/inf, or a misfit, is one line (CheckpointError)
    mujoco_sim_state(env) / set_mujoco_sim_state(env, state)   one MuJoCo env mid-episode, as plain data
    save_matrix_models(...)                      the matrix games' --save-model
Videos (--capture-video):
    probe_capture_video(simulator)   None, or one line saying what to install (checked before a run starts)
    mamujoco_frame(parallel_env)     one MaMuJoCo frame, without shadows (software rendering)
    video_timing(steps_per_second)   (stride, fps) for real-time playback
    save_video(writer, path, tag, frames, step, fps)   an mp4 file and an animated GIF in TensorBoard
    save_eval_video(runs_dir, loaded, frames, fps)     --eval-only's video, in a new run folder
    eval_only(args, loaded, evaluation_line, obs_dim, fps)   --eval-only: evaluate, print, maybe the video

Both simulators render through EGL: VMAS through pyglet's headless mode, MuJoCo with MUJOCO_GL=egl.
Without a GPU, Mesa's EGL renders in software (llvmpipe): no display and no GPU are needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import math
import os
import pickle
import random
import signal
import re
import subprocess
import tempfile
import threading
import sys
import time
import typing
import warnings
import zipfile
from typing import Optional, Sequence

import numpy as np
import torch

GL_HINT = ("install EGL with Mesa's software renderer (Debian/Ubuntu: apt-get install libegl1 libegl-mesa0 "
           "libgl1-mesa-dri) or a GPU driver")

# Each probe renders one frame the way a run will, in a child process: a GL driver can crash or hang
# instead of raising, and pyglet's and MuJoCo's choice of GL backend is fixed for a process at first
# use. The child prints the cause and leaves with os._exit, so a half-made GL context's destructors
# cannot print tracebacks that hide it.
_PROBES = {
    "vmas": """
import os
try:
    import vmas
    env = vmas.make_env("dispersion", num_envs=1, device="cpu", n_agents=1, seed=0)
    env.reset()
    frame = env.render(mode="rgb_array", env_index=0)
    assert frame.ndim == 3 and frame.std() > 0, "the frame is blank"
except BaseException as error:
    print(f"{type(error).__name__}: {error}".splitlines()[0], flush=True)
    os._exit(1)
os._exit(0)
""",
    "mujoco": """
import os
try:
    import gymnasium
    env = gymnasium.make("HalfCheetah-v5", render_mode="rgb_array", width=32, height=32)
    env.reset(seed=0)
    frame = env.render()
    env.close()
    assert frame.ndim == 3 and frame.std() > 0, "the frame is blank"
except BaseException as error:
    print(f"{type(error).__name__}: {error}".splitlines()[0], flush=True)
    os._exit(1)
os._exit(0)
""",
}


def default_mujoco_gl() -> None:
    """MuJoCo reads MUJOCO_GL when it is first imported. EGL renders without a display (on a GPU or on
    Mesa's llvmpipe). Set only for --capture-video: with MUJOCO_GL=egl, `import mujoco` itself fails
    where libEGL is missing. Linux only (macOS has no EGL); a user's own MUJOCO_GL wins."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")


def probe_capture_video(simulator: str, timeout: float = 120.0) -> Optional[str]:
    """None when this machine can render a frame of `simulator` ("vmas" or "mujoco") and write an mp4,
    else the one-line error for --capture-video. About 1-2 s."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()  # the wheel ships the binary; raises if it is missing
    except (ImportError, RuntimeError):
        return "--capture-video: needs imageio-ffmpeg to write mp4 files (pip install -r requirements.txt)"
    try:
        result = subprocess.run([sys.executable, "-c", _PROBES[simulator]], capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"--capture-video: rendering one {simulator} frame took over {timeout:.0f} s; {GL_HINT}"
    if result.returncode == 0:
        return None
    if result.returncode < 0:  # killed by a signal: the driver crashed, there is no Python message
        cause = f"the renderer crashed (signal {-result.returncode})"
    else:
        cause = (result.stdout.strip().splitlines() or [f"exit status {result.returncode}"])[-1][:200]
    backend = "EGL" if simulator == "vmas" else f"MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}"
    return f"--capture-video: {simulator} cannot render off-screen here ({backend}: {cause}); {GL_HINT}"


def mamujoco_frame(parallel_env) -> np.ndarray:
    """(H, W, 3) uint8 frame of a mamujoco_v1.parallel_env(..., render_mode="rgb_array"). Shadows and
    floor reflections are turned off: in software rendering they are 75-90% of a frame's time
    (HalfCheetah 480 x 480: 146 -> 34 ms on 2 CPU cores)."""
    renderer = parallel_env.single_agent_env.unwrapped.mujoco_renderer
    if renderer.viewer is None:
        import mujoco

        parallel_env.render()  # opens the viewer, whose scene flags persist for later frames
        renderer.viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
    return parallel_env.render()


def video_timing(steps_per_second: float, max_fps: float = 50.0) -> tuple[int, float]:
    """(stride, fps): keep every stride-th step so that the video plays in real time at <= max_fps
    (GIF players slow frames shorter than 20 ms down to 100 ms)."""
    stride = max(1, int(np.ceil(steps_per_second / max_fps)))
    return stride, steps_per_second / stride


def write_mp4(frames: Sequence[np.ndarray], path: str, fps: float) -> None:
    """H.264 mp4, written under a temporary name and renamed: a run stopped mid-write leaves no
    truncated video under the final name."""
    import imageio.v2 as imageio

    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp.mp4")  # ffmpeg picks the container from the suffix
    # macro_block_size=2: H.264 needs even sides, and imageio's default of 16 would resize 700 to 704.
    imageio.mimwrite(tmp, [np.asarray(f) for f in frames], fps=fps, codec="libx264", quality=7,
                     macro_block_size=2, ffmpeg_log_level="error")
    os.replace(tmp, path)


def gif_bytes(frames: Sequence[np.ndarray], fps: float) -> bytes:
    """A looping animated GIF. One palette for all frames, from four frames spread over the episode:
    Pillow's default re-quantises every frame (4 s for 100 frames of 700 x 700 here, against 0.5 s)."""
    from PIL import Image

    frames = [np.asarray(f) for f in frames]
    sample = np.concatenate([frames[i] for i in np.linspace(0, len(frames) - 1, 4).astype(int)])
    palette = Image.fromarray(sample).quantize(256, method=Image.Quantize.FASTOCTREE)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps / 10) * 10), loop=0)  # GIF times are centiseconds
    return buffer.getvalue()


def save_video(writer, path: str, tag: str, frames: Sequence[np.ndarray], step: int, fps: float) -> None:
    """The episode as an mp4 at `path` and, when writer is a SummaryWriter, as an animated GIF image
    summary under `tag`. SummaryWriter.add_video would need moviepy (whose 2.x removed what it
    imports, and which would downgrade pillow); TensorBoard's Images tab plays the GIF, and with
    --track wandb's sync_tensorboard turns a GIF image summary into a wandb.Video."""
    write_mp4(frames, path, fps)
    if writer is None:
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width, channels = np.asarray(frames[0]).shape
    image = Summary.Image(height=height, width=width, colorspace=channels,
                          encoded_image_string=gif_bytes(frames, fps))
    # _get_file_writer() is how every SummaryWriter.add_* reaches the event file, add_video included
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


# ===== Command line =====
class ArgError(ValueError):
    """A bad flag value: reported as one line, exit status 2, nothing written."""


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_output(args, simulator: Optional[str] = None, changes: Sequence[str] = ()) -> None:
    """--runs-dir a folder this run may create and write into (a run resumed in its own folder writes only
    there, checked by read_checkpoint), wandb installed for --track, and with --capture-video a renderer for
    `simulator`; checked before anything is written. changes: what --resume changes (read_checkpoint)."""
    eval_only, resumed_in_place = getattr(args, "eval_only", False), getattr(args, "resume", None) and not moved(changes)
    if not (eval_only or resumed_in_place) or getattr(args, "capture_video", False):
        check_output_folder("--runs-dir", args.runs_dir)
    if args.track and not eval_only:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ArgError("--track: wandb is not installed (pip install wandb)")
    if simulator and getattr(args, "capture_video", False):
        check_capture_video(simulator)


def machine_memory(cuda: bool) -> Optional[int]:
    """Bytes of the memory the run lives in: the GPU's with --cuda on a GPU, else RAM or the cgroup's limit."""
    if cuda and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None
    return min(total, cgroup_memory_limit() or total)


def memory_rule(args, need: dict[str, int], flags: dict[str, Sequence[str]], host_parts: Sequence[str] = ()):
    """(broken, message) for a run whose memory (need: a lower bound in bytes, by part) exceeds the machine's.
    With --cuda on a GPU every part but host_parts (simulators on the CPU) is held by the GPU, else all by RAM.
    The message names the flags (flags: part -> fields) of the largest part, with their values."""
    ram, gpu = machine_memory(False), machine_memory(True) if args.cuda and torch.cuda.is_available() else None
    host = sum(v for k, v in need.items() if gpu is None or k in host_parts)
    broken = host > (ram or math.inf) or sum(need.values()) - host > (gpu or math.inf)
    largest = ", ".join(f"{flag_of(name)} {getattr(args, name)}" for name in flags[max(need, key=need.get)])
    parts = ", ".join(f"{key} {value / 2**30:,.1f}" for key, value in need.items())
    room = " and ".join(f"{what}{size / 2**30:,.1f} GiB" for what, size in (("", ram), ("GPU ", gpu)) if size)
    return broken, (f"{largest}: the run needs at least {sum(need.values()) / 2**30:,.1f} GiB ({parts}), more than "
                    f"this machine's {room}; use smaller values, or --no-memory-check to try anyway")


def cgroup_memory_limit(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The smallest memory limit of this process's cgroup and those above it (a container's, a Slurm job's):
    cgroup v2's memory.max, v1's memory.limit_in_bytes; None where none is set or none can be read."""
    try:
        with open(proc) as f:
            entries = [line.split(":", 2) for line in f.read().splitlines() if line.count(":") >= 2]
    except OSError:
        entries = []
    places = [(root, "memory.max")]  # a namespace's own root
    for _, controllers, path in entries:
        if controllers == "":
            places += [(os.path.join(root, path.strip("/")), "memory.max")]
        elif "memory" in controllers.split(","):
            places += [(os.path.join(root, "memory", path.strip("/")), "memory.limit_in_bytes")]
    limits, tops = [], {os.path.normpath(root), os.path.normpath(os.path.join(root, "memory"))}
    for folder, name in places:
        while True:  # the cgroup, then each parent up to the hierarchy's root
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(folder, name)) as f:
                    limits.append(int(f.read()))  # "max": no limit, a ValueError
            parent = os.path.dirname(os.path.normpath(folder))
            if os.path.normpath(folder) in tops or parent == os.path.normpath(folder):
                break
            folder = parent
    return min(limits) if limits else None


def check_output_folder(flag: str, path: str) -> None:
    """A folder this run may create and write into, checked before anything is written."""
    if not path:
        raise ArgError(f"{flag}: must name a folder, got ''")
    try:  # bytes that are not UTF-8 reach Python as surrogates; TensorBoard fails on them at its first write
        path.encode()
    except UnicodeEncodeError:
        raise ArgError(f"{flag}: {path!r} is not UTF-8 text (TensorBoard writes UTF-8 paths only)") from None
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # a file, or a link to nothing
        raise ArgError(f"{flag}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgError(f"{flag}: {existing!r} is not writable")
    name_max, path_max = (_pathconf(existing, key, default) for key, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)))
    missing = os.path.relpath(os.path.abspath(path), existing)
    if any(len(os.fsencode(name)) > name_max for name in missing.split(os.sep)):
        raise ArgError(f"{flag}: a folder name in it is longer than this file system's {name_max} bytes")
    if len(os.fsencode(os.path.abspath(path))) + name_max + 64 > path_max:  # + the run's folder, + its files
        raise ArgError(f"{flag}: too long a path ({len(os.path.abspath(path))} characters) to hold run folders "
                       f"under this file system's {path_max}")
    try:  # access() says yes to root where the kernel refuses (/proc): create a folder, and remove it at once
        os.rmdir(tempfile.mkdtemp(prefix=".hypermarl-probe-", dir=existing))
    except OSError as error:
        raise ArgError(f"{flag}: cannot create a folder in {existing!r} ({error.strerror or first_line(error)})")


def _pathconf(path: str, key: str, default: int) -> int:
    try:
        return os.pathconf(path, key)
    except (OSError, ValueError, AttributeError):  # not POSIX, or no limit known
        return default


def first_line(error: BaseException, limit: int = 120) -> str:
    """An error's reason for a one-line message: its first line (its type if blank; with the next one if it is
    a heading, as load_state_dict's), cut at a word with '...' when longer than limit."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    if len(line) <= limit:
        return line
    head = line[: limit - 3]
    return (head.rsplit(" ", 1)[0] if " " in head else head) + "..."


INVOCATION_FIELDS = ("resume", "eval_only", "checkpoint", "snd_obs_file")  # what to do, not what the run is
# --eval-only meets the episodes and samples its run's evaluations met (seed + 10000), unless given otherwise
EVALUATION_FIELDS = ("seed", "eval_episodes", "eval_deterministic", "snd_samples", "snd_gaussian_samples")
# What --eval-only reads besides the model's flags, EVALUATION_FIELDS and INVOCATION_FIELDS: where it runs and
# where a --capture-video video goes. Every other flag is training's, which it would silently ignore: refused.
EVALUATION_RUN_FIELDS = ("cuda", "torch_deterministic", "torch_threads", "memory_check", "capture_video", "runs_dir")


def read_checkpoint(args, given: set[str], fmt: str, keys, model_fields, may_change, check):
    """The checkpoint a run resumes (--resume) or evaluates (--eval-only --checkpoint), read safely,
    its flags taken into args in place: (the checkpoint or None, the flags --resume changes, to report).
    fmt: the script's checkpoint format; keys: what its checkpoints hold; model_fields: the flags that
    define the model and the environment (--checkpoint takes them); may_change: what --resume may
    change, every other flag being the checkpoint's; check: the script's check_args(args, given), which
    the checkpoint's own flags must pass. ArgError (one line) for a bad flag or file."""
    if args.eval_only != bool(args.checkpoint):
        raise ArgError("--eval-only: needs --checkpoint PATH" if args.eval_only else
                       "--checkpoint: only with --eval-only (use --resume to continue training)")
    if args.eval_only and args.resume:
        raise ArgError("--resume: cannot be combined with --eval-only")
    evaluation_flags = {*model_fields, *EVALUATION_FIELDS, *INVOCATION_FIELDS, *EVALUATION_RUN_FIELDS}
    ignored = sorted(given - evaluation_flags) if args.eval_only else []
    if ignored:  # named as written
        written = ("--no-" + flag_of(ignored[0])[2:]) if getattr(args, ignored[0]) is False else flag_of(ignored[0])
        video = " but a --capture-video video" if hasattr(args, "capture_video") else ""
        raise ArgError(f"{written}: only for training, not with --eval-only (it prints the evaluation and writes "
                       f"nothing{video})")
    if getattr(args, "snd_obs_file", None) is not None and not args.eval_only:
        raise ArgError("--snd-obs-file: only with --eval-only")
    for name in ("resume", "checkpoint", "snd_obs_file"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            raise ArgError(f"{flag_of(name)}: {path!r} is a folder, not a file" if os.path.isdir(path) else
                           f"{flag_of(name)}: {path!r} is not a regular file" if os.path.exists(path) else
                           f"{flag_of(name)}: no such file {path!r}")
    if not (args.resume or args.checkpoint):
        return None, []
    flag, path = checkpoint_flag(args)
    loaded = load_checkpoint(path, flag, fmt, keys)
    names = ([*model_fields, *(n for n in EVALUATION_FIELDS if hasattr(args, n))] if flag == "--checkpoint"
             else [f.name for f in dataclasses.fields(args)])
    # Every flag the file holds is checked as the file's, the ones given too: a saved flag that fits the file's
    # other flags but not a given one is the command line's conflict, which take_flags_from_checkpoint names
    check_saved_flags(args, loaded, [n for n in names if n not in INVOCATION_FIELDS], check)
    changes = take_flags_from_checkpoint(args, loaded["args"], flag, given, model_fields, may_change, INVOCATION_FIELDS)
    check_run_position(loaded, flag, path, args.num_envs * args.num_steps)
    if flag == "--resume":
        given_here = os.path.join(args.runs_dir, loaded["run_name"])
        if "runs_dir" in given and not moved(changes) and not same_folder(given_here, os.path.dirname(path)):
            changes.append(f"--runs-dir {args.runs_dir} -> {os.path.abspath(args.runs_dir)}")  # the saved text, here
        check_resume_folder(path, resume_folder(path, args.runs_dir, loaded["run_name"], changes))
    return loaded, changes


def moved(changes: Sequence[str]) -> bool:
    """Whether --resume is given another --runs-dir (or the saved one's text, naming another folder from
    here), so the run goes on in <runs-dir>/<its run>."""
    return any(change.startswith("--runs-dir ") for change in changes)


def resume_folder(path: str, runs_dir: str, run_name: str, changes: Sequence[str]) -> str:
    """Where a resumed run goes on: the folder holding its checkpoint, or <runs-dir>/<run> (changes: --runs-dir)."""
    return os.path.join(runs_dir, run_name) if moved(changes) else os.path.dirname(os.path.abspath(path))


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_resume_folder(path: str, folder: str) -> None:
    """ArgError unless the run resumed from path can go on in folder: its own (the checkpoint.pt there, which
    the run replaces), or a new one that --runs-dir gives. A copy elsewhere (several side by side) would have
    the runs write one checkpoint.pt and mix their logs."""
    own = os.path.dirname(os.path.abspath(path))
    if same_folder(folder, own):
        if os.path.basename(path) != "checkpoint.pt":
            raise ArgError(f"--resume: {path!r} is not its run folder's checkpoint.pt, where the run would go on; "
                           f"give --runs-dir DIR to continue it in a new folder DIR/<its run>")
        check_output_folder("--resume", own)
        log = os.path.join(own, "evaluations.jsonl")  # the run appends to it at its first evaluation
        if os.path.lexists(log) and not (os.path.isfile(log) and os.access(log, os.W_OK)):
            raise ArgError(f"--resume: {log!r} is not a file the run can append to")
    elif os.path.lexists(folder):
        raise ArgError(f"--runs-dir: {folder!r} exists already; resume its checkpoint.pt, or give another --runs-dir")


def checkpoint_flag(args) -> tuple[str, str]:
    """The flag that names the checkpoint, and its path."""
    return ("--resume", args.resume) if args.resume else ("--checkpoint", args.checkpoint)


def check_saved_flags(args, loaded: dict, taken: list[str], check) -> None:
    """The flags the checkpoint defines for the run (taken), together, as the script's check sees them: a run
    saves only valid ones, so an invalid one is the file's fault (edited or damaged), said so before any of them
    is used. A broken rule that names no taken flag (a flag of the command line, this machine's memory) is left
    to the script's own check of the whole command line, which follows."""
    flag, path = checkpoint_flag(args)
    saved, hints = loaded["args"], typing.get_type_hints(type(args))
    if not isinstance(saved, dict):
        raise CheckpointError(f"{flag}: {path!r} holds no flags of a run: refused")
    if odd := sorted(map(str, hints.keys() ^ saved.keys())):  # a run saves every flag, and only flags
        raise CheckpointError(f"{flag}: {path!r} holds {'no' if odd[0] in hints else 'an unknown'} flag "
                              f"{flag_of(odd[0])!r:.60}: refused")
    values = {name: saved[name] for name in taken if name in saved}
    for name, value in values.items():
        if problem := type_problem(value, hints[name]):
            raise CheckpointError(f"{flag}: {path!r} holds an invalid flag: {flag_of(name)}: {problem}, got {value!r:.60}")
    try:
        check(dataclasses.replace(args, **values), set())
    except ValueError as error:
        if str(error).split(":", 1)[0] in {flag_of(name) for name in values}:
            raise CheckpointError(f"{flag}: {path!r} holds an invalid flag: {error}") from None


def type_problem(value, hint) -> Optional[str]:
    """Why value cannot be a flag of type hint (bool, int, float, str, Literal, Optional, list), or None."""
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return None if isinstance(value, str) and value in options else f"must be one of {', '.join(map(repr, options))}"
    if origin is typing.Union:  # Optional[X]
        return None if value is None else type_problem(value, next(o for o in options if o is not type(None)))
    if origin is list:
        fits = isinstance(value, list) and not any(type_problem(v, options[0]) for v in value)
        return None if fits else f"must be a list of {options[0].__name__}s"
    fits = isinstance(value, (int, float) if hint is float else hint) and (hint is bool or not isinstance(value, bool))
    return None if fits else f"must be {'an' if hint is int else 'a'} {hint.__name__}"


def check_run_position(loaded: dict, flag: str, path: str, batch: int) -> None:
    """Where the saved run stands: its folder's name (a plain name: --resume --runs-dir and --capture-video
    make a path of it), and for --resume its step and next iteration, which the loop's arithmetic ties together
    (batch: the run's num_envs * num_steps)."""
    name, step, iteration = loaded["run_name"], loaded["global_step"], loaded["iteration"]
    if not (isinstance(name, str) and 0 < len(name) <= 200 and name not in (".", "..") and name.isprintable()
            and len(name.encode()) <= 255 and not re.search(r"[/\\\0]", name)):  # 255 bytes: a file name's limit
        raise CheckpointError(f"{flag}: {path!r} holds an invalid run name {name!r:.60}: refused")
    if flag != "--resume" or batch <= 0:  # a batch of none is the ranges' to report
        return
    if not (type(step) is int and type(iteration) is int and iteration >= 1 and step == (iteration - 1) * batch):
        raise CheckpointError(f"{flag}: {path!r} holds an impossible position: global_step {step!r:.30}, iteration "
                              f"{iteration!r:.30} (a run is at step (iteration - 1) * {batch})")


def resume_rules(args, loaded, changes):
    """(broken, message) pairs, as the scripts' flag_rules: a resumed run's new budget (--total-timesteps)
    must fit what it has trained, and its --anneal-lr schedule. The scripts check them before the ranges:
    "already trained 64 steps" is the reason a budget of 16 fails, not "must be at least one batch"."""
    resumed = bool(args.resume)
    yield resumed and getattr(args, "anneal_lr", False) and any(c.startswith("--total-timesteps") for c in changes), \
        ("--total-timesteps: the run anneals its learning rate over its budget (--anneal-lr); "
         "a new budget would change the schedule")
    batch_size = args.num_envs * args.num_steps  # the checkpoint's
    if resumed and batch_size > 0:  # a batch of none is the ranges' to report (--num-envs, --num-steps)
        yield loaded["iteration"] > args.total_timesteps // batch_size, \
            (f"--total-timesteps: the run already trained {loaded['global_step']} steps, in iterations "
             f"of {batch_size}; give at least {loaded['iteration'] * batch_size} to train on")


def check_capture_video(simulator: str) -> None:
    """--capture-video: ArgError unless this machine renders `simulator` ("vmas" or "mujoco") off-screen."""
    if simulator == "mujoco":
        default_mujoco_gl()  # before anything imports mujoco, which reads it once
    if problem := probe_capture_video(simulator):
        raise ArgError(problem)


# ===== Run folders and signals =====
def new_run_folder(runs_dir: str, prefix: str) -> str:
    """A fresh folder runs_dir/<prefix>__<time>[_k]: mkdir is atomic, so runs started in the same
    second (a sweep launched with &) never share one. Returns its name."""
    os.makedirs(runs_dir, exist_ok=True)
    stamp, k = int(time.time()), 0
    while True:
        name = f"{prefix}__{stamp}" + (f"_{k}" if k else "")
        try:
            os.mkdir(os.path.join(runs_dir, name))
            return name
        except FileExistsError:
            k += 1


def open_run(args, prefix: str, loaded, changes: list[str]):
    """The run's folder and its TensorBoard writer (wandb too with --track): a new folder
    runs_dir/<prefix>__<time>, or the resumed checkpoint's own folder, wherever the run is started from
    (runs_dir/<its run> if --resume changes --runs-dir). Returns (run_dir, writer, global_step, iteration)."""
    from torch.utils.tensorboard import SummaryWriter

    if loaded is None:
        run_dir, global_step, iteration = os.path.join(args.runs_dir, new_run_folder(args.runs_dir, prefix)), 0, 1
    else:
        global_step, iteration, run_name = loaded["global_step"], loaded["iteration"], loaded["run_name"]
        run_dir = resume_folder(args.resume, args.runs_dir, run_name, changes)
        print(f"resume: {run_name} at step {global_step}" + (f"; changed: {', '.join(changes)}" if changes else ""))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"run: {run_dir}")
    return run_dir, writer, global_step, iteration


class StopOnSignal:
    """Ctrl-C or SIGTERM sets `requested`: the loop saves a checkpoint and stops after its iteration. A
    second one stops at once. restore() puts the previous handlers back."""

    def __init__(self):
        self.requested = None
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        self.stdout, sys.stdout = sys.stdout, StdoutGuard(sys.stdout)

    def request(self, signum, frame):
        if self.requested and SAVING["now"]:  # at once, but after the checkpoint is whole
            SAVING["interrupted"] = True
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        # inside a write to stdout (a blocked pipe) a print would raise: the line is only news
        with contextlib.suppress(OSError, RuntimeError):
            print(f"\nsignal {signum}: saving a checkpoint and stopping", flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if isinstance(sys.stdout, StdoutGuard):
            sys.stdout = self.stdout


class StdoutGuard:
    """stdout for a run whose reader may go away: `python ... | tee log` and a Ctrl-C stop tee too, and the
    next progress line would raise BrokenPipeError before the checkpoint is saved. Then the lines go to
    os.devnull, as Python's documentation advises for SIGPIPE, and the run saves and stops."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.discard()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.discard()

    def discard(self):
        with contextlib.suppress(OSError, ValueError):  # no file descriptor (a test's capture): nothing to do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def signal_deaf_vector_env(fns, autoreset_mode):
    """gymnasium's AsyncVectorEnv whose workers ignore Ctrl-C and the SIGTERM sent to the whole job, so the
    checkpoint a stop writes can still read their simulators. They inherit the blocked mask: a Ctrl-C right
    after their start cannot kill them before they ignore it."""
    import gymnasium

    blocks = hasattr(signal, "pthread_sigmask")  # not on Windows
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if blocks else None
    try:
        return gymnasium.vector.AsyncVectorEnv(fns, autoreset_mode=autoreset_mode,
                                               worker=functools.partial(_deaf_env_worker, os.getpid()))
    finally:
        if blocks:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _deaf_env_worker(main_pid: int, *args) -> None:
    """gymnasium's AsyncVectorEnv worker, deaf to the SIGINT and SIGTERM that Ctrl-C, `timeout` and Slurm send the
    whole job, but not to the main process's SIGTERM (terminate()); it exits when its pipe closes."""
    import gymnasium

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # SIGTERM stays blocked (the mask above): only this thread takes it
        def sigterm_from_main():
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
                pass
            os._exit(128 + signal.SIGTERM)  # the status of a death by SIGTERM

        threading.Thread(target=sigterm_from_main, daemon=True).start()
    else:  # macOS: a forced close still ends the workers, by closing their pipes
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        gymnasium.vector.async_vector_env._async_worker(*args)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the main process is gone: nobody to report to, and no traceback for the terminal


# ===== Checkpoints =====
class CheckpointError(ArgError):
    """A checkpoint that cannot be used: reported as one line, exit status 2."""


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic and durable: written to a file of this process's, synced, then renamed over the checkpoint, so
    a crash, a power loss or another process saving beside it leaves the previous checkpoint whole. Ctrl-C
    and SIGTERM wait until it is done (a second one would otherwise abort the write)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with second_signal_waits():
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError, AttributeError):  # the rename itself, on disk (POSIX)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for stale in glob.glob(f"{glob.escape(path)}.*.tmp"):  # a save killed mid-write (SIGKILL, power loss)
        pid = stale[len(path) + 1: -len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(stale)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's (PermissionError): alive
        pass
    return True


SAVING = {"now": False, "interrupted": False}  # StopOnSignal's second signal waits for a save in progress


@contextlib.contextmanager
def second_signal_waits():
    """A second Ctrl-C or SIGTERM (StopOnSignal's "stop at once") that comes during the block takes effect
    after it: a checkpoint half written would be lost (signals reach Python's handler in the main thread
    whichever thread the system gives them to, so blocking them would not hold them)."""
    SAVING["now"] = True
    try:
        yield
    finally:  # a failed save (a full disk) reports its own error; the next save starts clean either way
        SAVING["now"], interrupted, SAVING["interrupted"] = False, SAVING["interrupted"], False
    if interrupted:
        raise KeyboardInterrupt


def load_checkpoint(path: str, flag: str, fmt: str, required: set) -> dict:
    """weights_only=True: a file that smuggles code, or is not ours (format fmt), is refused."""
    try:
        with warnings.catch_warnings():  # torch warns about some foreign files: the one line below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises turning weights_only off: never relay that
        raise CheckpointError(f"{flag}: {path!r} holds objects other than tensors and plain data: refused")
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        if "weights_only" in str(error):  # e.g. a TorchScript archive: again, no advice to load it unsafely
            raise CheckpointError(f"{flag}: {path!r} is not a checkpoint torch can load as plain data: refused")
        raise CheckpointError(f"{flag}: {path!r} is not a readable checkpoint ({first_line(error)})")
    except Exception:  # other bytes lead torch's unpickler to any error (a line of text: a KeyError)
        raise CheckpointError(f"{flag}: {path!r} is not a checkpoint (torch cannot read it)")
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.split("/")[0] == fmt.split("/")[0] and found != fmt:
        raise CheckpointError(f"{flag}: {path!r} is a {found} checkpoint, written by an older version of this "
                              f"script; this one reads {fmt}")
    if isinstance(found, str) and found != fmt and re.fullmatch(r"hypermarl-[\w-]+/\d+", found):
        raise CheckpointError(f"{flag}: {path!r} is a {found} checkpoint, another script's; this one reads {fmt}")
    if found != fmt or not set(required) <= set(state):
        raise CheckpointError(f"{flag}: {path!r} is not a {fmt} checkpoint")
    if extra := sorted(map(str, set(state) - set(required))):  # written by hand: what else did the hand change?
        raise CheckpointError(f"{flag}: {path!r} holds {extra[0]!r:.40}, which no run of this script saves: refused")
    if odd := next(odd_tensors(state), None):
        raise CheckpointError(f"{flag}: {path!r} holds a tensor that is not plain dense data ({odd}): refused")
    try:  # torch reads its records without checking their CRC-32: a flipped bit would load as a number
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception:  # torch read it: a layout zipfile does not know is none of this check's business
        damaged = None
    if damaged:
        raise CheckpointError(f"{flag}: {path!r} is damaged ({damaged!r:.60} fails its checksum): refused")
    return state


def odd_tensors(state, path: str = "checkpoint"):
    """The places in state (dicts and lists) of tensors torch may load that no run saves: sparse, meta."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from odd_tensors(value, f"{path}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from odd_tensors(value, f"{path}[{i}]")
    elif isinstance(state, torch.Tensor) and (state.layout != torch.strided or state.is_meta or state.is_quantized):
        yield f"{path:.80}: {state.layout}" + (" on meta" if state.is_meta else "")


def take_flags_from_checkpoint(args, saved: dict, flag: str, given: set[str], compat_fields, resume_may_change,
                               invocation_fields) -> list[str]:
    """--resume continues the saved run, so its flags are the checkpoint's, and --eval-only takes the
    model's (compat_fields) from it. A flag given with another value is an error, except the ones in
    resume_may_change, which take effect. Returns those changes, to report."""
    defaults = {field.name: getattr(args, field.name) for field in dataclasses.fields(args)}
    names = compat_fields if flag == "--checkpoint" else [n for n in defaults if n not in invocation_fields]
    changes = []
    for name in EVALUATION_FIELDS if flag == "--checkpoint" else ():  # defaults, not constraints
        if name not in given and name in saved and name in defaults:
            setattr(args, name, saved[name])
    for name in names:
        value, kept = getattr(args, name), saved.get(name, defaults[name])
        if name not in given or value == kept:
            setattr(args, name, kept)
        elif flag == "--resume" and name in resume_may_change:
            changes.append(f"--{name.replace('_', '-')} {kept} -> {value}")
        else:
            raise CheckpointError(f"--{name.replace('_', '-')}: the checkpoint's run has {kept!r}, not {value!r}; "
                                  f"{flag} takes it from the checkpoint (leave the flag out)")
    if (flag == "--resume" and "save_interval" in saved and "save_interval" not in given
            and saved["save_interval"] == saved["eval_interval"]):
        args.save_interval = args.eval_interval  # its default follows --eval-interval, which may have changed
    return changes


def rng_to_tensors(states: list) -> dict:
    """[torch, numpy, python] RNG states as tensors and lists, loadable with weights_only=True."""
    torch_state, np_state, py_state = states
    return dict(torch=torch_state.clone(), numpy_keys=torch.as_tensor(np_state[1].astype(np.int64)),
                numpy_rest=[int(np_state[2]), int(np_state[3]), float(np_state[4])],
                python=[py_state[0], list(py_state[1]), py_state[2]])


def rng_from_tensors(state: dict) -> list:
    """ValueError if a generator's state is not one NumPy or Python could have saved (NumPy does not check
    its position: an edited one crashes the process at the next draw)."""
    keys, (pos, has_gauss, cached) = state["numpy_keys"], state["numpy_rest"]
    if keys.dtype != torch.int64 or keys.shape != (624,) or keys.min() < 0 or keys.max() >= 2**32 or not (
            type(pos) is int and 0 <= pos <= 624 and has_gauss in (0, 1) and isinstance(cached, float)):
        raise ValueError("rng: NumPy's is not a Mersenne Twister state")
    version, internal, gauss_next = state["python"]
    if version != 3 or len(internal) != 625 or not all(type(v) is int and 0 <= v < 2**32 for v in internal) or \
            internal[-1] > 624 or not (gauss_next is None or isinstance(gauss_next, float)):
        raise ValueError("rng: Python's is not a Mersenne Twister state")
    if state["torch"].dtype != torch.uint8 or state["torch"].dim() != 1:
        raise ValueError("rng: torch's is not a generator state")
    np_state = ("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return [state["torch"].clone(), np_state, (version, tuple(internal), gauss_next)]


def rng_state() -> dict:
    state = rng_to_tensors([torch.get_rng_state(), np.random.get_state(), random.getstate()])
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return state


def set_rng_state(state: dict) -> None:
    torch_state, np_state, py_state = rng_from_tensors(state)
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if state["cuda"] and torch.cuda.is_available():  # a run uses the first device; a node may show fewer
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def load_snd_obs(path: str, obs_dim: int) -> torch.Tensor:
    """The observations of an SND dataset (.npz, key obs) as an (N, obs_dim) tensor; ValueError if not."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("a .npy array, not an .npz archive")
        with data, np.errstate(all="ignore"):  # a value float32 cannot hold becomes inf, refused below
            obs = data["obs"]
            if obs.dtype.kind not in "fiu":  # strings, booleans, dates, records, complex: not observations
                raise ValueError(f"holds {obs.dtype} values, not real numbers")
            obs = np.asarray(obs, dtype=np.float32)
    except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError, MemoryError,
            zipfile.BadZipFile) as error:  # EOFError: an empty file; MemoryError: a header's absurd shape
        if "allow_pickle" in str(error):  # NumPy advises unpickling it: never relay that
            raise ValueError(f"--snd-obs-file: {path!r} holds Python objects (pickled), not plain arrays: refused "
                             "for safety")
        raise ValueError(f"--snd-obs-file: {path!r} is not an .npz file with an obs array ({first_line(error)})")
    if obs.ndim not in (2, 3) or obs.shape[-1] != obs_dim or obs.size == 0:
        raise ValueError(f"--snd-obs-file: {path!r} holds observations of shape {obs.shape}; "
                         f"this scenario's have {obs_dim} features")
    if not np.isfinite(obs).all():
        raise ValueError(f"--snd-obs-file: {path!r} holds non-finite observations")
    return torch.from_numpy(obs.reshape(-1, obs_dim))


def vmas_env_state(env) -> dict:
    """A VmasEnv's whole simulator state (every tensor of the environment, scenario, world and
    entities), its random stream and its running episode sums: a resumed run steps bit for bit."""
    tensors = {f"{name}/{key}": value.clone() for name, holder in env._state_holders().items()
               for key, value in vars(holder).items() if isinstance(value, torch.Tensor)}
    return dict(tensors=tensors, rng=rng_to_tensors(env._rng), obs=env.obs.clone(),
                episode_return=env.episode_return.clone(), episode_length=env.episode_length.clone())


# The tensors VMAS 1.5's Dispersion and Navigation give an entity or scenario at its first step, one row per
# environment: a checkpoint may hold them beyond a fresh environment's, and nothing else.
VMAS_FIRST_STEP_TENSORS = ("anyone_on_food", "how_many_on_food", "distance_to_goal", "on_goal", "all_goal_reached")


def load_vmas_env_state(env, state: dict, fresh: dict) -> None:
    """state written onto env; fresh: env's own tensors (vmas_env_state's), the ones it may hold."""
    holders = env._state_holders()
    for path, value in state["tensors"].items():
        name, key = path.split("/")
        if path not in fresh and (key not in VMAS_FIRST_STEP_TENSORS or value.shape[:1] != (env.num_envs,)):
            raise ValueError(f"env/tensors/{path:.60}: {tuple(value.shape)}, not a tensor this simulator keeps")
        setattr(holders[name], key, value.clone().to(env.device))
    env._rng = rng_from_tensors(state["rng"])
    env.obs = state["obs"].to(env.device)
    env.episode_return = state["episode_return"].to(env.device)
    env.episode_length = state["episode_length"].to(env.device)


def save_vmas_run(path, fmt, args, run_name, agent, optimizer, envs, global_step, iteration):
    """Everything a VMAS script's resumed run needs to go on bit for bit, written atomically (the agent's
    state_dict holds any state of its own, as DiCo's action optimizer)."""
    save_checkpoint(path, dict(
        format=fmt, args=dataclasses.asdict(args), run_name=run_name, model=agent.state_dict(),
        optimizer=optimizer.state_dict(), env=vmas_env_state(envs), rng=rng_state(), global_step=global_step,
        iteration=iteration))


def restore_vmas_run(args, loaded, agent, optimizer, envs=None) -> None:
    """The saved run's model and optimizer, restored in place; resuming (envs given), its environments (just
    reset) and random generators too. CheckpointError (one line) if it does not fit or holds NaN or inf."""
    fresh = dict(model=agent.state_dict(), optimizer=optimizer.state_dict())
    if envs is not None:
        fresh |= dict(env=vmas_env_state(envs), rng=rng_state())
    with restoring(args, loaded, fresh):
        agent.load_state_dict(loaded["model"])
        load_optimizer(optimizer, loaded["optimizer"], updated=loaded["iteration"] > 1)
        if envs is not None:
            same_layout(loaded["env"], fresh["env"], "env")
            load_vmas_env_state(envs, loaded["env"], fresh["env"]["tensors"])
            set_rng_state(loaded["rng"])


@contextlib.contextmanager
def restoring(args, loaded: dict, fresh: dict):
    """Around a restore: CheckpointError (one line) if the checkpoint holds NaN or inf where fresh (the same
    keys, as the run holds them before the restore) holds a number (a NaN is a state only where a freshly built
    model has one: DiCo's SND estimate before its first measurement), or if the restore fails (a key missing
    or extra, a shape: the file does not fit this script's model)."""
    flag, path = checkpoint_flag(args)
    if where := other_dtype({key: loaded[key] for key in fresh}, fresh):  # load_state_dict would cast it silently
        raise CheckpointError(f"{flag}: {path!r} does not fit this script's model ({where})")
    if where := nonfinite({key: loaded[key] for key in fresh}, fresh):
        raise CheckpointError(f"{flag}: {path!r} holds NaN or inf (in {where}): refused")
    try:
        yield
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as error:
        why = f"no {error.args[0]!r}" if isinstance(error, KeyError) and error.args else first_line(error, 200)
        raise CheckpointError(f"{flag}: {path!r} does not fit this script's model ({why})") from None


def other_dtype(saved, fresh, path: str = "") -> Optional[str]:
    """Where saved holds a tensor of another dtype than fresh's at the same place; None if nowhere."""
    if isinstance(saved, dict) and isinstance(fresh, dict):
        places = ((saved[k], fresh[k], f"{path}/{k}".lstrip("/")) for k in saved if k in fresh)
    elif isinstance(saved, (list, tuple)) and isinstance(fresh, (list, tuple)):
        places = ((s, f, f"{path}[{i}]") for i, (s, f) in enumerate(zip(saved, fresh)))
    elif isinstance(saved, torch.Tensor) and isinstance(fresh, torch.Tensor) and saved.dtype != fresh.dtype:
        return f"{path}: {saved.dtype}, not {fresh.dtype}"
    else:
        return None
    return next(filter(None, (other_dtype(*place) for place in places)), None)


def nonfinite(saved, fresh, path: str = "") -> Optional[str]:
    """Where saved (tensors and numbers, in dicts and lists) holds NaN or inf that fresh, at the same place,
    does not hold too; None if nowhere."""
    if isinstance(saved, dict):
        fresh = fresh if isinstance(fresh, dict) else {}
        return next(filter(None, (nonfinite(v, fresh.get(k), f"{path}/{k}".lstrip("/")) for k, v in saved.items())), None)
    if isinstance(saved, (list, tuple)):
        fresh = fresh if isinstance(fresh, (list, tuple)) and len(fresh) == len(saved) else [None] * len(saved)
        return next(filter(None, (nonfinite(v, f, f"{path}[{i}]") for i, (v, f) in enumerate(zip(saved, fresh)))), None)
    if isinstance(saved, float):
        saved = torch.tensor(saved, dtype=torch.float64)
        fresh = torch.tensor(fresh, dtype=torch.float64) if isinstance(fresh, float) else fresh
    if not (isinstance(saved, torch.Tensor) and (saved.is_floating_point() or saved.is_complex())) or \
            torch.isfinite(saved).all():
        return None
    same = isinstance(fresh, torch.Tensor) and fresh.shape == saved.shape
    kept = (saved == fresh.to(saved)) | (saved.isnan() & fresh.to(saved).isnan()) if same else torch.zeros_like(saved).bool()
    return None if (torch.isfinite(saved) | kept).all() else path


def same_layout(saved, fresh, path: str) -> None:
    """ValueError naming where saved differs from fresh in layout: keys, lengths, tensors' shapes and dtypes,
    kinds of value (a checkpoint edited, or of another scenario or task). Keys fresh lacks are allowed: VMAS
    gives its entities some tensors at their first step."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict) or fresh.keys() - saved.keys():
            raise ValueError(f"{path}: no {sorted(map(str, fresh.keys() - saved.keys()))[:3]}" if isinstance(saved, dict)
                             else f"{path}: a {type(saved).__name__}, not a dict")
        for key in fresh:
            same_layout(saved[key], fresh[key], f"{path}/{key}")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            raise ValueError(f"{path}: {len(saved) if isinstance(saved, (list, tuple)) else saved!r:.30} entries, "
                             f"not {len(fresh)}")
        for i, (s, f) in enumerate(zip(saved, fresh)):
            same_layout(s, f, f"{path}[{i}]")
    elif isinstance(fresh, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != fresh.shape or saved.dtype != fresh.dtype:
            what = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"{path}: {what}, not {tuple(fresh.shape)} {fresh.dtype}")
    elif not (isinstance(saved, type(fresh)) or {type(saved), type(fresh)} <= {int, float}):
        raise ValueError(f"{path}: a {type(saved).__name__}, not a {type(fresh).__name__}")


def load_optimizer(optimizer, state: dict, updated: bool = False) -> None:
    """optimizer.load_state_dict, and ValueError if its settings are not the run's (as the flags made them)
    or a parameter's state is not one Adam could hold (torch would find out at the first step, mid-run, or
    cast it silently): its moments of the parameter's shape and dtype, exp_avg_sq >= 0, its step a whole
    number >= 0 (per agent for PerAgentAdam), no state for a parameter it does not hold, and (updated: the
    run has made an update) not empty. The learning rate is the flags' (--anneal-lr sets it anew)."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        if extra := sorted(map(str, group.keys() - own.keys() - {"params"})):
            raise ValueError(f"optimizer's setting {extra[0]!r:.40} is not one of the run's")
        if odd := [key for key, value in own.items() if key != "lr" and not same_setting(group.get(key), value)]:
            raise ValueError(f"optimizer's {odd[0]} {group.get(odd[0])!r:.40}, not the run's {own[odd[0]]!r:.40}")
        group["lr"] = own["lr"]
    ids = [i for group in state["param_groups"] for i in group["params"]]  # as the file numbers the parameters
    if stray := [key for key in state["state"] if key not in ids]:
        raise ValueError(f"optimizer's state for parameter {stray[0]!r:.20}, which it does not hold")
    if updated and not state["state"]:
        raise ValueError("optimizer's state is empty, yet the run has made updates")
    per_agent = type(optimizer) is not torch.optim.Adam  # PerAgentAdam keeps a step per agent
    for i, p in zip(ids, (p for group in optimizer.param_groups for p in group["params"])):
        held = state["state"].get(i, {})  # as saved: load_state_dict has cast the moments to p's dtype
        if held and set(held) != {"step", "exp_avg", "exp_avg_sq"}:
            raise ValueError(f"optimizer's state {sorted(map(str, held))!r:.60} is not Adam's")
        for key, value in held.items():
            fits = ((torch.Size([]), p.shape[:1]) if per_agent else (torch.Size([]),)) if key == "step" else (p.shape,)
            if not isinstance(value, torch.Tensor) or value.shape not in fits or not value.is_floating_point() or \
                    (key != "step" and value.dtype != p.dtype):
                what = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"optimizer's {key} {what} for a parameter of {tuple(p.shape)} {p.dtype}")
            if key == "exp_avg":  # a mean of gradients: any sign
                continue
            bad = (value < 0) | (value != value.round()) if key == "step" else value < 0
            if bad.any():
                raise ValueError(f"optimizer's {key} holds {value[bad].flatten()[0].item():g}, which Adam cannot reach")


def same_setting(saved, own) -> bool:
    """An optimizer's setting as saved equals the run's own (a tuple may come back as a list)."""
    return list(saved) == list(own) if isinstance(own, (tuple, list)) and isinstance(saved, (tuple, list)) else \
        type(saved) is type(own) and saved == own


def save_eval_video(runs_dir: str, loaded: dict, video, fps: float) -> str:
    """--eval-only --capture-video: the episode as runs_dir/<the checkpoint's run>__eval<...>/eval.mp4."""
    path = os.path.join(runs_dir, new_run_folder(runs_dir, f"{loaded['run_name']}__eval"), "eval.mp4")
    save_video(None, path, "eval/video", video, loaded["global_step"], fps)
    return path


def eval_only(args, loaded: dict, evaluation_line, obs_dim: int, fps: float) -> int:
    """--eval-only, the checkpoint's model already loaded: evaluation_line(snd_obs, video) evaluates it
    (on --snd-obs-file's observations if given; into the list video with --capture-video) and returns
    the line printed. Writes nothing but the video. Returns the exit status."""
    try:
        snd_obs = load_snd_obs(args.snd_obs_file, obs_dim) if getattr(args, "snd_obs_file", None) else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    video = [] if getattr(args, "capture_video", False) else None
    print(evaluation_line(snd_obs, video))
    if video:
        print(f"video: {save_eval_video(args.runs_dir, loaded, video, fps)}")
    return 0


def mujoco_sim_state(env) -> dict:
    """All a MaMuJoCo env (its gymnasium single-agent env) carries from one step to the next, for a
    checkpoint to resume its episode exactly: MuJoCo's integration state, the body positions xpos and
    xipos (Ant and Humanoid read them before stepping; mj_forward cannot recompute them), the time-limit
    counter and the reset noise generator. Plain data: it crosses worker pipes and loads with weights_only=True."""
    import mujoco

    sim = env.unwrapped
    physics = np.empty(mujoco.mj_stateSize(sim.model, mujoco.mjtState.mjSTATE_INTEGRATION))
    mujoco.mj_getState(sim.model, sim.data, physics, mujoco.mjtState.mjSTATE_INTEGRATION)
    return dict(physics=physics.tolist(), xpos=sim.data.xpos.tolist(), xipos=sim.data.xipos.tolist(),
                elapsed_steps=env._elapsed_steps, np_random=sim.np_random.bit_generator.state)


def set_mujoco_sim_state(env, state: dict) -> None:
    import mujoco

    sim = env.unwrapped
    mujoco.mj_setState(sim.model, sim.data, np.array(state["physics"]), mujoco.mjtState.mjSTATE_INTEGRATION)
    sim.data.xpos[:], sim.data.xipos[:] = state["xpos"], state["xipos"]
    env._elapsed_steps = state["elapsed_steps"]
    sim.np_random.bit_generator.state = state["np_random"]


def running_stats(rms: dict) -> dict:
    """gymnasium RunningMeanStd objects by name, as plain tensors (the MaMuJoCo script's --norm-obs)."""
    return {key: dict(mean=torch.as_tensor(r.mean), var=torch.as_tensor(r.var), count=float(r.count))
            for key, r in rms.items()}


def load_running_stats(rms: dict, state: dict) -> None:
    """ValueError if a variance is negative or a count not positive: no run holds them (the square root of the
    variance would make every observation NaN)."""
    for key, r in rms.items():
        if (state[key]["var"] < 0).any() or not state[key]["count"] > 0:
            raise ValueError(f"obs_norm/{key}: a negative variance or a count of {state[key]['count']!r:.20}")
        r.mean, r.var = state[key]["mean"].numpy().astype(np.float64), state[key]["var"].numpy().astype(np.float64)
        r.count = float(state[key]["count"])


def save_mamujoco_run(path, fmt, args, run_name, actor, critics, value_norm, obs_norm, actor_optimizer,
                      critic_optimizer, envs, flat, episode_return, episode_length, global_step, iteration):
    """Everything the MaMuJoCo script's resumed run needs to go on bit for bit (the simulators' states
    and the episodes under way included), written atomically."""
    save_checkpoint(path, dict(
        format=fmt, args=dataclasses.asdict(args), run_name=run_name, actor=actor.state_dict(),
        critics=critics.state_dict(), value_norm=value_norm.state_dict(), obs_norm=running_stats(obs_norm.rms),
        actor_optimizer=actor_optimizer.state_dict(), critic_optimizer=critic_optimizer.state_dict(),
        envs=dict(sim=list(envs.get_attr("sim_state")), obs=torch.as_tensor(flat).clone(),
                  episode_return=torch.as_tensor(episode_return).clone(),
                  episode_length=torch.as_tensor(episode_length).clone()),
        rng=rng_state(), global_step=global_step, iteration=iteration))


def restore_mamujoco_run(args, loaded, actor, critics, value_norm, obs_norm, actor_optimizer, critic_optimizer,
                         envs=None):
    """The saved run's networks, normalisers and optimisers, restored in place; resuming (envs given, just
    reset), its random generators and environments too, which continue their episodes: then returns the loop's
    (flat observations, episode returns, episode lengths). CheckpointError (one line) if it does not fit or
    holds NaN or inf."""
    parts = dict(actor=actor, critics=critics, value_norm=value_norm)
    optimizers = dict(actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer)
    fresh = {key: part.state_dict() for key, part in (parts | optimizers).items()} | dict(obs_norm=running_stats(obs_norm.rms))
    if envs is not None:
        space = envs.observation_space
        fresh |= dict(rng=rng_state(), envs=dict(
            sim=list(envs.get_attr("sim_state")), obs=torch.as_tensor(np.zeros(space.shape, space.dtype)),
            episode_return=torch.zeros(envs.num_envs, dtype=torch.float64),
            episode_length=torch.zeros(envs.num_envs, dtype=torch.int64)))
    with restoring(args, loaded, fresh):
        for key, part in parts.items():
            part.load_state_dict(loaded[key])
        norm = loaded["value_norm"]  # HARL's debiased moving averages: a weight in [0, 1], a mean of squares >= 0
        if not 0 <= norm["debiasing_term"].item() <= 1 or (norm["running_mean_sq"] < 0).any():
            raise ValueError("value_norm: a debiasing term outside [0, 1] or a negative mean of squares")
        for key, optimizer in optimizers.items():
            load_optimizer(optimizer, loaded[key], updated=loaded["iteration"] > 1)
        same_layout(loaded["obs_norm"], fresh["obs_norm"], "obs_norm")
        load_running_stats(obs_norm.rms, loaded["obs_norm"])
        if envs is None:
            return None
        same_layout(loaded["envs"], fresh["envs"], "envs")
        for i, sim in enumerate(loaded["envs"]["sim"]):  # same_layout lets a float stand for an int
            if type(sim["elapsed_steps"]) is not int or not 0 <= sim["elapsed_steps"] <= args.max_episode_steps:
                raise ValueError(f"envs/sim[{i}]/elapsed_steps: {sim['elapsed_steps']!r:.20}, not a step of an "
                                 f"episode of at most {args.max_episode_steps}")
        if (loaded["envs"]["episode_length"] < 0).any():
            raise ValueError("envs/episode_length: a negative length")
        set_rng_state(loaded["rng"])
        envs.set_attr("sim_state", loaded["envs"]["sim"])
    state = loaded["envs"]
    return state["obs"].numpy(), state["episode_return"].numpy().copy(), state["episode_length"].numpy().copy()


def save_matrix_models(args, seeds: list[int], folders: list[str], population) -> None:
    """--save-model of the matrix games: seed s's final parameters to folders[s]/model.pt, atomically."""
    for s, (seed, folder) in enumerate(zip(seeds, folders)):
        model = {name: value[s].detach().clone() for name, value in population.params.items()}
        save_checkpoint(os.path.join(folder, "model.pt"), dict(args=dataclasses.asdict(args), seed=seed, model=model))
