"""A trained agent in Python, without the replay buffers.

    agent = metarelabel.load_agent("runs/my-run")            # newest good checkpoint
    agent = metarelabel.load_agent("runs/my-run", checkpoint=40)
    agent = metarelabel.load_agent("agent.pt")               # written by `metarelabel export`

    env = agent.make_env(); env.set_task(k)
    agent.reset()                                 # new task: empty context
    obs, _ = env.reset()
    action = agent.act(obs)                       # in the env's action space
    next_obs, reward, terminated, truncated, info = env.step(action)
    agent.observe(obs, action, reward, next_obs, info)
    ...
    agent.end_trajectory()                        # the next trajectory draws a new z
    mean, var = agent.posterior()

z follows the run's meta-test protocol (``pearl-online``), drawn at each trajectory's first
``act``: the first ``exploration_trajectories`` trajectories use z ~ prior, each later one z
from the posterior of all context observed since ``reset``.  ``agent.run_task(env, k)`` runs
the whole protocol on one task.  With the same seed and order of calls, the returns equal
those of ``metarelabel eval --rollouts sequential`` (``examples/adapt.py`` is that loop).
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import checkpoint as ckpt
from .errors import CheckpointError, ConfigError, RunDirError
from .sampler import ActionMap

EXPORT_FORMAT = "metarelabel-agent"
EXPORT_VERSION = 1


def load_pearl(source, checkpoint=None, device: str | None = None, overrides: dict | None = None):
    """(cfg, env, PEARL networks, info) from a run directory (``checkpoint``: None = newest
    good one, an iteration, or a ``.pt`` path) or from an exported agent file."""
    import json

    from .config import build_config, load_config_json
    from .envs import make_family
    from .pearl import PEARL, make_dims
    from .sampler import resolve_device

    source = Path(source)
    if source.is_file():
        if checkpoint is not None:
            raise ConfigError("--checkpoint applies to a run directory, not to an exported agent file")
        try:
            body = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{source.name}: cannot be loaded ({type(exc).__name__})") from None
        if not isinstance(body, dict) or body.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{source}: not an agent written by `metarelabel export`")
        cfg = build_config({}, body["config"])
        modules, info = body["modules"], {k: body[k] for k in ("iteration", "env_steps", "source")}
    else:
        if not (source / "config.json").exists():
            raise RunDirError(f"{source} is not a metarelabel run directory (no config.json)")
        cfg = load_config_json(source / "config.json")
        try:
            run_id = json.loads((source / "run.json").read_text()).get("run_id")
        except (OSError, json.JSONDecodeError):
            run_id = None
        body, path = ckpt.load_chosen(source / "checkpoints", checkpoint, run_id=run_id)
        modules = body["payload"]["agent"]["modules"]
        info = {"iteration": int(body["iteration"]), "env_steps": int(body["payload"]["env_steps"]),
                "source": {"run_dir": str(source), "checkpoint": str(path), "run_id": run_id}}
    changes = dict(overrides or {})
    if device is not None:
        changes["device"] = device
    if changes:
        cfg = cfg.replace(**changes)
    dev = resolve_device(cfg.device)
    env = make_family(cfg.family, cfg.task_seed)
    pearl = PEARL(make_dims(env, cfg), cfg, dev)
    try:
        pearl.load_state_dict({"modules": modules}, with_optimizers=False)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match the run's config ({type(exc).__name__})") from None
    return cfg, env, pearl, info


def export_agent(run_dir, out, checkpoint=None) -> Path:
    """Write networks + config of one checkpoint (no buffers, no optimizer state) to ``out``."""
    from .provenance import provenance

    cfg, _, pearl, info = load_pearl(run_dir, checkpoint, device="cpu")
    out = Path(out)
    body = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": cfg.to_dict(),
            "modules": pearl.state_dict()["modules"], **info, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "provenance": provenance()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(out, lambda fh: torch.save(body, fh))
    except OSError as exc:
        raise RunDirError(f"cannot write {out}: {exc.strerror}") from None
    return out


class Agent:
    """Adapt-and-act interface of a trained PEARL agent (see the module docstring)."""

    def __init__(self, cfg, pearl, env, info: dict, seed: int = 12345):
        self.cfg, self.pearl, self.info = cfg, pearl, info
        self.device = pearl.device
        self._amap = ActionMap(env.action_space)
        self._image = bool(getattr(env, "image_obs", False))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.reset()

    @property
    def family(self) -> str:
        return self.cfg.family

    def make_env(self):
        """A fresh environment of the run's family and task set."""
        from .envs import make_family

        return make_family(self.cfg.family, self.cfg.task_seed)

    def reset(self) -> None:
        """Forget all context (a new task); the next trajectory's z comes from the prior."""
        self._paths: list[dict] = []
        self._current = self._new_path()
        self._last = None
        self.z = None  # drawn at the trajectory's first act(), per the protocol

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        """The action for ``obs`` under the trajectory's z, in the environment's action space."""
        if self.z is None:
            self.z = self._draw_z()
        with torch.no_grad():
            a = self.pearl.act(obs, self.z, deterministic)
        env_a = self._amap.to_env(a)
        self._last = (env_a, a)
        return env_a

    def observe(self, obs, action, reward, next_obs, info: dict | None = None) -> None:
        """Add one transition to the context.  ``reward`` is the environment's; where the run's
        encoder reads the dense reward (``context_reward = dense``) it is taken from
        ``info['dense_reward']``."""
        if self._last is not None and np.array_equal(np.asarray(action, np.float64), self._last[0]):
            a = self._last[1]  # the policy's own action, bit for bit
        else:
            a = self._amap.to_policy(action)
        if self.cfg.context_reward_key == "dense_rewards":
            if info is None or "dense_reward" not in info:
                raise ConfigError("this run's encoder reads the dense reward: pass the step's info to observe()")
            reward = info["dense_reward"]
        odt = np.uint8 if self._image else np.float32
        p = self._current
        p["obs"].append(np.asarray(obs, odt))
        p["actions"].append(np.asarray(a, np.float32))
        p["rewards"].append(float(reward))
        p["next_obs"].append(np.asarray(next_obs, odt))

    def end_trajectory(self) -> None:
        """Close the current trajectory; the next one draws its z per the protocol."""
        if self._current["obs"]:
            self._paths.append(self._current)
        self._current = self._new_path()
        self.z = None

    @property
    def exploring(self) -> bool:
        """Whether the current (or next) trajectory is an exploration one (z ~ prior)."""
        return len(self._paths) < self.cfg.exploration_trajectories

    def run_task(self, env, task: int, steps: int | None = None, on_step=None) -> list[dict]:
        """The meta-test protocol on ``task`` of ``env``: ``reset``, then trajectories until
        ``steps`` transitions (default: the run's ``eval_steps``).  Returns one record per
        trajectory: ``exploration`` (bool), ``return``, ``success``, ``infos`` (the family's
        per-step quantities, e.g. positions).  ``on_step(env, record)`` runs after each step."""
        steps = self.cfg.eval_steps if steps is None else int(steps)
        env.set_task(int(task))
        self.reset()
        out, n = [], 0
        while n < steps:
            rec = {"exploration": self.exploring, "return": 0.0, "success": False, "infos": [], "start": None}
            obs, _ = env.reset()
            rec["start"] = np.asarray(obs).copy()
            for _ in range(self.cfg.max_path_length):
                action = self.act(obs)
                next_obs, reward, terminated, truncated, info = env.step(action)
                self.observe(obs, action, reward, next_obs, info)
                rec["return"] += float(reward)
                rec["success"] = rec["success"] or bool(info.get("success", False))
                rec["infos"].append({k: np.asarray(info[k]).copy() for k in env.info_spec if k in info})
                n += 1
                if on_step is not None:
                    on_step(env, rec)
                obs = next_obs
                if terminated or truncated:
                    break
            self.end_trajectory()
            out.append(rec)
        return out

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) of z given all context since ``reset`` (the prior if none)."""
        if not self._paths and not self._current["obs"]:
            L = self.pearl.dims.latent
            return np.zeros(L, np.float32), np.ones(L, np.float32)
        mu, var = self._posterior_tensors(include_current=True)
        return mu[0].cpu().numpy(), var[0].cpu().numpy()

    # ---- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _new_path() -> dict:
        return {"obs": [], "actions": [], "rewards": [], "next_obs": []}

    def _draw_z(self) -> torch.Tensor:
        if self.exploring or not self._paths:
            return self._prior()
        mu, var = self._posterior_tensors()
        if not self.cfg.use_information_bottleneck:
            return mu
        return mu + var.sqrt() * torch.randn(mu.shape, generator=self.generator, device=self.device)

    def _prior(self) -> torch.Tensor:
        L = self.pearl.dims.latent
        if not self.cfg.use_information_bottleneck:
            return torch.zeros(1, L, device=self.device)
        return torch.randn(1, L, generator=self.generator, device=self.device)

    def _posterior_tensors(self, include_current: bool = False):
        from .sampler import context_tensor, path_context, stack_contexts

        paths = self._paths + ([self._current] if include_current and self._current["obs"] else [])
        ctxs = [path_context(SimpleNamespace(obs=np.stack(p["obs"]), actions=np.stack(p["actions"]),
                                             next_obs=np.stack(p["next_obs"])),
                             np.asarray(p["rewards"], np.float32), self.cfg.use_next_obs_in_context) for p in paths]
        with torch.no_grad():
            return self.pearl.infer_posterior(context_tensor(stack_contexts(ctxs), self.device))


def load_agent(source, checkpoint=None, device: str | None = None, seed: int = 12345) -> Agent:
    """A trained agent from a run directory (``checkpoint``: None = the newest good one, an
    iteration number, or a ``.pt`` path) or from a file written by ``metarelabel export``.
    ``seed`` seeds the agent's z draws."""
    cfg, env, pearl, info = load_pearl(source, checkpoint, device)
    return Agent(cfg, pearl, env, info, seed=seed)
