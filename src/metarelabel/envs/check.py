"""Contract checks for a task family, for authors of new families (and this project's tests).

    from metarelabel.envs.check import check_family
    check_family(MyFamily())          # raises AssertionError naming the first broken rule

What a family must satisfy: a fixed task set per ``task_seed``; ``step`` records every
``info_spec`` quantity with its declared shape; the batched ``reward(infos, tasks)`` and
``dense_reward`` reproduce, exactly, what ``step`` returned, for any subset of tasks in any
order; episodes are truncated at ``horizon``; ``get_state``/``set_state`` continue the
environment's randomness exactly.
"""
from __future__ import annotations

import copy

import numpy as np

from .base import TaskFamily


def _require(ok, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def random_episodes(env: TaskFamily, task: int, rng: np.random.Generator, n_steps: int = 200) -> list[dict]:
    """``n_steps`` random steps on ``task`` (actions partly outside the box), split into
    episodes at terminations and truncations; per episode what ``step`` returned (``r``, ``d``,
    ``s``, ``dense``, ``trunc``) and the recorded ``infos``."""
    env.set_task(task)
    low, high = env.action_space.low, env.action_space.high
    mid, half = (high + low) / 2, (high - low) / 2
    episodes, ep = [], None
    for i in range(n_steps):
        if ep is None:
            env.reset()
            ep = {"r": [], "d": [], "s": [], "dense": [], "trunc": [], "infos": {k: [] for k in env.info_spec}}
        a = mid + half * rng.uniform(-1.3, 1.3, size=env.action_space.shape)
        _, r, term, trunc, info = env.step(a)
        for key, v in (("r", r), ("d", term), ("s", info["success"]), ("dense", info["dense_reward"]),
                       ("trunc", trunc)):
            ep[key].append(v)
        for k in env.info_spec:
            ep["infos"][k].append(info[k])
        if term or trunc or i == n_steps - 1:
            out = {k: np.asarray(v) for k, v in ep.items() if k != "infos"}
            out["infos"] = {k: np.asarray(v) for k, v in ep["infos"].items()}
            episodes.append(out)
            ep = None
    return episodes


def check_batched_reward(env: TaskFamily, ep: dict, task: int, subset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batched reward over all tasks agrees exactly with what ``step`` returned for ``task``
    in episode ``ep`` (from ``random_episodes``), and a ``subset`` of tasks (any order, repeats
    allowed) gives the same rows.  Returns rewards, terminals, success ``[N, T]``."""
    all_tasks = np.arange(env.num_tasks)
    r, d, s = env.reward(ep["infos"], all_tasks)
    dense = env.dense_reward(ep["infos"], all_tasks)
    shape = (env.num_tasks, len(ep["r"]))
    _require(r.shape == d.shape == s.shape == dense.shape == shape,
             f"reward/dense_reward must return [K, T] = {shape} arrays, got {r.shape}, {d.shape}, {s.shape}, {dense.shape}")
    _require(r.dtype == np.float64 and d.dtype == bool and s.dtype == bool,
             f"reward must return float64 rewards and bool terminals/success, got {r.dtype}, {d.dtype}, {s.dtype}")
    for name, batched, stepped in (("reward", r, ep["r"]), ("terminal", d, ep["d"]), ("success", s, ep["s"]),
                                   ("dense reward", dense, ep["dense"])):
        _require(np.array_equal(batched[task], stepped),
                 f"batched {name} of task {task} differs from what step returned: {batched[task]} vs {stepped}")
    subset = np.asarray(subset)
    r2, d2, s2 = env.reward(ep["infos"], subset)
    _require(np.array_equal(r2, r[subset]) and np.array_equal(d2, d[subset]) and np.array_equal(s2, s[subset]),
             "reward(infos, tasks) for a subset of tasks differs from the same rows of all tasks")
    return r, d, s


def check_family(env: TaskFamily, n_steps: int = 300, seed: int = 0, tasks_to_check: int = 4) -> dict:
    """Check the family contract on ``env`` (see the module docstring); raises AssertionError
    with the first broken rule, returns a small summary otherwise."""
    cls = type(env)
    again = cls(task_seed=env.task_seed)
    _require(np.array_equal(again.tasks, env.tasks), "make_tasks must give the same tasks for the same task_seed")
    _require(env.tasks.ndim == 2 and len(env.tasks) == env.num_tasks, "tasks must be one row of parameters per task")
    n_needed = env.num_tasks if env.eval_is_train else env.num_train + env.num_eval
    _require(n_needed <= env.num_tasks, f"{n_needed} train + eval tasks but make_tasks returned {env.num_tasks}")
    rng = np.random.default_rng(seed)
    n_steps = max(n_steps, 2 * env.horizon + 1)  # long enough to see truncation
    env.reset(seed=seed)
    picks = np.unique(np.linspace(0, env.num_tasks - 1, min(tasks_to_check, env.num_tasks)).round().astype(int))
    n_episodes = 0
    for task in picks:
        for ep in random_episodes(env, int(task), rng, n_steps):
            n_episodes += 1
            for k, shape in env.info_spec.items():
                _require(ep["infos"][k].shape[1:] == tuple(shape),
                         f"info[{k!r}] has shape {ep['infos'][k].shape[1:]} per step, info_spec says {tuple(shape)}")
            _require(len(ep["r"]) <= env.horizon, f"an episode ran {len(ep['r'])} steps, past the horizon {env.horizon}")
            _require(not ep["trunc"][-1] or len(ep["r"]) == env.horizon, "truncated before the horizon")
            subset = rng.integers(0, env.num_tasks, size=min(5, env.num_tasks))
            check_batched_reward(env, ep, int(task), subset)
    # get_state / set_state continue the environment exactly: mid-episode steps and the next reset
    env.set_task(int(picks[-1]))
    env.reset(seed=seed + 1)
    actions = [env.action_space.low + (env.action_space.high - env.action_space.low) * rng.uniform(size=env.action_space.shape)
               for _ in range(min(5, env.horizon))]
    env.step(actions[0])
    state = copy.deepcopy(env.get_state())

    def continue_from_state():
        out = [env.step(a)[:2] for a in actions[1:]]
        return out, env.reset()[0]

    first_steps, first_reset = continue_from_state()
    env.set_state(copy.deepcopy(state))
    second_steps, second_reset = continue_from_state()
    for (o1, r1), (o2, r2) in zip(first_steps, second_steps):
        _require(np.array_equal(o1, o2) and r1 == r2, "set_state(get_state()) must reproduce the following steps exactly")
    _require(np.array_equal(first_reset, second_reset), "set_state(get_state()) must reproduce the next reset exactly")
    return {"family": env.name, "tasks": env.num_tasks, "episodes": n_episodes}
