"""Base class of a task family: a Gymnasium environment with a fixed task set and a
batched hindsight reward.

A family owns ``tasks`` (one row of task parameters per task, fixed by ``task_seed``),
``train_tasks`` and ``eval_tasks`` (index arrays into ``tasks``).  ``step`` records, in
``info``, every per-step quantity that the reward depends on (``info_spec`` names them and
their shapes); ``reward(infos, tasks)`` recomputes rewards, terminals and success flags for
any K tasks over a whole path from those stored quantities, and must agree exactly with what
``step`` returned.  The environment's own randomness (start states) comes from Gymnasium's
``np_random``, seeded by ``reset(seed=...)``; the global numpy RNG is never touched.
"""
from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

Infos = dict[str, np.ndarray]


def task_index(tasks) -> np.ndarray:
    """Task indices as a flat int64 array."""
    return np.asarray(tasks, np.int64).reshape(-1)


def goal_distance(points: np.ndarray, goals: np.ndarray) -> np.ndarray:
    """Euclidean distance ``[K, T]`` between points ``[T, >=D]`` (their first D coordinates)
    and goals ``[K, D]``; coordinates are summed in order, so every caller gets the same floats."""
    points = np.asarray(points, np.float64)
    return _norm(points[None, :, d] - goals[:, None, d] for d in range(goals.shape[1]))


def pair_distance(points: np.ndarray, goals: np.ndarray) -> np.ndarray:
    """Distance ``[k]`` of point i to goal i (``points [k, >=D]``, ``goals [k, D]``): each value
    equals the (i, i) entry of ``goal_distance`` (the same sum in the same order)."""
    points = np.asarray(points, np.float64)
    return _norm(points[:, d] - goals[:, d] for d in range(goals.shape[1]))


def _norm(diffs) -> np.ndarray:
    """sqrt of the sum of squares of per-coordinate differences, summed in coordinate order."""
    sq = None
    for diff in diffs:
        sq = diff * diff if sq is None else sq + diff * diff
    return np.sqrt(sq)


class TaskFamily(gym.Env):
    """A family of tasks that share dynamics and differ in reward."""

    name: ClassVar[str] = ""
    horizon: ClassVar[int] = 0
    discount: ClassVar[float] = 0.99
    num_train: ClassVar[int] = 0
    num_eval: ClassVar[int] = 0
    #: True when eval tasks are the train tasks (Four-Corners).
    eval_is_train: ClassVar[bool] = False
    #: per-step quantities recorded in ``info`` for the hindsight reward: name -> shape
    info_spec: ClassVar[dict[str, tuple[int, ...]]] = {}
    #: one-line description for ``metarelabel envs``
    summary: ClassVar[str] = ""

    def __init__(self, task_seed: int = 0):
        super().__init__()
        self.task_seed = int(task_seed)
        self.tasks = np.asarray(self.make_tasks(np.random.default_rng(self.task_seed)), np.float64)
        n = len(self.tasks)
        if self.eval_is_train:
            self.train_tasks = np.arange(n)
            self.eval_tasks = np.arange(n)
        else:
            self.train_tasks = np.arange(self.num_train)
            self.eval_tasks = np.arange(self.num_train, self.num_train + self.num_eval)
        self._task = 0
        self._t = 0

    # ---- to implement -------------------------------------------------------------
    def make_tasks(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def reward(self, infos: Infos, tasks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rewards, terminals and success flags, each ``[K, T]``, of a path under K tasks."""
        raise NotImplementedError

    def dense_reward(self, infos: Infos, tasks) -> np.ndarray:
        """The family's dense reward ``[K, T]``; equal to ``reward`` for dense families."""
        return self.reward(infos, tasks)[0]

    # ---- common -----------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task(self) -> int:
        return self._task

    def set_task(self, idx: int) -> None:
        idx = int(idx)
        if not 0 <= idx < self.num_tasks:
            raise IndexError(f"task {idx} out of range [0, {self.num_tasks})")
        self._task = idx

    def _step_reward(self, infos: Infos) -> tuple[float, bool, bool, float]:
        """Reward, terminal, success and dense reward of the current step, computed by the
        batched functions on a one-step, one-task slice so both paths share the arithmetic."""
        one = {k: np.asarray(v)[None] for k, v in infos.items()}
        r, d, s = self.reward(one, [self._task])
        dense = self.dense_reward(one, [self._task])
        return float(r[0, 0]), bool(d[0, 0]), bool(s[0, 0]), float(dense[0, 0])

    def step_rewards(self, infos: Infos, tasks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Reward, terminal, success and dense reward ``[k]`` of k single steps, step i under
        task ``tasks[i]`` (``infos`` rows are the steps).  Elementwise the same arithmetic as
        ``_step_reward``: the diagonal of the batched functions over (task, step) pairs."""
        tasks = task_index(tasks)
        i = np.arange(len(tasks))
        r, d, s = self.reward(infos, tasks)
        r = r[i, i].astype(np.float64)
        if type(self).dense_reward is TaskFamily.dense_reward:  # the dense form is the reward
            dense = r.copy()
        else:
            dense = self.dense_reward(infos, tasks)[i, i].astype(np.float64)
        return r, d[i, i].astype(bool), s[i, i].astype(bool), dense

    def vector_env(self, seeds) -> "VectorEnv":
        """Environments for ``len(seeds)`` lanes of the lockstep rollout engine, lane i's start
        states seeded with ``seeds[i]``.  The default keeps one instance of the family per lane
        (``EnvList``); families whose dynamics are arrays override this with a batched step."""
        return EnvList(self, seeds)

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue the environment's RNG exactly (for checkpoints)."""
        return {"np_random": self.np_random.bit_generator.state, "task": self._task}

    def set_state(self, state: dict[str, Any]) -> None:
        self.np_random.bit_generator.state = state["np_random"]
        self._task = state["task"]


class VectorEnv:
    """Lanes of one task family stepped together (``TaskFamily.vector_env``).

    ``reset(lanes, tasks)`` starts a trajectory on each given lane under its task and returns
    the observations ``[k, ...]``; ``step(lanes, actions)`` steps those lanes with actions in
    the family's action box and returns ``next_obs [k, ...]``, ``rewards``, ``terminated``,
    ``truncated`` ``[k]`` and ``info`` (a dict of ``[k, ...]`` arrays: the family's
    ``info_spec`` quantities, ``success`` and ``dense_reward``).  Lane i draws its start
    states from its own generator, seeded like ``reset(seed=seeds[i])`` of a single instance
    (that first reset included), so a lane replays such an environment exactly."""

    num_lanes: int

    def reset(self, lanes: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, lanes: np.ndarray, actions: np.ndarray):
        raise NotImplementedError

    def get_state(self) -> list:
        raise NotImplementedError

    def set_state(self, state: list) -> None:
        raise NotImplementedError


class EnvList(VectorEnv):
    """One instance of the family per lane (MuJoCo, Meta-World, images, plugins)."""

    def __init__(self, family: TaskFamily, seeds):
        cls = type(family)
        self.envs = [cls(task_seed=family.task_seed) for _ in seeds]
        for env, seed in zip(self.envs, seeds):
            env.reset(seed=int(seed))
        self.num_lanes = len(self.envs)
        self.keys = tuple(family.info_spec)
        self.action_space = family.action_space
        self.image_obs = bool(getattr(family, "image_obs", False))

    def reset(self, lanes, tasks):
        out = []
        for lane, task in zip(lanes, tasks):
            env = self.envs[int(lane)]
            env.set_task(int(task))
            out.append(env.reset()[0])
        return np.stack(out)

    def step(self, lanes, actions):
        rows = [self.envs[int(lane)].step(a) for lane, a in zip(lanes, actions)]
        obs = np.stack([r[0] for r in rows])
        rew = np.array([r[1] for r in rows], np.float64)
        term = np.array([r[2] for r in rows], bool)
        trunc = np.array([r[3] for r in rows], bool)
        info = {k: np.stack([np.asarray(r[4][k]) for r in rows]) for k in self.keys}
        info["success"] = np.array([r[4].get("success", False) for r in rows], bool)
        info["dense_reward"] = np.array([r[4].get("dense_reward", r[1]) for r in rows], np.float64)
        return obs, rew, term, trunc, info

    def get_state(self):
        return [env.get_state() for env in self.envs]

    def set_state(self, state):
        for env, st in zip(self.envs, state):
            env.set_state(st)
