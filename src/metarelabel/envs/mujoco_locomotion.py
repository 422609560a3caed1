"""MuJoCo locomotion task families (SPEC section 5) on the maintained ``mujoco`` bindings and
Gymnasium's v5 MuJoCo models: HalfCheetah (``cheetah-vel``, ``cheetah-vel-sparse``,
``cheetah-highdim``) and Ant (``ant-vel``, the sparse low-gear ``ant-goal``).

The physics follows Gymnasium's v5 environments (same XML files, frame skip 5, the same reset
noise: qpos + U(-0.1, 0.1), qvel + 0.1 N(0, 1), drawn from the env's ``np_random``); the
observations, rewards, task sets and terminations are the paper's.  ``step`` stores every
per-step quantity a reward depends on in ``info`` (x velocity, torso xy and height, control and
contact costs, the next observation) and evaluates the family's batched ``reward`` on that
one-step slice, so hindsight rewards computed later for any K tasks agree exactly with what
``step`` returned.  Importing this module needs the ``mujoco`` extra
(``pip install metarelabel[mujoco]``); the registry turns the ImportError into that message.

Observation layouts (float32):

- ``cheetah-vel``, ``cheetah-vel-sparse``: 17-D, qpos[1:] (root z, root angle, 6 joint angles)
  then qvel (9), as Gymnasium's HalfCheetah-v5 (root x excluded).
- ``cheetah-highdim``: 18-D, qpos (root x, root z, root angle, 6 joint angles) then qvel (9).
- ``ant-vel``, ``ant-goal``: 113-D, qpos (15: torso xyz, torso quaternion, 8 joint angles), qvel
  (14), then the external contact forces ``cfrc_ext`` of all 14 bodies clipped to [-1, 1] (84).

Success flags (used by the success metrics only): within the goal radius for the sparse families
(|v_x - g| <= 0.3 for ``cheetah-vel-sparse``, ||xy - goal||_2 <= 0.8 for ``ant-goal``); the
same 0.3 velocity band for ``cheetah-vel`` and ``ant-vel``; for ``cheetah-highdim`` the normalized
next observation projects at least ``HIGHDIM_SUCCESS`` standard deviations onto the task's unit
direction, (w / ||w||) . ((s' - mu) / sigma) >= HIGHDIM_SUCCESS.
"""
from __future__ import annotations

import importlib.resources
import xml.etree.ElementTree as ET
from typing import Any

import mujoco
import numpy as np
from gymnasium import spaces

from .base import Infos, TaskFamily
from .base import task_index as _idx

FRAME_SKIP = 5
RESET_NOISE = 0.1
VEL_RADIUS = 0.3  # cheetah-vel-sparse goal radius; success band of the velocity families
ANT_GOAL_RADIUS = 0.8
ANT_GOAL_DISTANCE = 2.0
ANT_LOW_GEAR = 30.0
HEALTHY_Z = (0.2, 1.0)
HIGHDIM_SUCCESS = 10.0

HIGHDIM_MU = np.array([
    -0.2032, -0.1054, 0.0898, 0.0143, 0.0019, 0.0132, 0.0708, -0.1491, -0.0426, -0.2398, -0.0426,
    0.0979, -0.1000, -0.0930, 0.0415, 0.0365, -0.0661, -0.1578])
HIGHDIM_SIGMA = np.array([
    0.2466, 0.0705, 0.1305, 0.2103, 0.2675, 0.2240, 0.2896, 0.2673, 0.2615, 0.5503, 0.6953, 1.2163,
    4.1919, 5.5100, 5.2831, 5.2036, 5.0158, 4.9579])


def gymnasium_asset(name: str) -> str:
    """Path of one of Gymnasium's MuJoCo model files (``gymnasium/envs/mujoco/assets``)."""
    return str(importlib.resources.files("gymnasium") / "envs" / "mujoco" / "assets" / name)


def low_gear_ant_xml(gear: float = ANT_LOW_GEAR) -> str:
    """Gymnasium's Ant XML with every motor's gear set to ``gear`` (150 in the original)."""
    root = ET.parse(gymnasium_asset("ant.xml")).getroot()
    motors = list(root.iter("motor"))
    assert motors, "ant.xml has no motors"
    for motor in motors:
        motor.set("gear", f"{gear:g}")
    return ET.tostring(root, encoding="unicode")


def _f64(infos: Infos, key: str) -> np.ndarray:
    return np.asarray(infos[key], np.float64)


class _MujocoFamily(TaskFamily):
    """Shared MuJoCo plumbing: model loading, Gymnasium-v5 reset noise, frame-skipped steps,
    the clipped action, RNG + physics state for checkpoints."""

    horizon = 200
    discount = 0.99
    #: compute ``cfrc_ext`` after each step (the Ant's contact forces)
    needs_contact_forces = False

    def __init__(self, task_seed: int = 0):
        super().__init__(task_seed)
        self.model = self._load_model()
        self.data = mujoco.MjData(self.model)
        self.init_qpos = self.data.qpos.copy()
        self.init_qvel = self.data.qvel.copy()
        self.dt = float(self.model.opt.timestep) * FRAME_SKIP
        bounds = self.model.actuator_ctrlrange.astype(np.float64)
        self._low, self._high = bounds[:, 0].copy(), bounds[:, 1].copy()
        self.action_space = spaces.Box(self._low.astype(np.float32), self._high.astype(np.float32), dtype=np.float32)
        dim = len(self._observation())
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self._state_spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._state_size = mujoco.mj_stateSize(self.model, self._state_spec)

    # ---- to implement -----------------------------------------------------------------------
    def _load_model(self) -> mujoco.MjModel:
        raise NotImplementedError

    def _observation(self) -> np.ndarray:
        """The observation in float64 (returned as float32)."""
        raise NotImplementedError

    def _step_info(self, action: np.ndarray, qpos_before: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    # ---- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        nq, nv = self.model.nq, self.model.nv
        qpos = self.init_qpos + self.np_random.uniform(-RESET_NOISE, RESET_NOISE, size=nq)
        qvel = self.init_qvel + RESET_NOISE * self.np_random.standard_normal(nv)
        self.data.qpos[:] = qpos
        self.data.qvel[:] = qvel
        self._forward()
        self._t = 0
        return self._observation().astype(np.float32), {}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(self.model.nu), self._low, self._high)
        qpos_before = self.data.qpos.copy()
        self.data.ctrl[:] = a
        mujoco.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        if self.needs_contact_forces:
            mujoco.mj_rnePostConstraint(self.model, self.data)
        self._t += 1
        info = self._step_info(a, qpos_before)
        r, term, success, dense = self._step_reward(info)
        info["success"] = success
        info["dense_reward"] = dense
        truncated = self._t >= self.horizon and not term
        return self._observation().astype(np.float32), r, term, truncated, info

    def _forward(self) -> None:
        mujoco.mj_forward(self.model, self.data)
        if self.needs_contact_forces:
            mujoco.mj_rnePostConstraint(self.model, self.data)

    # ---- checkpoints ----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """The env RNG and task, plus the full MuJoCo integration state and the step counter, so
        an episode can even be continued mid-way."""
        physics = np.empty(self._state_size, np.float64)
        mujoco.mj_getState(self.model, self.data, physics, self._state_spec)
        return {**super().get_state(), "t": self._t, "physics": physics}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "physics" in state:
            physics = np.ascontiguousarray(state["physics"], np.float64)
            mujoco.mj_setState(self.model, self.data, physics, self._state_spec)
            self._forward()  # derived quantities (contact forces of the observation) ...
            # ... but mj_forward rewrites parts of the integration state (the solver's warm
            # start): restore it, so the next step is bit-identical to the uninterrupted run
            mujoco.mj_setState(self.model, self.data, physics, self._state_spec)
            self._t = int(state["t"])

    # ---- shared reward pieces ------------------------------------------------------------------
    def _velocity_error(self, infos: Infos, tasks) -> np.ndarray:
        v = _f64(infos, "x_velocity")  # [T]
        g = self.tasks[_idx(tasks), 0]  # [K]
        return np.abs(v[None, :] - g[:, None])  # [K, T]


# ============================================================================================
# HalfCheetah
# ============================================================================================
class _Cheetah(_MujocoFamily):
    num_train = 100
    num_eval = 30
    ctrl_cost_weight = 0.05
    info_spec = {"x_velocity": (), "ctrl_cost": ()}

    def _load_model(self):
        return mujoco.MjModel.from_xml_path(gymnasium_asset("half_cheetah.xml"))

    def _observation(self):
        return np.concatenate([self.data.qpos[1:], self.data.qvel])

    def _step_info(self, action, qpos_before):
        return {
            "x_velocity": float((self.data.qpos[0] - qpos_before[0]) / self.dt),
            "ctrl_cost": float(self.ctrl_cost_weight * np.sum(np.square(action))),
        }

    def make_tasks(self, rng):
        return rng.uniform(0.0, 3.0, size=(self.num_train + self.num_eval, 1))


class CheetahVel(_Cheetah):
    """HalfCheetah running at a target velocity g ~ U[0, 3]: reward -|v_x - g| - 0.05 ||a||^2."""

    name = "cheetah-vel"
    summary = "HalfCheetah target velocity g~U[0,3]: -|v-g| - 0.05|a|^2"

    def reward(self, infos, tasks):
        err = self._velocity_error(infos, tasks)
        ctrl = _f64(infos, "ctrl_cost")[None, :]
        return -err - ctrl, np.zeros(err.shape, bool), err <= VEL_RADIUS


class CheetahVelSparse(_Cheetah):
    """Sparse target velocity: (2 - |v_x - g|) within 0.3 of g, else 0, minus 0.05 ||a||^2.
    Dense form: the ``cheetah-vel`` reward."""

    name = "cheetah-vel-sparse"
    summary = "HalfCheetah target velocity, sparse: 2-|v-g| within 0.3, minus 0.05|a|^2"

    def reward(self, infos, tasks):
        err = self._velocity_error(infos, tasks)
        ctrl = _f64(infos, "ctrl_cost")[None, :]
        inside = err <= VEL_RADIUS
        return np.where(inside, 2.0 - err, 0.0) - ctrl, np.zeros(err.shape, bool), inside

    def dense_reward(self, infos, tasks):
        return -self._velocity_error(infos, tasks) - _f64(infos, "ctrl_cost")[None, :]


class CheetahHighdim(_Cheetah):
    """Linear reward on the normalized next observation (18-D, root x included):
    w . ((s' - mu) / sigma) - 0.05 ||a||^2 with w ~ U[-1, 1]^18 per task."""

    name = "cheetah-highdim"
    summary = "HalfCheetah, reward w.((s'-mu)/sigma) - 0.05|a|^2, w~U[-1,1]^18"
    info_spec = {"next_obs": (18,), "ctrl_cost": ()}

    def _observation(self):
        return np.concatenate([self.data.qpos, self.data.qvel])

    def _step_info(self, action, qpos_before):
        return {
            "next_obs": self._observation(),
            "ctrl_cost": float(self.ctrl_cost_weight * np.sum(np.square(action))),
        }

    def make_tasks(self, rng):
        return rng.uniform(-1.0, 1.0, size=(self.num_train + self.num_eval, 18))

    def _projection(self, infos, w):
        """sum_i w[k, i] * s_hat[t, i] as [K, T], accumulated in a fixed order (dim by dim), so
        the result of one (task, step) does not depend on how many are computed together."""
        s_hat = (_f64(infos, "next_obs") - HIGHDIM_MU) / HIGHDIM_SIGMA  # [T, 18]
        acc = np.zeros((len(w), len(s_hat)))
        for i in range(s_hat.shape[1]):
            acc += w[:, i, None] * s_hat[None, :, i]
        return acc

    def reward(self, infos, tasks):
        w = self.tasks[_idx(tasks)]  # [K, 18]
        lin = self._projection(infos, w)
        r = lin - _f64(infos, "ctrl_cost")[None, :]
        norm = np.sqrt(np.sum(w * w, axis=1))[:, None]
        return r, np.zeros(r.shape, bool), lin >= HIGHDIM_SUCCESS * norm


# ============================================================================================
# Ant
# ============================================================================================
class _Ant(_MujocoFamily):
    needs_contact_forces = True
    ctrl_cost_weight = 0.0
    contact_cost_weight = 0.5e-3
    info_spec = {"x_velocity": (), "xy": (2,), "z": (), "ctrl_cost": (), "contact_cost": ()}

    def _load_model(self):
        return mujoco.MjModel.from_xml_path(gymnasium_asset("ant.xml"))

    def _contact_forces(self) -> np.ndarray:
        return np.clip(self.data.cfrc_ext, -1.0, 1.0)

    def _observation(self):
        return np.concatenate([self.data.qpos, self.data.qvel, self._contact_forces().ravel()])

    def _step_info(self, action, qpos_before):
        qpos, qvel = self.data.qpos, self.data.qvel
        finite = bool(np.isfinite(qpos).all() and np.isfinite(qvel).all())
        return {
            "x_velocity": float((qpos[0] - qpos_before[0]) / self.dt),
            "xy": qpos[:2].copy(),
            # torso height; NaN when the state is not finite (always unhealthy)
            "z": float(qpos[2]) if finite else float("nan"),
            "ctrl_cost": float(self.ctrl_cost_weight * np.sum(np.square(action))),
            "contact_cost": float(self.contact_cost_weight * np.sum(np.square(self._contact_forces()))),
        }

    @staticmethod
    def healthy(infos: Infos) -> np.ndarray:
        """[T] torso height within [0.2, 1] (and a finite state)."""
        z = _f64(infos, "z")
        return (z >= HEALTHY_Z[0]) & (z <= HEALTHY_Z[1])

    def _terminals(self, infos, k: int) -> np.ndarray:
        return np.broadcast_to(~self.healthy(infos)[None, :], (k, len(_f64(infos, "z")))).copy()

    def _costs(self, infos) -> np.ndarray:
        return (_f64(infos, "ctrl_cost") + _f64(infos, "contact_cost"))[None, :]


class AntVel(_Ant):
    """Ant running forward at a target velocity g ~ U[0, 3]:
    1 - |v_x - g| - 0.005 ||a||^2 - 0.0005 ||clip(cfrc_ext, -1, 1)||^2 + 0.05; ends when unhealthy."""

    name = "ant-vel"
    num_train = 150
    num_eval = 30
    ctrl_cost_weight = 0.005
    summary = "Ant target velocity g~U[0,3]: 1-|v-g| - costs + 0.05; ends when unhealthy"

    def make_tasks(self, rng):
        return rng.uniform(0.0, 3.0, size=(self.num_train + self.num_eval, 1))

    def reward(self, infos, tasks):
        err = self._velocity_error(infos, tasks)
        r = 1.0 - err - self._costs(infos) + 0.05
        return r, self._terminals(infos, len(err)), err <= VEL_RADIUS


class AntGoal(_Ant):
    """Sparse goal reaching with a low-gear Ant (gear 30): goals on the radius-2 upper
    semicircle.  Reward g + 0.05 - ctrl - contact with g = 4 - ||xy - goal||_1 within
    ||xy - goal||_2 <= 0.8, else 4 - ||goal||_1 (the value at the origin);
    ctrl = 0.1 ||a||^2, contact = 0.0005 ||clip(cfrc_ext, -1, 1)||^2; ends when unhealthy.
    Dense form: 4 - ||xy - goal||_1 + 0.05 - ctrl - contact everywhere."""

    name = "ant-goal"
    num_train = 100
    num_eval = 30
    ctrl_cost_weight = 0.1
    summary = "low-gear Ant, goals on the radius-2 semicircle, sparse within 0.8; ends when unhealthy"

    def _load_model(self):
        return mujoco.MjModel.from_xml_string(low_gear_ant_xml())

    def make_tasks(self, rng):
        n = self.num_train + self.num_eval
        angles = np.linspace(0.0, np.pi, n)[rng.permutation(n)]
        return ANT_GOAL_DISTANCE * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def _goal_terms(self, infos, tasks):
        xy = _f64(infos, "xy")  # [T, 2]
        goals = self.tasks[_idx(tasks)]  # [K, 2]
        dx = xy[None, :, 0] - goals[:, None, 0]
        dy = xy[None, :, 1] - goals[:, None, 1]
        l1 = np.abs(dx) + np.abs(dy)
        inside = np.sqrt(dx * dx + dy * dy) <= ANT_GOAL_RADIUS
        origin_l1 = (np.abs(goals[:, 0]) + np.abs(goals[:, 1]))[:, None]
        return l1, inside, origin_l1

    def reward(self, infos, tasks):
        l1, inside, origin_l1 = self._goal_terms(infos, tasks)
        g = np.where(inside, 4.0 - l1, 4.0 - origin_l1)
        r = g + 0.05 - self._costs(infos)
        return r, self._terminals(infos, len(r)), inside

    def dense_reward(self, infos, tasks):
        l1, _, _ = self._goal_terms(infos, tasks)
        return 4.0 - l1 + 0.05 - self._costs(infos)
