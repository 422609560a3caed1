"""Relabeling strategies (SPEC section 4): HFR / HFR-Bellman, HIPI / HIPI-Q, Random, None, the
keep-original coin, filing through ``Trainer.store`` and CLI smoke runs.

Expected values are computed by hand here (numpy, or a hand-written forward pass of PEARL's
networks in ``relabel_helpers``), never by calling the code under test a second time.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math

import numpy as np
import pytest
import torch

from metarelabel import trainer as trainer_module
from metarelabel.cli import main as cli_main
from metarelabel.presets import make_config
from metarelabel.relabel import hfr as hfr_module
from metarelabel.sampler import rollout
from metarelabel.trainer import Trainer

from relabel_helpers import (
    CHI2_999,
    FC_GOALS,
    chi_square,
    constant_rows,
    fc_rewards,
    enlarge_output_layers,
    first_terminal_len,
    mlp_forward,
    point_path,
    policy_action,
    posterior_by_hand,
    stub_context,
    twin_q_min,
)

N_FC = 4  # Four-Corners train tasks
STARTS = np.array([[0.1, 0.2], [0.3, -0.1], [0.0, 0.0], [-0.2, 0.4]])  # one stored start per task


def softmax_by_hand(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_trainer(family, relabel, tmp_path, **overrides) -> Trainer:
    cfg = make_config(family, "quick", dict({"relabel": relabel}, **overrides))
    return Trainer(cfg, tmp_path / "run", echo=lambda *a, **k: None, tensorboard=False)


def fc_paths(fam, rng):
    """Three Four-Corners paths with known hindsight rewards.
    A (task 2) passes within 0.2 of task 1's goal at its 2nd step: cut there under task 1.
    B (task 0) hovers in task 3's -3 square.
    C (task 0) walks the diagonal to task 0's goal and ends there."""
    A = point_path([(0.3, 0.3), (0.9, 0.9), (0.5, 0.5), (0.5, -0.3)], 2, fam, rng)
    B = point_path([(-0.2, 0.2), (-0.3, 0.3), (-0.3, 0.4)], 0, fam, rng)
    C = point_path([(-0.3, -0.3), (-0.6, -0.6), (-0.9, -0.9)], 0, fam, rng)
    return [A, B, C]


# =====================================================================================================
# 1. HFR with a stub learner: U, log Z, q(psi | tau), sampling, hardmax
# =====================================================================================================
def hand_utility(path, task, eps, learner, start):
    """U(tau, psi) of the stub learner, from the hand-written Four-Corners reward."""
    r, d = fc_rewards(path.infos["pos"], task)
    T = first_terminal_len(d)  # context valid up to and including the first terminal under psi
    mu = np.array([r[:T].mean(), path.obs[:T, 0].mean()])
    z = mu + math.sqrt(learner.var) * np.asarray(eps, np.float64)
    return learner.a[0] * z[0] + learner.a[1] * z[1] - 0.5 * float((np.asarray(start) ** 2).sum())


def hfr_stub(**overrides):
    overrides.setdefault("keep_original_prob", 0.0)
    rel, ctx = stub_context("hfr", **overrides)
    for k in range(N_FC):  # one start state per task: every draw of B start states returns it
        ctx.rl_buffers.add(k, constant_rows(1, STARTS[k], (0, 0), -1.0), start_obs=STARTS[k])
    return rel, ctx


def test_hfr_utilities_match_hand_computation_with_explicit_noise():
    rel, ctx = hfr_stub()
    learner, fam = ctx.learner, ctx.family
    paths = fc_paths(fam, np.random.default_rng(0))
    P = len(paths)
    eps = torch.randn(P * N_FC, 2, generator=torch.Generator().manual_seed(3))
    U = rel.utilities(paths, z_eps=eps)
    expected = np.array([[hand_utility(p, k, eps[i * N_FC + k].numpy(), learner, STARTS[k]) for k in range(N_FC)]
                         for i, p in enumerate(paths)])
    assert U.shape == (P, N_FC)
    np.testing.assert_allclose(U, expected, atol=1e-5)
    # the cut matters: under task 1, A's context is 2 steps long (-3, 0), not 4
    r, _ = fc_rewards(paths[0].infos["pos"], 1)
    assert r[:2].mean() == -1.5 and r.mean() != -1.5
    # one batched encoder pass over all (path, task) contexts, one value pass over all rows
    (ctx_seen,) = learner.seen_contexts
    assert ctx_seen.shape == (P * N_FC, 4, learner.dims.context)
    (starts_seen,) = learner.seen_starts
    B = ctx.cfg.utility_batch_size
    assert starts_seen.shape == (P * N_FC, B, 2)
    np.testing.assert_allclose(starts_seen.numpy(), np.tile(STARTS, (P, 1))[:, None, :].repeat(B, 1), atol=1e-7)


def test_hfr_hindsight_context_layout_and_mask():
    rel, ctx = hfr_stub()
    paths = fc_paths(ctx.family, np.random.default_rng(0))
    c, m = rel.hindsight(paths)
    A = paths[0]
    np.testing.assert_allclose(c[0, :, :4, :2].numpy(), np.broadcast_to(A.obs, (N_FC, 4, 2)))
    np.testing.assert_allclose(c[0, :, :4, 2:4].numpy(), np.broadcast_to(A.actions, (N_FC, 4, 2)))
    for k in range(N_FC):
        r, d = fc_rewards(A.infos["pos"], k)
        np.testing.assert_allclose(c[0, k, :4, 4].numpy(), r)
        T = first_terminal_len(d)
        np.testing.assert_array_equal(m[0, k].numpy(), np.arange(4) < T)
    # B has 3 steps: the 4th row is padding
    assert not m[1, :, 3].any()
    assert m[0, 1].numpy().tolist() == [1, 1, 0, 0]


def test_hfr_q_logits_and_diagnostics():
    rel, ctx = hfr_stub()
    learner = ctx.learner
    paths = fc_paths(ctx.family, np.random.default_rng(0))
    zero = np.zeros(2)
    U = np.array([[hand_utility(p, k, zero, learner, STARTS[k]) for k in range(N_FC)] for p in paths])
    log_z = np.array([0.4, -1.1, 0.3, -0.2])
    rel.log_z = log_z.copy()
    rel.assign(paths)
    logits = U - log_z
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(rel.last_q, q, atol=1e-5)
    d = rel.diagnostics()
    np.testing.assert_allclose(d["relabel/utility_mean"], U.mean(), atol=1e-5)
    np.testing.assert_allclose(d["relabel/logits_mean"], logits.mean(), atol=1e-5)
    np.testing.assert_allclose(d["relabel/entropy_mean"], (-(q * np.log(q)).sum(1)).mean(), atol=1e-5)
    assert d["relabel/paths"] == 3.0


def test_hfr_samples_tasks_from_q():
    rel, ctx = hfr_stub()
    learner = ctx.learner
    base = fc_paths(ctx.family, np.random.default_rng(0))
    zero = np.zeros(2)
    U = np.array([[hand_utility(p, k, zero, learner, STARTS[k]) for k in range(N_FC)] for p in base])
    rel.log_z = U[0] - np.array([0.0, 0.5, -0.3, 0.2])  # keeps every row of q away from 0 and 1
    q = softmax_by_hand(U - rel.log_z)
    reps = 1500
    paths = [p for p in base for _ in range(reps)]
    out = rel.assign(paths)
    chosen = np.array([a[0] for a in out]).reshape(len(base), reps)
    for i in range(len(base)):
        assert (reps * q[i] >= 5).all(), q[i]
        counts = np.bincount(chosen[i], minlength=N_FC)
        assert chi_square(counts, q[i]) < CHI2_999[N_FC - 1], (counts, reps * q[i])
    for p, a in zip(paths, out):  # whole-path strategy: a constant array of the path's length
        assert len(a) == len(p) and (a == a[0]).all()


def test_hfr_hardmax_picks_argmax():
    rel, ctx = hfr_stub(hardmax=True)
    learner = ctx.learner
    paths = fc_paths(ctx.family, np.random.default_rng(0))
    zero = np.zeros(2)
    U = np.array([[hand_utility(p, k, zero, learner, STARTS[k]) for k in range(N_FC)] for p in paths])
    for log_z in (np.zeros(N_FC), np.array([3.0, -2.0, 0.5, 0.0]), np.array([-5.0, 0.0, 0.0, 5.0])):
        rel.log_z = log_z
        for _ in range(5):
            out = rel.assign(paths)
            np.testing.assert_array_equal([a[0] for a in out], (U - log_z).argmax(1))


def test_hfr_update_log_z_is_log_mean_exp_of_known_utilities():
    S = 6
    rel, ctx = hfr_stub(log_z_samples=S)
    learner, H = ctx.learner, ctx.cfg.max_path_length
    np.testing.assert_array_equal(rel.log_z, np.zeros(N_FC))  # zero before the first computation
    rewards, xs = [-1.0, -2.5, 0.0, -0.7], [0.3, -0.4, 0.9, 0.05]
    for k in range(N_FC):  # constant sampler buffers: any context of task k has mu = (r_k, x_k)
        ctx.sampler_buffers.add(k, constant_rows(50, (xs[k], 0.2), (0.1, -0.1), rewards[k]))
    eps = torch.randn(N_FC * S, 2, generator=torch.Generator().manual_seed(5)) * 2.0
    learner.queued_eps.append(eps)
    rel.update_log_z()
    (c,) = learner.seen_contexts
    assert c.shape == (N_FC * S, H, learner.dims.context)  # max_path_length transitions per sample
    expected = np.zeros(N_FC)
    for k in range(N_FC):
        z = np.array([rewards[k], xs[k]]) + math.sqrt(learner.var) * eps[k * S:(k + 1) * S].double().numpy()
        U = learner.a[0] * z[:, 0] + learner.a[1] * z[:, 1] - 0.5 * (STARTS[k] ** 2).sum()
        assert U.std() > 0.1
        expected[k] = np.log(np.mean(np.exp(U)))
    np.testing.assert_allclose(rel.log_z, expected, atol=1e-5)
    assert rel.diagnostics()["relabel/log_z_mean"] == pytest.approx(expected.mean(), abs=1e-5)


def test_hfr_bellman_utility_is_minus_td_error():
    rel, ctx = stub_context("hfr-bellman", keep_original_prob=0.0)
    rewards, xs = [-1.0, -3.0, 0.0, -0.5], [0.2, -0.3, 0.6, 0.0]
    for k in range(N_FC):
        ctx.rl_buffers.add(k, constant_rows(10, (xs[k], 0.0), (0, 0), rewards[k]), start_obs=STARTS[k])
    paths = fc_paths(ctx.family, np.random.default_rng(0))
    eps = torch.randn(len(paths) * N_FC, 2, generator=torch.Generator().manual_seed(9))
    U = rel.utilities(paths, z_eps=eps)
    for i, p in enumerate(paths):
        for k in range(N_FC):
            r, d = fc_rewards(p.infos["pos"], k)
            T = first_terminal_len(d)
            z = np.array([r[:T].mean(), p.obs[:T, 0].mean()]) + 0.5 * eps[i * N_FC + k].double().numpy()
            td = (rewards[k] - z[0]) ** 2 + (xs[k] - z[1]) ** 2
            assert U[i, k] == pytest.approx(-td, abs=1e-5)


# =====================================================================================================
# 2. Batched HFR == a per-task loop on a real (random-init) PEARL agent
# =====================================================================================================
def reference_utility(tr, path, task, z_eps_row, starts_k, value_eps_row, truncate=True):
    """U(path, task) one task at a time with a hand-written forward pass."""
    cfg, fam, agent = tr.cfg, tr.env, tr.agent
    r, d, _ = fam.reward(path.infos, [task])
    if cfg.context_reward == "dense":
        r = fam.dense_reward(path.infos, [task])
    T = first_terminal_len(d[0]) if truncate and cfg.relabel_truncate else len(path)
    parts = [path.obs[:T], path.actions[:T], r[0][:T, None]]
    if cfg.use_next_obs_in_context:
        parts.append(path.next_obs[:T])
    context = torch.as_tensor(np.concatenate(parts, 1).astype(np.float32))
    with torch.no_grad():
        if cfg.use_information_bottleneck:
            mu, var = posterior_by_hand(agent, context)
            z = mu + var.sqrt() * z_eps_row
        else:  # deterministic z: the mean of the per-transition encodings
            z = mlp_forward(agent.encoder, context).mean(0)
        s = torch.as_tensor(starts_k)
        zb = z.expand(len(s), -1)
        a = policy_action(agent.policy, torch.cat([s, zb], 1), value_eps_row)
        return float(twin_q_min(agent.qf, torch.cat([s, a, zb], 1)).mean())


def collected_paths(tr, tasks):
    out = []
    for k in tasks:
        tr.env.set_task(int(k))
        out.append(rollout(tr.env, tr.agent, tr.agent.prior_z(), tr.cfg.max_path_length))
    return out


@pytest.mark.parametrize("family,overrides,max_rows", [
    ("four-corners", {}, None),
    ("four-corners", {"relabel_truncate": False}, None),  # the release's whole-path contexts
    ("four-corners", {"use_next_obs_in_context": True, "utility_batch_size": 16}, 16 * 5),  # chunked
    ("four-corners", {"use_information_bottleneck": False, "utility_batch_size": 16}, None),
    ("sparse-point-robot", {"context_reward": "dense", "utility_batch_size": 16}, None),
])
def test_hfr_batched_utilities_equal_per_task_loop(tmp_path, monkeypatch, family, overrides, max_rows):
    tr = make_trainer(family, "hfr", tmp_path, **overrides)
    tr.initial_collection()
    enlarge_output_layers(tr.agent)
    cfg, fam, N = tr.cfg, tr.env, tr.num_tasks
    B, L, A = cfg.utility_batch_size, cfg.latent_dim, tr.dims.act
    rng = np.random.default_rng(7)
    paths = collected_paths(tr, [0, N - 1])
    if family == "four-corners":
        paths.append(point_path([(0.3, 0.3), (0.9, 0.9), (0.5, 0.5), (0.5, -0.3)], 2, fam, rng))
    else:  # passes through the sparse reward region of task 3, then leaves it
        g = fam.tasks[3]
        paths.append(point_path([0.5 * g, 0.9 * g, g, 0.5 * g], 0, fam, rng))
        assert fam.reward(paths[-1].infos, [3])[0].max() > 0.5
    P = len(paths)
    starts = rng.uniform(-1, 1, (N, B, tr.dims.obs)).astype(np.float32)
    calls = []

    def fixed_starts(tasks, n, rng_):
        calls.append((np.array(tasks), n))
        return starts[np.asarray(tasks)]

    monkeypatch.setattr(tr.rl_buf, "sample_starts", fixed_starts)
    if max_rows is not None:
        monkeypatch.setattr(hfr_module, "MAX_ROWS", max_rows)
    gen = torch.Generator().manual_seed(11)
    z_eps = torch.randn(P * N, L, generator=gen)
    value_eps = torch.randn(P * N, B, A, generator=gen)
    U = tr.relabeler.utilities(paths, z_eps=z_eps, value_eps=value_eps)
    (tasks_called, n_called), = calls
    np.testing.assert_array_equal(tasks_called, np.tile(np.arange(N), P))
    assert n_called == B
    ref = np.array([[reference_utility(tr, p, k, z_eps[i * N + k], starts[k], value_eps[i * N + k])
                     for k in range(N)] for i, p in enumerate(paths)])
    np.testing.assert_allclose(U, ref, rtol=1e-5, atol=1e-5)
    assert U.std() > 1e-2  # the comparison is not between near-constant numbers
    if family == "four-corners" and cfg.relabel_truncate:  # ... and it would see a missing cut
        full = reference_utility(tr, paths[-1], 1, z_eps[(P - 1) * N + 1], starts[1], value_eps[(P - 1) * N + 1],
                                 truncate=False)
        assert abs(full - U[-1, 1]) > 1e-4  # 10x the tolerance


def test_hfr_update_log_z_equals_reference_on_real_agent(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hfr", tmp_path, utility_batch_size=16, log_z_samples=5)
    tr.initial_collection()
    enlarge_output_layers(tr.agent)
    N, S, H, B, L = tr.num_tasks, 5, tr.cfg.max_path_length, 16, tr.cfg.latent_dim
    agent = tr.agent
    batch = tr.smp_buf.sample(np.repeat(np.arange(N), S), H, np.random.default_rng(2))
    starts = np.random.default_rng(3).uniform(-1, 1, (N, B, 2)).astype(np.float32)
    gen = torch.Generator().manual_seed(4)
    z_eps, v_eps = torch.randn(N * S, L, generator=gen), torch.randn(N * S, B, 2, generator=gen)
    seen = {}

    def fixed_sample(tasks, n, rng_, keys=None):
        seen["tasks"], seen["n"] = np.array(tasks), n
        return {k: batch[k] for k in keys}

    orig_sample_z, orig_value = agent.sample_z, agent.start_state_value
    monkeypatch.setattr(tr.smp_buf, "sample", fixed_sample)
    monkeypatch.setattr(tr.rl_buf, "sample_starts", lambda tasks, n, rng_: starts[np.asarray(tasks)])
    monkeypatch.setattr(agent, "sample_z",
                        lambda mu, var, eps=None: orig_sample_z(mu, var, z_eps if eps is None else eps))
    monkeypatch.setattr(agent, "start_state_value",
                        lambda s, z, eps=None: orig_value(s, z, v_eps if eps is None else eps))
    tr.relabeler.update_log_z()
    np.testing.assert_array_equal(seen["tasks"], np.repeat(np.arange(N), S))
    assert seen["n"] == H
    expected = np.zeros(N)
    for k in range(N):
        U = []
        for i in range(S):
            row = k * S + i
            parts = [batch["obs"][row], batch["actions"][row], batch["rewards"][row]]
            context = torch.as_tensor(np.concatenate(parts, 1))
            with torch.no_grad():
                mu, var = posterior_by_hand(agent, context)
                z = (mu + var.sqrt() * z_eps[row]).expand(B, -1)
                s = torch.as_tensor(starts[k])
                a = policy_action(agent.policy, torch.cat([s, z], 1), v_eps[row])
                U.append(float(twin_q_min(agent.qf, torch.cat([s, a, z], 1)).mean()))
        U = np.array(U)
        expected[k] = np.log(np.mean(np.exp(U)))
    np.testing.assert_allclose(tr.relabeler.log_z, expected, rtol=1e-5, atol=1e-5)


def test_learned_reward_replaces_context_rewards_not_terminals(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hfr", tmp_path, learned_reward=True, log_z_samples=3)
    tr.initial_collection()
    rel, fam, agent = tr.relabeler, tr.env, tr.agent
    # a known reward model: r^(s, a, g) = s . g + a_0
    monkeypatch.setattr(rel.reward_model, "forward", lambda o, a, g: (o * g).sum(-1) + a[..., 0])
    paths = fc_paths(fam, np.random.default_rng(0))
    c, m = rel.hindsight(paths)
    for i, p in enumerate(paths):
        T = len(p)
        for k in range(N_FC):
            want = p.obs @ FC_GOALS[k] + p.actions[:, 0]
            np.testing.assert_allclose(c[i, k, :T, 4].numpy(), want, atol=1e-6)
            # validity still follows the family's terminals under task k
            n_valid = first_terminal_len(fc_rewards(p.infos["pos"], k)[1])
            np.testing.assert_array_equal(m[i, k, :T].numpy(), np.arange(T) < n_valid)

    seen = []
    orig = agent.infer_posterior
    monkeypatch.setattr(agent, "infer_posterior", lambda ctx, mask=None: (seen.append(ctx.clone()), orig(ctx, mask))[1])
    rel.update_log_z()
    (ctx,) = seen
    tasks = np.repeat(np.arange(N_FC), 3)
    want = (ctx[..., :2].numpy() * FC_GOALS[tasks][:, None, :]).sum(-1) + ctx[..., 2].numpy()
    np.testing.assert_allclose(ctx[..., 4].numpy(), want, atol=1e-5)


def test_learned_reward_model_fits_sac_batch_rewards(tmp_path):
    tr = make_trainer("four-corners", "hfr", tmp_path, learned_reward=True)
    tr.initial_collection()
    rel = tr.relabeler
    tasks = np.array([0, 1, 2, 3])
    b = tr.rl_buf.sample(tasks, 64, np.random.default_rng(0))

    def mse():
        with torch.no_grad():
            g = rel.goals[torch.as_tensor(tasks)][:, None, :].expand(-1, 64, -1)
            pred = rel.reward_model(torch.as_tensor(b["obs"]), torch.as_tensor(b["actions"]), g)
        return float(((pred - torch.as_tensor(b["rewards"][..., 0])) ** 2).mean())

    before = mse()
    for _ in range(30):
        rel.on_gradient_step(tasks, b)
    assert mse() < 0.5 * before


# =====================================================================================================
# 3. HIPI and HIPI-Q
# =====================================================================================================
def hipi_paths(fam, rng):
    """Paths that end nowhere near a goal (no terminal under any task) with different returns."""
    return [
        point_path([(0.2, 0.2), (0.3, 0.3), (0.4, 0.4)], 1, fam, rng),          # task 1's square
        point_path([(-0.2, 0.2), (-0.3, 0.3)], 3, fam, rng),                    # task 3's square
        point_path([(0.05, -0.05), (0.6, -0.6), (0.7, -0.6), (0.6, -0.7)], 2, fam, rng),
        point_path([(-0.3, -0.3)], 0, fam, rng),
        point_path([(0.7, 0.0), (0.7, 0.05)], 1, fam, rng),
    ]


def hand_returns(paths):
    return np.array([[fc_rewards(p.infos["pos"], k)[0].sum() for k in range(N_FC)] for p in paths])


def logmeanexp(x, axis=0):
    return np.log(np.mean(np.exp(x), axis=axis))


def test_hipi_q_is_softmax_of_return_over_temperature_minus_cached_log_z():
    T = 2.0
    rel, ctx = stub_context("hipi", hipi_temperature=T, keep_original_prob=0.0)
    fam, rng = ctx.family, np.random.default_rng(0)
    init = hipi_paths(fam, rng)
    R_init = hand_returns(init)
    assert rel.cache_size == 0
    rel.observe(init)  # paths filed without relabeling still fill the cache
    assert rel.cache_size == len(init)
    np.testing.assert_allclose(rel.cache[:len(init)], R_init)
    new = [point_path([(0.3, 0.3), (0.35, 0.3)], 1, fam, rng), point_path([(-0.5, 0.6), (-0.6, 0.6)], 0, fam, rng)]
    R = hand_returns(new)
    log_z = logmeanexp(R_init / T)  # over the cache only: the new paths are not in it
    q = softmax_by_hand(R / T - log_z)
    rel.assign(new)
    np.testing.assert_allclose(rel.last_q, q, atol=1e-12)
    assert np.ptp(q, axis=1).min() > 0.05  # far from uniform
    d = rel.diagnostics()
    assert d["relabel/log_z_mean"] == pytest.approx(log_z.mean())
    assert d["relabel/return_mean"] == pytest.approx(R.mean())
    assert d["relabel/logits_mean"] == pytest.approx((R / T - log_z).mean())
    # after relabeling, the batch joins the cache
    assert rel.cache_size == len(init) + len(new)
    np.testing.assert_allclose(rel.cache[len(init):len(init) + len(new)], R)


def test_hipi_single_path_is_not_normalised_by_itself():
    rel, ctx = stub_context("hipi", keep_original_prob=0.0)
    path = point_path([(0.3, 0.3), (0.4, 0.4)], 1, ctx.family, np.random.default_rng(0))
    R = hand_returns([path])
    rel.assign([path])  # empty cache: log Z = 0, q = softmax(R), not uniform
    np.testing.assert_allclose(rel.last_q, softmax_by_hand(R))
    assert np.ptp(rel.last_q) > 0.3
    rel.assign([path])  # now the cache holds only the first copy: log Z = R, q uniform
    np.testing.assert_allclose(rel.last_q, np.full((1, N_FC), 0.25))


def test_hipi_cache_is_a_ring_of_the_last_paths():
    rel, ctx = stub_context("hipi", hipi_cache_size=3, keep_original_prob=0.0)
    paths = hipi_paths(ctx.family, np.random.default_rng(0))
    R = hand_returns(paths)
    rel.observe(paths)
    assert rel.cache_size == 3
    np.testing.assert_allclose(rel.log_z(), logmeanexp(R[-3:]), atol=1e-12)


def test_hipi_sampling_and_hardmax():
    rel, ctx = stub_context("hipi", keep_original_prob=0.0, hipi_temperature=3.0, hipi_cache_size=100)
    fam, rng = ctx.family, np.random.default_rng(0)
    init = hipi_paths(fam, rng)
    rel.observe(init)
    log_z = logmeanexp(hand_returns(init) / 3.0)
    base = [point_path([(0.3, 0.3), (0.6, 0.6)], 1, fam, rng), point_path([(0.7, 0.0), (0.7, -0.3)], 2, fam, rng)]
    q = softmax_by_hand(hand_returns(base) / 3.0 - log_z)
    reps = 1500
    out = rel.assign([p for p in base for _ in range(reps)])
    chosen = np.array([a[0] for a in out]).reshape(len(base), reps)
    for i in range(len(base)):
        assert (reps * q[i] >= 5).all(), q[i]
        counts = np.bincount(chosen[i], minlength=N_FC)
        assert chi_square(counts, q[i]) < CHI2_999[N_FC - 1], (counts, reps * q[i])

    rel, ctx = stub_context("hipi", keep_original_prob=0.0, hardmax=True)
    rel.observe(init)
    logits = hand_returns(base) - logmeanexp(hand_returns(init))
    out = rel.assign(base)
    np.testing.assert_array_equal([a[0] for a in out], logits.argmax(1))


def test_hipi_return_ends_at_the_first_terminal_under_psi(tmp_path):
    """A path collected on task 2 passes through task 1's goal at step 2 and walks on.  Filed under
    task 1 it is cut there (rewards -3, 0: return -3); HIPI should score it with that return, not
    with -3 + 0 - 1 - 1 = -5, which penalises exactly the paths that succeeded on task 1."""
    tr = make_trainer("four-corners", "hipi", tmp_path)
    A = fc_paths(tr.env, np.random.default_rng(0))[0]
    filed = tr.relabeled_path(A, 1)
    assert filed.rewards.sum() == -3.0 and len(filed) == 2
    truncated = []
    for k in range(N_FC):
        r, d = fc_rewards(A.infos["pos"], k)
        truncated.append(r[:first_terminal_len(d)].sum())
    assert truncated[1] == -3.0
    np.testing.assert_allclose(tr.relabeler.returns([A])[0], truncated)


def test_hipi_initial_collection_fills_the_cache(tmp_path):
    tr = make_trainer("four-corners", "hipi", tmp_path)
    tr.initial_collection()
    n_paths = int(tr.rl_buf.start_size.sum())  # one start state per stored path
    assert n_paths >= N_FC
    assert tr.relabeler.cache_size == min(n_paths, tr.cfg.hipi_cache_size)


def test_hipi_q_task_q_matches_hand_critic(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hipi-q", tmp_path)
    tr.initial_collection()
    enlarge_output_layers(tr.agent)
    agent, N, L = tr.agent, tr.num_tasks, tr.cfg.latent_dim
    rng = np.random.default_rng(0)
    paths = collected_paths(tr, [1, 2]) + [point_path([(0.3, 0.3), (0.9, 0.9)], 1, tr.env, rng)]

    def hand_q(z):
        out = []
        for p in paths:
            q = np.zeros((N, len(p)))
            for k in range(N):
                x = torch.cat([torch.as_tensor(p.obs), torch.as_tensor(p.actions), z[k].expand(len(p), -1)], 1)
                with torch.no_grad():
                    q[k] = twin_q_min(agent.qf, x).numpy()
            out.append(q)
        return out

    z = torch.randn(N, L, generator=torch.Generator().manual_seed(0)) * 2
    got, want = tr.relabeler.task_q(paths, z), hand_q(z)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert np.std(np.concatenate([w.ravel() for w in want])) > 1e-2

    # without z: z_psi from embedding_batch_size transitions of psi's encoder buffer
    E = tr.cfg.embedding_batch_size
    batch = tr.enc_buf.sample(np.arange(N), E, np.random.default_rng(1))
    eps = torch.randn(N, L, generator=torch.Generator().manual_seed(1))
    seen = {}

    def fixed_sample(tasks, n, rng_, keys=None):
        seen["tasks"], seen["n"] = np.array(tasks), n
        return {k: batch[k] for k in keys}

    orig_sample_z = agent.sample_z
    monkeypatch.setattr(tr.enc_buf, "sample", fixed_sample)
    monkeypatch.setattr(agent, "sample_z", lambda mu, var, e=None: orig_sample_z(mu, var, eps if e is None else e))
    got = tr.relabeler.task_q(paths)
    np.testing.assert_array_equal(seen["tasks"], np.arange(N))
    assert seen["n"] == E
    zs = []
    for k in range(N):
        context = torch.as_tensor(np.concatenate([batch["obs"][k], batch["actions"][k], batch["rewards"][k]], 1))
        with torch.no_grad():
            mu, var = posterior_by_hand(agent, context)
        zs.append(mu + var.sqrt() * eps[k])
    for g, w in zip(got, hand_q(torch.stack(zs))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _alternating_q(T):
    """Q_t(psi) [N, T]: pattern a on even t, pattern b on odd t."""
    a, b = np.array([0.0, 1.0, -0.5, 0.3]), np.array([0.8, -0.6, 0.2, 0.0])
    Q = np.where(np.arange(T)[None, :] % 2 == 0, a[:, None], b[:, None])
    log_z = np.log((np.exp(a) + np.exp(b)) / 2)  # log mean_t exp Q_t(psi), by hand
    return Q, a, b, log_z


def test_hipi_q_per_transition_distribution(monkeypatch):
    rel, ctx = stub_context("hipi-q", keep_original_prob=0.0)
    T = 3000
    path = point_path(np.random.default_rng(0).uniform(-0.9, 0.9, (T, 2)), 2, ctx.family, np.random.default_rng(1))
    Q, a, b, log_z = _alternating_q(T)
    monkeypatch.setattr(rel, "task_q", lambda paths, z=None: [Q.copy() for _ in paths])
    (chosen,) = rel.assign([path])
    assert chosen.shape == (T,)
    for sel, pattern in ((slice(0, None, 2), a), (slice(1, None, 2), b)):
        q = softmax_by_hand(pattern - log_z)
        counts = np.bincount(chosen[sel], minlength=N_FC)
        assert chi_square(counts, q) < CHI2_999[N_FC - 1], (counts, len(chosen[sel]) * q)
    np.testing.assert_allclose(rel.values["log_z"][-1], log_z, atol=1e-12)
    np.testing.assert_allclose(rel.values["logits"][-1], (Q - log_z[:, None]).T.ravel(), atol=1e-12)
    # a per-transition split counts fractions of the path in the relabel matrix
    m = rel.take_matrix()
    assert m[2].sum() == pytest.approx(1.0) and m[[0, 1, 3]].sum() == 0
    np.testing.assert_allclose(m[2], np.bincount(chosen, minlength=N_FC) / T)


def test_hipi_q_hardmax(monkeypatch):
    rel, ctx = stub_context("hipi-q", keep_original_prob=0.0, hardmax=True)
    T = 6
    path = point_path(np.full((T, 2), 0.7), 0, ctx.family, np.random.default_rng(1))
    Q, a, b, log_z = _alternating_q(T)
    monkeypatch.setattr(rel, "task_q", lambda paths, z=None: [Q.copy() for _ in paths])
    (chosen,) = rel.assign([path])
    expected = np.where(np.arange(T) % 2 == 0, (a - log_z).argmax(), (b - log_z).argmax())
    np.testing.assert_array_equal(chosen, expected)
    assert len(set(expected)) == 2


# =====================================================================================================
# 4. Random and None
# =====================================================================================================
def tiny_paths(fam, n):
    rng = np.random.default_rng(0)
    return [point_path([(0.7, 0.7)], i % N_FC, fam, rng) for i in range(n)]


def test_random_is_uniform_and_ignores_the_keep_original_coin():
    rel, ctx = stub_context("random", keep_original_prob=1.0)  # a coin would keep everything
    paths = tiny_paths(ctx.family, 4000)
    chosen = np.concatenate([a for i in range(0, len(paths), 10) for a in rel.assign(paths[i:i + 10])])
    counts = np.bincount(chosen, minlength=N_FC)
    assert chi_square(counts, np.full(N_FC, 0.25)) < CHI2_999[N_FC - 1], counts
    orig = np.array([p.task for p in paths])
    for k in range(N_FC):  # independent of the original task
        c = np.bincount(chosen[orig == k], minlength=N_FC)
        assert chi_square(c, np.full(N_FC, 0.25)) < CHI2_999[N_FC - 1], (k, c)
    frac = rel.diagnostics()["relabel/fraction_relabeled"]
    assert 0.70 < frac < 0.80  # 3/4 of the paths move
    assert rel.take_matrix().sum() == 4000


def test_none_never_moves_a_path():
    rel, ctx = stub_context("none", keep_original_prob=0.0)
    paths = tiny_paths(ctx.family, 400)
    for i in range(0, 400, 7):
        batch = paths[i:i + 7]
        for p, a in zip(batch, rel.assign(batch)):
            np.testing.assert_array_equal(a, np.full(len(p), p.task))
    m = rel.take_matrix()
    np.testing.assert_array_equal(m, np.diag(np.full(N_FC, 100.0)))
    assert rel.diagnostics()["relabel/fraction_relabeled"] == 0.0


# =====================================================================================================
# 5. The keep-original coin
# =====================================================================================================
def _moving_choose(paths):
    return [np.full(len(p), (p.task + 1) % N_FC, np.int64) for p in paths]


@pytest.mark.parametrize("name", ["hfr", "hfr-bellman", "hipi", "hipi-q"])
def test_keep_original_prob_one_never_moves(monkeypatch, name):
    rel, ctx = stub_context(name, keep_original_prob=1.0)

    def boom(paths):
        raise AssertionError("choose called although the coin keeps every batch")

    monkeypatch.setattr(rel, "choose", boom)
    paths = tiny_paths(ctx.family, 200)
    for i in range(0, 200, 5):
        for p, a in zip(paths[i:i + 5], rel.assign(paths[i:i + 5])):
            np.testing.assert_array_equal(a, np.full(len(p), p.task))
    m = rel.take_matrix()
    assert np.count_nonzero(m - np.diag(np.diag(m))) == 0
    assert rel.diagnostics()["relabel/fraction_relabeled"] == 0.0
    if name == "hipi":
        assert rel.cache_size == 100  # kept batches still fill the cache


@pytest.mark.parametrize("name", ["hfr", "hipi"])
def test_keep_original_prob_zero_never_keeps(monkeypatch, name):
    rel, ctx = stub_context(name, keep_original_prob=0.0)
    monkeypatch.setattr(rel, "choose", _moving_choose)
    paths = tiny_paths(ctx.family, 200)
    for i in range(0, 200, 5):
        for p, a in zip(paths[i:i + 5], rel.assign(paths[i:i + 5])):
            assert (a != p.task).all()
    assert rel.diagnostics()["relabel/fraction_relabeled"] == 1.0


def test_keep_original_coin_is_per_batch(monkeypatch):
    rel, ctx = stub_context("hfr", keep_original_prob=0.5)
    monkeypatch.setattr(rel, "choose", _moving_choose)
    replica = copy.deepcopy(ctx.rng)  # the coin is the first (and here only) draw per batch
    paths = tiny_paths(ctx.family, 10)
    kept = []
    for _ in range(200):
        moved = [bool((a != p.task).all()) for p, a in zip(paths, rel.assign(paths))]
        assert len(set(moved)) == 1  # all paths of a batch share the decision
        kept.append(not moved[0])
        assert kept[-1] == (replica.random() < 0.5)
    assert 60 < sum(kept) < 140


# =====================================================================================================
# 6. Filing through Trainer.store
# =====================================================================================================
class BufferSnapshot:
    def __init__(self, buf):
        self.size, self.ptr = buf.size.copy(), buf.ptr.copy()
        self.data = {k: v.copy() for k, v in buf.data.items()}
        if buf.store_starts:
            self.start_size, self.start_ptr = buf.start_size.copy(), buf.start_ptr.copy()
        self.should_clear = getattr(buf, "should_clear", np.zeros(0)).copy()


def new_rows(buf, snap, task, n):
    """The ``n`` rows written to ``task`` after ``snap`` (no wrap-around in these tests)."""
    p0 = snap.ptr[task]
    assert p0 + n <= buf.capacity
    return {k: v[task, p0:p0 + n] for k, v in buf.data.items()}


def expected_rows(fam, path, task, truncate=True):
    r, d, _ = fam.reward(path.infos, [task])
    dense = fam.dense_reward(path.infos, [task])
    T = first_terminal_len(d[0]) if truncate else len(path)
    return {"obs": path.obs[:T], "actions": path.actions[:T], "rewards": r[0][:T], "dense_rewards": dense[0][:T],
            "terminals": d[0][:T].astype(np.float32), "next_obs": path.next_obs[:T]}


def assert_rows(got, want):
    for k, v in want.items():
        np.testing.assert_allclose(got[k].reshape(len(v), -1), np.asarray(v, np.float32).reshape(len(v), -1),
                                   atol=1e-6, err_msg=k)


def test_store_files_relabeled_paths(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hfr", tmp_path, keep_original_prob=0.0)
    tr.initial_collection()
    fam = tr.env
    A, B, C = fc_paths(fam, np.random.default_rng(0))
    target = {id(A): 1, id(B): 3, id(C): 0}  # A and B move, C stays
    monkeypatch.setattr(tr.relabeler, "choose", lambda paths: [np.full(len(p), target[id(p)]) for p in paths])
    rl, enc, smp = BufferSnapshot(tr.rl_buf), BufferSnapshot(tr.enc_buf), BufferSnapshot(tr.smp_buf)
    tr.store([A, B, C], feeds_encoder=False)

    # A under task 1, by hand: -3 in task 1's square, then 0 and terminal at task 1's goal; cut there
    got = new_rows(tr.rl_buf, rl, 1, 2)
    np.testing.assert_array_equal(got["rewards"][:, 0], [-3.0, 0.0])
    np.testing.assert_array_equal(got["terminals"][:, 0], [0.0, 1.0])
    assert_rows(got, expected_rows(fam, A, 1))
    # B under task 3: -3 throughout, no terminal
    got = new_rows(tr.rl_buf, rl, 3, 3)
    np.testing.assert_array_equal(got["rewards"][:, 0], [-3.0, -3.0, -3.0])
    assert_rows(got, expected_rows(fam, B, 3))
    # C stays: its own rewards
    got = new_rows(tr.rl_buf, rl, 0, 3)
    np.testing.assert_array_equal(got["rewards"][:, 0], C.rewards)
    np.testing.assert_array_equal(got["rewards"][:, 0], fc_rewards(C.infos["pos"], 0)[0])
    assert got["terminals"][-1, 0] == 1.0

    np.testing.assert_array_equal(tr.rl_buf.size - rl.size, [3, 2, 0, 3])  # each path in exactly one buffer
    np.testing.assert_array_equal(tr.rl_buf.start_size - rl.start_size, [1, 1, 0, 1])
    for k, p in ((1, A), (3, B), (0, C)):
        np.testing.assert_array_equal(tr.rl_buf.starts[k, rl.start_ptr[k]], p.obs[0])
    # the sampler buffer keeps the originals
    np.testing.assert_array_equal(tr.smp_buf.size - smp.size, [len(B) + len(C), 0, len(A), 0])
    np.testing.assert_array_equal(new_rows(tr.smp_buf, smp, 2, len(A))["rewards"][:, 0], A.rewards)
    np.testing.assert_array_equal(new_rows(tr.smp_buf, smp, 0, len(B) + len(C))["rewards"][:, 0],
                                  np.concatenate([B.rewards, C.rewards]))
    # feeds_encoder=False: encoder buffers untouched
    np.testing.assert_array_equal(tr.enc_buf.size, enc.size)
    np.testing.assert_array_equal(tr.enc_buf.should_clear, enc.should_clear)
    for k in enc.data:
        np.testing.assert_array_equal(tr.enc_buf.data[k], enc.data[k])

    # feeds_encoder=True: the relabeled path goes to the assigned task's encoder buffer (cleared
    # on its first write after initial collection)
    assert tr.enc_buf.should_clear.all()
    tr.store([A], feeds_encoder=True)
    assert tr.enc_buf.size[1] == 2 and tr.enc_buf.size[2] == enc.size[2]
    assert_rows({k: v[1, :2] for k, v in tr.enc_buf.data.items()}, expected_rows(fam, A, 1))


def test_store_with_sampled_hfr_assignments(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hfr", tmp_path, keep_original_prob=0.0)
    tr.initial_collection()
    enlarge_output_layers(tr.agent)  # so that q(psi | tau) is not uniform
    fam, rel = tr.env, tr.relabeler
    rng = np.random.default_rng(0)
    paths = collected_paths(tr, [0, 1, 2, 3, 3, 2]) + fc_paths(fam, rng)
    captured = []
    orig_assign = rel.assign

    def spy(ps, groups=None):
        out = orig_assign(ps, groups)
        captured.extend(int(a[0]) for a in out)
        return out

    monkeypatch.setattr(rel, "assign", spy)
    rl, smp = BufferSnapshot(tr.rl_buf), BufferSnapshot(tr.smp_buf)
    tr.store(paths, feeds_encoder=True)
    assert len(captured) == len(paths)
    stored = np.zeros(N_FC, np.int64)
    for k in range(N_FC):
        mine = [p for p, a in zip(paths, captured) if a == k]
        if not mine:
            continue
        want = [expected_rows(fam, p, k) for p in mine]
        want = {f: np.concatenate([w[f] for w in want]) for f in want[0]}
        n = len(want["rewards"])
        stored[k] = n
        assert_rows(new_rows(tr.rl_buf, rl, k, n), want)
    np.testing.assert_array_equal(tr.rl_buf.size - rl.size, stored)
    assert (tr.smp_buf.size - smp.size).sum() == sum(len(p) for p in paths)
    assert np.sum(np.array(captured) != [p.task for p in paths]) > 0  # something did move


def test_store_per_transition_assignment(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hipi-q", tmp_path, keep_original_prob=0.0)
    tr.initial_collection()
    fam = tr.env
    A = point_path([(0.3, 0.3), (0.9, 0.9), (0.5, 0.5), (0.5, -0.3), (0.9, -0.9)], 2, fam, np.random.default_rng(0))
    assign = np.array([1, 1, 2, 3, 1])
    monkeypatch.setattr(tr.relabeler, "choose", lambda paths: [assign.copy()])
    rl = BufferSnapshot(tr.rl_buf)
    tr.store([A], feeds_encoder=True)
    np.testing.assert_array_equal(tr.rl_buf.size - rl.size, [0, 3, 1, 1])
    np.testing.assert_array_equal(tr.rl_buf.start_size, rl.start_size)  # no start state stored
    for k in (1, 2, 3):
        sel = assign == k
        r, d = fc_rewards(A.infos["pos"], k)  # not cut after task 1's terminal at step 2
        got = new_rows(tr.rl_buf, rl, k, int(sel.sum()))
        np.testing.assert_array_equal(got["rewards"][:, 0], r[sel])
        np.testing.assert_array_equal(got["terminals"][:, 0], d[sel])
        np.testing.assert_array_equal(got["obs"], A.obs[sel])
        np.testing.assert_array_equal(tr.enc_buf.data["rewards"][k, :sel.sum(), 0], r[sel])
    assert fc_rewards(A.infos["pos"], 1)[0][4] == -1.0 and fc_rewards(A.infos["pos"], 2)[1][4]


def test_relabeling_does_not_modify_collection_z(tmp_path, monkeypatch):
    tr = make_trainer("four-corners", "hfr", tmp_path, keep_original_prob=0.0)
    tr.initial_collection()
    z = tr.agent.prior_z()
    path = rollout(tr.env, tr.agent, z, tr.cfg.max_path_length)
    z0 = z.clone()
    tr.store([path], feeds_encoder=True)
    assert torch.equal(z, z0)

    seen = []

    def spy(env, agent, z_, H, deterministic=False):
        seen.append((z_, z_.clone()))
        return rollout(env, agent, z_, H, deterministic)

    monkeypatch.setattr(trainer_module, "rollout", spy)
    tr.collect(1, 60, posterior=True, feeds_encoder=True)  # z re-inferred after each relabeled path
    assert len(seen) >= 3
    for ref, clone in seen:
        assert torch.equal(ref, clone)


# =====================================================================================================
# 7. Smoke: every strategy trains through the CLI
# =====================================================================================================
def _train(tmp_path, family, *extra):
    run_dir = tmp_path / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["train", family, "--preset", "quick", *extra, "--num-iterations", "2",
                         "--num-train-steps-per-itr", "5", "--run-dir", str(run_dir), "--no-tensorboard",
                         "--progress", "off"])
    assert code == 0, out.getvalue()
    with open(run_dir / "progress.csv", newline="") as fh:
        progress = list(csv.DictReader(fh))
    with open(run_dir / "relabel_matrix.csv", newline="") as fh:
        matrix = list(csv.DictReader(fh))
    return progress, matrix


@pytest.mark.parametrize("family", ["four-corners", "sparse-point-robot"])
@pytest.mark.parametrize("relabel", ["none", "random", "hipi", "hipi-q", "hfr", "hfr-bellman"])
def test_cli_smoke(tmp_path, family, relabel):
    progress, matrix = _train(tmp_path, family, "--relabel", relabel)
    assert [r["iteration"] for r in progress] == ["1", "2"]
    fracs = [float(r["relabel/fraction_relabeled"]) for r in progress]
    assert all(0.0 <= f <= 1.0 for f in fracs)
    moved = [float(r["relabel/moved_success_rate"]) for r in progress]
    assert all(math.isnan(m) or 0.0 <= m <= 1.0 for m in moved)
    if relabel == "none":
        assert fracs == [0.0, 0.0] and all(math.isnan(m) for m in moved)
        assert all(r["original"] == r["assigned"] for r in matrix)
    if relabel == "random":
        assert min(fracs) > 0.0
    keys = {"hfr": ("utility", "log_z", "entropy", "logits"), "hfr-bellman": ("bellman_utility", "log_z", "entropy"),
            "hipi": ("return", "log_z", "entropy", "logits"), "hipi-q": ("q_value", "log_z", "entropy")}
    for key in keys.get(relabel, ()):
        col = f"relabel/{key}_mean"
        assert col in progress[0], col
        assert all(math.isfinite(float(r[col])) for r in progress), col
    if relabel in ("hfr", "hfr-bellman"):
        assert all(float(r["relabel/entropy_mean"]) <= math.log(N_FC if family == "four-corners" else 80) + 1e-6
                   for r in progress)
    assert {r["iteration"] for r in matrix} == {"1", "2"}
    # the matrix counts each iteration's paths once
    for it, row in zip(("1", "2"), progress):
        total = sum(float(r["paths"]) for r in matrix if r["iteration"] == it)
        assert total == pytest.approx(float(row["relabel/paths"]))


def test_cli_smoke_learned_reward(tmp_path):
    progress, matrix = _train(tmp_path, "four-corners", "--relabel", "hfr", "--learned-reward", "true")
    assert len(progress) == 2 and "relabel/utility_mean" in progress[0]
    assert {r["iteration"] for r in matrix} == {"1", "2"}


def test_keep_original_coin_per_group_and_one_choose_call():
    """``assign(paths, groups)``: one coin per group in order of first appearance, from the
    run's rng; the paths of the relabeled groups go to ``choose`` together, the others stay."""
    rel, ctx = hfr_stub(keep_original_prob=0.5)
    base = fc_paths(ctx.family, np.random.default_rng(0))
    paths = [base[0], base[1], base[2], base[0], base[1]]
    groups = [7, 7, 3, 9, 9]
    calls = []
    choose = rel.choose
    rel.choose = lambda ps: calls.append(len(ps)) or choose(ps)
    for seed in range(12):
        ctx.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        coins = np.random.default_rng(seed).random(3) < 0.5  # groups 7, 3, 9
        calls.clear()
        out = rel.assign(paths, groups)
        kept = [coins[[7, 3, 9].index(g)] for g in groups]
        for p, a, k in zip(paths, out, kept):
            if k:
                assert (a == p.task).all()
        n_relabel = sum(not k for k in kept)
        assert calls == ([n_relabel] if n_relabel else [])
