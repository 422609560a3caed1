"""Throughput of the PEARL gradient step against this machine's GEMM roofline, the per-phase split
of a meta-training iteration, env steps/s and policy-inference latency.  Prints tables; asserts
nothing about time.

    python benchmarks/throughput.py [--steps 20] [--threads 1] [--phases] [--phase-train-steps 1000]

Roofline: every matrix multiply of one gradient step (forward, grad-input and grad-weight GEMMs of
each layer, for the paper's shapes) is listed from the layer shapes and timed alone in a pure
``torch.mm`` loop; FLOPs / that time is the GEMM throughput this machine reaches on those shapes.
The gradient step's fraction of the roofline is (step FLOPs / step time) / that throughput.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from metarelabel.pearl import PEARL, Dims
from metarelabel.presets import make_config

# (name, obs, act, meta_batch, batch, context, family preset used for the other fields)
SHAPES = [
    ("four-corners paper", 2, 2, 8, 256, 1024, "four-corners"),
    ("cheetah-vel shapes", 20, 6, 16, 256, 100, "four-corners"),
]


def layer_dims(in_dim: int, hidden: int, layers: int, out_dim: int) -> list[tuple[int, int]]:
    dims = [in_dim] + [hidden] * layers + [out_dim]
    return list(zip(dims[:-1], dims[1:]))


def step_gemms(o: int, a: int, L: int, M: int, B: int, C: int, h: int = 300, nl: int = 3, eh: int = 200, enl: int = 3):
    """All GEMMs of one gradient step as (rows, in, out, kind) with kind in fwd/dx/dw.

    Passes: encoder fwd+bwd (M*C rows, no grad w.r.t. its data input); policy fwd+bwd; twin Q on
    (s, a) fwd+bwd (its input grad feeds z -> encoder); V fwd+bwd; target V fwd; twin Q on
    (s, a~) fwd + grad-input (for the policy loss) — its weight grads are not needed."""
    R, Rc = M * B, M * C
    g = []

    def net(rows, dims, fwd=True, dx=True, dw=True, heads=1, first_dx=False):
        for i, (i_d, o_d) in enumerate(dims):
            for _ in range(heads):
                if fwd:
                    g.append((rows, i_d, o_d, "fwd"))
                if dw:
                    g.append((rows, i_d, o_d, "dw"))
                if dx and (i > 0 or first_dx):
                    g.append((rows, i_d, o_d, "dx"))

    net(Rc, layer_dims(o + a + 1, eh, enl, 2 * L))
    pol = layer_dims(o + L, h, nl, a)
    net(R, pol[:-1] + [(h, 2 * a)])  # mean and log-std heads
    net(R, layer_dims(o + a + L, h, nl, 1), heads=2, first_dx=True)
    net(R, layer_dims(o + L, h, nl, 1))
    net(R, layer_dims(o + L, h, nl, 1), dx=False, dw=False)
    net(R, layer_dims(o + a + L, h, nl, 1), heads=2, dw=False, first_dx=True)
    return g


def gemm_flops(gemms) -> float:
    return sum(2.0 * r * i * o for r, i, o, _ in gemms)


def time_gemms(gemms, repeats: int) -> float:
    """Seconds for one pass over ``gemms`` with plain torch.mm (median of repeats)."""
    ops = []
    for r, i, o, kind in gemms:
        if kind == "fwd":
            ops.append((torch.randn(r, i), torch.randn(i, o)))
        elif kind == "dx":
            ops.append((torch.randn(r, o), torch.randn(o, i)))
        else:
            ops.append((torch.randn(i, r), torch.randn(r, o)))
    outs = [torch.empty(x.shape[0], w.shape[1]) for x, w in ops]
    times = []
    for rep in range(repeats + 2):
        t0 = time.perf_counter()
        for (x, w), out in zip(ops, outs):
            torch.mm(x, w, out=out)
        if rep >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_step(o, a, M, B, C, family, steps: int, seed: int = 0):
    cfg = make_config(family, "paper", {"meta_batch": M, "batch_size": B, "embedding_batch_size": C})
    torch.manual_seed(seed)
    agent = PEARL(Dims(o, a, cfg.latent_dim), cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    batch = {"obs": torch.randn(M, B, o, generator=gen), "actions": torch.rand(M, B, a, generator=gen) * 2 - 1,
             "rewards": torch.randn(M, B, 1, generator=gen), "next_obs": torch.randn(M, B, o, generator=gen),
             "terminals": torch.zeros(M, B, 1)}
    context = torch.randn(M, C, o + a + 1, generator=gen)
    for _ in range(3):
        agent.update(batch, context)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        agent.update(batch, context)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), agent


def policy_latency(agent, o: int, n: int = 2000) -> float:
    z = agent.prior_z()
    obs = torch.zeros(o).numpy()
    for _ in range(50):
        agent.act(obs, z)
    t0 = time.perf_counter()
    for _ in range(n):
        agent.act(obs, z)
    return (time.perf_counter() - t0) / n


def phase_split(family: str, train_steps: int, relabel: str) -> dict[str, float]:
    from metarelabel.trainer import Trainer

    cfg = make_config(family, "paper", {"num_iterations": 1, "num_train_steps_per_itr": train_steps, "relabel": relabel})
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(cfg, run_dir, echo=lambda *a: None, tensorboard=False)
        tr.initial_collection()
        row = tr.run_iteration()
    return {k: v for k, v in row.items() if k.startswith("time/")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed gradient steps per shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--phases", action="store_true", help="also run one real paper iteration per phase split")
    ap.add_argument("--phase-train-steps", type=int, default=1000)
    ap.add_argument("--relabel", default="hfr")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print("gradient step vs GEMM roofline")
    print(f"{'shape':<22}{'GFLOP/step':>11}{'GEMM GFLOP/s':>14}{'step ms':>10}{'step GFLOP/s':>14}{'of roofline':>13}")
    agents = {}
    for name, o, a, M, B, C, fam in SHAPES:
        gemms = step_gemms(o, a, 5, M, B, C)
        flops = gemm_flops(gemms)
        t_gemm = time_gemms(gemms, repeats=max(5, args.steps // 2))
        t_step, agent = time_step(o, a, M, B, C, fam, args.steps)
        agents[name] = (agent, o)
        peak = flops / t_gemm
        achieved = flops / t_step
        print(f"{name:<22}{flops / 1e9:>11.2f}{peak / 1e9:>14.1f}{t_step * 1e3:>10.1f}{achieved / 1e9:>14.1f}{achieved / peak:>12.0%}")
    print("\npolicy inference latency per env step (one observation, CPU)")
    for name, (agent, o) in agents.items():
        print(f"  {name:<22}{policy_latency(agent, o) * 1e6:8.1f} us")
    print("\nenv steps/s (benchmarks/env_steps.py, random actions)")
    import env_steps  # benchmarks/env_steps.py, beside this file

    env_steps.main(["--steps", "2000", "--repeats", "1"])
    if args.phases:
        print(f"\nper-phase split of one four-corners paper iteration (relabel={args.relabel}, "
              f"{args.phase_train_steps} gradient steps)")
        t = phase_split("four-corners", args.phase_train_steps, args.relabel)
        total = t["time/iteration_s"]
        for k in ("time/collect_s", "time/relabel_s", "time/log_z_s", "time/train_s", "time/eval_s"):
            print(f"  {k:<20}{t[k]:9.2f} s  {t[k] / total:6.1%}")
        other = total - t["time/train_s"]
        print(f"  {'non-gradient work':<20}{other:9.2f} s  {other / total:6.1%}")
        print(f"  {'iteration':<20}{total:9.2f} s")


if __name__ == "__main__":
    main()
