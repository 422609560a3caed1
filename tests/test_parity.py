"""The optimized PEARL step (batched twin critic, critic weights detached in the policy term,
fused Adam) equals a plain reference step written the textbook way: two separate critic
networks, separate per-network Adam optimizers, every forward pass with full autograd."""
from __future__ import annotations

import copy

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


@pytest.mark.parametrize("obs,act", [(2, 2), (20, 6)])
def test_optimized_step_equals_plain_reference(obs, act):
    agent = make_agent(seed=3, obs=obs, act=act, hidden_dim=48, encoder_hidden_dim=40, kl_lambda=0.7,
                       reward_scale=5.0, lr=1e-3)
    ref = Reference(agent)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        batch = random_batch(gen, 3, 17, obs, act)
        context = torch.randn(3, 9, obs + act + 1, generator=gen)
        torch.manual_seed(100 + step)
        got = agent.update(batch, context)
        torch.manual_seed(100 + step)
        want = ref.step(batch, context)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"step {step}: {k}")
    q1, q2 = _split_twin(agent)
    pairs = [(agent.encoder, ref.encoder), (agent.policy, ref.policy), (agent.vf, ref.vf),
             (agent.target_vf, ref.target_vf), (q1, ref.q1), (q2, ref.q2)]
    for mine, theirs in pairs:
        for (name, p), t in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, t, rtol=1e-4, atol=1e-5, msg=name)
    # the parameters really moved (the comparison is not between two untouched copies)
    assert not torch.allclose(q1.hidden[0].weight, _split_twin(make_agent(seed=3, obs=obs, act=act, hidden_dim=48,
                                                                           encoder_hidden_dim=40))[0].hidden[0].weight)
