"""Meta-test evaluation protocol (SPEC section 7), named ``pearl-online``.

For each task, ``eval_runs`` times: z is reset to the prior; the deterministic policy is rolled
out, accumulating context, until ``eval_steps`` transitions are collected.  The first
``exploration_trajectories`` trajectories use z ~ prior (resampled per trajectory); afterwards z
is sampled from the posterior inferred from all context collected so far, re-inferred after
each trajectory.

With ``rollouts = vector`` every (task, run) pair of one ``evaluate`` call runs side by side on
the lanes of the rollout engine (``rollout.run_jobs``): one policy call per step for all of
them, the prior draws of all pairs starting a trajectory in one call, and the posteriors of all
pairs with the same amount of context in one encoder call.  ``rollouts = sequential`` runs the
pairs one after another (the reference).

The evaluator owns its environments and its torch generator, so evaluating (or not) never
changes the random streams of training.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .rollout import Job, lane_seeds, lanes_for, run_jobs
from .sampler import context_tensor, path_context, rollout, stack_contexts

PROTOCOL = "pearl-online"


def train_task_sample(num_train: int, k: int) -> np.ndarray:
    """The fixed, evenly spaced train tasks evaluated as ``meta_train/...``."""
    k = min(k, num_train)
    return np.unique(np.linspace(0, num_train - 1, k).round().astype(np.int64)) if k else np.zeros(0, np.int64)


class Pair(Job):
    """One (task, run) of the protocol: trajectories until ``eval_steps`` transitions."""

    def __init__(self, task: int, cfg):
        self.task, self.cfg = int(task), cfg
        self.contexts, self.returns, self.successes, self.steps = [], [], [], 0
        self.exploration_infos: list[dict] = []

    def want(self):
        if self.steps >= self.cfg.eval_steps:
            return None
        return "prior" if len(self.returns) < self.cfg.exploration_trajectories else "posterior"

    def take(self, path) -> None:
        cfg = self.cfg
        if len(self.returns) < cfg.exploration_trajectories:
            self.exploration_infos.append(path.infos)
        self.contexts.append(path_context(path, getattr(path, cfg.context_reward_key), cfg.use_next_obs_in_context))
        self.returns.append(float(path.rewards.sum()))
        self.successes.append(bool(path.success.any()))
        self.steps += len(path)


class Evaluator:
    def __init__(self, env, agent, cfg, seed: int):
        self.env, self.agent, self.cfg = env, agent, cfg
        self.generator = torch.Generator(device=agent.device)
        self.generator.manual_seed(int(seed))
        self.env.reset(seed=int(seed))
        self.num_k = max(1, cfg.eval_steps // cfg.max_path_length)
        self.venv = None
        if getattr(cfg, "rollouts", "sequential") == "vector":
            pairs = max(len(env.eval_tasks), cfg.num_eval_train_tasks) * cfg.eval_runs
            self.venv = env.vector_env(lane_seeds(seed, lanes_for(env, pairs)))

    def _pair_z(self, pairs: list[Pair], kinds: list[str]) -> torch.Tensor:
        """z for the pairs starting a trajectory: prior draws for all of them in one call,
        then the posteriors, one encoder call per context length."""
        L, dev = self.agent.dims.latent, self.agent.device
        z = torch.empty(len(pairs), L, device=dev)
        pri = [i for i, k in enumerate(kinds) if k == "prior"]
        if pri:
            z[pri] = self._z_prior(len(pri))
        post = [i for i, k in enumerate(kinds) if k == "posterior"]
        if post:
            z[post] = self._sample(*self._posteriors([pairs[i] for i in post]))
        return z

    def _posteriors(self, pairs: list[Pair]):
        """Posterior (mu, var) ``[k, L]`` of each pair from all of its context, one encoder call
        per total context length (pairs of equal length stack without padding)."""
        L, dev = self.agent.dims.latent, self.agent.device
        mu, var = torch.empty(len(pairs), L, device=dev), torch.empty(len(pairs), L, device=dev)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(pairs):
            by_len.setdefault(p.steps, []).append(i)
        for group in by_len.values():
            ctx = [stack_contexts(pairs[i].contexts) for i in group]
            ctx = ({k: np.concatenate([c[k] for c in ctx], 0) for k in ctx[0]} if isinstance(ctx[0], dict)
                   else np.concatenate(ctx, 0))
            with torch.no_grad():
                mu[group], var[group] = self.agent.infer_posterior(context_tensor(ctx, dev))
        return mu, var

    def run_pairs(self, tasks) -> list[Pair]:
        """Every (task, run) pair of the protocol on ``tasks``, task-major, run side by side."""
        pairs = [Pair(int(t), self.cfg) for t in tasks for _ in range(self.cfg.eval_runs)]
        run_jobs(self.venv, self.agent, pairs, self.cfg.max_path_length, self._pair_z, deterministic=True)
        return pairs

    def _z_prior(self, n: int = 1) -> torch.Tensor:
        L = self.agent.dims.latent
        if not self.cfg.use_information_bottleneck:
            return torch.zeros(n, L, device=self.agent.device)
        return torch.randn(n, L, generator=self.generator, device=self.agent.device)

    def _sample(self, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """z ~ N(mu, var) from the evaluator's generator (the mean without the bottleneck)."""
        if not self.cfg.use_information_bottleneck:
            return mu
        return mu + var.sqrt() * torch.randn(mu.shape, generator=self.generator, device=mu.device)

    def _z_posterior(self, contexts: list[np.ndarray]) -> torch.Tensor:
        ctx = context_tensor(stack_contexts(contexts), self.agent.device)
        with torch.no_grad():
            return self._sample(*self.agent.infer_posterior(ctx))

    def run_task(self, task: int) -> Pair:
        """One (task, run) pair, one environment step at a time (``rollouts = sequential``)."""
        cfg = self.cfg
        self.env.set_task(task)
        pair = Pair(task, cfg)
        while (kind := pair.want()) is not None:
            z = self._z_prior() if kind == "prior" else self._z_posterior(pair.contexts)
            pair.take(rollout(self.env, self.agent, z, cfg.max_path_length, deterministic=True))
        return pair

    def runs(self, tasks) -> list[Pair]:
        """Every (task, run) pair of the protocol on ``tasks``, task-major."""
        if self.venv is not None:
            return self.run_pairs(tasks)
        return [self.run_task(int(t)) for t in tasks for _ in range(self.cfg.eval_runs)]

    def diagnostics(self, pairs: list[Pair], prefix: str) -> dict[str, float]:
        """Why adaptation works or not: how many of the evaluated tasks' goals the exploration
        trajectories reach (any of them, under any evaluated task's success condition), and how
        well the posteriors from each run's whole context separate the tasks (mean pairwise
        distance of the tasks' mean posterior means over the mean posterior std)."""
        tasks = sorted({p.task for p in pairs})
        infos = [i for p in pairs for i in p.exploration_infos]
        reached = 0
        if infos:
            cat = {k: np.concatenate([i[k] for i in infos], 0) for k in infos[0]}
            reached = int(self.env.reward(cat, tasks)[2].any(axis=1).sum())
        out = {f"{prefix}/explore_goals_reached": float(reached)}
        mu, var = (t.cpu().float() for t in self._posteriors(pairs))
        sd = var.sqrt()
        labels = np.array([p.task for p in pairs])
        means = torch.stack([mu[torch.as_tensor(labels == t)].mean(0) for t in tasks])
        std = float(sd.mean())
        out[f"{prefix}/posterior_std"] = std
        if len(tasks) > 1:
            dist = torch.cdist(means[None], means[None])[0]
            mean_dist = float(dist.sum() / (len(tasks) * (len(tasks) - 1)))
            out[f"{prefix}/posterior_separation"] = mean_dist / std if std > 0 else math.nan  # no bottleneck: no std
        return out

    def evaluate(self, tasks, prefix: str) -> dict[str, float]:
        cfg = self.cfg
        finals, final_success, any_success, n_traj = [], [], [], []
        by_k = [[] for _ in range(self.num_k)]
        pairs = self.runs(tasks)
        for pair in pairs:
            returns, successes = pair.returns, pair.successes
            finals.append(returns[-1])
            final_success.append(successes[-1])
            post = successes[cfg.exploration_trajectories:]
            any_success.append(any(post))
            n_traj.append(len(returns))
            for k, r in enumerate(returns[: self.num_k]):
                by_k[k].append(r)
        out = {
            f"{prefix}/return": float(np.mean(finals)),
            **self.diagnostics(pairs, prefix),
            f"{prefix}/success_rate": float(np.mean(any_success)),
            f"{prefix}/final_success_rate": float(np.mean(final_success)),
            f"{prefix}/num_trajectories": float(np.mean(n_traj)),
        }
        for k, vals in enumerate(by_k, start=1):
            out[f"{prefix}/return_by_trajectory_{k}"] = float(np.mean(vals)) if vals else math.nan
        return out


def evaluate_run(run_dir, device: str | None = None, eval_runs: int | None = None, seed: int = 12345,
                 checkpoint=None, rollouts: str | None = None) -> dict:
    """Re-evaluate a saved run with the protocol: its newest good checkpoint, or ``checkpoint``
    (an iteration number or a ``.pt`` path); ``rollouts`` overrides the run's engine."""
    from .agent import load_pearl
    from .errors import ConfigError

    changes: dict = {}
    if eval_runs is not None:
        if eval_runs < 1:
            raise ConfigError("eval_runs: must be >= 1")
        changes["eval_runs"] = eval_runs
    if rollouts is not None:
        changes["rollouts"] = rollouts
    cfg, env, agent, info = load_pearl(run_dir, checkpoint, device, changes)
    torch.set_num_threads(cfg.torch_threads)
    ev = Evaluator(env, agent, cfg, seed=seed)
    out: dict = {"iteration": info["iteration"], "env_steps": info["env_steps"], "protocol": PROTOCOL,
                 "checkpoint": info["source"]["checkpoint"]}
    out.update(ev.evaluate(env.eval_tasks, "meta_test"))
    sample = train_task_sample(len(env.train_tasks), cfg.num_eval_train_tasks)
    if len(sample):
        out.update(ev.evaluate(sample, "meta_train"))
    return out
