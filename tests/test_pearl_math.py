"""PEARL math against independent closed forms (SPEC section 1)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from metarelabel.networks import LOG_STD_MAX, LOG_STD_MIN, MLP, TanhGaussianPolicy, TwinQ
from metarelabel.pearl import VAR_MIN, kl_to_standard_normal, product_of_gaussians
from conftest import make_agent, random_batch


# ---- product of Gaussians ---------------------------------------------------------------------
def _pog_numpy(mu, var, mask=None):
    """sigma^2 = 1 / sum_n 1/max(sigma^2_n, 1e-7), mu = sigma^2 * sum_n mu_n / sigma^2_n (masked rows
    dropped), written with explicit loops."""
    M, C, L = mu.shape
    out_mu, out_var = np.zeros((M, L)), np.zeros((M, L))
    for m in range(M):
        for l in range(L):
            s_prec, s_mu = 0.0, 0.0
            for c in range(C):
                if mask is not None and mask[m, c] == 0:
                    continue
                v = max(var[m, c, l], 1e-7)
                s_prec += 1.0 / v
                s_mu += mu[m, c, l] / v
            out_var[m, l] = 1.0 / s_prec
            out_mu[m, l] = out_var[m, l] * s_mu
    return out_mu, out_var


def _pog_inputs(seed):
    rng = np.random.default_rng(seed)
    M, C, L = 4, 9, 5
    mu = rng.normal(size=(M, C, L)) * 2
    var = rng.uniform(0.05, 3.0, size=(M, C, L))
    # values below the clamp: exact zero, tiny positive, negative (softplus never gives those,
    # but the clamp must handle them)
    var[0, 3, 1] = 0.0
    var[1, 0, :] = 1e-12
    var[2, 5, 4] = -1.0
    var[3, 2, 2] = 5e-8
    return mu, var


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_product_of_gaussians_closed_form(seed):
    mu, var = _pog_inputs(seed)
    got_mu, got_var = product_of_gaussians(torch.tensor(mu), torch.tensor(var))
    ref_mu, ref_var = _pog_numpy(mu, var)
    assert np.all(np.isfinite(got_mu.numpy())) and np.all(np.isfinite(got_var.numpy()))
    np.testing.assert_allclose(got_var.numpy(), ref_var, rtol=1e-10, atol=0)
    np.testing.assert_allclose(got_mu.numpy(), ref_mu, rtol=1e-9, atol=1e-12)
    # the clamped transition (var=0) dominates: posterior ~= its mean, variance ~= 1e-7
    others = np.delete(var[0, :, 1], 3)
    assert got_var[0, 1].item() == pytest.approx(1.0 / (1e7 + (1.0 / others).sum()), rel=1e-12)
    assert got_mu[0, 1].item() == pytest.approx(mu[0, 3, 1], abs=1e-5)
    assert VAR_MIN == 1e-7


@pytest.mark.parametrize("seed", [3, 4])
def test_product_of_gaussians_mask(seed):
    mu, var = _pog_inputs(seed)
    rng = np.random.default_rng(seed + 100)
    mask = (rng.random(mu.shape[:2]) < 0.6).astype(np.float64)
    mask[:, 0] = 1.0  # at least one transition per task
    got_mu, got_var = product_of_gaussians(torch.tensor(mu), torch.tensor(var), torch.tensor(mask))
    ref_mu, ref_var = _pog_numpy(mu, var, mask)
    np.testing.assert_allclose(got_var.numpy(), ref_var, rtol=1e-10)
    np.testing.assert_allclose(got_mu.numpy(), ref_mu, rtol=1e-9, atol=1e-12)
    # masking == dropping the rows (independent route) for each task
    for m in range(mu.shape[0]):
        keep = mask[m] > 0
        sub_mu, sub_var = product_of_gaussians(torch.tensor(mu[m:m + 1, keep]), torch.tensor(var[m:m + 1, keep]))
        np.testing.assert_allclose(got_mu[m].numpy(), sub_mu[0].numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got_var[m].numpy(), sub_var[0].numpy(), rtol=1e-12)
    # and the mask matters
    assert not np.allclose(got_mu.numpy(), _pog_numpy(mu, var)[0])


def test_product_of_gaussians_single_transition_is_identity():
    mu = torch.randn(3, 1, 5, dtype=torch.float64)
    var = torch.rand(3, 1, 5, dtype=torch.float64) + 0.1
    pm, pv = product_of_gaussians(mu, var)
    torch.testing.assert_close(pm, mu[:, 0])
    torch.testing.assert_close(pv, var[:, 0])


# ---- KL -----------------------------------------------------------------------------------------------
def test_kl_to_standard_normal_matches_torch():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    var = torch.rand(6, 5, generator=g, dtype=torch.float64) * 3 + 1e-3
    ref = kl_divergence(Normal(mu, var.sqrt()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    got = kl_to_standard_normal(mu, var)
    assert got.shape == (6,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # zero exactly at the prior
    assert kl_to_standard_normal(torch.zeros(2, 5), torch.ones(2, 5)).abs().max().item() == 0.0


# ---- posterior inference --------------------------------------------------------------------------------
@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_infer_posterior_batched_equals_loop(bottleneck, use_mask):
    agent = make_agent(seed=1, use_information_bottleneck=bottleneck)
    g = torch.Generator().manual_seed(5)
    M, C = 6, 17
    ctx = torch.randn(M, C, agent.dims.context, generator=g)
    mask = None
    if use_mask:
        mask = (torch.rand(M, C, generator=g) < 0.5).float()
        mask[:, 0] = 1.0
    with torch.no_grad():
        mu, var = agent.infer_posterior(ctx, mask)
        assert mu.shape == (M, agent.dims.latent) and var.shape == (M, agent.dims.latent)
        for i in range(M):
            mi, vi = agent.infer_posterior(ctx[i:i + 1], None if mask is None else mask[i:i + 1])
            torch.testing.assert_close(mu[i], mi[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var[i], vi[0], rtol=1e-5, atol=1e-7)
            # masked rows are the same as not having them at all
            if mask is not None:
                keep = mask[i] > 0
                mk, vk = agent.infer_posterior(ctx[i:i + 1, keep])
                torch.testing.assert_close(mu[i], mk[0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(var[i], vk[0], rtol=1e-5, atol=1e-7)
        # the different tasks really get different posteriors
        assert (mu[0] - mu[1]).abs().max() > 1e-4


def test_infer_posterior_uses_softplus_variance_and_product():
    agent = make_agent(seed=2)
    L = agent.dims.latent
    ctx = torch.randn(3, 11, agent.dims.context, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = agent.encoder(ctx).double().numpy()
        mu, var = agent.infer_posterior(ctx)
        mu_t, var_t = agent.transition_factors(ctx)
    mu_n = out[..., :L]
    var_n = np.log1p(np.exp(out[..., L:]))  # softplus
    np.testing.assert_allclose(mu_t.numpy(), mu_n, rtol=1e-6)
    np.testing.assert_allclose(var_t.numpy(), np.maximum(var_n, VAR_MIN), rtol=1e-4)
    ref_mu, ref_var = _pog_numpy(mu_n, var_n)
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-4)
    np.testing.assert_allclose(mu.numpy(), ref_mu, rtol=1e-4, atol=1e-6)


# ---- tanh-Gaussian policy ------------------------------------------------------------------------
def _policy(seed=0, in_dim=7, act=3):
    torch.manual_seed(seed)
    pol = TanhGaussianPolicy(in_dim, act, 32, 2)
    with torch.no_grad():  # spread the distribution so the tanh correction matters
        pol.net.out.weight.mul_(300.0)
        pol.log_std.weight.mul_(100.0)
        pol.log_std.bias.fill_(-0.3)
    return pol


def _textbook_log_prob(mean, log_std, u):
    mean, log_std, u = (np.asarray(t.detach(), np.float64) for t in (mean, log_std, u))
    std = np.exp(log_std)
    log_n = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return log_n.sum(-1) - np.log(1.0 - np.tanh(u) ** 2).sum(-1)


def test_tanh_gaussian_log_prob_explicit_noise():
    pol = _policy()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 7, generator=g)
    eps = torch.randn(64, 3, generator=g)
    action, logp, mean, log_std = pol(x, eps=eps)
    # mean/log_std are the heads' outputs (log_std clamped)
    h = pol.net.trunk(x)
    torch.testing.assert_close(mean, pol.net.out(h))
    torch.testing.assert_close(log_std, pol.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX))
    u = (mean.double() + log_std.double().exp() * eps.double()).detach()
    assert u.abs().max() > 1.5, "test inputs should exercise the tanh correction"
    assert u.abs().max() < 8.0
    np.testing.assert_allclose(action.detach().numpy(), np.tanh(u.numpy()), atol=1e-5)
    np.testing.assert_allclose(logp.detach().numpy(), _textbook_log_prob(mean, log_std, u), atol=1e-4, rtol=1e-5)


def test_tanh_gaussian_log_prob_fixed_seed_sampling():
    pol = _policy(seed=4)
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        mean = pol.net(x)
    torch.manual_seed(1234)
    eps = torch.randn_like(mean)
    torch.manual_seed(1234)
    action, logp, mean2, log_std = pol(x)
    u = (mean2.double() + log_std.double().exp() * eps.double()).detach()
    np.testing.assert_allclose(action.detach().numpy(), np.tanh(u.numpy()), atol=1e-5)
    np.testing.assert_allclose(logp.detach().numpy(), _textbook_log_prob(mean2, log_std, u), atol=1e-4, rtol=1e-5)
    # the log-prob is differentiable (reparameterised) w.r.t. the policy parameters
    logp.sum().backward()
    assert pol.net.out.weight.grad is not None and pol.net.out.weight.grad.abs().sum() > 0


def test_tanh_gaussian_deterministic_and_log_std_clamp():
    pol = _policy(seed=5)
    x = torch.randn(10, 7, generator=torch.Generator().manual_seed(2))
    a, logp, mean, _ = pol(x, deterministic=True)
    assert logp is None
    torch.testing.assert_close(a, torch.tanh(mean))
    with torch.no_grad():
        pol.log_std.weight.zero_()
        pol.log_std.bias.fill_(50.0)
    assert torch.all(pol(x)[3] == LOG_STD_MAX)
    with torch.no_grad():
        pol.log_std.bias.fill_(-50.0)
    assert torch.all(pol(x)[3] == LOG_STD_MIN)
    assert (LOG_STD_MIN, LOG_STD_MAX) == (-20.0, 2.0)


# ---- twin Q --------------------------------------------------------------------------------------------
def test_twin_q_batched_equals_two_explicit_mlps():
    torch.manual_seed(0)
    tq = TwinQ(6, 16, 3)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    out = tq(x)
    assert out.shape == (2, 40)
    ws = [w.detach().double().numpy() for w in tq.weights]
    bs = [b.detach().double().numpy() for b in tq.biases]
    assert len(ws) == 4 and ws[0].shape == (2, 6, 16) and ws[-1].shape == (2, 16, 1)
    xn = x.double().numpy()
    for head in range(2):
        h = xn
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = h @ w[head] + b[head, 0]
            if i < len(ws) - 1:
                h = np.maximum(h, 0.0)
        np.testing.assert_allclose(out[head].detach().numpy(), h[:, 0], rtol=1e-5, atol=1e-6)
    # the heads are independent networks
    assert not np.allclose(ws[0][0], ws[0][1])
    assert (out[0] - out[1]).abs().max() > 0


def test_twin_q_heads_get_independent_gradients():
    torch.manual_seed(0)
    tq = TwinQ(4, 8, 2)
    x = torch.randn(12, 4)
    tq(x)[0].sum().backward()  # only head 0 in the loss
    for w in tq.weights:
        assert w.grad[0].abs().sum() > 0
        assert w.grad[1].abs().sum() == 0


# ---- the gradient step ---------------------------------------------------------------------------------
def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_update_changes_all_networks_and_polyak_target():
    agent = make_agent(seed=3, soft_target_tau=0.05)
    g = torch.Generator().manual_seed(0)
    # make target differ from V so that tau * (V_new - target_old) is clearly measurable
    with torch.no_grad():
        for p in agent.target_vf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    batch = random_batch(g, 3, 16)
    context = torch.randn(3, 10, agent.dims.context, generator=g)
    before = {k: _params(m) for k, m in agent.modules().items()}
    out = agent.update(batch, context)
    for name in ("encoder", "qf", "vf", "policy"):
        after = _params(agent.modules()[name])
        for i, (p0, p1) in enumerate(zip(before[name], after)):
            assert not torch.equal(p0, p1), f"{name} parameter {i} did not change"
    tau = agent.cfg.soft_target_tau
    assert tau == 0.05
    for t_old, t_new, v_new in zip(before["target_vf"], _params(agent.target_vf), _params(agent.vf)):
        expected = t_old + tau * (v_new - t_old)
        torch.testing.assert_close(t_new, expected, rtol=0, atol=1e-7)
        assert (t_new - t_old).abs().max() > 1e-4  # the target moved measurably
    for p in agent.target_vf.parameters():
        assert not p.requires_grad
    for k, v in out.items():
        assert torch.isfinite(v).all(), k


def test_target_starts_as_copy_of_v():
    agent = make_agent(seed=4)
    for a, b in zip(agent.vf.parameters(), agent.target_vf.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("grad_step", ["reference", "lean"])
@pytest.mark.parametrize("reward_scale,kl_lambda", [(100.0, 1.0), (3.0, 0.25)])
def test_update_q_loss_kl_and_encoder_gradient(reward_scale, kl_lambda, grad_step):
    """Reproduce the critic/encoder loss of one step from the pre-update networks and the same
    noise, and check that the encoder gradient is exactly that loss's gradient (so policy and V
    see z detached).  The lean step's hand-written gradients are checked against autograd on
    that independent loss."""
    agent = make_agent(seed=5, reward_scale=reward_scale, kl_lambda=kl_lambda, discount=0.9, grad_step=grad_step)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        agent.target_vf.out.bias.fill_(2.0)  # make gamma * V(s') non-negligible
    M, B = 4, 12
    batch = random_batch(g, M, B)
    context = torch.randn(M, 9, agent.dims.context, generator=g)
    ref = copy.deepcopy(agent)

    torch.manual_seed(77)
    eps_z = torch.randn(M, agent.dims.latent)
    torch.manual_seed(77)
    out = agent.update(batch, context)

    # independent computation on the copy
    L = agent.dims.latent
    enc_out = ref.encoder(context)
    mu_n, var_n = enc_out[..., :L], F.softplus(enc_out[..., L:]).clamp(min=1e-7)
    var = 1.0 / (1.0 / var_n).sum(1)
    mu = var * (mu_n / var_n).sum(1)
    z = mu + var.sqrt() * eps_z
    kl = kl_divergence(Normal(mu, var.sqrt()), Normal(0.0, 1.0)).sum()
    zb = z[:, None, :].expand(M, B, L)
    q_in = torch.cat([batch["obs"], batch["actions"], zb], -1).reshape(M * B, -1)
    q1, q2 = ref.qf(q_in)
    with torch.no_grad():
        v_next = ref.target_vf(torch.cat([batch["next_obs"], zb], -1).reshape(M * B, -1))[:, 0]
    r, d = batch["rewards"].reshape(-1), batch["terminals"].reshape(-1)
    y = reward_scale * r + (1.0 - d) * 0.9 * v_next
    qf_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    torch.testing.assert_close(out["losses/qf"], qf_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["losses/kl"], kl.detach(), rtol=1e-5, atol=1e-5)
    (kl_lambda * kl + qf_loss).backward()
    for i, (p, p_ref) in enumerate(zip(agent.encoder.parameters(), ref.encoder.parameters())):
        grad = agent._flat[0].grads[p] if grad_step == "lean" else p.grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, p_ref.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"encoder param {i}: {m}")


def test_td_error_matches_manual_q_target():
    agent = make_agent(seed=6, reward_scale=7.0, discount=0.8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        agent.target_vf.out.bias.fill_(3.0)
        agent.qf.biases[-1].add_(0.5)
    K, B = 3, 10
    batch = random_batch(g, K, B, p_terminal=0.5)
    assert 0 < batch["terminals"].sum() < K * B
    z = torch.randn(K, agent.dims.latent, generator=g)
    got = agent.td_error(batch, z)
    assert got.shape == (K,)

    # manual, per task and per transition, in float64
    ws = [w.detach().double().numpy() for w in agent.qf.weights]
    bs = [b.detach().double().numpy() for b in agent.qf.biases]

    def q_head(x, head):
        h = x
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = h @ w[head] + b[head, 0]
            if i < len(ws) - 1:
                h = np.maximum(h, 0)
        return h[0]

    expected = np.zeros(K)
    for k in range(K):
        zk = z[k].double().numpy()
        err1 = err2 = 0.0
        for b in range(B):
            s, a = batch["obs"][k, b].double().numpy(), batch["actions"][k, b].double().numpy()
            s2 = batch["next_obs"][k, b]
            with torch.no_grad():
                v = agent.target_vf(torch.cat([s2, z[k]])[None]).item()
            rr, dd = batch["rewards"][k, b, 0].item(), batch["terminals"][k, b, 0].item()
            y = 7.0 * rr + (1.0 - dd) * 0.8 * v
            x = np.concatenate([s, a, zk])
            err1 += (q_head(x, 0) - y) ** 2
            err2 += (q_head(x, 1) - y) ** 2
        expected[k] = err1 / B + err2 / B
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)

    # the target really depends on the terminal flag and the reward scale
    flipped = dict(batch, terminals=1.0 - batch["terminals"])
    assert not torch.allclose(agent.td_error(flipped, z), got, rtol=1e-3)


def test_start_state_value_matches_manual():
    agent = make_agent(seed=7)
    g = torch.Generator().manual_seed(3)
    K, B = 3, 8
    starts = torch.randn(K, B, 2, generator=g)
    z = torch.randn(K, agent.dims.latent, generator=g)
    eps = torch.randn(K, B, 2, generator=g)
    got = agent.start_state_value(starts, z, eps=eps)
    with torch.no_grad():
        for k in range(K):
            sz = torch.cat([starts[k], z[k].expand(B, -1)], -1)
            a, _, mean, log_std = agent.policy(sz, eps=eps[k])
            torch.testing.assert_close(a, torch.tanh(mean + log_std.exp() * eps[k]))
            q = agent.qf(torch.cat([starts[k], a, z[k].expand(B, -1)], -1))
            assert q.shape == (2, B)
            expected = torch.minimum(q[0], q[1]).mean()
            torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)


def test_mlp_shapes_and_init():
    torch.manual_seed(0)
    m = MLP(5, 20, 3, 4)
    assert len(m.hidden) == 3
    for lin in m.hidden:
        assert torch.all(lin.bias == 0.1)
        bound = 1.0 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max() <= bound
    assert m.out.weight.abs().max() <= 3e-3
    assert m(torch.randn(7, 5)).shape == (7, 4)


def test_rlkit_init_bounds_by_output_width():
    """``init = rlkit``: hidden weights within 1/sqrt(out) (the release's fanin_init on torch
    Linear weights), biases 0.1, policy heads within 1e-3, target V a copy of V; ``pearl``
    bounds the first layer by 1/sqrt(in), several times wider here."""
    rl = make_agent(seed=0, hidden_dim=48, encoder_hidden_dim=40, init="rlkit")
    pe = make_agent(seed=0, hidden_dim=48, encoder_hidden_dim=40)
    for agent, bound in ((rl, 1 / math.sqrt(48)), (pe, 1 / math.sqrt(rl.vf.hidden[0].in_features))):
        w = agent.vf.hidden[0].weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert rl.encoder.hidden[0].weight.abs().max() <= 1 / math.sqrt(40)
    assert rl.qf.weights[0].abs().max() <= 1 / math.sqrt(48)
    assert torch.all(rl.qf.biases[0] == 0.1) and torch.all(rl.policy.net.hidden[1].bias == 0.1)
    for lin in (rl.policy.net.out, rl.policy.log_std):
        assert lin.weight.abs().max() <= 1e-3 and lin.bias.abs().max() <= 1e-3
    for a, b in zip(rl.vf.parameters(), rl.target_vf.parameters()):
        assert torch.equal(a, b)
