"""The optimized PEARL step (batched twin critic, critic weights detached in the policy term,
fused Adam) equals a plain reference step written the textbook way: two separate critic
networks, separate per-network Adam optimizers, every forward pass with full autograd."""
from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import make_agent, random_batch
from metarelabel.networks import MLP


def _split_twin(agent):
    """Two plain MLPs holding the TwinQ's stacked weights."""
    qf = agent.qf
    in_dim = qf.weights[0].shape[1]
    hidden = qf.weights[0].shape[2]
    layers = len(qf.weights) - 1
    nets = []
    for h in range(2):
        net = MLP(in_dim, hidden, layers, 1)
        with torch.no_grad():
            for lin, w, b in zip(list(net.hidden) + [net.out], qf.weights, qf.biases):
                lin.weight.copy_(w[h].T)
                lin.bias.copy_(b[h, 0])
        nets.append(net)
    return nets


class Reference:
    def __init__(self, agent):
        self.cfg = agent.cfg
        self.L = agent.dims.latent
        self.encoder = copy.deepcopy(agent.encoder)
        self.policy = copy.deepcopy(agent.policy)
        self.vf = copy.deepcopy(agent.vf)
        self.target_vf = copy.deepcopy(agent.target_vf)
        self.q1, self.q2 = _split_twin(agent)
        lr = self.cfg.lr
        self.opts = {n: torch.optim.Adam(getattr(self, n).parameters(), lr=lr)
                     for n in ("encoder", "policy", "vf", "q1", "q2")}

    def step(self, batch, context):
        cfg, L = self.cfg, self.L
        M, B, _ = batch["obs"].shape
        obs = batch["obs"].reshape(M * B, -1)
        act = batch["actions"].reshape(M * B, -1)
        nxt = batch["next_obs"].reshape(M * B, -1)
        rew = batch["rewards"].reshape(M * B, 1)
        term = batch["terminals"].reshape(M * B, 1)
        out = self.encoder(context)
        mu_n, var_n = out[..., :L], F.softplus(out[..., L:]).clamp(min=1e-7)
        var = 1.0 / (1.0 / var_n).sum(1)
        mu = var * (mu_n / var_n).sum(1)
        z = mu + var.sqrt() * torch.randn_like(mu)
        zb = z.repeat_interleave(B, 0)
        new_act, log_pi, pmean, plog_std = self.policy(torch.cat([obs, zb.detach()], 1))
        q1 = self.q1(torch.cat([obs, act, zb], 1))
        q2 = self.q2(torch.cat([obs, act, zb], 1))
        v = self.vf(torch.cat([obs, zb.detach()], 1))
        with torch.no_grad():
            tv = self.target_vf(torch.cat([nxt, zb], 1))
        prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, var.sqrt()), prior).sum()
        y = cfg.reward_scale * rew + (1 - term) * cfg.discount * tv
        qf_loss = torch.mean((q1 - y) ** 2) + torch.mean((q2 - y) ** 2)
        for n in ("encoder", "q1", "q2"):
            self.opts[n].zero_grad()
        (cfg.kl_lambda * kl + qf_loss).backward()
        for n in ("q1", "q2", "encoder"):
            self.opts[n].step()
        q_new = torch.min(self.q1(torch.cat([obs, new_act, zb.detach()], 1)),
                          self.q2(torch.cat([obs, new_act, zb.detach()], 1))).squeeze(1)
        vf_loss = F.mse_loss(v.squeeze(1), (q_new - log_pi).detach())
        self.opts["vf"].zero_grad()
        vf_loss.backward()
        self.opts["vf"].step()
        with torch.no_grad():
            for tp, p in zip(self.target_vf.parameters(), self.vf.parameters()):
                tp.mul_(1 - cfg.soft_target_tau).add_(cfg.soft_target_tau * p)
        policy_loss = (log_pi - q_new).mean() + cfg.policy_mean_reg * (pmean ** 2).mean() \
            + cfg.policy_std_reg * (plog_std ** 2).mean()
        self.opts["policy"].zero_grad()
        policy_loss.backward()
        self.opts["policy"].step()
        return {"losses/qf": qf_loss.detach(), "losses/vf": vf_loss.detach(),
                "losses/policy": policy_loss.detach(), "losses/kl": kl.detach()}


def _compare_steps(step_got, step_want, obs: int, act: int, steps: int, same_keys: bool = False) -> None:
    """Run two step functions on the same batches and noise; the losses must agree."""
    gen = torch.Generator().manual_seed(11)
    for step in range(steps):
        batch = random_batch(gen, 3, 17, obs, act)
        context = torch.randn(3, 9, obs + act + 1, generator=gen)
        torch.manual_seed(100 + step)
        got = step_got(batch, context)
        torch.manual_seed(100 + step)
        want = step_want(batch, context)
        assert not same_keys or got.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"step {step}: {k}")


@pytest.mark.parametrize("obs,act", [(2, 2), (20, 6)])
def test_optimized_step_equals_plain_reference(obs, act):
    agent = make_agent(seed=3, obs=obs, act=act, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7,
                       reward_scale=5.0, lr=1e-3)
    ref = Reference(agent)
    _compare_steps(agent.update, ref.step, obs, act, 4)
    q1, q2 = _split_twin(agent)
    pairs = [(agent.encoder, ref.encoder), (agent.policy, ref.policy), (agent.vf, ref.vf),
             (agent.target_vf, ref.target_vf), (q1, ref.q1), (q2, ref.q2)]
    for mine, theirs in pairs:
        for (name, p), t in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, t, rtol=1e-4, atol=1e-5, msg=name)
    # the parameters really moved (the comparison is not between two untouched copies)
    assert not torch.allclose(q1.hidden[0].weight, _split_twin(make_agent(seed=3, obs=obs, act=act, hidden_dim=48,
                                                                           encoder_hidden_dim=40))[0].hidden[0].weight)


def _all_params(agent):
    return [p.detach().clone() for m in agent.modules().values() for p in m.parameters()]


def _lean_vs_reference(ib: bool, obs: int, act: int, steps: int = 5, **over):
    kw = dict(seed=3, obs=obs, act=act, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7, reward_scale=5.0,
              lr=1e-3, use_information_bottleneck=ib, **over)
    lean, ref = make_agent(grad_step="lean", **kw), make_agent(grad_step="reference", **kw)
    assert lean.lean and not ref.lean
    _compare_steps(lean.update, ref.update, obs, act, steps, same_keys=True)
    return lean, ref


@pytest.mark.parametrize("ib", [True, False])
@pytest.mark.parametrize("obs,act", [(2, 2), (20, 6)])
def test_lean_step_equals_reference_step(ib, obs, act):
    """The hand-written backward + flat fused Adam gives the reference step's losses and, after
    several steps, all of its parameters and Adam moments (same random draws, same order)."""
    lean, ref = _lean_vs_reference(ib, obs, act)
    start = make_agent(seed=3, obs=obs, act=act, hidden_dim=48, encoder_hidden_dim=40)
    for a, b, s in zip(_all_params(lean), _all_params(ref), _all_params(start)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert not torch.equal(a, s) or a.numel() == 0  # every parameter moved
    for name in ("qf", "encoder", "vf", "policy"):
        sl, sr = lean.optimizers[name].state_dict()["state"], ref.optimizers[name].state_dict()["state"]
        assert sl.keys() == sr.keys()
        for i in sr:
            assert float(sl[i]["step"]) == float(sr[i]["step"]) == 5
            torch.testing.assert_close(sl[i]["exp_avg"], sr[i]["exp_avg"], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(sl[i]["exp_avg_sq"], sr[i]["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def test_lean_step_with_clamped_log_std_and_regularisers():
    """log-std pushed above its clamp for one action dimension: no gradient flows through the
    clamped entries, as in autograd's clamp; strong mean/std penalties make the regulariser
    gradients visible.  (Below the lower clamp, std = e^-20, autograd's reference computes the
    Gaussian term's zero total derivative as a difference of ~1e17-sized terms; the lean step
    uses the exact zero, so the two are not compared there.)"""
    def push(agent):
        with torch.no_grad():
            agent.policy.log_std.bias[0] = 4.0
    kw = dict(seed=4, obs=2, act=2, hidden_dim=16, encoder_hidden_dim=16, policy_mean_reg=0.3, policy_std_reg=0.2)
    lean, ref = make_agent(grad_step="lean", **kw), make_agent(grad_step="reference", **kw)
    push(lean), push(ref)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        batch, context = random_batch(gen, 2, 11), torch.randn(2, 5, 5, generator=gen)
        torch.manual_seed(step)
        got = lean.update(batch, context)
        torch.manual_seed(step)
        want = ref.update(batch, context)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    for a, b in zip(_all_params(lean), _all_params(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lean_and_reference_steps_share_state_and_checkpoints():
    """The steps can alternate on one agent (the flat views are the optimizer's own state),
    and a state_dict written after lean steps loads into a fresh agent that continues
    identically."""
    lean, ref = _lean_vs_reference(True, 2, 2, steps=2)
    gen = torch.Generator().manual_seed(5)
    batch, context = random_batch(gen, 3, 17), torch.randn(3, 9, 5, generator=gen)
    torch.manual_seed(1)
    lean.update_reference(batch, context)
    torch.manual_seed(1)
    ref.update_reference(batch, context)
    torch.manual_seed(2)
    lean.update_lean(batch, context)
    torch.manual_seed(2)
    ref.update_lean(batch, context)
    for a, b in zip(_all_params(lean), _all_params(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    state = copy.deepcopy(lean.state_dict())
    fresh = make_agent(seed=9, obs=2, act=2, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7, reward_scale=5.0,
                       lr=1e-3, grad_step="lean")
    fresh.load_state_dict(state)
    for agent in (lean, fresh):
        torch.manual_seed(3)
        agent.update(batch, context)
    for a, b in zip(_all_params(lean), _all_params(fresh)):
        assert torch.equal(a, b)


def test_lean_step_equals_reference_with_the_release_squash():
    """``squash_log_prob = rlkit``: log(1 - tanh(u)^2 + 1e-6) in both steps; the lean step's
    derivative of it matches autograd's, and the term is the release's formula."""
    _lean_vs_reference(True, 2, 2, squash_log_prob="rlkit")
    agent = make_agent(seed=1, squash_log_prob="rlkit")
    assert agent.policy.squash == "rlkit"
    x = torch.randn(64, agent.dims.obs + agent.dims.latent, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a, logp, mean, log_std = agent.policy(x)
    torch.manual_seed(5)
    u = mean + log_std.exp() * torch.randn_like(mean)
    want = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum(-1)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ib", [True, False])
def test_z_noise_lean_equals_reference_and_changes_the_step(ib):
    """``z_noise``: the same extra draw in both steps (after the posterior sample), so lean and
    reference still agree; the step differs from the step without it, and the noise reaches the
    critics' inputs (Q loss changes) while the KL term, a function of the posterior alone, does not."""
    lean, ref = _lean_vs_reference(ib, 2, 2, steps=3, z_noise=0.7)
    for a, b in zip(_all_params(lean), _all_params(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    kw = dict(seed=3, obs=2, act=2, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7, reward_scale=5.0, lr=1e-3,
              use_information_bottleneck=ib)
    plain, noisy = make_agent(grad_step="reference", **kw), make_agent(grad_step="reference", z_noise=0.7, **kw)
    gen = torch.Generator().manual_seed(11)
    batch = random_batch(gen, 3, 17, 2, 2)
    context = torch.randn(3, 9, 5, generator=gen)
    torch.manual_seed(100)
    a = plain.update(batch, context)
    torch.manual_seed(100)
    b = noisy.update(batch, context)
    assert float(a["losses/qf"]) != float(b["losses/qf"])
    torch.testing.assert_close(a["losses/kl"], b["losses/kl"])
    # and the networks end the step elsewhere
    assert any(not torch.equal(p, q) for p, q in zip(_all_params(plain), _all_params(noisy)))


@pytest.mark.parametrize("target", [1e-3, 1e3])
def test_tuned_kl_weight_first_step_and_lean_equals_reference(target):
    """``kl_target``: a step uses the weight exp(log kl_lambda) it starts with, then moves log
    kl_lambda by about lr against the sign of (target - KL per task): up when the KL is above
    the target, down when below.  The lean step tunes it as the reference does."""
    lean, ref = _lean_vs_reference(True, 2, 2, steps=1, kl_target=target)
    for agent in (lean, ref):
        gen = torch.Generator().manual_seed(0)
        batch, context = random_batch(gen, 3, 17), torch.randn(3, 9, 5, generator=gen)
        before = float(agent.kl_log_lambda.detach())
        torch.manual_seed(0)
        out = agent.update(batch, context)
        assert float(out["train/kl_lambda"]) == pytest.approx(math.exp(before), rel=1e-6)
        up = float(out["losses/kl"]) / 3 > target
        assert up == (target < 1)  # random contexts carry well over 1e-3 and under 1e3 nats
        # Adam's second step with a same-signed gradient moves by about lr again
        assert float(agent.kl_log_lambda.detach()) - before == pytest.approx(1e-3 if up else -1e-3, rel=0.05)
    assert float(lean.kl_log_lambda.detach()) == pytest.approx(float(ref.kl_log_lambda.detach()), rel=1e-6)


def test_tuned_kl_weight_is_exactly_one_adam_step_and_checkpointed():
    """From a fresh agent the first tuning step is log(kl_lambda) + lr * sign(KL/M - target)
    (Adam's bias-corrected first step), and a state_dict carries log kl_lambda and its Adam
    state into a fresh agent that then continues identically."""
    agent = make_agent(seed=3, hidden_dim=16, encoder_hidden_dim=16, kl_lambda=2.0, kl_target=1e3, lr=1e-3)
    gen = torch.Generator().manual_seed(4)
    batch, context = random_batch(gen, 2, 11), torch.randn(2, 5, 5, generator=gen)
    torch.manual_seed(0)
    agent.update(batch, context)
    assert float(agent.kl_log_lambda.detach()) == pytest.approx(math.log(2.0) - 1e-3, rel=1e-6)
    fresh = make_agent(seed=8, hidden_dim=16, encoder_hidden_dim=16, kl_lambda=2.0, kl_target=1e3, lr=1e-3)
    fresh.load_state_dict(copy.deepcopy(agent.state_dict()))
    for a in (agent, fresh):
        torch.manual_seed(1)
        a.update(batch, context)
    assert float(agent.kl_log_lambda.detach()) == float(fresh.kl_log_lambda.detach())
    for a, b in zip(_all_params(agent), _all_params(fresh)):
        assert torch.equal(a, b)
    plain = make_agent(seed=3, hidden_dim=16, encoder_hidden_dim=16, kl_lambda=2.0, lr=1e-3)
    assert plain.kl_log_lambda is None and "kl_log_lambda" not in plain.state_dict()
    with pytest.raises(ValueError, match="kl_target"):
        fresh.load_state_dict(plain.state_dict())


def _masked_batches(obs: int, act: int, steps: int, pad_fill: float | None = None):
    """Batches whose contexts are padded to 9 rows, task m keeping its first n_m (1..9)."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        batch = random_batch(gen, 3, 17, obs, act)
        context = torch.randn(3, 9, obs + act + 1, generator=gen)
        n = torch.tensor([1, 4, 9])[torch.randperm(3, generator=gen)]
        mask = torch.arange(9)[None] < n[:, None]
        if pad_fill is not None:
            context = torch.where(mask[..., None], context, torch.full_like(context, pad_fill))
        out.append(({**batch, "context_mask": mask}, context))
    return out


def _run(agent, batches):
    losses = []
    for step, (batch, context) in enumerate(batches):
        torch.manual_seed(100 + step)
        losses.append({k: float(v) for k, v in agent.update(batch, context).items()})
    return losses, _all_params(agent)


@pytest.mark.parametrize("ib", [True, False])
def test_masked_contexts_lean_equals_reference_and_ignores_padding(ib):
    """Contexts of whole paths come padded with a mask (``context_trajectories``): the lean
    step's hand-written backward through the masked posterior equals autograd's, and what the
    padding holds changes nothing."""
    kw = dict(seed=3, obs=2, act=2, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7, reward_scale=5.0,
              lr=1e-3, use_information_bottleneck=ib)
    ref_l, ref_p = _run(make_agent(grad_step="reference", **kw), _masked_batches(2, 2, 4))
    lean_l, lean_p = _run(make_agent(grad_step="lean", **kw), _masked_batches(2, 2, 4))
    other_l, other_p = _run(make_agent(grad_step="lean", **kw), _masked_batches(2, 2, 4, pad_fill=37.0))
    for a, b, c in zip(lean_l, ref_l, other_l):
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), k
            assert c[k] == a[k], k
    for a, b, c in zip(lean_p, ref_p, other_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    # and the mask is not ignored: unmasked, the same padded contexts give another step
    plain = [({k: v for k, v in b.items() if k != "context_mask"}, c) for b, c in _masked_batches(2, 2, 4)]
    plain_l, _ = _run(make_agent(grad_step="lean", **kw), plain)
    assert plain_l[0]["losses/qf"] != lean_l[0]["losses/qf"]


def test_masked_posterior_equals_the_posterior_of_the_kept_rows():
    """Closed form: a masked context's posterior is the product (or mean) over its kept rows
    alone, for each task separately."""
    for ib in (True, False):
        agent = make_agent(seed=1, obs=2, act=2, use_information_bottleneck=ib)
        ctx = torch.randn(3, 6, 5)
        mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
        mu, var = agent.infer_posterior(ctx, mask)
        for m in range(3):
            n = int(mask[m].sum())
            mu1, var1 = agent.infer_posterior(ctx[m: m + 1, :n])
            torch.testing.assert_close(mu[m], mu1[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(var[m], var1[0], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a C++ compiler")
def test_compiled_step_equals_lean_step_and_is_deterministic():
    """``grad_step=compiled`` (torch.compile of the lean step) gives the lean step's losses
    and parameters after several steps to float rounding, with the same random draws; two
    agents from the same seed stay bitwise identical under it."""
    kw = dict(seed=3, obs=2, act=2, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7, reward_scale=5.0, lr=1e-3)
    gen = torch.Generator().manual_seed(7)
    batches = [(random_batch(gen, 3, 17), torch.randn(3, 9, 5, generator=gen)) for _ in range(4)]
    lean_l, lean_p = _run(make_agent(grad_step="lean", **kw), batches)
    comp = make_agent(grad_step="compiled", **kw)
    comp_l, comp_p = _run(comp, batches)
    assert comp._compiled is not None  # the compiled path ran
    for got, want in zip(comp_l, lean_l):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    start = make_agent(seed=3, obs=2, act=2, hidden_dim=48, encoder_hidden_dim=40)
    for a, b, s in zip(comp_p, lean_p, _all_params(start)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert not torch.equal(a, s)
    again_l, again_p = _run(make_agent(grad_step="compiled", **kw), batches)
    assert again_l == comp_l
    assert all(torch.equal(a, b) for a, b in zip(again_p, comp_p))

    # the compiled graph reads the parameters and Adam state afresh: after loading another
    # agent's state (which rebuilds the flat buffers) it steps from that state
    other = make_agent(grad_step="lean", seed=11, **{k: v for k, v in kw.items() if k != "seed"})
    _run(other, batches[:2])
    comp.load_state_dict(other.state_dict())
    more = batches[2:]
    comp_l2, comp_p2 = _run(comp, more)
    other_l2, other_p2 = _run(other, more)
    for got, want in zip(comp_l2, other_l2):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(comp_p2, other_p2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fast_step_compiles_only_long_cpu_runs_with_fixed_contexts():
    """``grad_step=fast`` (the default) resolves to the compiled step for a CPU run of at least
    ``FAST_COMPILE_MIN_STEPS`` gradient steps with fixed-size contexts and no ``kl_target``,
    to the lean step otherwise; ``auto`` stays lean."""
    from metarelabel.pearl import FAST_COMPILE_MIN_STEPS

    long = dict(num_iterations=FAST_COMPILE_MIN_STEPS // 100, num_train_steps_per_itr=100)
    assert make_agent(**long).step_kind == "compiled"
    assert make_agent(num_iterations=FAST_COMPILE_MIN_STEPS // 100 - 1, num_train_steps_per_itr=100).step_kind == "lean"
    assert make_agent().step_kind == "lean"  # the quick preset: too short to pay back a compile
    assert make_agent(kl_target=0.5, **long).step_kind == "lean"
    assert make_agent(context_trajectories=2, **long).step_kind == "lean"
    assert make_agent(grad_step="auto", **long).step_kind == "lean"
    assert make_agent(grad_step="reference", **long).step_kind == "reference"
    assert make_agent(grad_step="compiled").step_kind == "compiled"


def test_fast_step_falls_back_to_lean_where_inductor_cannot_compile(monkeypatch):
    """Where inductor fails its probe, ``fast`` warns once and every step is the lean step,
    bit for bit (nothing of a step runs twice or half-compiled)."""
    long = dict(num_iterations=1000, num_train_steps_per_itr=100, seed=3, obs=2, act=2)
    gen = torch.Generator().manual_seed(7)
    batches = [(random_batch(gen, 3, 17), torch.randn(3, 9, 5, generator=gen)) for _ in range(3)]
    lean_l, lean_p = _run(make_agent(grad_step="lean", **long), batches)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    fast = make_agent(**long)
    said = []
    fast.warn = said.append
    assert fast.step_kind == "compiled"
    fast_l, fast_p = _run(fast, batches)
    assert said == ["grad_step: fast: torch.compile does not work on this machine (RuntimeError: no C++ compiler "
                    "found); using the lean step"]
    assert fast.step_kind == "lean" and fast._compiled is None
    assert fast_l == lean_l
    assert all(torch.equal(a, b) for a, b in zip(fast_p, lean_p))


def test_a_deep_copy_of_a_stepped_lean_agent_steps_as_the_original():
    """``copy.deepcopy`` clones each parameter on its own (the trainer's time estimate copies
    the agent): the copy rebuilds its flat buffers from its own parameters, so its lean steps
    update its own networks exactly as the original's update the original's."""
    import copy

    gen = torch.Generator().manual_seed(7)
    batches = [(random_batch(gen, 3, 17), torch.randn(3, 9, 5, generator=gen)) for _ in range(4)]
    agent = make_agent(grad_step="lean", seed=3)
    _run(agent, batches[:2])  # the flat buffers exist now
    twin = copy.deepcopy(agent)
    assert twin._flat is None
    got_l, got_p = _run(twin, batches[2:])
    want_l, want_p = _run(agent, batches[2:])
    assert got_l == want_l
    assert all(torch.equal(a, b) for a, b in zip(got_p, want_p))
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(got_p, want_p))
