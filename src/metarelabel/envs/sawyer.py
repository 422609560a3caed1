"""Sparse Sawyer manipulation families (SPEC section 5) on Meta-World 3.1.1: ``sawyer-reach``
(Meta-World's ``reach-v3``) and ``sawyer-push`` (``push-v3``).

One Meta-World single-task environment per family instance; the task (a goal) is switched with
``set_task`` and applied at the next ``reset``.  Meta-World supplies the Sawyer model, the mocap
position control (an action moves the hand target by ``0.01 * clip(a[:3], -1, 1)`` m, ``a[3]`` is
the gripper effort), its hand reset and the frame skip; the reward, the termination, the task set
and the per-episode randomness are this module's:

- **Tasks.** 60 goals (50 train / 10 eval) drawn uniformly by the task seed
  (``np.random.default_rng(task_seed)``) from a box adapted to v3's valid goal ranges:
  ``sawyer-reach`` goals (x, y, z) in [-0.1, 0.1] x [0.8, 0.9] x [0.05, 0.3] (v3's ``goal_space``;
  SPEC's y in [0.7, 0.8] is the 2020 range: in v3 some of those goals, e.g. (0, 0.7, z), leave
  no object start in v3's box 0.15 away, and Meta-World's reset would hang); ``sawyer-push``
  goals (x, y) in [-0.1, 0.1] x [0.8, 0.9] (SPEC's box, = v3's).
- **Object start.** Meta-World draws the object's start from [-0.1, 0.1] x [0.6, 0.7] (z = 0.02)
  at every reset and rejects draws closer than 0.15 (xy) to the goal; with a fixed goal it loops
  forever instead.  Here the object start is drawn at every reset from that same box with the
  family's ``np_random`` (seeded by ``reset(seed=...)``), redrawn until it lies at least
  ``MIN_SEPARATION`` = 0.15 (xy) from the goal, and handed to Meta-World as the task's reset
  vector (``set_task``), so Meta-World's own rejection loop always accepts on its first check.
  The start is independent of the task apart from that separation (the object position in the
  observation does not reveal the goal).  Meta-World's own randomness is never used: its reset
  vector stays frozen (no draw from its ``np_random`` or the global numpy RNG), and its reset
  starts from ``mj_resetData``, so an episode is a deterministic function of the seed and the
  actions.
- **Observation** (float32, 22-D; the goal is hidden): Meta-World v3's observation without the
  goal slot and the always-zero padding.  Current frame: hand position xyz (the ``hand`` body),
  gripper opening in [0, 1], object position xyz, object quaternion (x, y, z, w); then the same 11
  values of the previous step (Meta-World's frame stacking; at reset the previous frame is the
  current one).
- **Reward** (sparse): 0 and the episode ends on success, else -1.  ``sawyer-reach``: success when
  ||tcp - goal||_2 <= 0.05, tcp = the centre of the two fingertips (the point Meta-World's reach
  success uses); ``sawyer-push``: ||object_xy - goal_xy||_2 <= 0.07.  Dense form (``--rl-reward
  dense`` / ``--context-reward dense``): minus that distance.  Horizon 150, gamma 0.99.
- **Hindsight reward.** ``step`` stores ``hand`` (the tcp, 3) and ``obj`` (the object position,
  3) in ``info``; ``reward(infos, tasks)`` computes rewards, terminals and success flags for K
  tasks x T steps from them, and ``step`` itself evaluates it on a one-step slice, so the two
  agree bit for bit.

Meta-World's dense shaped reward is not computed (``evaluate_state`` is overridden to return
nothing): ``push-v3``'s runs Python loops over the contacts and more than halves the step rate.
The object quaternion is computed with MuJoCo's ``mju_mat2Quat`` rather than scipy (the same
values to ~1e-15; scipy's conversion took a quarter of the step time).
Meta-World's step limit (500) is disabled; this family truncates at its own horizon.
Importing this module needs the ``metaworld`` extra (``pip install metarelabel[metaworld]``).
"""
from __future__ import annotations

import pickle
from typing import Any, ClassVar

import mujoco
import numpy as np
from gymnasium import spaces
from metaworld.envs import SawyerPushEnvV3, SawyerReachEnvV3
from metaworld.types import Task

from .base import Infos, TaskFamily, goal_distance
from .base import task_index as _idx

MIN_SEPARATION = 0.15  # object start to goal, xy (Meta-World's reset rejects closer pairs)
OBJECT_LOW = np.array([-0.1, 0.6])  # v3's object start box, xy (reach-v3 and push-v3)
OBJECT_HIGH = np.array([0.1, 0.7])
OBJECT_Z = 0.02
REACH_RADIUS = 0.05
PUSH_RADIUS = 0.07
# indices of the 22 observed values in Meta-World's 39-D observation (curr 18, prev 18, goal 3)
OBS_INDEX = np.r_[0:11, 18:29]
MAX_OBJECT_DRAWS = 10_000


class _FastSawyer:
    """Two overrides of Meta-World's v3 envs (same dynamics, same observation): no shaped reward
    (``evaluate_state``; unused here, and push-v3's loops over the contacts in Python), and the
    object quaternion from MuJoCo's ``mju_mat2Quat`` instead of scipy's ``Rotation`` (the same
    quaternion to ~1e-15, about a quarter of the step time saved)."""

    def evaluate_state(self, obs, action):
        return 0.0, {}

    def _get_quat_objects(self):
        wxyz = np.empty(4)
        mujoco.mju_mat2Quat(wxyz, self.data.geom("objGeom").xmat)
        return wxyz[[1, 2, 3, 0]]  # (x, y, z, w), scipy's order


class _ReachV3(_FastSawyer, SawyerReachEnvV3):
    pass


class _PushV3(_FastSawyer, SawyerPushEnvV3):
    pass


class _SawyerFamily(TaskFamily):
    """Shared plumbing: one Meta-World env, per-reset object start from the family's RNG, the
    goal-hidden observation, sparse rewards from the stored tcp / object positions."""

    horizon = 150
    discount = 0.99
    num_train = 50
    num_eval = 10
    info_spec = {"hand": (3,), "obj": (3,)}
    #: the Meta-World v3 environment class, its registered name, the subclass that is run
    mw_class: ClassVar[type] = SawyerReachEnvV3
    mw_name: ClassVar[str] = ""
    mw_runner: ClassVar[type] = _ReachV3
    goal_low: ClassVar[tuple[float, ...]] = ()
    goal_high: ClassVar[tuple[float, ...]] = ()

    def __init__(self, task_seed: int = 0):
        super().__init__(task_seed)
        self.mw = self.mw_runner()
        self.mw.max_path_length = np.iinfo(np.int64).max  # truncation is the family's (horizon)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, (len(OBS_INDEX),), np.float32)
        self._rand_vec: np.ndarray | None = None  # object start + goal of the current episode
        self._state_spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._state_size = mujoco.mj_stateSize(self.mw.model, self._state_spec)
        # a valid task before the first reset (Meta-World refuses to step without one)
        self._set_mw_task(self._reset_vector(np.array([0.0, 0.6]), self._goal_xyz(0)))
        self._rand_vec = None

    # ---- tasks ----------------------------------------------------------------------------------
    def make_tasks(self, rng):
        low, high = np.asarray(self.goal_low), np.asarray(self.goal_high)
        return rng.uniform(low, high, size=(self.num_train + self.num_eval, len(low)))

    def _goal_xyz(self, task: int) -> np.ndarray:
        """The goal handed to Meta-World (push: z is Meta-World's, set to the object's height)."""
        g = self.tasks[task]
        return g if len(g) == 3 else np.array([g[0], g[1], OBJECT_Z])

    @staticmethod
    def _reset_vector(obj_xy: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return np.array([obj_xy[0], obj_xy[1], OBJECT_Z, goal[0], goal[1], goal[2]], np.float64)

    def _sample_reset_vector(self) -> np.ndarray:
        """Object start uniform in v3's box, redrawn until >= 0.15 (xy) from the goal -- the
        same test Meta-World's reset applies to the vector, so its loop accepts at once."""
        goal = self._goal_xyz(self._task)
        for _ in range(MAX_OBJECT_DRAWS):
            vec = self._reset_vector(self.np_random.uniform(OBJECT_LOW, OBJECT_HIGH), goal)
            if not np.linalg.norm(vec[:2] - vec[3:5]) < MIN_SEPARATION:
                return vec
        raise RuntimeError(f"no object start {MIN_SEPARATION} away from goal {goal}")  # unreachable

    def _set_mw_task(self, vec: np.ndarray) -> None:
        data = dict(rand_vec=np.array(vec, np.float64), env_cls=self.mw_class, partially_observable=True)
        self.mw.set_task(Task(env_name=self.mw_name, data=pickle.dumps(data)))
        self._rand_vec = np.array(vec, np.float64)

    # ---- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._set_mw_task(self._sample_reset_vector())
        mw_obs, _ = self.mw.reset()
        self._t = 0
        return mw_obs[OBS_INDEX].astype(np.float32), {}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(4), -1.0, 1.0)
        mw_obs, _, _, _, _ = self.mw.step(a)
        self._t += 1
        info = {"hand": np.array(self.mw.tcp_center, np.float64), "obj": np.array(mw_obs[4:7], np.float64)}
        r, term, success, dense = self._step_reward(info)
        info["success"] = success
        info["dense_reward"] = dense
        truncated = self._t >= self.horizon and not term
        return mw_obs[OBS_INDEX].astype(np.float32), r, term, truncated, info

    # ---- rewards ----------------------------------------------------------------------------------
    def distance(self, infos: Infos, tasks) -> np.ndarray:
        """[K, T] distance to the goal that decides success (elementwise, no reductions, so a
        (task, step) value never depends on how many are computed together)."""
        raise NotImplementedError

    radius: ClassVar[float] = 0.0

    def reward(self, infos, tasks):
        success = self.distance(infos, tasks) <= self.radius
        return np.where(success, 0.0, -1.0), success.copy(), success

    def dense_reward(self, infos, tasks):
        return -self.distance(infos, tasks)

    # ---- checkpoints ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """The env RNG and task, plus (after a reset) the episode's object start and goal, the
        step counter, MuJoCo's full integration state (mocap target included) and Meta-World's
        previous observation frame, so even an interrupted episode continues identically."""
        state = super().get_state()
        if self._rand_vec is not None:
            physics = np.empty(self._state_size, np.float64)
            mujoco.mj_getState(self.mw.model, self.mw.data, physics, self._state_spec)
            state.update(t=self._t, rand_vec=self._rand_vec.copy(), physics=physics,
                         prev_obs=np.array(self.mw._prev_obs, np.float64))
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if state.get("physics") is None:
            return
        # Meta-World's reset rebuilds its per-episode attributes (goal site, initial positions)
        # from the reset vector; then the physics is overwritten with the saved state
        self._set_mw_task(np.asarray(state["rand_vec"], np.float64))
        self.mw.reset()
        model, data = self.mw.model, self.mw.data
        physics = np.ascontiguousarray(state["physics"], np.float64)
        mujoco.mj_setState(model, data, physics, self._state_spec)
        mujoco.mj_forward(model, data)  # derived quantities (positions of bodies and sites) ...
        mujoco.mj_setState(model, data, physics, self._state_spec)  # ... and the exact warm start
        self.mw._prev_obs = np.array(state["prev_obs"], np.float64)
        self._t = int(state["t"])
        self.mw.curr_path_length = self._t


class SawyerReach(_SawyerFamily):
    """Meta-World reach-v3 with the goal hidden: 0 and done when the fingertip centre is within
    0.05 of the goal (3-D), else -1.  Goals in [-0.1, 0.1] x [0.8, 0.9] x [0.05, 0.3]."""

    name = "sawyer-reach"
    summary = "Meta-World reach-v3, goal hidden: 0 and done within 0.05 of the goal, else -1"
    mw_class = SawyerReachEnvV3
    mw_name = "reach-v3"
    mw_runner = _ReachV3
    goal_low = (-0.1, 0.8, 0.05)
    goal_high = (0.1, 0.9, 0.3)
    radius = REACH_RADIUS

    def distance(self, infos, tasks):
        return goal_distance(infos["hand"], self.tasks[_idx(tasks)])  # hand [T, 3], goals [K, 3]


class SawyerPush(_SawyerFamily):
    """Meta-World push-v3 with the goal hidden: 0 and done when the object's xy is within 0.07
    of the goal, else -1.  Goals (x, y) in [-0.1, 0.1] x [0.8, 0.9]."""

    name = "sawyer-push"
    summary = "Meta-World push-v3, goal hidden: 0 and done with the object within 0.07 (xy), else -1"
    mw_class = SawyerPushEnvV3
    mw_name = "push-v3"
    mw_runner = _PushV3
    goal_low = (-0.1, 0.8)
    goal_high = (0.1, 0.9)
    radius = PUSH_RADIUS

    def distance(self, infos, tasks):
        return goal_distance(infos["obj"], self.tasks[_idx(tasks)])  # object xy of [T, 3], goals [K, 2]
