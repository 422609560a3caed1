"""Probe a trained Four-Corners run: where do its prior-z trajectories go, and does a context that
shows a goal make the posterior policy reach that goal?  Prints a table; asserts nothing.

    python benchmarks/probe_four_corners.py RUN_DIR [--trajectories 200] [--seed 0]

- prior: ``--trajectories`` deterministic rollouts with z ~ N(0, I) (the meta-test exploration):
  how many end within 0.2 of each corner, and of none;
- hand-made context: for each task k, one straight walk from the origin into corner k (its
  rewards under task k: -1 / -3 on the way, 0 and terminal at the goal); z ~ the posterior given
  that context; ``--trajectories`` deterministic rollouts; the fraction that reach goal k, the
  posterior's std and its mean's distance to the other tasks' means;
- reward-swapped walks: the walk into corner j with the rewards of task k (for k != j: "went to
  j and found no goal there"); the fraction of ``--trajectories // 5`` posterior rollouts that
  end at corner j.  High off the diagonal means the encoder reads *where the context went*, not
  its rewards;
- exploration: the meta-test protocol replayed (``eval_steps`` per (task, run), the first
  ``exploration_trajectories`` with an exploration z, then z from the posterior of all context so
  far, re-inferred after each trajectory; success = some post-exploration trajectory reaches the
  goal) with the exploration z drawn from the prior, as the protocol does, and instead from the
  posteriors of the four hand-made walks (one task hypothesis per trajectory, in random order):
  how much of the gap to full success is the exploration's;
- prior coverage: how many posterior stds each prior z lies from the nearest task's hand-made
  posterior (in PEARL, exploration is posterior sampling, which works when prior draws land where
  the policy was trained for some task), and whether its trajectory ends at that task's corner;
- precision shares: for the first replay of each task with the hand-made hypotheses, each
  exploration trajectory's share of the posterior precision (the sum over its transitions of
  the encoder's per-transition precisions, PEARL's product of Gaussians), with the corner it
  reached, and the task whose hand-made posterior mean lies nearest the resulting posterior mean.
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
from metarelabel.pearl import PEARL, make_dims, product_of_gaussians
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

    prior_zs, ends = [], []
    for _ in range(n):
        prior_zs.append(agent.prior_z())
        ends.append(reached(rollout(env, agent, prior_zs[-1], cfg.max_path_length, deterministic=True)))
    counts = {k: ends.count(k) for k in range(-1, N)}
    print(f"iteration {body['iteration']}: {n} prior-z trajectories end at corner "
          + ", ".join(f"{k}: {counts[k]}" for k in range(N)) + f", none: {counts[-1]}")
    walks = [walk(env, k) for k in range(N)]

    def posterior(contexts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, var) ``[L]`` from context arrays (concatenated)."""
        with torch.no_grad():
            mu, var = agent.infer_posterior(torch.as_tensor(np.concatenate(contexts)[None]))
        return mu[0], var[0]

    def reach_rate(mu, var, corner: int, m: int) -> float:
        """Fraction of ``m`` deterministic rollouts with z ~ N(mu, var) that end at ``corner``."""
        return float(np.mean([reached(rollout(env, agent, agent.sample_z(mu[None], var[None]), cfg.max_path_length,
                                              deterministic=True)) == corner for _ in range(m)]))

    def walk_context(w: Path, task: int) -> np.ndarray:
        """A walk's context with the rewards of ``task``."""
        return path_context(w, env.reward(w.infos, [task])[0][0], cfg.use_next_obs_in_context)

    post = [posterior([walk_context(walks[k], k)]) for k in range(N)]
    print(f"{'task':>4} {'goal reached':>13} {'posterior std':>14} {'dist to other means':>20}")
    for k, (mu, var) in enumerate(post):
        env.set_task(k)
        others = [float((mu - m).norm()) for j, (m, _) in enumerate(post) if j != k]
        print(f"{k:>4} {reach_rate(mu, var, k, n):>13.2f} {float(var.sqrt().mean()):>14.4f} {np.mean(others):>20.3f}")

    # prior coverage: how far the exploration's z's fall from where the policy was trained for a task
    means = torch.stack([mu for mu, _ in post])
    stds = torch.stack([var.sqrt() for _, var in post])
    zs = torch.cat(prior_zs)
    maha = (((zs[:, None] - means[None]) / stds[None]) ** 2).sum(-1).sqrt()  # [n, N], in posterior stds
    nearest = maha.argmin(1).numpy()
    dmin = maha.min(1).values.numpy()
    gaps = torch.pdist(means)
    print(f"prior coverage: the {n} prior z's lie {np.median(dmin):.1f} posterior stds (median; 10th pct "
          f"{np.percentile(dmin, 10):.1f}) from the nearest task's hand-made posterior, within 3 stds for "
          f"{np.mean(dmin <= 3):.2f} of them; Euclidean: prior z to the nearest mean "
          f"{float(torch.cdist(zs, means).min(1).values.median()):.2f} (median), between task means "
          f"{float(gaps.min()):.2f}-{float(gaps.max()):.2f}")
    print("  prior-z trajectory ends at the corner of the task whose posterior is nearest its z: "
          f"{np.mean(np.asarray(ends) == nearest):.2f}; at no corner: {np.mean(np.asarray(ends) == -1):.2f}")

    m = max(1, n // 5)
    print(f"walk into corner j, rewards of task k: fraction of {m} posterior rollouts ending at corner j")
    print("  j\\k " + " ".join(f"{k:>5}" for k in range(N)))
    for j in range(N):
        row = [reach_rate(*posterior([walk_context(walks[j], k)]), j, m) for k in range(N)]
        print(f"  {j:>3} " + " ".join(f"{x:>5.2f}" for x in row))

    print(f"mixed context: the four walks, all with task k's rewards (one reaches k's goal): fraction of {m} "
          "posterior rollouts reaching goal k")
    row = []
    for k in range(N):
        mu, var = posterior([walk_context(w, k) for w in walks])
        env.set_task(k)
        row.append(reach_rate(mu, var, k, m))
    print("  " + ", ".join(f"task {k}: {x:.2f}" for k, x in enumerate(row)))

    def precision_shares(k: int, contexts: list, ends: list) -> None:
        with torch.no_grad():
            mu_t, var = agent.transition_factors(torch.as_tensor(np.concatenate(contexts)))
            m, _ = product_of_gaussians(mu_t, var)
        per = (1.0 / var).sum(1).numpy()
        bounds = np.cumsum([0] + [len(c) for c in contexts])
        shares = [per[a:b].sum() / per.sum() for a, b in zip(bounds[:-1], bounds[1:])]
        near = int(torch.cdist(m[None], means).argmin())
        print(f"  task {k}: " + ", ".join(f"to {e if e >= 0 else 'none'} {sh:.2f}" for e, sh in zip(ends, shares))
              + f" -> posterior mean nearest task {near}")

    def episode(k: int, explore_z, shares: bool = False) -> bool:
        """One (task, run) of the protocol; ``explore_z(i)`` gives exploration trajectory i's z."""
        env.set_task(k)
        contexts, steps, i, hit, ends = [], 0, 0, False, []
        while steps < cfg.eval_steps:
            if shares and i == cfg.exploration_trajectories:
                precision_shares(k, contexts, ends)
            if i < cfg.exploration_trajectories:
                z = explore_z(i)
            else:
                mu, var = posterior(contexts)
                z = agent.sample_z(mu[None], var[None])
            path = rollout(env, agent, z, cfg.max_path_length, deterministic=True)
            contexts.append(path_context(path, path.rewards, cfg.use_next_obs_in_context))
            ends.append(reached(path))
            hit |= i >= cfg.exploration_trajectories and bool(path.success.any())
            steps, i = steps + len(path), i + 1
        return hit

    rng = np.random.default_rng(args.seed)
    runs = max(1, n // 10)

    def hypotheses():
        order = np.concatenate([rng.permutation(N) for _ in range(cfg.exploration_trajectories // N + 1)])
        return lambda i: agent.sample_z(post[order[i]][0][None], post[order[i]][1][None])

    rates = {"prior": [], "hand-made posteriors": []}
    print("precision share of each exploration trajectory (corner it reached), first replay with the hand-made hypotheses:")
    for k in range(N):
        rates["prior"].append(np.mean([episode(k, lambda i: agent.prior_z()) for _ in range(runs)]))
        rates["hand-made posteriors"].append(np.mean([episode(k, hypotheses(), shares=r == 0) for r in range(runs)]))
    print(f"meta-test success ({runs} runs per task), exploration z from:")
    for name, r in rates.items():
        print(f"  {name:>22}: {np.mean(r):.2f}  (per task " + ", ".join(f"{x:.2f}" for x in r) + ")")


if __name__ == "__main__":
    main()
