"""PEARL (Rakelly et al. 2019): the posterior over the task latent, the SAC-V losses and one
gradient step, batched over tasks.  This module holds all of the update math.

Shapes: M tasks, B transitions per task, C context transitions per task, L latent dims.

- posterior: product of the per-transition Gaussians N(mu_n, sigma^2_n),
  sigma^2 = 1 / sum_n 1/sigma^2_n (each sigma^2_n >= 1e-7), mu = sigma^2 * sum_n mu_n / sigma^2_n
- Q loss: y = alpha * r + (1 - d) * gamma * Vbar(s', z); MSE(Q1, y) + MSE(Q2, y); it and
  kl_lambda * sum_tasks KL(q(z|c) || N(0, I)) are the only losses that reach the encoder
- V loss: MSE(V(s, z), min_k Q_k(s, a~, z) - log pi(a~ | s, z))
- policy loss: mean(log pi(a~ | s, z) - min_k Q_k(s, a~, z)) + 1e-3 (mean^2 + log_std^2)
Policy and V see z detached.  The entropy temperature is 1; alpha scales rewards instead.

Image observations (``Dims.obs_shape`` set, e.g. ``visual-reacher``): one convolutional trunk
(``networks.ConvTrunk``) maps every image to a 50-D feature, ``embed_obs``; the policy, the
critics, V and the context encoder all see trunk features instead of raw observations, and a
context is a dict ``{"obs": uint8 images, "actions", "rewards"[, "next_obs"]}`` that
``infer_posterior`` embeds (or an already embedded float tensor).  The trunk is trained by the
critic loss and the encoder's KL term (they are one backward pass); the policy and V read
detached features, the target V reads features without gradients.  For vector observations the
trunk is the identity and nothing above changes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .networks import FEATURE_DIM, MLP, ContextEncoder, ConvTrunk, TanhGaussianPolicy, TwinQ

VAR_MIN = 1e-7


@dataclass(frozen=True)
class Dims:
    obs: int
    act: int
    latent: int
    use_next_obs: bool = False
    #: image observations ``(C, H, W)`` (uint8); None for vector observations of size ``obs``
    obs_shape: tuple[int, ...] | None = None
    feature_dim: int = FEATURE_DIM

    @property
    def image(self) -> bool:
        return self.obs_shape is not None

    @property
    def feat(self) -> int:
        """Width of what the networks see per observation: ``obs`` for vectors, the trunk's
        feature size for images."""
        return self.feature_dim if self.image else self.obs

    @property
    def context(self) -> int:
        """Width of one embedded context transition (features, action, reward[, features'])."""
        return self.feat + self.act + 1 + (self.feat if self.use_next_obs else 0)


def make_dims(env, cfg) -> Dims:
    """Dims of a task family's spaces under a config (image families: ``image_obs`` is True)."""
    act = int(np.prod(env.action_space.shape))
    shape = tuple(int(s) for s in env.observation_space.shape)
    image = tuple(shape) if getattr(env, "image_obs", False) else None
    return Dims(int(np.prod(shape)), act, cfg.latent_dim, cfg.use_next_obs_in_context, image)


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None = None):
    """Combine per-transition Gaussians ``[..., C, L]`` into one ``[..., L]``.  ``mask``
    ``[..., C]`` (1 = use) drops padded transitions."""
    var = var.clamp(min=VAR_MIN)
    prec = 1.0 / var
    if mask is not None:
        prec = prec * mask.unsqueeze(-1).to(prec.dtype)
    post_var = 1.0 / prec.sum(-2)
    post_mu = post_var * (mu * prec).sum(-2)
    return post_mu, post_var


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag var) || N(0, I)) per row, ``[...]``."""
    return 0.5 * (var + mu * mu - 1.0 - var.log()).sum(-1)


class PEARL:
    """Networks, optimizers and the gradient step.  Also implements the learner protocol
    relabeling strategies use: ``infer_posterior``, ``sample_z``, ``start_state_value`` and
    ``td_error`` (all batched over tasks)."""

    def __init__(self, dims: Dims, cfg, device: torch.device):
        self.dims, self.cfg, self.device = dims, cfg, device
        o, a, L = dims.feat, dims.act, dims.latent
        h, nl = cfg.hidden_dim, cfg.hidden_layers
        self.encoder = ContextEncoder(dims.context, cfg.encoder_hidden_dim, cfg.encoder_layers,
                                      2 * L if cfg.use_information_bottleneck else L).to(device)
        self.qf = TwinQ(o + a + L, h, nl).to(device)
        self.vf = MLP(o + L, h, nl, 1).to(device)
        self.target_vf = copy.deepcopy(self.vf)
        for p in self.target_vf.parameters():
            p.requires_grad_(False)
        self.policy = TanhGaussianPolicy(o + L, a, h, nl).to(device)
        # fused Adam: one kernel per parameter group instead of a Python loop per tensor
        adam = dict(lr=cfg.lr, fused=True)
        self.optimizers = {
            "policy": torch.optim.Adam(self.policy.parameters(), **adam),
            "qf": torch.optim.Adam(self.qf.parameters(), **adam),
            "vf": torch.optim.Adam(self.vf.parameters(), **adam),
            "encoder": torch.optim.Adam(self.encoder.parameters(), **adam),
        }
        self.trunk = None
        if dims.image:
            self.trunk = ConvTrunk(dims.obs_shape, dims.feature_dim).to(device)
            self.optimizers["trunk"] = torch.optim.Adam(self.trunk.parameters(), **adam)

    # ---- observations --------------------------------------------------------------------
    def embed_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Features ``[..., feat]`` of observations ``[..., *obs_shape]``: the conv trunk for
        images, the identity (the same tensor) for vectors."""
        if self.trunk is None:
            return obs
        return self.trunk(obs)

    def context_features(self, context):
        """An image context dict -> the float tensor ``[..., C, context]`` the encoder reads;
        float tensors (vector families, or contexts already embedded) pass unchanged."""
        if isinstance(context, torch.Tensor):
            return context
        parts = [self.embed_obs(context["obs"]), context["actions"], context["rewards"]]
        if self.dims.use_next_obs:
            parts.append(self.embed_obs(context["next_obs"]))
        return torch.cat(parts, -1)

    # ---- posterior ---------------------------------------------------------------------
    def infer_posterior(self, context: torch.Tensor, mask: torch.Tensor | None = None):
        """Posterior (mu, var), each ``[M, L]``, from contexts ``[M, C, context_dim]`` (or an
        image context dict, see ``context_features``)."""
        out = self.encoder(self.context_features(context))
        L = self.dims.latent
        if not self.cfg.use_information_bottleneck:
            if mask is None:
                mu = out.mean(-2)
            else:
                m = mask.unsqueeze(-1).to(out.dtype)
                mu = (out * m).sum(-2) / m.sum(-2).clamp(min=1.0)
            return mu, torch.zeros_like(mu)
        return product_of_gaussians(out[..., :L], F.softplus(out[..., L:]), mask)

    def sample_z(self, mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(mu, var) by reparameterisation (``eps``: explicit standard normal noise)."""
        if not self.cfg.use_information_bottleneck:
            return mu
        return mu + var.sqrt() * (torch.randn_like(mu) if eps is None else eps)

    def prior_z(self, n: int = 1) -> torch.Tensor:
        if not self.cfg.use_information_bottleneck:
            return torch.zeros(n, self.dims.latent, device=self.device)
        return torch.randn(n, self.dims.latent, device=self.device)

    # ---- acting ----------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs, z: torch.Tensor, deterministic: bool = False):
        if self.trunk is None:
            o = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1)
        else:
            o = self.embed_obs(torch.as_tensor(obs, device=self.device)[None])
        x = torch.cat([o, z], -1)
        action = self.policy(x, deterministic)[0]
        return action[0].cpu().numpy()

    # ---- learner protocol for relabeling ------------------------------------------------
    @torch.no_grad()
    def start_state_value(self, starts: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """mean_b min_k Q_k(s_b, a~_b, z) with a~_b ~ pi(. | s_b, z): ``[K]`` from starts
        ``[K, B, obs]`` and z ``[K, L]`` (one forward pass of policy and twin critic).
        ``eps`` ``[K, B, act]``: explicit policy noise."""
        K, B = starts.shape[:2]
        starts = self.embed_obs(starts)
        zb = z.unsqueeze(1).expand(K, B, z.shape[-1])
        sz = torch.cat([starts, zb], -1).reshape(K * B, -1)
        action = self.policy(sz, eps=None if eps is None else eps.reshape(K * B, -1))[0]
        q = self.qf(torch.cat([starts.reshape(K * B, -1), action, zb.reshape(K * B, -1)], -1))
        return q.min(0).values.reshape(K, B).mean(1)

    @torch.no_grad()
    def min_q(self, x: torch.Tensor) -> torch.Tensor:
        """min_k Q_k on rows ``[n, feat + act + latent]`` (observations already embedded): ``[n]``."""
        return self.qf(x).min(0).values

    @torch.no_grad()
    def td_error(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """mean_b (Q1 - y)^2 + mean_b (Q2 - y)^2 per task: ``[K]`` for batches ``[K, B, .]``."""
        obs, act, rew, nxt, term = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "terminals"))
        K, B = obs.shape[:2]
        obs, nxt = self.embed_obs(obs), self.embed_obs(nxt)
        zb = z.unsqueeze(1).expand(K, B, z.shape[-1]).reshape(K * B, -1)
        q = self.qf(torch.cat([obs.reshape(K * B, -1), act.reshape(K * B, -1), zb], -1))
        v_next = self.target_vf(torch.cat([nxt.reshape(K * B, -1), zb], -1)).squeeze(-1)
        y = self.cfg.reward_scale * rew.reshape(-1) + (1.0 - term.reshape(-1)) * self.cfg.discount * v_next
        return ((q - y) ** 2).reshape(2, K, B).mean(-1).sum(0)

    # ---- the gradient step ---------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor], context: torch.Tensor) -> dict[str, torch.Tensor]:
        """One PEARL gradient step on batches ``[M, B, .]`` and contexts ``[M, C, .]``.
        Returns detached loss tensors (no host synchronisation)."""
        cfg = self.cfg
        obs, act, rew, nxt, term = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "terminals"))
        M, B = act.shape[:2]
        n = M * B
        if self.trunk is not None:  # the critic loss trains the trunk; policy and V read detached features
            obs = self.embed_obs(obs)
            with torch.no_grad():
                nxt = self.embed_obs(nxt)
        obs, act, nxt = obs.reshape(n, -1), act.reshape(n, -1), nxt.reshape(n, -1)
        obs_d = obs.detach() if self.trunk is not None else obs
        rew, term = rew.reshape(n), term.reshape(n)

        mu, var = self.infer_posterior(context)
        z = self.sample_z(mu, var)
        zb = z.unsqueeze(1).expand(M, B, z.shape[-1]).reshape(n, -1)
        zd = zb.detach()

        new_act, log_pi, pmean, plog_std = self.policy(torch.cat([obs_d, zd], -1))
        q = self.qf(torch.cat([obs, act, zb], -1))  # [2, n]; gradients reach the encoder
        v = self.vf(torch.cat([obs_d, zd], -1)).squeeze(-1)
        with torch.no_grad():
            v_next = self.target_vf(torch.cat([nxt, zb], -1)).squeeze(-1)
            y = cfg.reward_scale * rew + (1.0 - term) * cfg.discount * v_next

        # encoder + critics
        if cfg.use_information_bottleneck:
            kl = kl_to_standard_normal(mu, var).sum()
        else:
            kl = torch.zeros((), device=obs.device)
        qf_loss = ((q - y) ** 2).mean(-1).sum()
        enc_loss = cfg.kl_lambda * kl + qf_loss
        self.optimizers["encoder"].zero_grad(set_to_none=True)
        self.optimizers["qf"].zero_grad(set_to_none=True)
        if self.trunk is not None:
            self.optimizers["trunk"].zero_grad(set_to_none=True)
        enc_loss.backward()
        self.optimizers["qf"].step()
        self.optimizers["encoder"].step()
        if self.trunk is not None:
            self.optimizers["trunk"].step()

        # V (target from the updated critics) and the target network.  The critics are fixed
        # here: only the policy's actions need gradients, so no weight-gradient GEMMs are run.
        q_new = self.qf(torch.cat([obs_d, new_act, zd], -1), detach_params=True).min(0).values
        v_target = (q_new - log_pi).detach()
        vf_loss = F.mse_loss(v, v_target)
        self.optimizers["vf"].zero_grad(set_to_none=True)
        vf_loss.backward()
        self.optimizers["vf"].step()
        with torch.no_grad():
            tau = cfg.soft_target_tau
            for tp, p in zip(self.target_vf.parameters(), self.vf.parameters()):
                tp.lerp_(p, tau)

        # policy
        reg = cfg.policy_mean_reg * (pmean**2).mean() + cfg.policy_std_reg * (plog_std**2).mean()
        policy_loss = (log_pi - q_new).mean() + reg
        self.optimizers["policy"].zero_grad(set_to_none=True)
        policy_loss.backward()
        self.optimizers["policy"].step()

        return {
            "losses/qf": qf_loss.detach(),
            "losses/vf": vf_loss.detach(),
            "losses/policy": policy_loss.detach(),
            "losses/kl": kl.detach(),
            "train/q_mean": q.detach().mean(),
            "train/v_mean": v.detach().mean(),
            "train/log_pi": log_pi.detach().mean(),
            "train/z_var": var.detach().mean() if cfg.use_information_bottleneck else kl.detach(),
        }

    # ---- state ---------------------------------------------------------------------------------
    def modules(self) -> dict:
        out = {"encoder": self.encoder, "qf": self.qf, "vf": self.vf, "target_vf": self.target_vf,
               "policy": self.policy}
        if self.trunk is not None:
            out["trunk"] = self.trunk
        return out

    def state_dict(self) -> dict:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict, with_optimizers: bool = True) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state["modules"][k])
        if with_optimizers:
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
