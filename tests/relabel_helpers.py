"""Helpers for tests/test_relabel.py: hand-written rewards, synthetic paths, a stub learner with
closed-form outputs, and a hand-written forward pass of PEARL's networks.

Everything here is written independently of ``src/``: the expected values in the tests come
from these few lines of numpy/torch, not from the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from metarelabel.buffers import EncoderBuffers, Path, TaskBuffers
from metarelabel.envs import make_family
from metarelabel.pearl import Dims
from metarelabel.presets import make_config
from metarelabel.relabel import RelabelContext, make_relabeler

# ---- Four-Corners reward, by hand (SPEC section 5) ------------------------------------------
FC_GOALS = np.array([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])


def fc_step_reward(pos, goal) -> tuple[float, bool]:
    """Reward and terminal of one Four-Corners step ending at ``pos``, for goal ``goal``."""
    x, y = float(pos[0]), float(pos[1])
    gx, gy = float(goal[0]), float(goal[1])
    if math.hypot(x - gx, y - gy) <= 0.2:
        return 0.0, True
    in_square = 0.1 < abs(x) < 0.5 and 0.1 < abs(y) < 0.5
    same_quadrant = (x > 0) == (gx > 0) and (y > 0) == (gy > 0)
    return (-3.0 if in_square and same_quadrant else -1.0), False


def fc_rewards(positions, task: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step rewards and terminals ``[T]`` of a position sequence under one task."""
    out = [fc_step_reward(p, FC_GOALS[task]) for p in positions]
    return np.array([r for r, _ in out]), np.array([d for _, d in out])


def first_terminal_len(terminals) -> int:
    """Length of a path cut after its first terminal (the whole path when there is none)."""
    terminals = np.asarray(terminals, bool)
    return int(np.flatnonzero(terminals)[0]) + 1 if terminals.any() else len(terminals)


def point_path(positions, task: int, family, rng: np.random.Generator, start=(0.0, 0.0)) -> Path:
    """A synthetic point-family path visiting ``positions`` (obs = previous position, random
    stored actions in [-1, 1]); rewards/terminals are the family's for ``task``."""
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    T = len(pos)
    obs = np.vstack([np.asarray(start, np.float64)[None], pos[:-1]]).astype(np.float32)
    infos = {"pos": pos.copy()}
    r, d, s = family.reward(infos, [task])
    dense = family.dense_reward(infos, [task])
    return Path(obs=obs, actions=rng.uniform(-1, 1, (T, 2)).astype(np.float32), rewards=r[0].astype(np.float64),
                dense_rewards=dense[0].astype(np.float64), terminals=d[0].astype(bool),
                next_obs=pos.astype(np.float32), success=s[0].astype(bool), infos=infos, task=int(task))


# ---- a stub learner with closed-form outputs ----------------------------------------------------
class StubLearner:
    """Implements the learner protocol with known functions of its inputs.

    infer_posterior: mu = (masked mean of context rewards, masked mean of the context's first
                     obs coordinate), var = ``var`` (constant).
    sample_z:        mu + sqrt(var) * eps; without eps, the next queued noise (zeros if none).
    start_state_value: mean_b [a0 * z0 + a1 * z1 - 0.5 * |s_b|^2].
    td_error:        mean_b (r_b - z0)^2 + mean_b (o_b[0] - z1)^2.
    """

    def __init__(self, obs_dim: int = 2, act_dim: int = 2, var: float = 0.25, a=(1.0, 0.5)):
        self.device = torch.device("cpu")
        self.dims = Dims(obs_dim, act_dim, 2, False)
        self.var = float(var)
        self.a = a
        self.queued_eps: list[torch.Tensor] = []
        self.seen_contexts: list[torch.Tensor] = []
        self.seen_starts: list[torch.Tensor] = []

    def embed_obs(self, obs):
        return obs  # vector observations: the identity, as the learner protocol says

    def infer_posterior(self, context, mask=None):
        self.seen_contexts.append(context.clone())
        o, a = self.dims.obs, self.dims.act
        m = torch.ones(context.shape[:-1], dtype=context.dtype) if mask is None else mask.to(context.dtype)
        r, x = context[..., o + a], context[..., 0]
        mu = torch.stack([(r * m).sum(-1) / m.sum(-1), (x * m).sum(-1) / m.sum(-1)], -1)
        return mu, torch.full_like(mu, self.var)

    def sample_z(self, mu, var, eps=None):
        if eps is None:
            eps = self.queued_eps.pop(0) if self.queued_eps else torch.zeros_like(mu)
        return mu + var.sqrt() * eps

    def start_state_value(self, starts, z, eps=None):
        self.seen_starts.append(starts.clone())
        a0, a1 = self.a
        return (a0 * z[:, 0:1] + a1 * z[:, 1:2] - 0.5 * (starts ** 2).sum(-1)).mean(1)

    def td_error(self, batch, z):
        r = batch["rewards"][..., 0]
        x = batch["obs"][..., 0]
        return ((r - z[:, 0:1]) ** 2).mean(1) + ((x - z[:, 1:2]) ** 2).mean(1)


def stub_context(relabel: str, learner=None, family: str = "four-corners", capacity: int = 200, seed: int = 0,
                 **overrides):
    """A relabeler of ``relabel`` on empty buffers, with a stub learner (or the one given)."""
    cfg = make_config(family, "quick", dict({"relabel": relabel}, **overrides))
    fam = make_family(family, cfg.task_seed)
    n = len(fam.train_tasks)
    learner = StubLearner() if learner is None else learner
    ctx = RelabelContext(cfg=cfg, family=fam, learner=learner,
                         rl_buffers=TaskBuffers(n, capacity, 2, 2, store_starts=True),
                         enc_buffers=EncoderBuffers(n, capacity, 2, 2),
                         sampler_buffers=TaskBuffers(n, capacity, 2, 2),
                         rng=np.random.default_rng(seed), num_tasks=n)
    return make_relabeler(relabel, ctx), ctx


def constant_rows(n: int, obs, act, reward, dense=None, terminal=0.0):
    """``n`` identical transitions (dict of arrays) for ``TaskBuffers.add``."""
    obs = np.asarray(obs, np.float32)
    return {"obs": np.tile(obs, (n, 1)), "actions": np.tile(np.asarray(act, np.float32), (n, 1)),
            "rewards": np.full(n, reward), "dense_rewards": np.full(n, reward if dense is None else dense),
            "terminals": np.full(n, terminal), "next_obs": np.tile(obs, (n, 1))}


# ---- PEARL's networks, by hand ---------------------------------------------------------------------
def mlp_forward(mlp, x):
    for lin in mlp.hidden:
        x = torch.relu(x @ lin.weight.T + lin.bias)
    return x @ mlp.out.weight.T + mlp.out.bias


def twin_q_min(qf, x):
    """min over the heads of the twin critic, one head at a time with plain matmuls: ``[n]``."""
    heads = []
    for h in range(qf.n_heads):
        y = x
        for i, (w, b) in enumerate(zip(qf.weights, qf.biases)):
            y = y @ w[h] + b[h, 0]
            if i < len(qf.weights) - 1:
                y = torch.relu(y)
        heads.append(y[:, 0])
    return torch.minimum(heads[0], heads[1]) if len(heads) == 2 else torch.stack(heads).min(0).values


def policy_action(policy, x, eps):
    """tanh(mean + exp(clamp(log_std)) * eps)."""
    h = x
    for lin in policy.net.hidden:
        h = torch.relu(h @ lin.weight.T + lin.bias)
    mean = h @ policy.net.out.weight.T + policy.net.out.bias
    log_std = (h @ policy.log_std.weight.T + policy.log_std.bias).clamp(-20.0, 2.0)
    return torch.tanh(mean + log_std.exp() * eps)


def posterior_by_hand(agent, context):
    """Product of the per-transition Gaussians of one unpadded context ``[T, d]``: (mu, var) ``[L]``."""
    L = agent.dims.latent
    out = mlp_forward(agent.encoder, context)
    mu_n = out[:, :L]
    var_n = torch.nn.functional.softplus(out[:, L:]).clamp(min=1e-7)
    var = 1.0 / (1.0 / var_n).sum(0)
    mu = var * (mu_n / var_n).sum(0)
    return mu, var


def enlarge_output_layers(agent, scale: float = 1.0, seed: int = 0) -> None:
    """Re-draw the (tiny, +-3e-3) output layers of a freshly initialised PEARL at O(1) scale so
    that Q, the policy mean and the posterior vary visibly with their inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (agent.encoder.out, agent.policy.net.out, agent.policy.log_std):
            bound = scale / math.sqrt(lin.in_features)
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=g) * 2 - 1) * 0.1)
        w, b = agent.qf.weights[-1], agent.qf.biases[-1]
        bound = 3.0 * scale / math.sqrt(w.shape[1])
        w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)
        b.copy_((torch.rand(b.shape, generator=g) * 2 - 1) * 0.1)


# ---- statistics ------------------------------------------------------------------------------------
# upper 0.1% points of the chi-square distribution, by degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def chi_square(counts, probs) -> float:
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() * np.asarray(probs, np.float64)
    return float(((counts - expected) ** 2 / expected).sum())
