"""The Four-Corners didactic figure: the four goals and their -3 squares, trajectories of a
trained agent on each task, and, for a trajectory that hovers over one quadrant's square, the
relabeling distributions q(psi | tau) that HFR and HIPI assign, computed with the run's networks.

    metarelabel didactic RUN_DIR [--quadrant 1] [--out didactic.png]
"""
from __future__ import annotations

from pathlib import Path as FsPath

import numpy as np
import torch

from .buffers import Path
from .errors import ConfigError
from .relabel import RelabelContext, make_relabeler
from .sampler import path_context, rollout


def hovering_path(env, quadrant: int, steps: int = 20) -> Path:
    """A path collected on task ``quadrant`` that walks into that goal's -3 square and hovers
    there (at 0.3, 0.3 in the goal's quadrant) for the rest of the episode."""
    sign = np.sign(env.tasks[quadrant])
    target = 0.3 * sign
    pos = np.zeros(2)
    rows = {"obs": [], "actions": [], "pos": []}
    for t in range(steps):
        delta = np.clip(target - pos, -0.1, 0.1)
        if np.allclose(delta, 0):  # hover: small back-and-forth moves inside the square
            delta = 0.05 * sign * (1 if t % 2 else -1)
        rows["obs"].append(pos.copy())
        rows["actions"].append(delta / 0.1)
        pos = pos + delta
        rows["pos"].append(pos.copy())
    infos = {"pos": np.asarray(rows["pos"])}
    r, d, s = env.reward(infos, [quadrant])
    obs = np.asarray(rows["obs"], np.float32)
    return Path(obs=obs, actions=np.asarray(rows["actions"], np.float32), rewards=r[0], dense_rewards=r[0],
                terminals=d[0], next_obs=np.asarray(rows["pos"], np.float32), success=s[0], infos=infos,
                task=int(quadrant))


def agent_trajectories(trainer, task: int, exploration: int | None = None, steps: int | None = None):
    """The trajectories of the run's meta-test protocol on ``task`` (deterministic policy):
    the first ``exploration`` (default: the run's ``exploration_trajectories``) with z ~ prior,
    then z from the posterior of all context so far, until ``steps`` transitions (default: the
    run's ``eval_steps``)."""
    env, agent, cfg = trainer.evaluator.env, trainer.agent, trainer.cfg
    exploration = cfg.exploration_trajectories if exploration is None else exploration
    steps = cfg.eval_steps if steps is None else steps
    env.set_task(task)
    contexts, paths, n = [], [], 0
    while n < steps:
        if len(paths) < exploration:
            z = agent.prior_z()
        else:
            ctx = torch.as_tensor(np.concatenate(contexts)[None], device=agent.device)
            with torch.no_grad():
                z = agent.sample_z(*agent.infer_posterior(ctx))
        p = rollout(env, agent, z, cfg.max_path_length, deterministic=True)
        contexts.append(path_context(p, getattr(p, cfg.context_reward_key), cfg.use_next_obs_in_context))
        paths.append(p)
        n += len(p)
    return paths


def relabel_distributions(trainer, path: Path, hipi_cache_paths: list[Path]) -> dict[str, np.ndarray]:
    """q(psi | tau) of HFR (log Z estimated from the run's buffers) and of HIPI (log Z from the
    cache of ``hipi_cache_paths``)."""
    cfg = trainer.cfg.replace(relabel="hfr")
    out = {}
    for name in ("hfr", "hipi"):
        ctx = RelabelContext(cfg=cfg, family=trainer.env, learner=trainer.agent, rl_buffers=trainer.rl_buf,
                             enc_buffers=trainer.enc_buf, sampler_buffers=trainer.smp_buf,
                             rng=np.random.default_rng(0), num_tasks=trainer.num_tasks)
        rel = make_relabeler(name, ctx)
        if name == "hfr":
            rel.update_log_z()
            logits = rel.utilities([path])[0] - rel.log_z
        else:
            rel.observe(hipi_cache_paths)
            logits = rel.returns([path])[0] / cfg.hipi_temperature - rel.log_z()
        e = np.exp(logits - logits.max())
        out[name] = e / e.sum()
    return out


def didactic_figure(run_dir, out, quadrant: int = 1, echo=print) -> FsPath:
    from .plot import _need
    from .trainer import load_trainer

    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    trainer, body = load_trainer(run_dir)
    if trainer.cfg.family != "four-corners":
        raise ConfigError(f"didactic: needs a four-corners run, {run_dir} is {trainer.cfg.family}")
    if not 0 <= quadrant < trainer.num_tasks:
        raise ConfigError(f"didactic: --quadrant must be in [0, {trainer.num_tasks})")
    torch.manual_seed(0)
    trainer.evaluator.env.reset(seed=0)
    env = trainer.env
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    trajs = {k: agent_trajectories(trainer, k) for k in range(trainer.num_tasks)}
    cache = [p for k in trajs for p in trajs[k]]
    hover = hovering_path(env, quadrant)
    q = relabel_distributions(trainer, hover, cache)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5.4), gridspec_kw={"width_ratios": [1.1, 1]})
    for k, g in enumerate(env.tasks):
        sx, sy = np.sign(g)
        ax.add_patch(Rectangle((min(0.1 * sx, 0.5 * sx), min(0.1 * sy, 0.5 * sy)), 0.4, 0.4, color=colors[k], alpha=0.18))
        ax.add_patch(Circle(g, 0.2, fill=False, color=colors[k], lw=2))
        ax.plot(*g, marker="*", ms=14, color=colors[k])
        last = trajs[k][-1].infos["pos"]
        ax.plot(*np.vstack([[0, 0], last]).T, color=colors[k], lw=1.6, label=f"task {k}: return {trajs[k][-1].rewards.sum():.0f}")
    hp = np.vstack([[0, 0], hover.infos["pos"]])
    ax.plot(*hp.T, "k--", lw=1.2, marker=".", label=f"hovering path (task {quadrant})")
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    n_traj = ", ".join(str(len(trajs[k])) for k in range(trainer.num_tasks))
    ax.set_title(f"goals, -3 squares, agent after {int(body['iteration'])} iterations: last trajectory of the\n"
                 f"meta-test protocol ({trainer.cfg.exploration_trajectories} exploration, {n_traj} in all; "
                 f"{trainer.cfg.eval_steps} steps)", fontsize=9)
    width = 0.38
    idx = np.arange(trainer.num_tasks)
    bx.bar(idx - width / 2, q["hfr"], width, label="HFR", color="tab:purple")
    bx.bar(idx + width / 2, q["hipi"], width, label="HIPI", color="tab:gray")
    returns = env.reward(hover.infos, idx)[0].sum(1)
    bx.set_xticks(idx, [f"task {k}\nR={r:.0f}" for k, r in zip(idx, returns)])
    bx.set_ylim(0, 1.05)
    bx.set_ylabel("q(task | hovering path)")
    bx.legend()
    bx.set_title(f"relabeling distribution of the path hovering in task {quadrant}'s square", fontsize=9)
    fig.tight_layout()
    out = FsPath(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    if out.suffix == ".png":
        fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
    echo(f"HFR  q: {np.array2string(q['hfr'], precision=3)}")
    echo(f"HIPI q: {np.array2string(q['hipi'], precision=3)}")
    echo(f"wrote {out}")
    return out
