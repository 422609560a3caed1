"""Probe a trained Four-Corners run: where do its prior-z trajectories go, and does a context that
shows a goal make the posterior policy reach that goal?  Prints a table; asserts nothing.

    python benchmarks/probe_four_corners.py RUN_DIR [--trajectories 200] [--seed 0]

- prior: ``--trajectories`` deterministic rollouts with z ~ N(0, I) (the meta-test exploration):
  how many end within 0.2 of each corner, and of none;
- hand-made context: for each task k, one straight walk from the origin into corner k (its
  rewards under task k: -1 / -3 on the way, 0 and terminal at the goal); z ~ the posterior given
  that context; ``--trajectories`` deterministic rollouts; the fraction that reach goal k, the
  posterior's std and its mean's distance to the other tasks' means.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path as FsPath

import numpy as np
import torch

from metarelabel import checkpoint as ckpt
from metarelabel.buffers import Path
from metarelabel.config import load_config_json
from metarelabel.envs import make_family
from metarelabel.pearl import PEARL, make_dims
from metarelabel.sampler import path_context, rollout


def walk(env, k: int) -> Path:
    """A straight walk from (0, 0) to corner k in steps of 0.1 per coordinate."""
    goal = env.tasks[k]
    pos, rows = np.zeros(2), []
    for _ in range(env.horizon):
        nxt = pos + np.clip(goal - pos, -0.1, 0.1)
        rows.append((pos.copy(), np.clip(goal - pos, -0.1, 0.1) / 0.1, nxt.copy()))
        pos = nxt
        if np.linalg.norm(pos - goal) <= 0.2:
            break
    obs, act, nxt = (np.asarray(c, np.float32) for c in zip(*rows))
    infos = {"pos": np.asarray([r[2] for r in rows])}
    r, d, s = env.reward(infos, [k])
    return Path(obs=obs, actions=act, rewards=r[0], dense_rewards=r[0], terminals=d[0], next_obs=nxt, success=s[0],
                infos=infos, task=k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--trajectories", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = FsPath(args.run_dir)
    cfg = load_config_json(run / "config.json")
    meta = json.loads((run / "run.json").read_text())
    body = ckpt.load_latest(run / "checkpoints", run_id=meta.get("run_id"))
    env = make_family(cfg.family, cfg.task_seed)
    agent = PEARL(make_dims(env, cfg), cfg, torch.device("cpu"))
    agent.load_state_dict(body["payload"]["agent"], with_optimizers=False)
    torch.manual_seed(args.seed)
    env.reset(seed=args.seed)
    n, N = args.trajectories, env.num_tasks

    def reached(path) -> int:
        s = env.reward(path.infos, np.arange(N))[2].any(axis=1)
        return int(np.argmax(s)) if s.any() else -1

    ends = [reached(rollout(env, agent, agent.prior_z(), cfg.max_path_length, deterministic=True)) for _ in range(n)]
    counts = {k: ends.count(k) for k in range(-1, N)}
    print(f"iteration {body['iteration']}: {n} prior-z trajectories end at corner "
          + ", ".join(f"{k}: {counts[k]}" for k in range(N)) + f", none: {counts[-1]}")
    post = []
    for k in range(N):
        ctx = torch.as_tensor(path_context(walk(env, k), walk(env, k).rewards, cfg.use_next_obs_in_context)[None])
        with torch.no_grad():
            mu, var = agent.infer_posterior(ctx)
        post.append((mu[0], var[0]))
    print(f"{'task':>4} {'goal reached':>13} {'posterior std':>14} {'dist to other means':>20}")
    for k, (mu, var) in enumerate(post):
        env.set_task(k)
        hits = 0
        for _ in range(n):
            z = agent.sample_z(mu[None], var[None])
            hits += reached(rollout(env, agent, z, cfg.max_path_length, deterministic=True)) == k
        others = [float((mu - m).norm()) for j, (m, _) in enumerate(post) if j != k]
        print(f"{k:>4} {hits / n:>13.2f} {float(var.sqrt().mean()):>14.4f} {np.mean(others):>20.3f}")


if __name__ == "__main__":
    main()
