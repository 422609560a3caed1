"""Draw what a trained agent does: the meta-test protocol on one task.

    metarelabel render RUN [--task K] [--out FILE] [--checkpoint ITER|PATH] [--seed S]

- 2-D families (``four-corners``, ``point-robot``, ``sparse-point-robot``): a PNG of every
  trajectory over the goals (the task's goal and its success radius highlighted; Four-Corners'
  -3 squares shaded): exploration trajectories (z ~ prior) dashed and grey-orange, adapted ones
  (z from the posterior) solid and blue, darker the later.
- MuJoCo families (locomotion, Sawyer, Visual-Reacher): an animated GIF (or MP4 with
  ``imageio-ffmpeg`` installed, chosen by ``--out x.mp4``) rendered offscreen, one frame per env
  step, each frame captioned with the trajectory number, its kind and its return so far.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ConfigError, RunDirError

FRAME_SIZE = 240
MAX_FRAMES = 1200


def _mujoco(env):
    """(model, data) of a MuJoCo family, or None."""
    for holder in (env, getattr(env, "mw", None)):
        if holder is not None and hasattr(holder, "model") and hasattr(holder, "data"):
            return holder.model, holder.data
    return None


def render_run(source, task: int = 0, out=None, checkpoint=None, seed: int = 12345, device=None) -> Path:
    from .agent import load_agent

    agent = load_agent(source, checkpoint=checkpoint, device=device, seed=seed)
    env = agent.make_env()
    env.reset(seed=seed)
    tasks = np.asarray(env.eval_tasks)
    if not 0 <= task < len(tasks):
        raise ConfigError(f"--task {task}: {agent.family} has {len(tasks)} eval tasks (0..{len(tasks) - 1})")
    planar = "pos" in env.info_spec and int(np.prod(env.observation_space.shape)) == 2
    handles = None if planar else _mujoco(env)
    if not planar and handles is None:
        raise ConfigError(f"render: no drawing for family {agent.family} (2-D point or MuJoCo families only)")
    src = Path(source)
    default_dir = src if src.is_dir() else src.parent
    suffix = ".png" if planar else ".gif"
    out = Path(out) if out else default_dir / f"render_task{task}{suffix}"
    if planar and out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: a 2-D family renders to a .png")
    if not planar and out.suffix.lower() not in (".gif", ".mp4"):
        raise ConfigError(f"--out {out}: a MuJoCo family renders to a .gif or .mp4")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot write {out}: {exc.strerror}") from None
    if planar:
        trajs = agent.run_task(env, int(tasks[task]))
        _draw_planar(env, int(tasks[task]), trajs, out, agent)
    else:
        _animate(env, agent, int(tasks[task]), handles, out)
    return out


def _draw_planar(env, task: int, trajs: list[dict], out: Path, agent) -> None:
    from .plot import _need

    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    goals = np.asarray(env.tasks[np.asarray(env.eval_tasks)], np.float64)
    goal = np.asarray(env.tasks[task], np.float64)
    fig, ax = plt.subplots(figsize=(5.6, 6.2))
    if agent.family == "four-corners":  # the goal's -3 square on the straight path to it
        sx, sy = np.sign(goal)
        ax.add_patch(Rectangle((min(0.1 * sx, 0.5 * sx), min(0.1 * sy, 0.5 * sy)), 0.4, 0.4,
                               color="#d62728", alpha=0.15, lw=0, label="-3 square of this task"))
    ax.scatter(goals[:, 0], goals[:, 1], s=14, color="#999999", zorder=2, label="other tasks' goals")
    ax.add_patch(Circle(goal, 0.2, fill=False, color="#2ca02c", lw=1.5, zorder=3))
    ax.scatter([goal[0]], [goal[1]], marker="*", s=160, color="#2ca02c", zorder=4, label=f"goal of task {task}")
    n_exp = sum(t["exploration"] for t in trajs)
    n_ad = len(trajs) - n_exp
    i_exp = i_ad = 0
    for t in trajs:
        pos = np.vstack([t["start"][None, :2]] + [i["pos"][None] for i in t["infos"]])
        if t["exploration"]:
            shade = 0.35 + 0.5 * i_exp / max(n_exp - 1, 1)
            ax.plot(pos[:, 0], pos[:, 1], ls="--", lw=1.2, color=plt.cm.Oranges(shade),
                    label="exploration (z ~ prior)" if i_exp == 0 else None)
            i_exp += 1
        else:
            shade = 0.35 + 0.6 * i_ad / max(n_ad - 1, 1)
            ax.plot(pos[:, 0], pos[:, 1], ls="-", lw=1.4, color=plt.cm.Blues(shade),
                    label="adapted (z ~ posterior)" if i_ad == 0 else None)
            i_ad += 1
        ax.scatter([pos[-1, 0]], [pos[-1, 1]], s=10, color="black" if t["success"] else "#bbbbbb", zorder=5)
    succ = [t["success"] for t in trajs if not t["exploration"]]
    ax.set_title(f"{agent.family}, task {task}: {n_exp} exploration + {n_ad} adapted trajectories\n"
                 f"adapted success {np.mean(succ) if succ else float('nan'):.2f}, "
                 f"last return {trajs[-1]['return']:.1f} (iteration {agent.info['iteration']})", fontsize=9)
    ax.set_aspect("equal")
    lim = max(1.3, float(np.abs(goals).max()) + 0.3)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, frameon=False)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=130)
    except OSError as exc:
        raise RunDirError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        plt.close(fig)


def _animate(env, agent, task: int, handles, out: Path) -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    import mujoco

    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ConfigError("render: MuJoCo families need imageio (pip install imageio)") from None
    from .envs.visual_reacher import _make_renderer

    model, data = handles
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, FRAME_SIZE)
    model.vis.global_.offheight = max(model.vis.global_.offheight, FRAME_SIZE)
    renderer = _make_renderer(model, FRAME_SIZE)
    cam = mujoco.MjvCamera()
    mujoco.mjv_defaultFreeCamera(model, cam)
    body = 1 if model.nbody > 1 else 0  # the first body below the world: torso / arm base
    # close enough to see the body move (the floor makes a locomotion model's extent large)
    cam.distance = float(np.clip(0.6 * float(model.stat.extent), 0.6, 4.0))
    cam.elevation = -20.0
    frames: list[np.ndarray] = []
    seen: list[dict] = []

    # a fixed overview camera where the model has one (Meta-World's "corner"), else a free
    # camera following the first body
    names = [model.camera(i).name for i in range(model.ncam)]
    fixed = "corner" if "corner" in names else None

    def on_step(env_, rec):
        if not seen or seen[-1] is not rec:
            seen.append(rec)
        if len(frames) >= MAX_FRAMES:
            return
        if fixed is None:
            cam.lookat[:] = data.xpos[body]
        renderer.update_scene(data, camera=fixed or cam)
        img = renderer.render()
        img = (img[::-1] if fixed else img).copy()  # Meta-World's corner camera is mounted upside down
        kind = "exploration" if rec["exploration"] else "adapted"
        frames.append(_caption(img, f"traj {len(seen)} {kind}  return {rec['return']:.1f}"))

    try:
        agent.run_task(env, task, on_step=on_step)
    finally:
        renderer.close()
    if not frames:
        raise ConfigError("render: no frames were drawn")
    try:
        if out.suffix.lower() == ".mp4":
            try:
                imageio.mimsave(out, frames, fps=30)
            except (ImportError, ValueError, RuntimeError):
                raise ConfigError("render: MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                                  "or use --out x.gif") from None
        else:
            imageio.mimsave(out, frames, duration=1 / 30, loop=0)
    except OSError as exc:
        raise RunDirError(f"cannot write {out}: {exc.strerror}") from None


def _caption(img: np.ndarray, text: str) -> np.ndarray:
    """``img`` with ``text`` drawn in its top-left corner."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, im.width, 14), fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255))
    return np.asarray(im)
