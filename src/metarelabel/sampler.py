"""Trajectory collection with the current policy and a given task latent z.

Actions from the policy live in [-1, 1]; they are mapped affinely onto the environment's action
box before ``step`` and stored in the buffers as the policy produced them.
"""
from __future__ import annotations

import numpy as np
import torch

from .buffers import Path
from .envs.base import TaskFamily


def rollout(env: TaskFamily, agent, z: torch.Tensor, max_path_length: int, deterministic: bool = False) -> Path:
    """One trajectory on the env's current task; stops on termination or at the length limit."""
    low = env.action_space.low.astype(np.float64)
    high = env.action_space.high.astype(np.float64)
    obs, _ = env.reset()
    rows = {k: [] for k in ("obs", "actions", "rewards", "dense_rewards", "terminals", "next_obs", "success")}
    infos = {k: [] for k in env.info_spec}
    for _ in range(max_path_length):
        action = agent.act(obs, z, deterministic)
        env_action = low + (action.astype(np.float64) + 1.0) * 0.5 * (high - low)
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
    return Path(
        obs=np.asarray(rows["obs"], f32), actions=np.asarray(rows["actions"], f32),
        rewards=np.asarray(rows["rewards"], np.float64), dense_rewards=np.asarray(rows["dense_rewards"], np.float64),
        terminals=np.asarray(rows["terminals"], bool), next_obs=np.asarray(rows["next_obs"], f32),
        success=np.asarray(rows["success"], bool), infos={k: np.asarray(v) for k, v in infos.items()},
        task=env.task,
    )


def context_from(batch: dict[str, np.ndarray], reward_key: str, use_next_obs: bool) -> np.ndarray:
    """Context transitions ``[..., obs + act + 1 (+ obs)]`` from buffer samples."""
    parts = [batch["obs"], batch["actions"], batch[reward_key]]
    if use_next_obs:
        parts.append(batch["next_obs"])
    return np.concatenate(parts, -1)


def path_context(path: Path, rewards: np.ndarray, use_next_obs: bool) -> np.ndarray:
    """Context ``[T, dim]`` of one path with the given per-step rewards."""
    parts = [path.obs, path.actions, np.asarray(rewards, np.float32).reshape(-1, 1)]
    if use_next_obs:
        parts.append(path.next_obs)
    return np.concatenate(parts, -1).astype(np.float32)
