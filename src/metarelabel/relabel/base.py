"""The relabeling interface (SPEC section 4).

After every batch of collected paths the trainer calls ``Relabeler.assign(paths, groups)``; it returns,
for each path, the task each transition is filed under (an int array of the path's length; a
constant array for whole-path strategies).  The trainer then recomputes rewards, terminals and
success under the assigned task from the stored per-step info and writes the path to that task's
RL (and, when the phase feeds it, encoder) buffer; the sampler buffer always keeps the original.

Strategies talk to the learner only through a small protocol (``Learner`` below), so they work
with any off-policy meta-RL learner that implements it.  PEARL does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ..buffers import Path, TaskBuffers
from ..errors import NonFiniteError


def check_finite(name: str, values) -> None:
    """Raise ``NonFiniteError('relabel/<name>')`` if any value is NaN or inf."""
    v = np.asarray(values, np.float64)
    if not np.all(np.isfinite(v)):
        raise NonFiniteError(f"relabel/{name}", float(v[~np.isfinite(v)].ravel()[0]))


def until_first_terminal(terminals: np.ndarray) -> np.ndarray:
    """Boolean mask ``[..., T]``: steps up to and including the first terminal (per row) — the
    part of a path that is filed under a task when it is relabeled to it."""
    d = np.asarray(terminals, bool)
    return (np.cumsum(d, axis=-1) - d) == 0


def sample_categorical(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of the row-stochastic matrix ``q`` (inverse CDF)."""
    u = rng.random((q.shape[0], 1))
    idx = (np.cumsum(q, axis=1) < u).sum(axis=1)
    return np.minimum(idx, q.shape[1] - 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(q: np.ndarray) -> np.ndarray:
    return -(q * np.log(np.clip(q, 1e-300, None))).sum(-1)


class Learner(Protocol):
    """What a relabeling strategy needs from an off-policy meta-RL learner (all batched)."""

    device: torch.device
    dims: Any  # .obs, .act, .latent, .context (context transition width), .use_next_obs

    def infer_posterior(self, context: torch.Tensor, mask: torch.Tensor | None = None):
        """(mu, var) ``[K, L]`` from contexts ``[K, T, context]`` (mask ``[K, T]``); for image
        observations also a dict ``{"obs", "actions", "rewards"[, "next_obs"]}``."""

    def embed_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Features ``[..., feat]`` of observations (identity for vector observations)."""

    def sample_z(self, mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(mu, var); ``eps`` optional explicit standard-normal noise."""

    def start_state_value(self, starts: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``[K]``: mean over B start states ``[K, B, *obs_shape]`` of min Q(s, a~pi(.|s,z), z)."""

    def td_error(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``[K]``: twin-critic squared Bellman error of batches ``[K, B, .]`` under z ``[K, L]``."""

    def min_q(self, x: torch.Tensor) -> torch.Tensor:
        """min over critics of Q on rows ``[n, feat + act + latent]`` (embedded observations)."""


@dataclass
class RelabelContext:
    """Everything a strategy may use."""

    cfg: Any
    family: Any
    learner: Learner
    rl_buffers: TaskBuffers
    enc_buffers: TaskBuffers
    sampler_buffers: TaskBuffers
    rng: np.random.Generator
    num_tasks: int
    extras: dict = field(default_factory=dict)


class Relabeler:
    """Base class: the keep-original coin, bookkeeping and diagnostics.  Subclasses implement
    ``choose`` (and, when they normalise by a partition function, ``update_log_z``)."""

    name: ClassVar[str] = ""
    #: flip the keep-original coin per batch of paths (Random does not)
    uses_keep_original: ClassVar[bool] = True

    def __init__(self, ctx: RelabelContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        n = ctx.num_tasks
        self.matrix = np.zeros((n, n), np.float64)
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.stats: dict[str, list] = {"paths": [0], "moved": [0.0], "transitions": [0]}
        self.values: dict[str, list[np.ndarray]] = {}

    def _record(self, key: str, value) -> None:
        self.values.setdefault(key, []).append(np.asarray(value, np.float64).ravel())

    # ---- main entry ---------------------------------------------------------------------------
    def assign(self, paths: list[Path], groups=None) -> list[np.ndarray]:
        """Assignments of a batch of paths.  ``groups`` (one label per path; default: one
        group) says which paths came from one sampler call: each group flips its own
        keep-original coin (in order of first appearance), and ``choose`` sees every path of
        the groups that were not kept, in one call."""
        if not paths:
            return []
        labels = [0] * len(paths) if groups is None else list(groups)
        coins: dict = {}
        for g in labels:
            if g not in coins:
                coins[g] = self.uses_keep_original and self.ctx.rng.random() < self.cfg.keep_original_prob
        out = [np.full(len(p), p.task, np.int64) for p in paths]
        todo = [i for i, g in enumerate(labels) if not coins[g]]
        if todo:
            for i, a in zip(todo, self.choose([paths[i] for i in todo])):
                out[i] = np.asarray(a, np.int64)
        for p, a in zip(paths, out):
            if np.all(a == a[0]):
                self.matrix[p.task, a[0]] += 1.0
            else:
                np.add.at(self.matrix[p.task], a, 1.0 / len(p))
            self.stats["paths"][0] += 1
            self.stats["transitions"][0] += len(p)
            self.stats["moved"][0] += float(np.sum(a != p.task))
        return out

    def choose(self, paths: list[Path]) -> list[np.ndarray]:
        raise NotImplementedError

    def draw(self, logits: np.ndarray) -> np.ndarray:
        """One task per row of ``logits`` ``[rows, N]``: a draw from q = softmax(logits), or its
        argmax with ``hardmax``.  Records the logits and the entropy of q."""
        q = softmax(logits)
        chosen = logits.argmax(axis=1) if self.cfg.hardmax else sample_categorical(q, self.ctx.rng)
        self._record("logits", logits)
        self._record("entropy", entropy(q))
        self.last_q = q
        return chosen.astype(np.int64)

    def update_log_z(self) -> None:
        """Recompute the partition function (once per iteration, after collection)."""

    def observe(self, paths: list[Path]) -> None:
        """See paths that were filed without relabeling (the initial collection)."""

    def on_gradient_step(self, tasks: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        """Called with each SAC batch (numpy, ``[M, B, .]``); for learned reward models."""

    # ---- diagnostics ----------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Per-iteration summary; resets the accumulators (not the matrix)."""
        total = max(self.stats["transitions"][0], 1)
        out = {"relabel/fraction_relabeled": self.stats["moved"][0] / total,
               "relabel/paths": int(self.stats["paths"][0])}
        for key, chunks in self.values.items():
            v = np.concatenate(chunks) if chunks else np.zeros(0)
            if v.size:
                out[f"relabel/{key}_mean"] = float(v.mean())
                out[f"relabel/{key}_min"] = float(v.min())
                out[f"relabel/{key}_max"] = float(v.max())
        self._reset_stats()
        return out

    def take_matrix(self) -> np.ndarray:
        """Original -> assigned task counts (paths; a per-transition split counts fractions)
        since the last call."""
        m = self.matrix.copy()
        self.matrix[:] = 0.0
        return m

    def state_dict(self) -> dict:
        return {"matrix": self.matrix.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.matrix[:] = np.asarray(state["matrix"])


REGISTRY: dict[str, type[Relabeler]] = {}


def register(cls: type[Relabeler]) -> type[Relabeler]:
    REGISTRY[cls.name] = cls
    return cls
