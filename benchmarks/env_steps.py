"""Environment steps per second for every installed task family, and the cost of the batched
hindsight reward over all of a family's tasks.

    python benchmarks/env_steps.py [--steps 5000] [--repeats 3] [--families a,b,...]

Each family (families whose extra is not installed are listed as skipped) is stepped with
uniform random actions in its action box, ``--steps`` steps per repeat, resetting at
termination/truncation (reset time included: this is what a rollout pays, without the policy).
``step`` includes the family's own reward (the batched reward on a one-step slice).  Reported:
the median over repeats of steps/s, and the median time of one ``reward(infos, all tasks)`` call
on a horizon-long path (what relabeling pays per path for the hindsight rewards of all tasks).
Image families (``image_obs``, e.g. ``visual-reacher``) also report the median time of one
offscreen frame (``render_image``; steps/s already include one frame per step).
Single process, ``time.perf_counter``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from metarelabel.envs import REGISTRY, family_class
from metarelabel.errors import ConfigError


def steps_per_second(env, n_steps: int, rng: np.random.Generator) -> tuple[float, dict]:
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, size=(n_steps,) + low.shape)
    env.reset()
    infos = {k: [] for k in env.info_spec}
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, trunc, info = env.step(a)
        if len(infos[next(iter(infos))]) < env.horizon:
            for k in infos:
                infos[k].append(info[k])
        if term or trunc:
            env.reset()
    dt = time.perf_counter() - t0
    return n_steps / dt, {k: np.asarray(v) for k, v in infos.items()}


def reward_time(env, infos, repeats: int = 20) -> float:
    tasks = np.arange(env.num_tasks)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        env.reward(infos, tasks)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def render_ms(env, frames: int = 500) -> float:
    """Median over 5 repeats of the time of one ``render_image`` call, in ms."""
    env.render_image()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(frames):
            env.render_image()
        times.append((time.perf_counter() - t0) / frames)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", default=",".join(REGISTRY))
    args = ap.parse_args(argv)
    try:
        import mujoco

        mj = f"mujoco {mujoco.__version__}"
    except ImportError:
        mj = "mujoco not installed"
    print(f"python {platform.python_version()}, numpy {np.__version__}, {mj}, {platform.machine()}")
    print(f"{args.steps} random-action steps x {args.repeats} repeats (median)\n")
    header = (f"{'family':<20} {'obs':>8} {'act':>4} {'tasks':>6} {'steps/s':>10} {'reward(all tasks, T=H)':>24}"
              f" {'render ms/frame':>16}")
    print(header)
    print("-" * len(header))
    for name in args.families.split(","):
        try:
            cls = family_class(name)
        except ConfigError as exc:
            print(f"{name:<20} skipped: {exc}")
            continue
        env = cls(task_seed=0)
        env.reset(seed=0)
        env.set_task(0)
        rng = np.random.default_rng(0)
        rates, infos = [], None
        for _ in range(args.repeats):
            rate, infos = steps_per_second(env, args.steps, rng)
            rates.append(rate)
        t_rew = reward_time(env, infos)
        T = len(next(iter(infos.values())))
        obs = "x".join(str(d) for d in env.observation_space.shape)
        act = env.action_space.shape[0]
        render = f"{render_ms(env):.3f}" if getattr(env, "image_obs", False) else "-"
        print(f"{name:<20} {obs:>8} {act:>4} {env.num_tasks:>6} {statistics.median(rates):>10,.0f} "
              f"{t_rew * 1e3:>15.3f} ms (T={T}) {render:>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
