"""HFR (Wan, Peng, Gangwani 2022) and its Bellman-error variant (SPEC 4.2-4.4).

For a path tau and every train task psi (hindsight, then foresight):
  c_psi(tau) = the path with rewards recomputed under psi (up to its first terminal under psi)
  z ~ q(z | c_psi(tau))
  hfr:          U(tau, psi) = mean_b min_k Q_k(s0_b, a~_b, z),  s0_b from psi's RL buffer, a~_b ~ pi(.|s0_b, z)
  hfr-bellman:  U(tau, psi) = -[mean_b (Q1 - y)^2 + mean_b (Q2 - y)^2] on psi's RL-buffer transitions
  q(psi | tau) = softmax_psi(U(tau, psi) - log Z(psi))
log Z(psi) = log mean_i exp U_i(psi), with z_i from ``log_z_samples`` contexts of
``max_path_length`` random transitions of psi's sampler buffer; recomputed once per iteration.
Everything is batched: one encoder pass over all (path, task) contexts, one policy+critic pass
over all (path, task, start-state) rows (chunked only to bound memory).

Image observations: each path's T images are embedded once by the learner's trunk
(``embed_obs``) and the T features are broadcast over the N tasks, so the hindsight contexts are
the same ``[P, N, T, context]`` float tensors as for vector observations (no image is copied N
times).  Start states and log-Z contexts are image batches that the learner embeds itself.
"""
from __future__ import annotations

import numpy as np
import torch

from ..buffers import FIELDS
from ..networks import MLP
from ..errors import ConfigError
from ..sampler import context_from, context_tensor
from .base import RelabelContext, Relabeler, check_finite, register, until_first_terminal

# Rows per encoder / policy+critic call.  Both the batched and a per-task version do the same
# FLOPs; chunks of a few thousand rows keep the 300-wide activations in cache (measured with
# benchmarks/relabel.py: 65,536-row chunks ran at ~60% of the GEMM rate of 4,096-row ones).
MAX_ROWS = 4096
# Images per chunk where rows carry images (contexts, start states): a 64x64 frame's first conv
# activations alone take ~120 kB, so 1,024-image chunks bound the peak memory to ~0.2 GB.
MAX_IMAGE_ROWS = 1024


def _max_rows(learner) -> int:
    return MAX_IMAGE_ROWS if getattr(learner.dims, "image", False) else MAX_ROWS


def posterior_chunked(learner, ctx: torch.Tensor, mask: torch.Tensor | None = None):
    """``learner.infer_posterior`` over ``[K, T, d]`` contexts (or image context dicts) in chunks
    of about MAX_ROWS rows."""
    lead = ctx["actions"] if isinstance(ctx, dict) else ctx
    K, T = lead.shape[:2]
    step = max(1, (MAX_IMAGE_ROWS if isinstance(ctx, dict) else MAX_ROWS) // max(T, 1))

    def part(i):
        return {k: v[i:i + step] for k, v in ctx.items()} if isinstance(ctx, dict) else ctx[i:i + step]

    parts = [learner.infer_posterior(part(i), None if mask is None else mask[i:i + step])
             for i in range(0, K, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class RewardModel(torch.nn.Module):
    """r^(s, a, g): 3 x 300 MLP, trained by MSE on the (unscaled) context rewards of SAC batches."""

    def __init__(self, obs_dim: int, act_dim: int, goal_dim: int, hidden: int = 300, layers: int = 3, lr: float = 3e-4):
        super().__init__()
        self.net = MLP(obs_dim + act_dim + goal_dim, hidden, layers, 1)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr)

    def forward(self, obs, act, goal):
        return self.net(torch.cat([obs, act, goal], -1)).squeeze(-1)

    def train_step(self, obs, act, goal, reward) -> torch.Tensor:
        loss = ((self(obs, act, goal) - reward) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class ForesightRelabeler(Relabeler):
    """Shared machinery of HFR and HFR-Bellman; subclasses define ``task_values``."""

    value_name = "utility"

    def __init__(self, ctx: RelabelContext):
        super().__init__(ctx)
        n = ctx.num_tasks
        self.log_z = np.zeros(n, np.float64)
        self.all_tasks = np.arange(n)
        self.device = ctx.learner.device
        cfg = ctx.cfg
        self.ctx_key = cfg.context_reward_key
        self.rl_key = cfg.rl_reward_key
        self.reward_model = None
        if cfg.learned_reward and getattr(ctx.learner.dims, "image", False):
            raise ConfigError("learned_reward: not supported with image observations")
        if cfg.learned_reward:
            fam = ctx.family
            obs_dim = int(np.prod(fam.observation_space.shape))
            act_dim = int(np.prod(fam.action_space.shape))
            self.goals = torch.as_tensor(fam.tasks[: n], dtype=torch.float32, device=self.device)
            self.reward_model = RewardModel(obs_dim, act_dim, self.goals.shape[-1], lr=cfg.lr).to(self.device)

    # ---- to implement ---------------------------------------------------------------------------------
    def task_values(self, tasks: np.ndarray, z: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Value ``[K]`` of latent z[k] on task tasks[k]'s own data."""
        raise NotImplementedError

    # ---- hindsight contexts ---------------------------------------------------------------------------
    def hindsight(self, paths):
        """Contexts ``[P, N, Tmax, d]`` and masks ``[P, N, Tmax]``: every path relabeled with
        every train task's reward, masked after its first terminal under that task."""
        fam, n = self.ctx.family, self.ctx.num_tasks
        lengths = [len(p) for p in paths]
        infos = {k: np.concatenate([p.infos[k] for p in paths], 0) for k in paths[0].infos}
        rew, term, _ = fam.reward(infos, self.all_tasks)  # [N, sum T]: one vectorized call
        if self.ctx_key == "dense_rewards":
            rew = fam.dense_reward(infos, self.all_tasks)
        learner, dev = self.ctx.learner, self.device
        dcfg = learner.dims
        P, Tm, F, A = len(paths), max(lengths), dcfg.feat, dcfg.act
        ctx = torch.zeros(P, n, Tm, dcfg.context, device=dev)
        mask = np.zeros((P, n, Tm), np.float32)
        start = 0
        for i, p in enumerate(paths):
            T = lengths[i]
            r, d = rew[:, start:start + T], term[:, start:start + T]
            start += T
            # the part filed under each task
            mask[i, :, :T] = until_first_terminal(d) if self.cfg.relabel_truncate else 1.0
            # observations (image features: embedded once per path) are shared by every task's context
            ctx[i, :, :T, :F] = learner.embed_obs(torch.as_tensor(p.obs, device=dev))
            ctx[i, :, :T, F:F + A] = torch.as_tensor(p.actions, device=dev)
            ctx[i, :, :T, F + A] = torch.as_tensor(r, dtype=torch.float32, device=dev)
            if dcfg.use_next_obs:
                ctx[i, :, :T, F + A + 1:] = learner.embed_obs(torch.as_tensor(p.next_obs, device=dev))
        if self.reward_model is not None:  # vector observations only (config validation)
            with torch.no_grad():
                goals = self.goals[None, :, None, :].expand(P, n, Tm, -1)
                ctx[..., F + A] = self.reward_model(ctx[..., :F], ctx[..., F:F + A], goals)
        return ctx, torch.as_tensor(mask, device=dev)

    # ---- utilities and assignment ---------------------------------------------------------------------
    @torch.no_grad()
    def utilities(self, paths, z_eps: torch.Tensor | None = None, value_eps: torch.Tensor | None = None) -> np.ndarray:
        """U ``[P, N]`` for a batch of paths; ``z_eps`` ``[P*N, L]`` and ``value_eps`` (see
        ``task_values``) make the random draws explicit."""
        ctx, mask = self.hindsight(paths)
        P, n, T, d = ctx.shape
        learner = self.ctx.learner
        mu, var = posterior_chunked(learner, ctx.reshape(P * n, T, d), mask.reshape(P * n, T))
        z = learner.sample_z(mu, var, z_eps)
        values = self.task_values(np.tile(self.all_tasks, P), z, value_eps)
        return values.reshape(P, n).double().cpu().numpy()

    def choose(self, paths):
        U = self.utilities(paths)
        check_finite(self.value_name, U)
        self._record(self.value_name, U)
        chosen = self.draw(U - self.log_z[None, :])
        return [np.full(len(p), k, np.int64) for p, k in zip(paths, chosen)]

    @torch.no_grad()
    def update_log_z(self) -> None:
        cfg, learner = self.cfg, self.ctx.learner
        n, S, H = self.ctx.num_tasks, cfg.log_z_samples, cfg.max_path_length
        tasks = np.repeat(self.all_tasks, S)
        b = self.ctx.sampler_buffers.sample(tasks, H, self.ctx.rng, keys=("obs", "actions", self.ctx_key, "next_obs"))
        if self.reward_model is not None:
            o = torch.as_tensor(b["obs"], device=self.device)
            a = torch.as_tensor(b["actions"], device=self.device)
            g = self.goals[torch.as_tensor(tasks, device=self.device)][:, None, :].expand(-1, H, -1)
            b[self.ctx_key] = self.reward_model(o, a, g).unsqueeze(-1).cpu().numpy()
        ctx = context_tensor(context_from(b, self.ctx_key, learner.dims.use_next_obs), self.device)
        z = learner.sample_z(*posterior_chunked(learner, ctx))
        values = self.task_values(tasks, z).reshape(n, S).double()
        self.log_z = (torch.logsumexp(values, 1) - np.log(S)).cpu().numpy()
        check_finite("log_z", self.log_z)
        self._record("log_z", self.log_z)

    def on_gradient_step(self, tasks: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        if self.reward_model is None:
            return
        t = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        M, B, _ = batch["obs"].shape
        g = self.goals[t(tasks)][:, None, :].expand(M, B, -1)
        self.reward_model.train_step(t(batch["obs"]), t(batch["actions"]), g, t(batch[self.ctx_key]).squeeze(-1))

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self):
        state = {**super().state_dict(), "log_z": self.log_z.copy()}
        if self.reward_model is not None:
            state["reward_model"] = self.reward_model.state_dict()
            state["reward_model_opt"] = self.reward_model.opt.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.log_z = np.asarray(state["log_z"], np.float64).copy()
        if self.reward_model is not None:
            self.reward_model.load_state_dict(state["reward_model"])
            self.reward_model.opt.load_state_dict(state["reward_model_opt"])


@register
class HFR(ForesightRelabeler):
    """Utility = post-adaptation value of psi's start states when tau is the only context."""

    name = "hfr"

    def task_values(self, tasks, z, eps=None):
        """``eps``: policy noise ``[K, B, act]``."""
        B = self.cfg.utility_batch_size
        starts = torch.as_tensor(self.ctx.rl_buffers.sample_starts(tasks, B, self.ctx.rng), device=self.device)
        learner = self.ctx.learner
        chunk = max(1, _max_rows(learner) // B)
        out = [learner.start_state_value(starts[i:i + chunk], z[i:i + chunk], None if eps is None else eps[i:i + chunk])
               for i in range(0, len(tasks), chunk)]
        return torch.cat(out)


@register
class HFRBellman(ForesightRelabeler):
    """Utility = minus the twin-critic Bellman error on psi's RL-buffer transitions."""

    name = "hfr-bellman"
    value_name = "bellman_utility"

    def task_values(self, tasks, z, eps=None):
        B = self.cfg.utility_batch_size
        b = self.ctx.rl_buffers.sample(tasks, B, self.ctx.rng, keys=FIELDS)
        batch = {"obs": b["obs"], "actions": b["actions"], "rewards": b[self.rl_key], "next_obs": b["next_obs"],
                 "terminals": b["terminals"]}
        batch = {k: torch.as_tensor(v, device=self.device) for k, v in batch.items()}
        learner = self.ctx.learner
        chunk = max(1, _max_rows(learner) // B)
        out = [-learner.td_error({k: v[i:i + chunk] for k, v in batch.items()}, z[i:i + chunk])
               for i in range(0, len(tasks), chunk)]
        return torch.cat(out)
