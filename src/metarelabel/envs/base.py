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
    sq = None
    for d in range(goals.shape[1]):
        diff = points[None, :, d] - goals[:, None, d]
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

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue the environment's RNG exactly (for checkpoints)."""
        return {"np_random": self.np_random.bit_generator.state, "task": self._task}

    def set_state(self, state: dict[str, Any]) -> None:
        self.np_random.bit_generator.state = state["np_random"]
        self._task = state["task"]
