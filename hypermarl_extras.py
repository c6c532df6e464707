"""What the training scripts need beyond training: input checks, checkpoints, resuming, videos.

The scripts import this module only where a feature needs it: the checks of the command line, and
--save-model, --resume, --eval-only, the checkpoint written on Ctrl-C or SIGTERM, --capture-video.
Training runs from each script alone: a script copied into another project without this file trains
as before, with tyro's checks of types and choices only.

Command line (every script):
    ArgError                                     a bad flag: one line, exit status 2, nothing written
    refuse_misplaced(given, why_not, args)       a flag given where it does not apply
    check_values(args, positive=..., ...)        every value in its range, --runs-dir writable, wandb there
    read_command_line(script, argv)              flags, checks, and the checkpoint to resume or evaluate
    check_args(script, args, given)              a VMAS or the MaMuJoCo script's rules (misplaced_flags)
    check_matrix_args(args, given)               the matrix games' rules
Checkpoints (every script):
    save_checkpoint(path, state)                 atomic: a crash mid-write leaves the previous file
    load_checkpoint(path, flag, fmt, required)   weights_only=True; a foreign or tampered file is refused
    take_flags_from_checkpoint(...)              --resume / --checkpoint take the saved run's flags
    rng_state() / set_rng_state(state)           torch, NumPy, Python (and CUDA) generators
    rng_to_tensors(states) / rng_from_tensors(state)   the same as plain data
    load_snd_obs(path, obs_dim)                  an SND dataset (.npz) for --eval-only --snd-obs-file
    save_vmas_run(...) / restore_vmas_run(...)   a VMAS script's whole run, simulators included, bit for bit
    save_mamujoco_run(...) / restore_mamujoco_run(...)   the same for the MaMuJoCo script
    mujoco_sim_state(env) / set_mujoco_sim_state(env, state)   one MuJoCo env mid-episode, as plain data
    evaluate_vmas_checkpoint / evaluate_mamujoco_checkpoint   --eval-only
    save_matrix_models(...)                      the matrix games' --save-model
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


def refuse_misplaced(given: set[str], why_not: dict, args=None) -> None:
    """why_not[name]: why flag `name` does not apply to this run (None where it does); given, it is refused,
    named as written (--no-x for a boolean given False)."""
    for name in sorted(given):
        if why_not.get(name):
            written = "--no-" + flag_of(name)[2:] if getattr(args, name, None) is False else flag_of(name)
            raise ArgError(f"{written}: {why_not[name]}")


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
    CHECKPOINT_FORMAT and SIMULATOR (vmas: SCENARIO_OPTIONS too)."""
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
        kind = script.SIMULATOR
        loaded = load_checkpoint(args.resume or args.checkpoint, flag, script.CHECKPOINT_FORMAT, CHECKPOINT_KEYS[kind])
        changes = take_flags_from_checkpoint(args, loaded["args"], flag, given, COMPAT_FIELDS[kind],
                                             RESUME_MAY_CHANGE[kind], INVOCATION_FIELDS)
        if flag == "--checkpoint":  # the evaluation's defaults are those of the checkpoint's scenario
            args = script.paper_defaults(args, given | set(COMPAT_FIELDS[kind]))
        refuse_misplaced(given, misplaced_flags(script, args), args)  # before the budget, as the values come after it
        if args.resume and getattr(args, "anneal_lr", False) and any(c.startswith("--total-timesteps") for c in changes):
            raise ArgError("--total-timesteps: the run anneals its learning rate over its budget (--anneal-lr); "
                           "a new budget would change the schedule")
        batch_size = args.num_envs * args.num_steps  # the checkpoint's
        if args.resume and loaded["iteration"] > args.total_timesteps // batch_size:
            raise ArgError(f"--total-timesteps: the run already trained {loaded['global_step']} steps, in iterations "
                           f"of {batch_size}; give at least {loaded['iteration'] * batch_size} to train on")
    check_args(script, args, given)
    if args.capture_video:
        if script.SIMULATOR == "mujoco":
            default_mujoco_gl()  # before anything imports mujoco, which reads it once
        if problem := probe_capture_video(script.SIMULATOR):
            raise ArgError(problem)
    return args, loaded, changes


# ===== Each script's flags: where they apply, and their ranges =====
def hypernet_flags(family: str) -> dict:
    """The hypernetwork's flags: why each does not apply to --hypernet family (None where it does)."""
    return dict.fromkeys(("hypernet_embedding_dim", "hypernet_hidden_dims", "hypernet_embedding"),
                         None if family == "mlp" else f"only with --hypernet mlp, got --hypernet {family}") | \
        dict.fromkeys(("hypernet_init", "hypernet_input"), None if family in ("mlp", "linear") else
                      f"only with --hypernet mlp or linear, got --hypernet {family}")


def misplaced_flags(script, args) -> dict:
    """Flag -> why it does not apply to this run of a VMAS script or the MaMuJoCo one (None where it does)."""
    why_not = hypernet_flags(args.hypernet) | dict(save_interval=None if args.save_model else "only with --save-model")
    if script.SIMULATOR == "mujoco":
        return why_not | dict(
            fixed_order=None if args.algo == "happo" else f"only with --algo happo, got --algo {args.algo}",
            agent_obsk=None if args.obs_mode == "local" else f"only with --obs-mode local, got --obs-mode {args.obs_mode}")
    other = "navigation" if args.scenario == "dispersion" else "dispersion"
    why_not.update(dico_snd_des=None if args.hypernet == "dico" else
                   f"only with --hypernet dico, got --hypernet {args.hypernet}",
                   lidar_range=None if args.collisions else "only with --collisions (agents carry a LIDAR only then)")
    return why_not | {name: f"is a {other} option, not for --scenario {args.scenario}"
                      for name in script.SCENARIO_OPTIONS[other]}


def check_args(script, args, given: set[str]) -> None:
    """A VMAS or the MaMuJoCo script's run: each flag given only where it applies (with a checkpoint: to
    its run), every value in its range, no combination the method or the simulator cannot run."""
    refuse_misplaced(given, misplaced_flags(script, args), args)
    (check_mamujoco_values if script.SIMULATOR == "mujoco" else check_vmas_values)(args)
    if args.hypernet_init == "matched" and args.hypernet == "linear":  # the linear one's scaled init is exact
        raise ArgError("--hypernet-init: matched is for --hypernet mlp, got --hypernet linear")


def check_vmas_values(args) -> None:
    n, same, navigation = args.n_agents, args.agents_with_same_goal, args.scenario == "navigation"
    if n < 2:
        raise ArgError(f"--n-agents: must be at least 2, got {n}")
    check_values(args, positive=(
        "max_steps", "total_timesteps", "learning_rate", "num_envs", "num_steps", "num_minibatches", "update_epochs",
        "clip_coef", "max_grad_norm", "eval_interval", "eval_episodes", "snd_samples", "snd_gaussian_samples",
        "interference_samples", "print_interval", "save_interval", "n_food", "food_radius", "lidar_range",
        "agent_radius", "hypernet_embedding_dim"), unit=("gamma", "gae_lambda"), nonneg=("ent_coef", "vf_coef"),
        sizes=("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims"), divide_batch=("num_minibatches",))
    for broken, why in (
            (args.hypernet == "dico" and not (args.dico_snd_des == -1 or args.dico_snd_des >= 0),
             f"--dico-snd-des: must be -1 (unconstrained) or >= 0, got {args.dico_snd_des!r}"),
            (navigation and not 1 <= same <= n,
             f"--agents-with-same-goal: must be between 1 and n_agents = {n}, got {same!r}"),
            (navigation and same > 1 and args.collisions,
             "--collisions: agents cannot share a goal with collisions on (VMAS asserts it); "
             "use --agents-with-same-goal 1"),
            (navigation and args.split_goals and (n % 2 or same != n // 2),
             f"--split-goals: needs an even n_agents and --agents-with-same-goal n/2, got n={n}, same={same}")):
        if broken:
            raise ArgError(why)


def check_mamujoco_values(args) -> None:
    check_values(args, positive=(
        "torch_threads", "update_threads", "max_episode_steps", "num_envs", "total_timesteps", "num_steps",
        "learning_rate", "critic_learning_rate", "update_epochs", "critic_epochs", "num_minibatches",
        "critic_num_minibatches", "clip_coef", "huber_delta", "max_grad_norm", "adam_eps", "std_x_coef", "std_y_coef",
        "hypernet_embedding_dim", "eval_interval", "eval_episodes", "snd_samples", "snd_gaussian_samples",
        "interference_interval", "interference_samples", "print_interval", "save_interval"),
        unit=("gamma", "gae_lambda"), nonneg=("ent_coef", "agent_obsk"),
        sizes=("actor_hidden_dims", "critic_hidden_dims", "hypernet_hidden_dims"),
        divide_batch=("num_minibatches", "critic_num_minibatches"),
        max_seed=2**32 - 1 - 10_000 - (args.eval_episodes - 1),  # NumPy takes seeds below 2**32
        seed_why=" (evaluation episode k uses seed + 10000 + k, below 2**32)")
    if args.algo == "happo" and args.hypernet != "nops":  # shared weights: one agent's step moves the others
        raise ArgError(f"--hypernet: --algo happo needs disjoint per-agent actors (nops), got --hypernet {args.hypernet}")


# Flags of one family of the matrix games ([linear], [mlp] in their --help)
MATRIX_FAMILY_FLAGS = {"hyper_linear_shared_bias": "linear", "hypernet_embedding_dim": "mlp",
                       "hypernet_hidden_dims": "mlp"}


def check_matrix_args(args, given: set[str], hypernets: Optional[list[str]] = None) -> None:
    """reinforce_matrix_games.py's flags. hypernets: the families they train (default: --hypernet; the
    sweep's --hypernets); a flag marked [family] in --help needs that family among them."""
    trained = f"--hypernet {args.hypernet}" if hypernets is None else f"--hypernets {' '.join(hypernets)}"
    refuse_misplaced(given, {name: None if family in (hypernets or [args.hypernet]) else
                             f"only with --hypernet {family}, got {trained}"
                             for name, family in MATRIX_FAMILY_FLAGS.items()}, args)
    if args.n_agents < 2:
        raise ArgError(f"--n-agents: must be at least 2, got {args.n_agents}")
    check_values(args, positive=("num_trials", "batch_size", "learning_rate", "num_seeds", "eval_trials",
                                 "eval_interval", "log_interval", "hidden_size", "hypernet_embedding_dim",
                                 "num_threads"), sizes=("hypernet_hidden_dims",))
    max_seed = 2**32 - 1 - 10_000  # NumPy takes seeds below 2**32; evaluation uses seed + 10000
    if args.seed + args.num_seeds - 1 > max_seed:
        raise ArgError(f"--num-seeds: the last seed, {args.seed} + {args.num_seeds} - 1, must be at most "
                       f"{max_seed}, got {args.num_seeds!r}")
    if args.num_trials < args.batch_size:
        raise ArgError(f"--num-trials: must be at least --batch-size = {args.batch_size}, got {args.num_trials!r}")


# ===== Checkpoints =====
class CheckpointError(ArgError):
    """A checkpoint that cannot be used: reported as one line, exit status 2."""


# What a script's checkpoint holds; the flags that define the model and the environment, which
# --eval-only takes from it; what --resume may change (budget, logging, cadence, device), every other
# flag being the checkpoint's. MaMuJoCo: --no-async-envs changes no number, the thread counts do (a
# matrix product's sums split otherwise), so a resumed run keeps the threads it was started with.
CHECKPOINT_KEYS = {
    "vmas": {"format", "args", "run_name", "model", "optimizer", "action_optimizer", "env", "rng", "global_step",
             "iteration"},
    "mujoco": {"format", "args", "run_name", "actor", "critics", "value_norm", "obs_norm", "actor_optimizer",
               "critic_optimizer", "envs", "rng", "global_step", "iteration"}}
COMPAT_FIELDS = {
    "vmas": ("n_food", "share_reward", "penalise_by_time", "food_radius", "agents_with_same_goal", "split_goals",
             "observe_all_goals", "shared_rew", "collisions", "lidar_range", "agent_radius", "scenario", "n_agents",
             "max_steps", "continuous_actions", "actor_hidden_dims", "critic_hidden_dims", "activation", "hypernet",
             "hypernet_embedding_dim", "hypernet_hidden_dims", "hypernet_embedding", "hypernet_init",
             "hypernet_input", "dico_snd_des"),
    "mujoco": ("task", "obs_mode", "agent_obsk", "max_episode_steps", "algo", "hypernet", "critic", "norm_obs",
               "norm_value", "actor_hidden_dims", "critic_hidden_dims", "std_x_coef", "std_y_coef",
               "hypernet_embedding_dim", "hypernet_hidden_dims", "hypernet_embedding", "hypernet_init",
               "hypernet_input")}
RESUME_MAY_CHANGE = {
    simulator: ("total_timesteps", "eval_interval", "save_interval", "save_model", "print_interval", "runs_dir",
                "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video") + extra
    for simulator, extra in (("vmas", ("compile",)), ("mujoco", ("async_envs",)))}


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
        save_eval_only_video(script, args, loaded, video, 1 / eval_env.env.world.dt)
    return 0


def save_eval_only_video(script, args, loaded, video, fps: float) -> None:
    """--eval-only --capture-video: the episode as runs_dir/<the checkpoint's run>__eval<...>/eval.mp4."""
    folder = script.new_run_folder(args.runs_dir, f"{loaded['run_name']}__eval")
    path = os.path.join(args.runs_dir, folder, "eval.mp4")
    save_video(None, path, "eval/video", video, loaded["global_step"], fps)
    print(f"video: {path}")


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


def save_mamujoco_run(path, fmt, args, run_name, actor, critics, value_norm, obs_norm, actor_optimizer,
                      critic_optimizer, envs, flat, episode_return, episode_length, global_step, iteration):
    """Everything the MaMuJoCo script's resumed run needs to go on bit for bit (the simulators' states
    and the episodes under way included), written atomically."""
    save_checkpoint(path, dict(
        format=fmt, args=dataclasses.asdict(args), run_name=run_name, actor=actor.state_dict(),
        critics=critics.state_dict(), value_norm=value_norm.state_dict(), obs_norm=obs_norm.state_dict(),
        actor_optimizer=actor_optimizer.state_dict(), critic_optimizer=critic_optimizer.state_dict(),
        envs=dict(sim=list(envs.get_attr("sim_state")), obs=torch.as_tensor(flat).clone(),
                  episode_return=torch.as_tensor(episode_return).clone(),
                  episode_length=torch.as_tensor(episode_length).clone()),
        rng=rng_state(), global_step=global_step, iteration=iteration))


def restore_mamujoco_run(loaded, actor, critics, value_norm, obs_norm, actor_optimizer, critic_optimizer, envs):
    """The saved run, restored in place; the environments continue their episodes. Returns the loop's
    (flat observations, episode returns, episode lengths)."""
    for module, key in ((actor, "actor"), (critics, "critics"), (value_norm, "value_norm"), (obs_norm, "obs_norm"),
                        (actor_optimizer, "actor_optimizer"), (critic_optimizer, "critic_optimizer")):
        module.load_state_dict(loaded[key])
    set_rng_state(loaded["rng"])
    envs.set_attr("sim_state", loaded["envs"]["sim"])
    state = loaded["envs"]
    return state["obs"].numpy(), state["episode_return"].numpy().copy(), state["episode_length"].numpy().copy()


def evaluate_mamujoco_checkpoint(script, args, loaded, actor, obs_norm, evaluator) -> int:
    """--eval-only for the MaMuJoCo script: the return and SND of a checkpoint's policy, printed; writes
    nothing but a video (--capture-video). Returns the exit status."""
    actor.load_state_dict(loaded["actor"])
    obs_norm.load_state_dict(loaded["obs_norm"])
    video = [] if args.capture_video else None
    try:
        eval_return, snd, _ = evaluator(actor, obs_norm, video)
        print(f"eval/episodic_return={eval_return:.4f} diversity/snd={snd:.6f}")
        if video:
            save_eval_only_video(script, args, loaded, video, evaluator.video_timing()[1])
    finally:
        evaluator.close()
    return 0


def save_matrix_models(args, seeds: list[int], folders: list[str], population) -> None:
    """--save-model of the matrix games: seed s's final parameters to folders[s]/model.pt, atomically."""
    for s, (seed, folder) in enumerate(zip(seeds, folders)):
        model = {name: value[s].detach().clone() for name, value in population.params.items()}
        save_checkpoint(os.path.join(folder, "model.pt"), dict(args=dataclasses.asdict(args), seed=seed, model=model))
