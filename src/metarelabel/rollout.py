"""The lockstep rollout engine shared by meta-training collection and meta-test evaluation.

Work comes as *jobs*; a job is a sequence of trajectories on one task whose latent z for the
next trajectory may depend on the job's own earlier trajectories (a collection visit of a task
with its prior, posterior and extra-RL phases; one (task, run) pair of the meta-test protocol).
The engine runs up to ``lanes`` jobs side by side on the lanes of a ``VectorEnv``:

    each step: every lane that needs a new trajectory asks its job for one (jobs that are done
    hand their lane to the next job in the queue); the caller's ``next_z`` gives all of those
    trajectories their z in one batched call; the lanes are reset; then ONE policy call acts
    for every running lane and the vector env steps them all; a trajectory that terminates,
    truncates or reaches ``max_path_length`` becomes a ``Path`` (the same arrays and dtypes as
    ``sampler.rollout``) and goes to its job, and the paths finished in that step go to
    ``on_paths`` together.

Jobs are taken in order and lane i always takes the lowest free lane, so a run is a
deterministic function of the seeds.  ``sampler.rollout`` (one environment at a time) is the
reference the engine is tested against (``rollouts = sequential``).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from .buffers import Path
from .sampler import ActionMap

#: lanes for families with array dynamics, and for families with one instance per lane
MAX_ARRAY_LANES = 64
MAX_INSTANCE_LANES = 16


class Job:
    """One task's sequence of trajectories.  ``want()`` says what the next trajectory needs:
    ``None`` (the job is done), ``"prior"`` or ``"posterior"`` (the caller's ``next_z`` reads
    the job's own state to infer it); ``take(path)`` receives each finished trajectory."""

    task: int

    def want(self) -> str | None:
        raise NotImplementedError

    def take(self, path: Path) -> None:
        raise NotImplementedError


def lanes_for(family, num_jobs: int) -> int:
    """How many lanes to run ``num_jobs`` jobs of ``family`` on."""
    from .envs.base import TaskFamily

    array = type(family).vector_env is not TaskFamily.vector_env
    return max(1, min(int(num_jobs), MAX_ARRAY_LANES if array else MAX_INSTANCE_LANES))


def lane_seeds(seed: int, n: int) -> list[int]:
    """Reset seeds of ``n`` lanes, derived from one seed."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n)]


def run_jobs(venv, agent, jobs, max_path_length: int, next_z, on_paths=None, deterministic: bool = False) -> int:
    """Run ``jobs`` to completion on ``venv`` (see the module docstring).  ``next_z(jobs,
    kinds)`` returns z ``[k, L]`` for the k jobs starting a trajectory (``kinds[i]`` is what
    ``jobs[i].want()`` said); ``on_paths(list of (job, path))`` is called after every step in
    which trajectories finished.  Returns the number of env steps taken."""
    amap = ActionMap(venv.action_space)
    odt = np.uint8 if venv.image_obs else np.float32
    queue = deque(jobs)
    n, H = venv.num_lanes, int(max_path_length)
    job = [None] * n
    running = np.zeros(n, bool)
    t = np.zeros(n, np.int64)
    # the agent's lane actor, where it has one, holds the lanes' observations and z's in the
    # policy's own input tensor; otherwise ``act_batch`` gets them each step
    actor = agent.lane_actor(n) if hasattr(agent, "lane_actor") else None
    z = torch.zeros(n, agent.dims.latent, device=agent.device) if actor is None else actor.z
    obs = None
    rows: dict[str, np.ndarray] = {}  # field -> [lanes, H, ...]: the running trajectories
    flat: dict[str, np.ndarray] = {}  # the same arrays as [lanes * H, ...] views
    infos: list = []  # (flat view, info key) of the family's info fields
    total = 0
    lanes = np.arange(n)
    while True:
        # lanes without a running trajectory: ask their job (or the next one) for one
        starting, kinds = [], []
        for i in ([] if running.all() else np.flatnonzero(~running)):
            while True:
                if job[i] is None:
                    if not queue:
                        break
                    job[i] = queue.popleft()
                kind = job[i].want()
                if kind is not None:
                    starting.append(i)
                    kinds.append(kind)
                    break
                job[i] = None
        if starting:
            idx = np.asarray(starting)
            z[idx] = next_z([job[i] for i in starting], kinds).to(z.dtype)
            first = venv.reset(idx, np.asarray([job[i].task for i in starting], np.int64))
            if obs is None:
                if actor is not None and first.shape[1:] == actor.obs.shape[1:]:
                    obs = actor.obs
                else:  # no actor, or observations that are not flat vectors: act_batch
                    z, actor = z.clone(), None
                    obs = np.zeros((n,) + first.shape[1:], first.dtype)
            obs[idx] = first
            running[idx] = True
            t[idx] = 0
        full = bool(running.all())  # every lane running (most steps): whole arrays, no gathers
        active = lanes if full else np.flatnonzero(running)
        if len(active) == 0:
            return total
        obs_a = obs if full else obs[active]
        if actor is None:
            actions = agent.act_batch(obs_a, z if full else z[active], deterministic)
        else:
            actions = actor.act(None if full else active, deterministic)
        env_actions = amap.to_env(actions)
        next_obs, rew, term, trunc, info = venv.step(active, env_actions)
        total += len(active)
        t_a = t if full else t[active]
        at = active * H + t_a  # rows of the flat [lanes * H, ...] views
        if not rows:
            first = {"obs": obs_a, "actions": actions, "rewards": rew, "dense_rewards": info["dense_reward"],
                     "terminals": term, "next_obs": next_obs, "success": info["success"]}
            first.update({"info:" + k: v for k, v in info.items() if k not in ("success", "dense_reward")})
            for k, v in first.items():
                v = np.asarray(v)
                rows[k] = np.zeros((n, H) + v.shape[1:], v.dtype)
                flat[k] = rows[k].reshape((n * H,) + v.shape[1:])
            infos = [(flat[k], k[5:]) for k in rows if k.startswith("info:")]
        flat["obs"][at] = obs_a
        flat["actions"][at] = actions
        flat["rewards"][at] = rew
        flat["dense_rewards"][at] = info["dense_reward"]
        flat["terminals"][at] = term
        flat["next_obs"][at] = next_obs
        flat["success"][at] = info["success"]
        for dest, k in infos:
            dest[at] = info[k]
        t_now = t_a + 1  # a new array: t_a may be t itself
        if full:
            obs[:] = next_obs
            t[:] = t_now
        else:
            obs[active] = next_obs
            t[active] = t_now
        done = np.asarray(term, bool) | np.asarray(trunc, bool) | (t_now >= H)
        finished = []
        for i in active[done]:
            path = _make_path(rows, i, int(t[i]), job[i].task, odt)
            running[i] = False
            job[i].take(path)
            finished.append((job[i], path))
        if finished and on_paths is not None:
            on_paths(finished)


def _make_path(rows: dict, lane: int, T: int, task: int, odt) -> Path:
    """The trajectory of ``lane``'s first T rows, with ``sampler.rollout``'s dtypes."""
    def col(k, dtype=None):
        v = rows[k][lane, :T]
        return v.astype(dtype) if dtype is not None else v.copy()

    f32 = np.float32
    infos = {k[5:]: col(k) for k in rows if k.startswith("info:")}
    return Path(obs=col("obs", odt), actions=col("actions", f32), rewards=col("rewards", np.float64),
                dense_rewards=col("dense_rewards", np.float64), terminals=col("terminals", bool),
                next_obs=col("next_obs", odt), success=col("success", bool), infos=infos, task=int(task))
