"""Return-based relabeling baselines (SPEC 4.5-4.6).

hipi:   q(psi | tau) propto exp(R_psi(tau) / temperature - log Z(psi)), R_psi the hindsight
        return under the reward the critic is trained on; log Z(psi) = log mean exp(R_psi / T)
        over a cache of the last ``hipi_cache_size`` original paths (any task), scored under
        psi.  The cache never contains the paths being relabeled.
hipi-q: per transition: z_psi from ``embedding_batch_size`` transitions of psi's encoder
        buffer; Q_t(psi) = min_k Q_k(s_t, a_t, z_psi); log Z(psi) = log mean_t exp Q_t(psi)
        over the path; each transition gets its own task ~ softmax_psi(Q_t(psi) - log Z(psi)).
"""
from __future__ import annotations

import numpy as np
import torch

from ..sampler import context_from, context_tensor
from .base import Relabeler, check_finite, register, until_first_terminal


def _logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).mean(axis=axis, keepdims=True))).squeeze(axis)


@register
class HIPI(Relabeler):
    name = "hipi"

    def __init__(self, ctx):
        super().__init__(ctx)
        n = ctx.num_tasks
        self.all_tasks = np.arange(n)
        self.cache = np.zeros((ctx.cfg.hipi_cache_size, n), np.float64)
        self.cache_size = 0
        self.cache_ptr = 0
        self.dense = ctx.cfg.rl_reward == "dense"

    def returns(self, paths) -> np.ndarray:
        """Hindsight returns ``[P, N]`` from one vectorized reward call."""
        fam = self.ctx.family
        infos = {k: np.concatenate([p.infos[k] for p in paths], 0) for k in paths[0].infos}
        rew, term, _ = fam.reward(infos, self.all_tasks)
        if self.dense:
            rew = fam.dense_reward(infos, self.all_tasks)
        bounds = np.cumsum([0] + [len(p) for p in paths])
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            d = term[:, a:b]
            out.append((rew[:, a:b] * until_first_terminal(d)).sum(1))
        return np.stack(out)

    def log_z(self) -> np.ndarray:
        if self.cache_size == 0:
            return np.zeros(self.ctx.num_tasks)
        return _logmeanexp(self.cache[: self.cache_size] / self.cfg.hipi_temperature, axis=0)

    def _push(self, returns: np.ndarray) -> None:
        for r in returns:
            self.cache[self.cache_ptr] = r
            self.cache_ptr = (self.cache_ptr + 1) % len(self.cache)
            self.cache_size = min(self.cache_size + 1, len(self.cache))

    def assign(self, paths, groups=None):
        self._pending = self.returns(paths) if paths else None
        out = super().assign(paths, groups)
        if self._pending is not None:  # the batch joins the cache only after it was relabeled
            self._push(self._pending)
        return out

    def observe(self, paths) -> None:
        """Paths filed without relabeling (the initial collection) still fill the cache."""
        if paths:
            self._push(self.returns(paths))

    def choose(self, paths):
        R = self.returns(paths)  # the paths of this batch whose coin said relabel
        log_z = self.log_z()
        self._record("return", R)
        self._record("log_z", log_z)
        chosen = self.draw(R / self.cfg.hipi_temperature - log_z[None, :])
        return [np.full(len(p), k, np.int64) for p, k in zip(paths, chosen)]

    def state_dict(self):
        return {**super().state_dict(), "cache": self.cache.copy(), "cache_size": self.cache_size,
                "cache_ptr": self.cache_ptr}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.cache[:] = np.asarray(state["cache"])
        self.cache_size, self.cache_ptr = int(state["cache_size"]), int(state["cache_ptr"])


@register
class HIPIQ(Relabeler):
    name = "hipi-q"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.all_tasks = np.arange(ctx.num_tasks)
        self.ctx_key = ctx.cfg.context_reward_key

    @torch.no_grad()
    def task_q(self, paths, z: torch.Tensor | None = None) -> list[np.ndarray]:
        """Q_t(psi) ``[N, T]`` per path (one encoder pass for all tasks, one critic pass for all
        (task, transition) rows of the batch)."""
        learner, n, dev = self.ctx.learner, self.ctx.num_tasks, self.ctx.learner.device
        if z is None:
            b = self.ctx.enc_buffers.sample(self.all_tasks, self.cfg.embedding_batch_size, self.ctx.rng,
                                            keys=("obs", "actions", self.ctx_key, "next_obs"))
            ctx = context_tensor(context_from(b, self.ctx_key, learner.dims.use_next_obs), dev)
            z = learner.sample_z(*learner.infer_posterior(ctx))
        obs = torch.as_tensor(np.concatenate([p.obs for p in paths]), device=dev)
        if getattr(learner.dims, "image", False):  # embed each image once; features broadcast over tasks
            obs = learner.embed_obs(obs)
        act = torch.as_tensor(np.concatenate([p.actions for p in paths]), device=dev)
        T = obs.shape[0]
        x = torch.cat([obs.expand(n, T, -1), act.expand(n, T, -1), z[:, None, :].expand(n, T, -1)], -1)  # [N, T, s+a+z]
        q = learner.min_q(x.reshape(n * T, -1)).reshape(n, T).double().cpu().numpy()
        bounds = np.cumsum([0] + [len(p) for p in paths])
        return [q[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def choose(self, paths):
        out = []
        for q_path, p in zip(self.task_q(paths), paths):
            check_finite("q_value", q_path)
            log_z = _logmeanexp(q_path, axis=1)  # [N], over the path's transitions
            self._record("q_value", q_path)
            self._record("log_z", log_z)
            out.append(self.draw((q_path - log_z[:, None]).T))  # logits [T, N]: one task per transition
        return out
