"""Evaluation videos for --capture-video (CleanRL's flag), on machines with or without a display.

The training scripts import this module only when --capture-video is given: training, checkpoints
and evaluation run from each script alone, and a script copied into another project without this
file trains as before.

    probe_capture_video(simulator)   None, or one line saying what to install (checked before a run starts)
    mamujoco_frame(parallel_env)     one MaMuJoCo frame, without shadows (software rendering)
    video_timing(steps_per_second)   (stride, fps) for real-time playback
    save_video(writer, path, tag, frames, step, fps)   an mp4 file and an animated GIF in TensorBoard

Both simulators render through EGL: VMAS through pyglet's headless mode, MuJoCo with MUJOCO_GL=egl.
Without a GPU, Mesa's EGL renders in software (llvmpipe): no display and no GPU are needed.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

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
