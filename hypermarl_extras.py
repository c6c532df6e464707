"""What the training scripts need beyond training: input checks, checkpoints, resuming, videos.

The scripts import this module only where a feature needs it: the checks of the command line, and
--save-model, --resume, --eval-only, the checkpoint written on Ctrl-C or SIGTERM, --capture-video.
Training runs from each script alone: a script copied into another project without this file trains
as before, with tyro's checks of types and choices only.

Command line (every script):
    ArgError                                     a bad flag: one line, exit status 2, nothing written
    refuse_misplaced(given, why_not)             a flag given where it does not apply
    check_values(args, positive=..., ...)        every value in its range, --runs-dir writable, wandb there
    read_command_line(script, argv)              flags, checks, and the checkpoint to resume or evaluate
Checkpoints (every script):
    save_checkpoint(path, state)                 atomic: a crash mid-write leaves the previous file
    load_checkpoint(path, flag, fmt, required)   weights_only=True; a foreign or tampered file is refused
    take_flags_from_checkpoint(...)              --resume / --checkpoint take the saved run's flags
    rng_state() / set_rng_state(state)           torch, NumPy, Python (and CUDA) generators
    rng_to_tensors(states) / rng_from_tensors(state)   the same as plain data
    load_snd_obs(path, obs_dim)                  an SND dataset (.npz) for --eval-only --snd-obs-file
    save_vmas_run(...) / restore_vmas_run(...)   a VMAS script's whole run, simulators included, bit for bit
Videos (--capture-video):
    probe_capture_video(simulator)   None, or one line saying what to install (checked before a run starts)
    mamujoco_frame(parallel_env)     one MaMuJoCo frame, without shadows (software rendering)
    video_timing(steps_per_second)   (stride, fps) for real-time playback
    save_video(writer, path, tag, frames, step, fps)   an mp4 file and an animated GIF in TensorBoard

Both simulators render through EGL: VMAS through pyglet's headless mode, MuJoCo with MUJOCO_GL=egl.
Without a GPU, Mesa's EGL renders in software (llvmpipe): no display and no GPU are needed.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import random
import re
import subprocess
import sys
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


def refuse_misplaced(given: set[str], why_not: dict) -> None:
    """why_not[name]: why flag `name` does not apply to this run (None where it does); given, it is refused."""
    for name in sorted(given):
        if why_not.get(name):
            raise ArgError(f"{flag_of(name)}: {why_not[name]}")


def check_values(args, positive=(), unit=(), nonneg=(), sizes=(), divide_batch=(), max_seed=2**32 - 1 - 10_000,
                 seed_why="") -> None:
    """A run's values (a checkpoint's included): finite floats, a seed NumPy takes (max_seed leaves room
    for the evaluation's offsets), a plain --exp-name, the fields of `positive` > 0, of `unit` in [0, 1],
    of `nonneg` >= 0, of `sizes` one or more positive sizes; with divide_batch, those fields divide
    num_envs * num_steps and total_timesteps holds one batch. Then --runs-dir and --track."""
    def fail(name, why):
        raise ArgError(f"{flag_of(name)}: {why}, got {getattr(args, name)!r}")

    for f in dataclasses.fields(args):  # inf and nan pass every comparison below: refuse them first
        if isinstance(getattr(args, f.name), float) and not math.isfinite(getattr(args, f.name)):
            fail(f.name, "must be a finite number")
    if not 0 <= args.seed <= max_seed:
        fail("seed", f"must be between 0 and {max_seed}{seed_why}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.exp_name):
        fail("exp_name", "must be a plain name (letters, digits, '.', '_', '-')")
    for names, holds, why in ((positive, lambda v: v > 0, "must be positive"),
                              (unit, lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
                              (nonneg, lambda v: v >= 0, "must be >= 0"),
                              (sizes, lambda v: v and min(v) > 0, "must be one or more positive sizes")):
        for name in names:
            if not holds(getattr(args, name)):
                fail(name, why)
    if divide_batch:
        batch_size = args.num_envs * args.num_steps
        for name in divide_batch:
            if batch_size % getattr(args, name):
                fail(name, f"must divide num_envs * num_steps = {batch_size}")
        if args.total_timesteps < batch_size:
            fail("total_timesteps", f"must be at least num_envs * num_steps = {batch_size}")
    eval_only = getattr(args, "eval_only", False)
    if not eval_only or args.capture_video:
        check_output_folder("--runs-dir", args.runs_dir)
    if args.track and not eval_only:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ArgError("--track: wandb is not installed (pip install wandb)")


def check_output_folder(flag: str, path: str) -> None:
    """A folder this run may create and write into, checked before anything is written."""
    if not path:
        raise ArgError(f"{flag}: must name a folder, got ''")
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # a file, or a link to nothing
        raise ArgError(f"{flag}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgError(f"{flag}: {existing!r} is not writable")


INVOCATION_FIELDS = ("resume", "eval_only", "checkpoint", "snd_obs_file")  # what to do, not what the run is


def read_command_line(script, argv: list[str]):
    """A checkpointing script's command line: (args, the checkpoint to resume or evaluate or None, the
    flags --resume changes). ArgError or CheckpointError (one line) for a bad flag or file, before
    anything is written. script: the module, with Args, parse_args, flags_given, paper_defaults,
    misplaced_flags, check_args, CHECKPOINT_FORMAT, CHECKPOINT_KEYS, COMPAT_FIELDS, RESUME_MAY_CHANGE and SIMULATOR."""
    args, given = script.parse_args(argv, checked=False), script.flags_given(argv)
    if args.eval_only != bool(args.checkpoint):
        raise ArgError("--eval-only: needs --checkpoint PATH" if args.eval_only else
                       "--checkpoint: only with --eval-only (use --resume to continue training)")
    if args.eval_only and args.resume:
        raise ArgError("--resume: cannot be combined with --eval-only")
    if getattr(args, "snd_obs_file", None) is not None and not args.eval_only:
        raise ArgError("--snd-obs-file: only with --eval-only")
    for name in ("resume", "checkpoint", "snd_obs_file"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            raise ArgError(f"{flag_of(name)}: {path!r} is a folder, not a file" if os.path.isdir(path) else
                           f"{flag_of(name)}: no such file {path!r}")
    loaded, changes = None, []
    if args.resume or args.checkpoint:
        flag = "--resume" if args.resume else "--checkpoint"
        loaded = load_checkpoint(args.resume or args.checkpoint, flag, script.CHECKPOINT_FORMAT, script.CHECKPOINT_KEYS)
        changes = take_flags_from_checkpoint(args, loaded["args"], flag, given, script.COMPAT_FIELDS,
                                             script.RESUME_MAY_CHANGE, INVOCATION_FIELDS)
        if flag == "--checkpoint":  # the evaluation's defaults are those of the checkpoint's scenario
            args = script.paper_defaults(args, given | set(script.COMPAT_FIELDS))
        refuse_misplaced(given, script.misplaced_flags(args))  # before the budget, as the values come after it
        if args.resume and getattr(args, "anneal_lr", False) and any(c.startswith("--total-timesteps") for c in changes):
            raise ArgError("--total-timesteps: the run anneals its learning rate over its budget (--anneal-lr); "
                           "a new budget would change the schedule")
        batch_size = args.num_envs * args.num_steps  # the checkpoint's
        if args.resume and loaded["iteration"] > args.total_timesteps // batch_size:
            raise ArgError(f"--total-timesteps: the run already trained {loaded['global_step']} steps, in iterations "
                           f"of {batch_size}; give at least {loaded['iteration'] * batch_size} to train on")
    script.check_args(args, given)
    if args.capture_video:
        if script.SIMULATOR == "mujoco":
            default_mujoco_gl()  # before anything imports mujoco, which reads it once
        if problem := probe_capture_video(script.SIMULATOR):
            raise ArgError(problem)
    return args, loaded, changes


# ===== Checkpoints =====
class CheckpointError(ArgError):
    """A checkpoint that cannot be used: reported as one line, exit status 2."""


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        why = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]  # an empty file's error is blank
        raise CheckpointError(f"{flag}: {path!r} is not a readable checkpoint ({why})")
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.split("/")[0] == fmt.split("/")[0] and found != fmt:
        raise CheckpointError(f"{flag}: {path!r} is a {found} checkpoint, written by an older version of this "
                              f"script; this one reads {fmt}")
    if found != fmt or not set(required) <= set(state):
        raise CheckpointError(f"{flag}: {path!r} is not a {fmt} checkpoint")
    return state


def take_flags_from_checkpoint(args, saved: dict, flag: str, given: set[str], compat_fields, resume_may_change,
                               invocation_fields) -> list[str]:
    """--resume continues the saved run, so its flags are the checkpoint's, and --eval-only takes the
    model's (compat_fields) from it. A flag given with another value is an error, except the ones in
    resume_may_change, which take effect. Returns those changes, to report."""
    defaults = {field.name: getattr(args, field.name) for field in dataclasses.fields(args)}
    names = compat_fields if flag == "--checkpoint" else [n for n in defaults if n not in invocation_fields]
    changes = []
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
    pos, has_gauss, cached = state["numpy_rest"]
    np_state = ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    version, internal, gauss_next = state["python"]
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
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_snd_obs(path: str, obs_dim: int) -> torch.Tensor:
    """The observations of an SND dataset (.npz, key obs) as an (N, obs_dim) tensor; ValueError if not."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("a .npy array, not an .npz archive")
        with data:
            obs = np.asarray(data["obs"], dtype=np.float32)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:  # EOFError: an empty file
        raise ValueError(f"--snd-obs-file: {path!r} is not an .npz file with an obs array "
                         f"({str(error).splitlines()[0][:120]})")
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


def load_vmas_env_state(env, state: dict) -> None:
    holders = env._state_holders()
    for path, value in state["tensors"].items():
        name, key = path.split("/")
        setattr(holders[name], key, value.clone().to(env.device))
    env._rng = rng_from_tensors(state["rng"])
    env.obs = state["obs"].to(env.device)
    env.episode_return = state["episode_return"].to(env.device)
    env.episode_length = state["episode_length"].to(env.device)


def save_vmas_run(path, fmt, args, run_name, agent, optimizer, action_optimizer, envs, global_step, iteration):
    """Everything a VMAS script's resumed run needs to go on bit for bit, written atomically."""
    save_checkpoint(path, dict(
        format=fmt, args=dataclasses.asdict(args), run_name=run_name, model=agent.state_dict(),
        optimizer=optimizer.state_dict(), action_optimizer=action_optimizer.state_dict() if action_optimizer else {},
        env=vmas_env_state(envs), rng=rng_state(), global_step=global_step, iteration=iteration))


def restore_vmas_run(loaded, agent, optimizer, action_optimizer, envs):
    """The saved run, restored in place; returns (global_step, next iteration, run_name)."""
    agent.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if action_optimizer is not None:
        action_optimizer.load_state_dict(loaded["action_optimizer"])
    load_vmas_env_state(envs, loaded["env"])
    set_rng_state(loaded["rng"])
    return loaded["global_step"], loaded["iteration"], loaded["run_name"]


def evaluate_vmas_checkpoint(script, args, loaded, agent, eval_env) -> int:
    """--eval-only for a VMAS script: the return and SND (script.evaluate) of a checkpoint's policy,
    printed; writes nothing but a video (--capture-video). Returns the exit status."""
    agent.load_state_dict(loaded["model"])
    try:
        snd_obs = load_snd_obs(args.snd_obs_file, eval_env.obs_dim) if args.snd_obs_file else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    video = [] if args.capture_video else None
    ret, per_agent, snd, _, _ = script.evaluate(agent, eval_env, args, args.seed + 10_000, snd_obs, video=video)
    print(f"eval/episodic_return={ret:.4f} diversity/snd={snd:.6f} per_agent={[round(r, 4) for r in per_agent]}")
    if video:
        folder = script.new_run_folder(args.runs_dir, f"{loaded['run_name']}__eval")
        path = os.path.join(args.runs_dir, folder, "eval.mp4")
        save_video(None, path, "eval/video", video, loaded["global_step"], 1 / eval_env.env.world.dt)
        print(f"video: {path}")
    return 0
