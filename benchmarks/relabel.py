"""Seconds per HFR-relabeled path and per log Z computation: the package's batched
implementation against a per-task-loop reference written here in the style of the original
research code.

    python benchmarks/relabel.py [--tasks 4,50,100,150] [--lengths 20,200] [--utility-batch 256]
                                 [--threads 1] [--quick]

Setup.  One PEARL agent with the four-corners ``paper`` network sizes (3 x 300 policy/Q/V, 3 x 200
encoder, latent 5, information bottleneck) is shared by every configuration; it takes a few
gradient steps on random data first so that Q is not at its near-zero initialisation (this makes
the parity check meaningful; timings do not depend on the weights).  For each N the task family is
PEARL's 2-D point robot subclassed to have exactly N train tasks (and horizon T); its RL buffer
(start states) and sampler buffer (log Z contexts) are filled with random data; the relabeled
paths are T-step random-action rollouts.  ``max_path_length`` = T, so log Z contexts have T
transitions, and ``log_z_samples`` = 20 (paper).

Batched (the package):  ``HFR.utilities([path])`` (one encoder pass over N x T context, one
policy + twin-critic pass over N x B start states) and ``HFR.update_log_z()`` (N x 20 contexts,
N x 20 x B rows).
Loop (reference, below):  per task, per-step reward calls, that task's context, encoder and
product of Gaussians, B start states, the policy, Q1 and Q2 as separate networks, min and mean;
log Z loops over tasks and over the 20 samples.

Timing: time.perf_counter; batched and loop calls alternate (so background load hits both alike);
a first call of each is a warm-up (kept as a measurement when it is long, since the cost is then
compute-bound); median over the repeats that fit a per-measurement time budget.
A parity check runs first: with the same start states and noise, both give the same U and log Z.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from metarelabel.buffers import TaskBuffers
from metarelabel.envs.point import PointRobot
from metarelabel.pearl import PEARL, Dims, product_of_gaussians
from metarelabel.presets import make_config
from metarelabel.relabel import RelabelContext, hfr, make_relabeler
from metarelabel.relabel.hfr import HFR
from metarelabel.sampler import context_from, path_context, rollout

CTX_KEYS = ("obs", "actions", "rewards", "next_obs")


# ---- setup -------------------------------------------------------------------------------------
def point_family(n_train: int, horizon: int) -> PointRobot:
    """PEARL's dense point robot with exactly ``n_train`` train tasks and horizon ``horizon``."""

    class BenchPointRobot(PointRobot):
        name = f"bench-point-robot-{n_train}"
        num_train = n_train
        num_eval = 0

    BenchPointRobot.horizon = horizon
    fam = BenchPointRobot(task_seed=0)
    fam.reset(seed=0)
    return fam


class RandomAgent:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def act(self, obs, z, deterministic=False):
        return self.rng.uniform(-1.0, 1.0, 2).astype(np.float32)


def random_paths(fam, n: int, T: int, seed: int):
    agent, paths = RandomAgent(seed), []
    for i in range(n):
        fam.set_task(i % fam.num_train)
        paths.append(rollout(fam, agent, None, T))
    return paths


def fill_random(buf: TaskBuffers, n: int, rng: np.random.Generator) -> None:
    for task in range(buf.num_tasks):
        rows = {"obs": rng.uniform(-1, 1, (n, buf.obs_dim)), "actions": rng.uniform(-1, 1, (n, buf.act_dim)),
                "rewards": -rng.uniform(0, 2, n), "dense_rewards": -rng.uniform(0, 2, n), "terminals": np.zeros(n),
                "next_obs": rng.uniform(-1, 1, (n, buf.obs_dim))}
        buf.add(task, rows)
        if buf.store_starts:  # one start state per stored "path"
            for s in rng.uniform(-1, 1, (min(n, 512), buf.obs_dim)):
                buf.starts[task, buf.start_ptr[task]] = s
                buf.start_ptr[task] += 1
                buf.start_size[task] += 1


def pretrain(agent: PEARL, cfg, steps: int, seed: int = 0) -> None:
    """A few PEARL gradient steps on random data so that Q has a non-trivial scale."""
    g = torch.Generator().manual_seed(seed)
    M, B, C, d = cfg.meta_batch, cfg.batch_size, 256, agent.dims
    for _ in range(steps):
        u = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
        batch = {"obs": u(M, B, d.obs), "actions": u(M, B, d.act), "rewards": -torch.rand(M, B, 1, generator=g) * 2,
                 "next_obs": u(M, B, d.obs), "terminals": torch.zeros(M, B, 1)}
        ctx = torch.cat([u(M, C, d.obs), u(M, C, d.act), -torch.rand(M, C, 1, generator=g) * 2], -1)
        agent.update(batch, ctx)


class Setup:
    """Family, buffers and the package's HFR relabeler for N train tasks and path length T."""

    def __init__(self, agent: PEARL, n: int, T: int, B: int, threads: int, seed: int = 0):
        # The paper four-corners config (validated), with this benchmark's T and B swapped in
        # without re-validation: the synthetic family is not registered, so the checks that tie
        # max_path_length to a registered family's horizon do not apply to it.
        base = make_config("four-corners", "paper", {"relabel": "hfr", "torch_threads": threads})
        self.cfg = dataclasses.replace(base, max_path_length=T, utility_batch_size=B)
        self.agent, self.n, self.T, self.B = agent, n, T, B
        self.fam = point_family(n, T)
        rng = np.random.default_rng(seed)
        d = agent.dims
        self.rl_buf = TaskBuffers(n, 2048, d.obs, d.act, store_starts=True)
        self.smp_buf = TaskBuffers(n, 2048, d.obs, d.act)
        enc_buf = TaskBuffers(n, 1, d.obs, d.act)
        fill_random(self.rl_buf, 2048, rng)
        fill_random(self.smp_buf, 2048, rng)
        self.rel: HFR = make_relabeler("hfr", RelabelContext(
            cfg=self.cfg, family=self.fam, learner=agent, rl_buffers=self.rl_buf, enc_buffers=enc_buf,
            sampler_buffers=self.smp_buf, rng=np.random.default_rng(seed + 1), num_tasks=n))
        self.loop_rng = np.random.default_rng(seed + 2)
        self.paths = random_paths(self.fam, 4, T, seed + 3)


# ---- the per-task-loop reference -----------------------------------------------------------------
def q_head(qf, head: int, x: torch.Tensor) -> torch.Tensor:
    """One of the twin critics as its own network (a slice of TwinQ's stacked weights)."""
    last = len(qf.weights) - 1
    for i, (w, b) in enumerate(zip(qf.weights, qf.biases)):
        x = torch.addmm(b[head], x, w[head])
        if i < last:
            x = F.relu(x)
    return x.squeeze(-1)


def loop_value(agent: PEARL, context: np.ndarray, starts: np.ndarray, z_eps=None, a_eps=None) -> torch.Tensor:
    """U for one task: z ~ q(z | context), mean over starts of min(Q1, Q2)(s, a~, z)."""
    L = agent.dims.latent
    out = agent.encoder(torch.as_tensor(context)[None])  # [1, T, 2L]
    mu, var = product_of_gaussians(out[..., :L], F.softplus(out[..., L:]))
    z = mu + var.sqrt() * (torch.randn_like(mu) if z_eps is None else z_eps[None])  # [1, L]
    s = torch.as_tensor(starts)  # [B, obs]
    zb = z.expand(s.shape[0], L)
    action = agent.policy(torch.cat([s, zb], -1), eps=a_eps)[0]
    sa = torch.cat([s, action, zb], -1)
    q1 = q_head(agent.qf, 0, sa)
    q2 = q_head(agent.qf, 1, sa)
    return torch.min(q1, q2).mean()


@torch.no_grad()
def loop_utilities(st: Setup, paths, starts=None, z_eps=None, a_eps=None) -> np.ndarray:
    """U [P, N] one path and one task at a time (``starts`` [N, B, obs], ``z_eps`` [P*N, L],
    ``a_eps`` [P*N, B, act] fix the draws; otherwise they are drawn per task)."""
    fam, n, B = st.fam, st.n, st.B
    U = np.zeros((len(paths), n))
    for p, path in enumerate(paths):
        for k in range(n):
            rewards, T = [], len(path)
            for t in range(len(path)):  # per-step reward of task k
                r, d, _ = fam.reward({key: v[t:t + 1] for key, v in path.infos.items()}, [k])
                rewards.append(float(r[0, 0]))
                if d[0, 0]:
                    T = t + 1
                    break
            context = path_context(path, np.asarray(rewards), st.agent.dims.use_next_obs)[:T]
            s = st.rl_buf.sample_starts([k], B, st.loop_rng)[0] if starts is None else starts[k]
            j = p * n + k
            U[p, k] = float(loop_value(st.agent, context, s, None if z_eps is None else z_eps[j],
                                       None if a_eps is None else a_eps[j]))
    return U


@torch.no_grad()
def loop_log_z(st: Setup, contexts=None, starts=None, z_eps=None, a_eps=None) -> np.ndarray:
    """log Z [N]: for each task, for each of the S samples, a context of H random transitions from
    its sampler buffer, z, B start states, the value; then log-mean-exp (fixed draws as above,
    indexed task-major: row k * S + i)."""
    n, S, H, B = st.n, st.cfg.log_z_samples, st.cfg.max_path_length, st.B
    log_z = np.zeros(n)
    for k in range(n):
        vals = []
        for i in range(S):
            j = k * S + i
            if contexts is None:
                b = st.smp_buf.sample([k], H, st.loop_rng, keys=CTX_KEYS)
                c = context_from(b, "rewards", st.agent.dims.use_next_obs)[0]
            else:
                c = contexts[j]
            s = st.rl_buf.sample_starts([k], B, st.loop_rng)[0] if starts is None else starts[j]
            vals.append(float(loop_value(st.agent, c, s, None if z_eps is None else z_eps[j],
                                         None if a_eps is None else a_eps[j])))
        m = max(vals)
        log_z[k] = m + math.log(sum(math.exp(v - m) for v in vals) / S)
    return log_z


# ---- parity --------------------------------------------------------------------------------------
def parity(st: Setup, P: int = 2, seed: int = 123) -> tuple[float, float, float, float]:
    """Max |U_batched - U_loop| and |logZ_batched - logZ_loop| with identical draws, and the
    scale of U and log Z."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, B, S, H, d = st.n, st.B, st.cfg.log_z_samples, st.cfg.max_path_length, st.agent.dims
    paths = st.paths[:P]
    # utilities: fixed start states per task, explicit noise
    starts = rng.uniform(-1, 1, (n, B, d.obs)).astype(np.float32)
    z_eps = torch.randn(P * n, d.latent, generator=g)
    a_eps = torch.randn(P * n, B, d.act, generator=g)
    st.rl_buf.sample_starts = lambda tasks, m, r: starts[np.asarray(tasks)]
    try:
        Ub = st.rel.utilities(paths, z_eps=z_eps, value_eps=a_eps)
    finally:
        del st.rl_buf.sample_starts
    Ul = loop_utilities(st, paths, starts=starts, z_eps=z_eps, a_eps=a_eps)
    du = float(np.abs(Ub - Ul).max())

    # log Z: fixed contexts and starts per (task, sample), fixed noise
    ctx_b = {"obs": rng.uniform(-1, 1, (n * S, H, d.obs)), "actions": rng.uniform(-1, 1, (n * S, H, d.act)),
             "rewards": -rng.uniform(0, 2, (n * S, H, 1)), "next_obs": rng.uniform(-1, 1, (n * S, H, d.obs))}
    ctx_b = {k: v.astype(np.float32) for k, v in ctx_b.items()}
    zs = torch.randn(n * S, d.latent, generator=g)
    zs_starts = rng.uniform(-1, 1, (n * S, B, d.obs)).astype(np.float32)
    az = torch.randn(n * S, B, d.act, generator=g)
    agent, rel = st.agent, st.rel
    st.smp_buf.sample = lambda tasks, m, r, keys: {k: ctx_b[k] for k in keys}
    st.rl_buf.sample_starts = lambda tasks, m, r: zs_starts
    agent.sample_z = lambda mu, var, eps=None: PEARL.sample_z(agent, mu, var, zs if eps is None else eps)
    rel.task_values = lambda tasks, z, eps=None: HFR.task_values(rel, tasks, z, az if eps is None else eps)
    try:
        rel.update_log_z()
    finally:
        del st.smp_buf.sample, st.rl_buf.sample_starts, agent.sample_z, rel.task_values
    Zl = loop_log_z(st, contexts=context_from(ctx_b, "rewards", d.use_next_obs), starts=zs_starts, z_eps=zs, a_eps=az)
    dz = float(np.abs(rel.log_z - Zl).max())
    rel.log_z[:] = 0.0
    return du, dz, float(np.abs(Ub).max()), float(np.abs(Zl).max())


# ---- timing --------------------------------------------------------------------------------------
def time_pair(fa, fb, repeats: int, budget_s: float) -> tuple[float, float]:
    """Median seconds per call of ``fa`` and of ``fb``, timed alternately (a, b, a, b, ...) so
    that load from other processes hits both alike.  The first call of each is a warm-up unless
    it is long (>= 1 s: then it is compute-bound and its time is kept); then pairs of calls until
    ``repeats`` measurements each or ``budget_s`` spent (at least one measurement each)."""
    times: tuple[list, list] = ([], [])
    spent = 0.0
    for f, ts in ((fa, times[0]), (fb, times[1])):
        t0 = time.perf_counter()
        f()
        dt = time.perf_counter() - t0
        spent += dt
        if dt >= 1.0:
            ts.append(dt)
    while min(len(times[0]), len(times[1])) < repeats:
        if times[0] and times[1] and spent + statistics.median(times[0]) + statistics.median(times[1]) > budget_s:
            break
        for f, ts in ((fa, times[0]), (fb, times[1])):
            if len(ts) >= repeats:
                continue
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
            ts.append(dt)
            spent += dt
    return statistics.median(times[0]), statistics.median(times[1])


def macs(module: torch.nn.Module) -> int:
    """Multiply-adds per row of the weight matrices (= number of weight entries)."""
    return sum(p.numel() for name, p in module.named_parameters() if "bias" not in name and p.dim() >= 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=None, help="comma-separated train-task counts N (default 4,50,100,150; quick: 4,50)")
    ap.add_argument("--lengths", default="20,200", help="comma-separated path lengths T")
    ap.add_argument("--utility-batch", type=int, default=256, help="B start states per task (default 256)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; quick: 1)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per batched+loop pair of measurements before repeats stop (default 8; quick: 2)")
    ap.add_argument("--pretrain-steps", type=int, default=20, help="gradient steps on random data before timing")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="override the package's policy/critic chunk size hfr.MAX_ROWS (experiment; default: unchanged)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=4,50, one repeat, small budget")
    args = ap.parse_args()
    if args.max_rows is not None:
        hfr.MAX_ROWS = args.max_rows
    tasks = [int(x) for x in (args.tasks or ("4,50" if args.quick else "4,50,100,150")).split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    repeats = args.repeats or (1 if args.quick else 5)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 8.0)
    B0 = args.utility_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = make_config("four-corners", "paper", {"relabel": "hfr", "torch_threads": args.threads})
    agent = PEARL(Dims(2, 2, cfg.latent_dim, cfg.use_next_obs_in_context), cfg, torch.device("cpu"))
    t0 = time.perf_counter()
    pretrain(agent, cfg, args.pretrain_steps)
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, nets={cfg.hidden_layers}x{cfg.hidden_dim} "
          f"encoder={cfg.encoder_layers}x{cfg.encoder_hidden_dim} latent={cfg.latent_dim} log_z_samples={cfg.log_z_samples}; "
          f"family: point robot with N train tasks; {args.pretrain_steps} pretrain steps ({time.perf_counter() - t0:.1f} s); "
          f"hfr.MAX_ROWS={hfr.MAX_ROWS}; repeats<={repeats}, budget {budget:g} s per batched+loop pair")

    configs = [(n, T, B0) for T in lengths for n in tasks]
    if 4 in tasks and B0 != 1024:  # the paper's four-corners utility batch
        configs += [(4, T, 1024) for T in lengths]

    # parity (small N, both lengths): identical start states and noise -> identical U and log Z
    for T in lengths:
        st = Setup(agent, min(tasks[0], 8), T, B0, args.threads)
        du, dz, su, sz = parity(st)
        ok = du < 1e-4 and dz < 1e-4
        print(f"parity {'ok' if ok else 'FAILED'} (N={st.n}, T={T}, B={B0}): max |dU| = {du:.2e} (max |U| = {su:.3g}), "
              f"max |dlogZ| = {dz:.2e} (max |logZ| = {sz:.3g})")
        if not ok:
            raise SystemExit("parity check failed: the loop reference and the batched version disagree")

    p_macs = macs(agent.policy)  # trunk + mean + log-std heads
    q_macs = macs(agent.qf)  # both heads
    e_macs = macs(agent.encoder)
    S = cfg.log_z_samples
    hdr = (f"{'N':>4} {'T':>4} {'B':>5} | {'batched s/path':>14} {'loop s/path':>12} {'ratio':>6} | "
           f"{'batched s/logZ':>14} {'loop s/logZ':>12} {'ratio':>6}")
    print()
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for n, T, B in configs:
        st = Setup(agent, n, T, B, args.threads)
        path = st.paths[:1]
        bp, lp = time_pair(lambda: st.rel.utilities(path), lambda: loop_utilities(st, path), repeats, budget)
        bz, lz = time_pair(st.rel.update_log_z, lambda: loop_log_z(st), repeats, budget)
        print(f"{n:>4} {T:>4} {B:>5} | {bp:>14.4f} {lp:>12.4f} {lp / bp:>6.2f} | {bz:>14.3f} {lz:>12.3f} {lz / bz:>6.2f}",
              flush=True)
        rows.append((n, T, B, bp, lp, bz, lz))

    print()
    print("Compute bound: per path, N*B rows go through the policy and both critics, N*T through the encoder;")
    print(f"per log Z, N*{S}*B rows and N*{S}*T encoder rows. Per row: policy {p_macs:,} + twin Q {q_macs:,} "
          f"multiply-adds (~{2 * (p_macs + q_macs) / 1e6:.2f} MFLOP), encoder {e_macs:,} (~{2 * e_macs / 1e6:.2f} MFLOP).")
    print(f"{'N':>4} {'T':>4} {'B':>5} | {'rows/path':>9} {'GFLOP/path':>10} {'GFLOP/s b':>9} {'GFLOP/s l':>9} | "
          f"{'rows/logZ':>9} {'GFLOP/logZ':>10} {'GFLOP/s b':>9} {'GFLOP/s l':>9}   (b = batched, l = loop)")
    for n, T, B, bp, lp, bz, lz in rows:
        fp = (2 * n * B * (p_macs + q_macs) + 2 * n * T * e_macs) / 1e9
        fz = S * fp
        print(f"{n:>4} {T:>4} {B:>5} | {n * B:>9,} {fp:>10.2f} {fp / bp:>9.1f} {fp / lp:>9.1f} | "
              f"{S * n * B:>9,} {fz:>10.1f} {fz / bz:>9.1f} {fz / lz:>9.1f}")
    print("Both versions do the same dense FLOPs, so both are compute-bound: at B >= 256 rows per task a per-task matmul")
    print("is already large enough to run near peak, and the batched version can only save the per-task and per-step")
    print("Python/dispatch overhead. Very large batched chunks (up to hfr.MAX_ROWS rows, 300-wide activations) fall out")
    print("of cache and run at a lower GFLOP/s than the loop's B-row matmuls (see --max-rows).")
    print(f"load average at end: {os.getloadavg()[0]:.2f} (timings on a loaded machine are noisy; batched and loop")
    print("calls are interleaved so that the ratios stay comparable)")


if __name__ == "__main__":
    main()
