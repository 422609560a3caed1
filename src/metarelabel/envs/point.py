"""The 2-D numpy task families: Four-Corners (HFR's didactic task) and PEARL's point robots.

The agent is a point; an action is a displacement clipped to [-0.1, 0.1] per coordinate and
the next position is ``position + clipped action`` (no walls).  The reward is computed on the
position after the step; ``info['pos']`` holds it, and every reward is a function of it.
"""
from __future__ import annotations

import numpy as np
from gymnasium import spaces

from gymnasium.utils import seeding

from .base import Infos, TaskFamily, VectorEnv, goal_distance, pair_distance, task_index

SUCCESS_RADIUS = 0.2


class _PointFamily(TaskFamily):
    info_spec = {"pos": (2,)}
    horizon = 20
    discount = 0.90

    def __init__(self, task_seed: int = 0):
        super().__init__(task_seed)
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = spaces.Box(-0.1, 0.1, (2,), np.float32)
        self._pos = np.zeros(2)

    def _start(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._pos = self._start(self.np_random)
        self._t = 0
        return self._pos.astype(np.float32), {}

    def step(self, action):
        delta = np.clip(np.asarray(action, np.float64), -0.1, 0.1)
        self._pos = self._pos + delta
        self._t += 1
        info = {"pos": self._pos.copy()}
        r, term, success, dense = self._step_reward(info)
        info["success"] = success
        info["dense_reward"] = dense
        truncated = self._t >= self.horizon and not term
        return self._pos.astype(np.float32), r, term, truncated, info

    def get_state(self):
        return {**super().get_state(), "pos": self._pos.copy(), "t": self._t}

    def set_state(self, state):
        super().set_state(state)
        self._pos = np.array(state["pos"], np.float64)
        self._t = int(state["t"])

    def _dist(self, infos: Infos, tasks) -> np.ndarray:
        return goal_distance(infos["pos"], self.tasks[task_index(tasks)])  # [K, T]

    def _pair_dist(self, infos: Infos, tasks) -> np.ndarray:
        return pair_distance(infos["pos"], self.tasks[task_index(tasks)])  # [k]: step i, task i

    def vector_env(self, seeds) -> "PointVector":
        return PointVector(self, seeds)


class PointVector(VectorEnv):
    """Lanes of a point family as arrays: positions ``[lanes, 2]``, one vectorized step and
    one reward call for all stepped lanes (``step_rewards``), the same float64 arithmetic as
    ``_PointFamily.step``."""

    def __init__(self, family: _PointFamily, seeds):
        self.family = family
        self.num_lanes = len(seeds)
        self.action_space = family.action_space
        self.image_obs = False
        self.rngs = [seeding.np_random(int(s))[0] for s in seeds]
        self.pos = np.zeros((self.num_lanes, 2))
        self.t = np.zeros(self.num_lanes, np.int64)
        self.task = np.zeros(self.num_lanes, np.int64)
        self.reset(np.arange(self.num_lanes), self.task)  # like each instance's reset(seed=...)

    def reset(self, lanes, tasks):
        for lane in lanes:
            self.pos[lane] = self.family._start(self.rngs[lane])
        self.t[lanes] = 0
        self.task[lanes] = tasks
        return self.pos[lanes].astype(np.float32)

    def step(self, lanes, actions):
        delta = np.clip(np.asarray(actions, np.float64), -0.1, 0.1)
        if len(lanes) == self.num_lanes:  # every lane (lanes are sorted): whole arrays
            pos = self.pos + delta
            self.pos[:] = pos
            self.t += 1
            t, task = self.t, self.task
        else:
            pos = self.pos[lanes] + delta
            self.pos[lanes] = pos
            self.t[lanes] += 1
            t, task = self.t[lanes], self.task[lanes]
        info = {"pos": pos}
        r, term, success, dense = self.family.step_rewards(info, task)
        info["success"] = success
        info["dense_reward"] = dense
        truncated = (t >= self.family.horizon) & ~term
        return pos.astype(np.float32), r, term, truncated, info

    def get_state(self):
        return [{"np_random": g.bit_generator.state, "pos": self.pos[i].copy(), "t": int(self.t[i]),
                 "task": int(self.task[i])} for i, g in enumerate(self.rngs)]

    def set_state(self, state):
        for i, st in enumerate(state):
            self.rngs[i].bit_generator.state = st["np_random"]
            self.pos[i] = np.asarray(st["pos"], np.float64)
            self.t[i] = int(st["t"])
            self.task[i] = int(st["task"])


class FourCorners(_PointFamily):
    """Goals at the four corners; a -3 square on the straight path inside each goal's own
    quadrant.  Start at (0, 0); success (reward 0, episode ends) within 0.2 of the goal."""

    name = "four-corners"
    num_train = 4
    num_eval = 4
    eval_is_train = True
    summary = "didactic: 4 corner goals, -3 square in the goal's quadrant, sparse success"

    def make_tasks(self, rng):
        return np.array([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])

    @staticmethod
    def _rewards(pos: np.ndarray, goals: np.ndarray, dist: np.ndarray):
        """Rewards and success for positions ``pos [..., 2]`` under goals ``goals [..., 2]`` at
        distances ``dist`` (all broadcast together): 0 within the radius, else -3 in the goal's
        own square, else -1."""
        success = dist <= SUCCESS_RADIUS
        ax, ay = np.abs(pos[..., 0]), np.abs(pos[..., 1])
        in_square = (ax > 0.1) & (ax < 0.5) & (ay > 0.1) & (ay < 0.5)
        same_quadrant = (np.sign(pos[..., 0]) == np.sign(goals[..., 0])) & (np.sign(pos[..., 1]) == np.sign(goals[..., 1]))
        return np.where(success, 0.0, np.where(in_square & same_quadrant, -3.0, -1.0)), success

    def reward(self, infos, tasks):
        pos = np.asarray(infos["pos"], np.float64)
        goals = self.tasks[np.asarray(tasks, np.int64)]
        rewards, success = self._rewards(pos[None], goals[:, None], self._dist(infos, tasks))  # [K, T]
        return rewards, success.copy(), success

    def step_rewards(self, infos, tasks):
        """``reward``'s (step i, task i) entries computed pairwise (the vector engine's step)."""
        pos = np.asarray(infos["pos"], np.float64)
        rewards, success = self._rewards(pos, self.tasks[task_index(tasks)], self._pair_dist(infos, tasks))
        return rewards, success.copy(), success, rewards.copy()


class PointRobot(_PointFamily):
    """PEARL's dense point robot: goals uniform in [-1, 1]^2, random start, reward -||p - g||."""

    name = "point-robot"
    num_train = 80
    num_eval = 20
    summary = "PEARL dense point robot: goals in [-1,1]^2, reward -distance"

    def make_tasks(self, rng):
        return rng.uniform(-1.0, 1.0, size=(self.num_train + self.num_eval, 2))

    def _start(self, rng):
        return rng.uniform(-1.0, 1.0, size=2)

    def reward(self, infos, tasks):
        dist = self._dist(infos, tasks)
        success = dist <= SUCCESS_RADIUS
        return -dist, np.zeros_like(success), success

    def step_rewards(self, infos, tasks):
        """``reward``'s (step i, task i) entries computed pairwise (the vector engine's step)."""
        dist = self._pair_dist(infos, tasks)
        return -dist, np.zeros(len(dist), bool), dist <= SUCCESS_RADIUS, -dist


class SparsePointRobot(_PointFamily):
    """PEARL's sparse point robot: goals on the upper unit semicircle, start at the origin,
    reward 1 - ||p - g|| within radius 0.2 of the goal and 0 elsewhere (dense: -||p - g||)."""

    name = "sparse-point-robot"
    num_train = 80
    num_eval = 20
    summary = "PEARL sparse point robot: goals on the unit semicircle, reward only within 0.2"

    def make_tasks(self, rng):
        angles = np.linspace(0.0, np.pi, self.num_train + self.num_eval)
        angles = angles[rng.permutation(len(angles))]
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def reward(self, infos, tasks):
        dist = self._dist(infos, tasks)
        success = dist <= SUCCESS_RADIUS
        return np.where(success, 1.0 - dist, 0.0), np.zeros_like(success), success

    def dense_reward(self, infos, tasks):
        return -self._dist(infos, tasks)

    def step_rewards(self, infos, tasks):
        """``reward``'s and ``dense_reward``'s (step i, task i) entries computed pairwise."""
        dist = self._pair_dist(infos, tasks)
        success = dist <= SUCCESS_RADIUS
        return np.where(success, 1.0 - dist, 0.0), np.zeros(len(dist), bool), success, -dist
