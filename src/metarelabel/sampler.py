"""Trajectory collection with the current policy and a given task latent z.

Actions from the policy live in [-1, 1]; they are mapped affinely onto the environment's action
box before ``step`` and stored in the buffers as the policy produced them.

Contexts: for vector observations a float32 array ``[..., obs + act + 1 (+ obs)]``; for image
observations (uint8) a dict ``{"obs", "actions", "rewards"[, "next_obs"]}`` of arrays with the
same leading dims, which the learner embeds (``PEARL.context_features``).  ``context_tensor``
moves either to a device; ``stack_contexts`` joins several along the transition axis.
"""
from __future__ import annotations

import numpy as np
import torch

from .buffers import Path
from .envs.base import TaskFamily
from .errors import ConfigError


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Keep freed activation-sized blocks in the process instead of returning them to the OS
    after every use (glibc only; once per process): glibc serves blocks over 128 KiB with mmap
    and unmaps them on free, so every gradient step page-faults its 128-512 KiB activations in
    anew.  Blocks up to 16 MiB now come from the heap, which is trimmed past 128 MiB of free
    top memory.  Measured on this project's CPU: the lean step about 20% faster, the reference
    step about 8%."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: keep the platform's allocator as it is
        pass


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` as a torch device (a clear error without CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(name)


class ActionMap:
    """The affine map between the policy's actions in [-1, 1] and an environment's action box
    (float64 arithmetic; ``to_policy`` inverts ``to_env`` up to rounding)."""

    def __init__(self, space):
        self.low = space.low.astype(np.float64)
        self.high = space.high.astype(np.float64)
        self.width = self.high - self.low

    def to_env(self, action: np.ndarray) -> np.ndarray:
        return self.low + (action.astype(np.float64) + 1.0) * 0.5 * self.width

    def to_policy(self, env_action) -> np.ndarray:
        return (2.0 * (np.asarray(env_action, np.float64) - self.low) / self.width - 1.0).astype(np.float32)


def rollout(env: TaskFamily, agent, z: torch.Tensor, max_path_length: int, deterministic: bool = False) -> Path:
    """One trajectory on the env's current task; stops on termination or at the length limit."""
    amap = ActionMap(env.action_space)
    obs, _ = env.reset()
    rows = {k: [] for k in ("obs", "actions", "rewards", "dense_rewards", "terminals", "next_obs", "success")}
    infos = {k: [] for k in env.info_spec}
    for _ in range(max_path_length):
        action = agent.act(obs, z, deterministic)
        env_action = amap.to_env(action)
        next_obs, reward, terminated, truncated, info = env.step(env_action)
        rows["obs"].append(obs)
        rows["actions"].append(action)
        rows["rewards"].append(reward)
        rows["dense_rewards"].append(info.get("dense_reward", reward))
        rows["terminals"].append(terminated)
        rows["next_obs"].append(next_obs)
        rows["success"].append(info.get("success", False))
        for k in infos:
            infos[k].append(info[k])
        obs = next_obs
        if terminated or truncated:
            break
    f32 = np.float32
    odt = np.uint8 if getattr(env, "image_obs", False) else f32
    return Path(
        obs=np.asarray(rows["obs"], odt), actions=np.asarray(rows["actions"], f32),
        rewards=np.asarray(rows["rewards"], np.float64), dense_rewards=np.asarray(rows["dense_rewards"], np.float64),
        terminals=np.asarray(rows["terminals"], bool), next_obs=np.asarray(rows["next_obs"], odt),
        success=np.asarray(rows["success"], bool), infos={k: np.asarray(v) for k, v in infos.items()},
        task=env.task,
    )


def _is_image(obs) -> bool:
    return obs.dtype in (np.uint8, torch.uint8) if hasattr(obs, "dtype") else np.asarray(obs).dtype == np.uint8


def context_from(batch: dict, reward_key: str, use_next_obs: bool):
    """Context transitions ``[..., obs + act + 1 (+ obs)]`` from buffer samples (a dict of
    arrays for image observations); numpy arrays, or torch tensors from a device mirror."""
    if _is_image(batch["obs"]):
        ctx = {"obs": batch["obs"], "actions": batch["actions"], "rewards": batch[reward_key]}
        if use_next_obs:
            ctx["next_obs"] = batch["next_obs"]
        return ctx
    parts = [batch["obs"], batch["actions"], batch[reward_key]]
    if use_next_obs:
        parts.append(batch["next_obs"])
    return torch.cat(parts, -1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, -1)


def path_context(path: Path, rewards: np.ndarray, use_next_obs: bool) -> np.ndarray:
    """Context ``[T, dim]`` of one path with the given per-step rewards (a dict of arrays for
    image observations)."""
    if _is_image(path.obs):
        ctx = {"obs": path.obs, "actions": path.actions, "rewards": np.asarray(rewards, np.float32).reshape(-1, 1)}
        if use_next_obs:
            ctx["next_obs"] = path.next_obs
        return ctx
    parts = [path.obs, path.actions, np.asarray(rewards, np.float32).reshape(-1, 1)]
    if use_next_obs:
        parts.append(path.next_obs)
    return np.concatenate(parts, -1).astype(np.float32)


def context_tensor(ctx, device):
    """A context (array or dict of arrays) as torch tensors on ``device``."""
    if isinstance(ctx, dict):
        return {k: torch.as_tensor(v, device=device) for k, v in ctx.items()}
    return torch.as_tensor(ctx, device=device)


def stack_contexts(contexts: list):
    """Join per-path contexts ``[T_i, ...]`` along the transition axis into one ``[1, sum T, ...]``."""
    if isinstance(contexts[0], dict):
        return {k: np.concatenate([c[k] for c in contexts], 0)[None] for k in contexts[0]}
    return np.concatenate(contexts, 0)[None]
