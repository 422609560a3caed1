"""``visual-reacher``: Gymnasium's 2-link Reacher (v5 XML) observed through an offscreen RGB
camera, with the target hidden (SPEC section 5; issue 8).

- Observation: an RGB image ``uint8 [3, H, W]`` (channels first, 64 x 64 by default) rendered
  with ``mujoco.Renderer`` from a free camera looking straight down on the arena centre
  (distance ``CAMERA_DISTANCE`` = 0.55, field of view 45 deg: the frame spans +-0.23 around the
  base), so the arm (reach 0.21) fills the frame without leaving it.  Shadows and
  reflections are switched off.  ``MUJOCO_GL`` defaults to ``egl`` (headless GPU/CPU EGL).
- The target is **not visible**: its geom's rgba alpha is 0 (``show_target=True`` builds a
  goal-visible copy for tests and figures).  The task must be inferred from rewards.
- Tasks: 60 target positions (50 train / 10 eval) drawn by ``np.random.default_rng(task_seed)``
  uniformly over the annulus 0.05 <= r <= 0.20 around the base (inside the arm's reach 0.21),
  none within 0.1 of the fingertip's rest position (a reset would already solve those).
- Reward: sparse, 0 when the fingertip is within ``RADIUS`` (0.05) of the target, else -1; the
  episode **terminates on success** (like ``sawyer-reach``: the success state is absorbing with
  value 0, every other step costs -1).  Dense form: -||fingertip - target||.
- Dynamics: Gymnasium's Reacher-v5 (frame skip 2, dt 0.02, reset noise U(-0.1, 0.1) on the
  joint angles and U(-0.005, 0.005) on their velocities); horizon 50, gamma 0.99.
- ``info["fingertip"]`` keeps the fingertip's xy after each step; the batched hindsight reward
  is computed from it (never from the image) and ``step`` evaluates that same function on a
  one-step slice, so both agree exactly.
"""
from __future__ import annotations

import os
import sys

# MuJoCo picks its GL backend when it is first imported; ask for headless EGL unless the user
# chose one.  If mujoco was imported earlier without a choice (it then defaults to GLFW, which
# needs a display), the renderer is still built on EGL (``_make_renderer``).
os.environ.setdefault("MUJOCO_GL", "egl")

import atexit  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from .base import Infos, goal_distance  # noqa: E402
from .mujoco_locomotion import _idx, _MujocoFamily, gymnasium_asset  # noqa: E402

RADIUS = 0.05
TARGET_R = (0.05, 0.20)
REST_TIP = (0.21, 0.0)  # fingertip with both joints at 0
REACHER_FRAME_SKIP = 2
IMAGE_SIZE = 64
# 45 deg field of view: half-width 0.55 tan(22.5) = 0.228 keeps the fully stretched arm (0.21) in view
CAMERA_DISTANCE = 0.55

# One offscreen renderer per (goal visibility, image size) for the whole process, shared by all
# instances: GL contexts are never created or freed while the garbage collector runs (an EGL
# context freed by a finalizer in the middle of creating another one aborts the process), and
# many environments cost one context.  Each renderer draws with its own copy of the model
# (identical structure), so any instance's ``MjData`` can be rendered with it.
_RENDERERS: dict = {}


def _close_renderers() -> None:
    """Free the GL contexts before interpreter teardown (registered after the first renderer,
    so it runs before MuJoCo's own EGL shutdown; contexts freed later make EGL complain)."""
    while _RENDERERS:
        _, (renderer, _, _) = _RENDERERS.popitem()
        renderer.close()


def _make_renderer(model, size: int):
    """``mujoco.Renderer`` on the backend ``MUJOCO_GL`` names now (EGL unless the user chose
    another), even if mujoco was imported before the variable was set."""
    if os.environ.get("MUJOCO_GL", "").lower().strip() == "egl" and sys.platform.startswith("linux"):
        from mujoco import egl, gl_context

        if gl_context.GLContext is not egl.GLContext:
            saved = gl_context.GLContext
            gl_context.GLContext = egl.GLContext  # only while this renderer is constructed
            try:
                return mujoco.Renderer(model, size, size)
            finally:
                gl_context.GLContext = saved
    return mujoco.Renderer(model, size, size)


def shared_renderer(show_target: bool, size: int):
    """(renderer, camera) for ``size`` x ``size`` frames, created on first use: a free camera
    looking straight down at the base from ``CAMERA_DISTANCE``; shadows, reflections and skybox
    off."""
    key = (bool(show_target), int(size))
    if key not in _RENDERERS:
        model = mujoco.MjModel.from_xml_string(reacher_xml(show_target))
        r = _make_renderer(model, int(size))
        r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        r.scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = False
        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:] = (0.0, 0.0, 0.0)
        cam.distance = CAMERA_DISTANCE
        cam.elevation = -90.0
        cam.azimuth = 90.0
        if not _RENDERERS:
            atexit.register(_close_renderers)
        _RENDERERS[key] = (r, cam, model)
    r, cam, _ = _RENDERERS[key]
    return r, cam


def reacher_xml(show_target: bool = False) -> str:
    """Gymnasium's reacher.xml; the target geom is made fully transparent unless
    ``show_target``."""
    root = ET.parse(gymnasium_asset("reacher.xml")).getroot()
    found = False
    for geom in root.iter("geom"):
        if geom.get("name") == "target":
            found = True
            if not show_target:
                geom.set("rgba", "0 0 0 0")
    assert found, "reacher.xml has no target geom"
    return ET.tostring(root, encoding="unicode")


class VisualReacher(_MujocoFamily):
    """2-link reacher seen from above as an RGB image; sparse reward within 0.05 of a hidden
    target; ends on success."""

    name = "visual-reacher"
    horizon = 50
    discount = 0.99
    num_train = 50
    num_eval = 10
    summary = "2-link Reacher from 64x64 RGB images, target hidden: 0 and done within 0.05, else -1"
    info_spec = {"fingertip": (2,)}
    #: observations are images ``uint8 [3, H, W]`` (the learner embeds them with a conv trunk)
    image_obs: ClassVar[bool] = True
    obs_shape: ClassVar[tuple[int, int, int]] = (3, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self, task_seed: int = 0, show_target: bool = False, image_size: int = IMAGE_SIZE):
        self.show_target = bool(show_target)
        self.image_size = int(image_size)
        super().__init__(task_seed)
        self.dt = float(self.model.opt.timestep) * REACHER_FRAME_SKIP
        self.obs_shape = (3, self.image_size, self.image_size)
        self.observation_space = spaces.Box(0, 255, self.obs_shape, np.uint8)
        self._fingertip = self.model.body("fingertip").id
        self._arm_q = np.array([self.model.joint(n).qposadr[0] for n in ("joint0", "joint1")])
        self._target_q = np.array([self.model.joint(n).qposadr[0] for n in ("target_x", "target_y")])
        self._arm_v = np.array([self.model.joint(n).dofadr[0] for n in ("joint0", "joint1")])
        self._target_v = np.array([self.model.joint(n).dofadr[0] for n in ("target_x", "target_y")])

    # ---- model, camera, rendering --------------------------------------------------------------
    def _load_model(self):
        return mujoco.MjModel.from_xml_string(reacher_xml(self.show_target))

    def render_image(self) -> np.ndarray:
        """The current frame, ``uint8 [3, H, W]``."""
        renderer, camera = shared_renderer(self.show_target, self.image_size)
        renderer.update_scene(self.data, camera)
        return np.ascontiguousarray(renderer.render().transpose(2, 0, 1))

    def _observation(self):
        return self.render_image()

    # ---- tasks and reward --------------------------------------------------------------------------------
    def make_tasks(self, rng):
        """Uniform over the annulus' area, rejecting targets within ``2 * RADIUS`` of the
        fingertip's rest position (0.21, 0), which a reset would already solve."""
        n = self.num_train + self.num_eval
        lo, hi = TARGET_R
        out = np.zeros((0, 2))
        while len(out) < n:
            r = np.sqrt(rng.uniform(lo * lo, hi * hi, n))
            phi = rng.uniform(-np.pi, np.pi, n)
            xy = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
            keep = np.hypot(xy[:, 0] - REST_TIP[0], xy[:, 1] - REST_TIP[1]) > 2 * RADIUS
            out = np.concatenate([out, xy[keep]])
        return out[:n]

    def distance(self, infos: Infos, tasks) -> np.ndarray:
        return goal_distance(infos["fingertip"], self.tasks[_idx(tasks)])  # [K, T]

    def reward(self, infos, tasks):
        inside = self.distance(infos, tasks) <= RADIUS
        return np.where(inside, 0.0, -1.0), inside.copy(), inside

    def dense_reward(self, infos, tasks):
        return -self.distance(infos, tasks)

    def fingertip(self) -> np.ndarray:
        return self.data.xpos[self._fingertip, :2].copy()

    # ---- gymnasium API -----------------------------------------------------------------------------------
    def _place_target(self) -> None:
        self.data.qpos[self._target_q] = self.tasks[self._task]
        self.data.qvel[self._target_v] = 0.0

    def set_task(self, idx: int) -> None:
        super().set_task(idx)
        self._place_target()  # the (invisible) target marker follows the task
        self._forward()

    def reset(self, *, seed=None, options=None):
        super(_MujocoFamily, self).reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[self._arm_q] = self.init_qpos[self._arm_q] + self.np_random.uniform(-0.1, 0.1, size=2)
        self.data.qvel[self._arm_v] = self.init_qvel[self._arm_v] + self.np_random.uniform(-0.005, 0.005, size=2)
        self._place_target()
        self._forward()
        self._t = 0
        return self._observation(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(self.model.nu), self._low, self._high)
        self.data.ctrl[:] = a
        mujoco.mj_step(self.model, self.data, nstep=REACHER_FRAME_SKIP)
        self._t += 1
        info: dict[str, Any] = {"fingertip": self.fingertip()}
        r, term, success, dense = self._step_reward(info)
        info["success"] = success
        info["dense_reward"] = dense
        truncated = self._t >= self.horizon and not term
        return self._observation(), r, term, truncated, info
