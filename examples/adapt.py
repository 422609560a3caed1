"""Adapt a trained agent to each meta-test task through the adapt/act interface, and check the
result against `metarelabel eval`.

    python examples/adapt.py RUN_DIR_OR_AGENT_FILE [--seed 12345]

The loop below is the meta-test protocol (`pearl-online`): on each task the agent starts with
an empty context; it explores with z from the prior for the run's `exploration_trajectories`
trajectories, then acts with z from the posterior of everything it has observed.
"""
import argparse

import numpy as np

import metarelabel
from metarelabel.evaluation import evaluate_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a run directory or a file written by `metarelabel export`")
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args()

    agent = metarelabel.load_agent(args.run, seed=args.seed)
    cfg = agent.cfg
    env = agent.make_env()
    env.reset(seed=args.seed)
    finals = []
    for task in env.eval_tasks:
        for _ in range(cfg.eval_runs):
            env.set_task(int(task))
            agent.reset()  # a new task: forget the context
            steps, returns = 0, []
            while steps < cfg.eval_steps:  # trajectories until the protocol's step budget
                obs, _ = env.reset()
                ret = 0.0
                for _ in range(cfg.max_path_length):
                    action = agent.act(obs)  # deterministic, in the env's action space
                    next_obs, reward, terminated, truncated, info = env.step(action)
                    agent.observe(obs, action, reward, next_obs, info)
                    ret += reward
                    steps += 1
                    obs = next_obs
                    if terminated or truncated:
                        break
                agent.end_trajectory()  # the next trajectory draws its z (prior, then posterior)
                returns.append(ret)
            finals.append(returns[-1])
            mean, var = agent.posterior()
            print(f"task {int(task)}: returns {', '.join(f'{r:.1f}' for r in returns)}; "
                  f"posterior mean {np.round(mean, 2)}, std {np.sqrt(var).mean():.3f}")
    ours = float(np.mean(finals))
    print(f"meta-test return (last trajectory, mean over tasks and runs): {ours:.3f}")
    if agent.info["source"].get("checkpoint"):
        ref = evaluate_run(agent.info["source"]["run_dir"], seed=args.seed, rollouts="sequential",
                           checkpoint=agent.info["source"]["checkpoint"])["meta_test/return"]
        same = "equals" if abs(ref - ours) < 1e-6 else "DIFFERS FROM"
        print(f"{same} metarelabel eval --rollouts sequential --seed {args.seed}: {ref:.3f}")


if __name__ == "__main__":
    main()
