"""An example task family of your own: a point on a line that must reach a hidden goal.

Use it from Python (``register_family``) or, packaged, through the ``metarelabel.families``
entry point so every ``metarelabel`` command knows it by name:

    # pyproject.toml of your package
    [project.entry-points."metarelabel.families"]
    line-goal = "line_goal:LineGoal"

    metarelabel envs                                       # lists line-goal
    metarelabel train line-goal --preset quick --relabel hfr

Check the contract (batched reward == step reward, horizon, state) with
``metarelabel.envs.check.check_family(LineGoal())``.
"""
from __future__ import annotations

import numpy as np
from gymnasium import spaces

from metarelabel.envs import TaskFamily


class LineGoal(TaskFamily):
    """Position x in R, action a displacement clipped to [-0.1, 0.1], start at 0; a task is a
    goal g in [-1, 1]; reward -|x - g| after the step; success (no termination) within 0.1."""

    name = "line-goal"
    horizon = 20
    discount = 0.9
    num_train = 10
    num_eval = 5
    info_spec = {"x": (1,)}  # what the reward depends on, recorded by step() in info
    summary = "example: a point on a line, goal hidden, reward -distance"
    # optional: per-preset config values on top of the generic ones (see metarelabel config)
    presets = {"paper": {"num_iterations": 50, "reward_scale": 10.0}}

    def __init__(self, task_seed: int = 0):
        super().__init__(task_seed)
        self.observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = spaces.Box(-0.1, 0.1, (1,), np.float32)
        self._x = np.zeros(1)

    def make_tasks(self, rng):
        return rng.uniform(-1.0, 1.0, size=(self.num_train + self.num_eval, 1))

    def reward(self, infos, tasks):
        """Rewards, terminals and success ``[K, T]`` of a path (infos ``[T, ...]``) under K tasks."""
        x = np.asarray(infos["x"], np.float64)[:, 0]  # [T]
        goals = self.tasks[np.asarray(tasks, np.int64), 0]  # [K]
        dist = np.abs(x[None, :] - goals[:, None])
        return -dist, np.zeros(dist.shape, bool), dist <= 0.1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._x, self._t = np.zeros(1), 0
        return self._x.astype(np.float32), {}

    def step(self, action):
        self._x = self._x + np.clip(np.asarray(action, np.float64), -0.1, 0.1)
        self._t += 1
        info = {"x": self._x.copy()}
        r, term, success, dense = self._step_reward(info)  # the batched reward on a one-step slice
        info.update(success=success, dense_reward=dense)
        return self._x.astype(np.float32), r, term, self._t >= self.horizon and not term, info

    def get_state(self):
        return {**super().get_state(), "x": self._x.copy(), "t": self._t}

    def set_state(self, state):
        super().set_state(state)
        self._x, self._t = np.array(state["x"], np.float64), int(state["t"])
