"""PEARL (Rakelly et al. 2019): the posterior over the task latent, the SAC-V losses and one
gradient step, batched over tasks.  This module holds all of the update math.

Shapes: M tasks, B transitions per task, C context transitions per task, L latent dims.

- posterior: product of the per-transition Gaussians N(mu_n, sigma^2_n),
  sigma^2 = 1 / sum_n 1/sigma^2_n (each sigma^2_n >= 1e-7), mu = sigma^2 * sum_n mu_n / sigma^2_n
- Q loss: y = alpha * r + (1 - d) * gamma * Vbar(s', z); MSE(Q1, y) + MSE(Q2, y); it and
  kl_lambda * sum_tasks KL(q(z|c) || N(0, I)) are the only losses that reach the encoder
  (``kl_target`` > 0: kl_lambda = exp(log_lambda), and after the step log_lambda takes one Adam
  step on the loss -log_lambda * (KL / M - kl_target), i.e. gradient kl_target - KL / M)
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
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .networks import (FEATURE_DIM, LOG_STD_MAX, LOG_STD_MIN, MLP, SQUASH_EPS, ContextEncoder, ConvTrunk,
                       TanhGaussianPolicy, TwinQ, act_with, squash_log_det)

VAR_MIN = 1e-7
#: ``grad_step=fast`` compiles the lean step for runs of at least this many gradient steps in
#: all: its compile (about 5-40 s) costs less than 5% of what it saves (1.3-2 ms per step on
#: the ``cpu`` preset's shapes) from here on
FAST_COMPILE_MIN_STEPS = 50_000


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


def _relu_backward(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gradient through ReLU given its output ``h``."""
    return torch.ops.aten.threshold_backward(g, h, 0.0)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _affine(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias``: one ``addmm`` / ``baddbmm`` eagerly; traced by ``torch.compile``, a
    plain product and an add, which inductor fuses into the next elementwise kernel (``addmm``
    first copies the broadcast bias into its output, 10-25 us a layer at the ``cpu`` shapes)."""
    if torch.compiler.is_compiling():
        return (torch.mm(x, weight) if x.dim() == 2 else torch.bmm(x, weight)) + bias
    return torch.addmm(bias, x, weight) if x.dim() == 2 else torch.baddbmm(bias, x, weight)


def _mlp_forward(mlp: MLP, x: torch.Tensor, head: bool = True):
    """``mlp(x)`` (or its last hidden activation with ``head=False``) and the inputs of its
    layers, for ``_mlp_backward``."""
    hs = [x]
    for lin in mlp.hidden:
        x = _affine(lin.bias, x, lin.weight.t()).relu_()
        hs.append(x)
    if not head:
        return x, hs
    return _affine(mlp.out.bias, x, mlp.out.weight.t()), hs


def _linear_grads(lin, g: torch.Tensor, h: torch.Tensor, grads: dict) -> None:
    """Weight and bias gradients of ``y = h W^T + b`` into their (preallocated) tensors."""
    torch.mm(g.t(), h, out=grads[lin.weight])
    torch.sum(g, 0, out=grads[lin.bias])


def _mlp_backward(mlp: MLP, hs: list, g: torch.Tensor, grads: dict, head: bool = True) -> None:
    """Parameter gradients of an MLP from the output gradient ``g`` (with ``head=False``: the
    gradient of the last hidden activation); the input's gradient is not needed."""
    layers = list(mlp.hidden)
    if head:
        lin, h = mlp.out, hs[-1]
        _linear_grads(lin, g, h, grads)
        g = _relu_backward(g.mm(lin.weight), h)
    else:
        g = _relu_backward(g, hs[-1])
    for i in range(len(layers) - 1, -1, -1):
        lin, h = layers[i], hs[i]
        _linear_grads(lin, g, h, grads)
        if i > 0:
            g = _relu_backward(g.mm(lin.weight), h)


def _twin_forward(qf: TwinQ, x: torch.Tensor):
    """``qf(x)`` ``[2, n]`` and the activations ``_twin_backward`` needs."""
    h = x.unsqueeze(0).expand(qf.n_heads, *x.shape)
    hs = [h]
    last = len(qf.weights) - 1
    for i, (w, b) in enumerate(zip(qf.weights, qf.biases)):
        h = _affine(b, h, w)
        if i < last:
            h = h.relu_()
            hs.append(h)
    return h.squeeze(-1), hs


def _twin_backward(qf: TwinQ, hs: list, g: torch.Tensor, grads: dict | None, cols: slice) -> torch.Tensor:
    """Back through the twin critic from ``g`` ``[2, n]`` (d loss / d Q): parameter gradients
    into ``grads`` (None: not needed) and the input gradient of columns ``cols``, summed over
    the heads, ``[n, len(cols)]``."""
    g = g.unsqueeze(-1)
    for i in range(len(qf.weights) - 1, -1, -1):
        w, h = qf.weights[i], hs[i]
        if grads is not None:
            torch.bmm(h.transpose(1, 2), g, out=grads[w])
            torch.sum(g, 1, keepdim=True, out=grads[qf.biases[i]])
        if i > 0:
            g = _relu_backward(torch.bmm(g, w.transpose(1, 2)), h)
    return torch.bmm(g, qf.weights[0][:, cols, :].transpose(1, 2)).sum(0)


class FlatAdam:
    """The parameters of some fused Adam optimizers, their gradients and Adam moments as views
    of three flat buffers, so that one ``_fused_adam_`` call steps them all with the kernel and
    arithmetic of ``Optimizer.step`` (Adam is elementwise).  Parameters (``p.data``) and the
    optimizers' ``exp_avg`` / ``exp_avg_sq`` state become those views, so the reference step,
    ``state_dict`` and ``load_state_dict`` keep working on the same tensors; after an
    optimizer's ``load_state_dict`` the group must be rebuilt.  ``grads`` maps each parameter
    to its gradient view, which the lean step overwrites completely every step."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)
        group = self.optimizers[0].param_groups[0]
        self.hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                          weight_decay=group["weight_decay"], eps=group["eps"])
        pairs = [(opt, p) for opt in self.optimizers for grp in opt.param_groups for p in grp["params"]]
        for opt, p in pairs:
            st = opt.state[p]
            if not st:  # the state Optimizer.step would create for a fused Adam
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        counts = {float(opt.state[p]["step"]) for opt, p in pairs}
        if len(counts) > 1:
            raise ValueError("FlatAdam: the optimizers' step counts differ")
        # one step count per parameter, as Optimizer.step keeps them, as 0-d views of one
        # tensor: one kernel increments them all
        device = pairs[0][1].device
        self.steps = torch.full((len(pairs),), counts.pop(), dtype=torch.float32, device=device)
        for i, (opt, p) in enumerate(pairs):
            opt.state[p]["step"] = self.steps[i]

        def flat(tensors):
            return torch.cat([t.detach().reshape(-1) for t in tensors])

        params = [p for _, p in pairs]
        self.param = flat(params)
        self.exp_avg = flat([opt.state[p]["exp_avg"] for opt, p in pairs])
        self.exp_avg_sq = flat([opt.state[p]["exp_avg_sq"] for opt, p in pairs])
        self.grad = torch.zeros_like(self.param)
        self.grads = {}
        start = 0
        for opt, p in pairs:
            end = start + p.numel()
            p.data = self.param[start:end].view_as(p)
            opt.state[p]["exp_avg"] = self.exp_avg[start:end].view_as(p)
            opt.state[p]["exp_avg_sq"] = self.exp_avg_sq[start:end].view_as(p)
            self.grads[p] = self.grad[start:end].view_as(p)
            start = end
        #: the per-parameter tensors (parameters, gradients, Adam moments) ``_step_ops`` updates
        self.views = (params, [self.grads[p] for p in params], [opt.state[p]["exp_avg"] for opt, p in pairs],
                      [opt.state[p]["exp_avg_sq"] for opt, p in pairs])

    def step(self) -> None:
        if torch.compiler.is_compiling():  # inductor cannot trace _fused_adam_: the same math in plain ops
            return self._step_ops()
        self.steps.add_(1)
        torch._fused_adam_([self.param], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps[0]],
                           amsgrad=False, maximize=False, **self.hyper)

    def _step_ops(self) -> None:
        """``step`` in elementwise ops on the per-parameter views (equal to it to float
        rounding), for ``torch.compile``: the Adam update then joins the compiled graph instead
        of splitting it (a traced graph may not mutate a flat buffer and its views together)."""
        h = self.hyper
        params, grads, m, v = self.views
        self.steps.add_(1)
        step = self.steps[0]
        if h["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=h["weight_decay"])
        torch._foreach_lerp_(m, grads, 1.0 - h["beta1"])
        torch._foreach_mul_(v, h["beta2"])
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - h["beta2"])
        denom = torch._foreach_div(torch._foreach_sqrt(v), (1.0 - h["beta2"] ** step).sqrt())
        torch._foreach_add_(denom, h["eps"])
        upd = torch._foreach_div(m, denom)
        torch._foreach_mul_(upd, h["lr"] / (1.0 - h["beta1"] ** step))
        torch._foreach_sub_(params, upd)


@torch.no_grad()
def rlkit_init_(agent) -> None:
    """Re-initialise the hidden layers as the release's ``fanin_init`` does: the bound is
    1/sqrt(weight.size(0)), which for a torch Linear is its *output* width; biases 0.1; the
    policy's mean and log-std heads U(+-1e-3).  Output layers of Q, V and the encoder keep
    U(+-3e-3).  The target V becomes a copy of V again."""
    for mlp in (agent.encoder, agent.vf, agent.policy.net):
        for lin in mlp.hidden:
            b = 1.0 / math.sqrt(lin.out_features)
            lin.weight.uniform_(-b, b)
            lin.bias.fill_(0.1)
    for w, bias in list(zip(agent.qf.weights, agent.qf.biases))[:-1]:  # [heads, in, out]
        b = 1.0 / math.sqrt(w.shape[2])
        w.uniform_(-b, b)
        bias.fill_(0.1)
    for lin in (agent.policy.net.out, agent.policy.log_std):
        lin.weight.uniform_(-1e-3, 1e-3)
        lin.bias.uniform_(-1e-3, 1e-3)
    agent.target_vf.load_state_dict(agent.vf.state_dict())


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
        self.policy.squash = getattr(cfg, "squash_log_prob", "exact")
        if getattr(cfg, "init", "pearl") == "rlkit":
            rlkit_init_(self)
        # fused Adam: one kernel per parameter group instead of a Python loop per tensor
        adam = dict(lr=cfg.lr, fused=True)
        self.optimizers = {
            "policy": torch.optim.Adam(self.policy.parameters(), **adam),
            "qf": torch.optim.Adam(self.qf.parameters(), **adam),
            "vf": torch.optim.Adam(self.vf.parameters(), **adam),
            "encoder": torch.optim.Adam(self.encoder.parameters(), **adam),
        }
        #: log kl_lambda, learned when ``kl_target`` > 0 (else None: kl_lambda stays fixed)
        self.kl_log_lambda = None
        if getattr(cfg, "kl_target", 0.0) > 0:
            self.kl_log_lambda = torch.tensor(math.log(cfg.kl_lambda), device=device, requires_grad=True)
            self.optimizers["kl_lambda"] = torch.optim.Adam([self.kl_log_lambda], **adam)
        self.trunk = None
        if dims.image:
            self.trunk = ConvTrunk(dims.obs_shape, dims.feature_dim).to(device)
            self.optimizers["trunk"] = torch.optim.Adam(self.trunk.parameters(), **adam)
        self._flat = None  # the lean step's FlatAdam groups, built on first use
        self._compiled = None  # grad_step compiled: torch.compile(update_lean), built on first use
        self._no_inductor = None  # grad_step fast: why inductor cannot compile here (then: lean)
        #: where ``grad_step=fast`` says it falls back to the lean step (the trainer's echo)
        self.warn = lambda msg: print(f"warning: {msg}", file=sys.stderr)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_compiled"] = None  # a compiled step is bound to this agent: a copy compiles its own
        # a deep copy clones each Parameter on its own, so its parameters would no longer be
        # views of the copied flat buffers: the copy builds its own on first use
        state["_flat"] = None
        return state

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
        if self.cfg.use_information_bottleneck:
            return product_of_gaussians(*self.transition_factors(context), mask)
        out = self.encoder(self.context_features(context))
        if mask is None:
            mu = out.mean(-2)
        else:
            m = mask.unsqueeze(-1).to(out.dtype)
            mu = (out * m).sum(-2) / m.sum(-2).clamp(min=1.0)
        return mu, torch.zeros_like(mu)

    def transition_factors(self, context):
        """The encoder's per-transition Gaussian factors (mu, var), each ``[..., C, L]`` (var
        clamped as the product clamps it), whose product is the posterior; information
        bottleneck only."""
        out = self.encoder(self.context_features(context))
        L = self.dims.latent
        return out[..., :L], F.softplus(out[..., L:]).clamp(min=VAR_MIN)

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

    @torch.no_grad()
    def act_batch(self, obs: np.ndarray, z: torch.Tensor, deterministic: bool = False) -> np.ndarray:
        """Actions ``[k, act]`` for k observations and latents ``z`` ``[k, L]``: one policy
        call (one observation copy to the device and one action copy back)."""
        o = torch.as_tensor(obs, device=self.device)
        o = o.float().reshape(len(o), -1) if self.trunk is None else self.embed_obs(o)
        return self.policy.act(torch.cat([o, z], -1), deterministic).cpu().numpy()

    def lane_actor(self, lanes: int) -> "LaneActor | None":
        """A ``LaneActor`` for the rollout engine's ``lanes`` (vector observations on the CPU),
        or None where ``act_batch`` is the way (image observations, other devices)."""
        if self.trunk is not None or self.device.type != "cpu":
            return None
        return LaneActor(self.policy, lanes, self.dims.obs, self.dims.latent)

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
    @property
    def step_kind(self) -> str:
        """The step ``update`` runs, ``grad_step`` resolved: ``reference``, ``lean`` or
        ``compiled`` (``fast``: compiled where ``fast_compiles``, else lean)."""
        mode = getattr(self.cfg, "grad_step", "reference")
        if mode in ("lean", "compiled") and self.trunk is not None:
            raise ValueError(f"grad_step: {mode} supports vector observations only (use auto or reference)")
        if mode == "reference" or self.trunk is not None:
            return "reference"
        if mode == "fast":
            return "compiled" if self.fast_compiles() else "lean"
        return "lean" if mode == "auto" else mode

    @property
    def lean(self) -> bool:
        """Whether ``update`` runs the lean step, compiled or not (vector observations only)."""
        return self.step_kind != "reference"

    def fast_compiles(self) -> bool:
        """Whether ``grad_step=fast`` compiles: a CPU run of at least ``FAST_COMPILE_MIN_STEPS``
        gradient steps, with fixed-size contexts (``context_trajectories`` pads to varying
        lengths: recompiles) and no ``kl_target`` (its Adam call would be traced), on a machine
        where inductor compiled its probe."""
        cfg = self.cfg
        steps = getattr(cfg, "num_iterations", 0) * getattr(cfg, "num_train_steps_per_itr", 0)
        return (self.device.type == "cpu" and steps >= FAST_COMPILE_MIN_STEPS and self._no_inductor is None
                and not getattr(cfg, "context_trajectories", 0) and getattr(cfg, "kl_target", 0.0) <= 0)

    def _inductor_works(self) -> bool:
        """Compile a two-op function with inductor once (``fast``, before the step's own
        compile, which could fail halfway through a step): False, with one warning, where it
        cannot (no C++ compiler, no Python headers); the run then takes the lean step."""
        try:
            probe = torch.compile(lambda x: (x * 2.0).relu(), options={"fallback_random": True})
            probe(torch.ones(8))
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to compile means: do not compile
            self._no_inductor = f"{type(exc).__name__}: {_first_line(exc)[:200]}"
            self.warn(f"grad_step: fast: torch.compile does not work on this machine ({self._no_inductor}); "
                      "using the lean step")
            return False

    def kl_weight(self):
        """The KL weight of the next step: ``kl_lambda``, or exp(log_lambda) (a 0-d tensor)."""
        return self.cfg.kl_lambda if self.kl_log_lambda is None else self.kl_log_lambda.detach().exp()

    def _tune_kl_weight(self, kl: torch.Tensor, tasks: int, out: dict) -> None:
        """With ``kl_target``: one Adam step of log kl_lambda toward KL per task = target, and
        the weight this step used in ``out``."""
        if self.kl_log_lambda is None:
            return
        out["train/kl_lambda"] = self.kl_log_lambda.detach().exp()
        self.kl_log_lambda.grad = self.cfg.kl_target - kl.detach() / tasks
        self.optimizers["kl_lambda"].step()

    def update(self, batch: dict[str, torch.Tensor], context: torch.Tensor) -> dict[str, torch.Tensor]:
        """One PEARL gradient step on batches ``[M, B, .]`` and contexts ``[M, C, .]``
        (``update_lean`` or ``update_reference``, by ``grad_step``).  Returns detached loss
        tensors (no host synchronisation)."""
        kind = self.step_kind
        if kind == "reference":
            return self.update_reference(batch, context)
        if kind == "compiled" and (self._compiled is not None or self.cfg.grad_step == "compiled"
                                   or self._inductor_works()):
            return self.update_compiled(batch, context)
        return self.update_lean(batch, context)

    def update_compiled(self, batch: dict[str, torch.Tensor], context: torch.Tensor) -> dict[str, torch.Tensor]:
        """``update_lean`` compiled by ``torch.compile`` (inductor) into one graph: the same
        operations, with the elementwise work fused into a few C++ loops, the layers' bias adds
        fused into them (``_affine``) and Adam in elementwise ops (``FlatAdam._step_ops``).
        Random draws come from the same generator in the same order (``fallback_random``);
        results equal the lean step's to float rounding, and are deterministic on a given
        machine.  The graph skips dynamo's guards on the networks' module attributes (they
        cost ~8% of a step; the modules never change shape or structure during a run, and the
        parameters are read afresh at every call).  A machine where inductor cannot compile
        (no C++ compiler) raises ``ConfigError`` (one line) on the first step."""
        self.flat_adam()  # built eagerly: it rebinds parameters to views, nothing to trace
        if self._compiled is None:
            self._compiled = torch.compile(self.update_lean, options={
                "fallback_random": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            try:
                return self._compiled(batch, context)
            except Exception as exc:  # noqa: BLE001 - a failed compile is an environment problem
                self._compiled = None
                raise ConfigError(f"grad_step: compiled: torch.compile failed on this machine ({type(exc).__name__}: "
                                   f"{_first_line(exc)[:300]}); use grad_step=lean") from None
        return self._compiled(batch, context)

    def update_reference(self, batch: dict[str, torch.Tensor], context: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference step: autograd, three backward passes in the textbook order."""
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

        mu, var = self.infer_posterior(context, batch.get("context_mask"))
        z = self.sample_z(mu, var)
        if cfg.z_noise > 0:
            z = z + cfg.z_noise * torch.randn_like(z)
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
        enc_loss = self.kl_weight() * kl + qf_loss
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

        out = {
            "losses/qf": qf_loss.detach(),
            "losses/vf": vf_loss.detach(),
            "losses/policy": policy_loss.detach(),
            "losses/kl": kl.detach(),
            "train/q_mean": q.detach().mean(),
            "train/v_mean": v.detach().mean(),
            "train/log_pi": log_pi.detach().mean(),
            "train/z_var": var.detach().mean() if cfg.use_information_bottleneck else kl.detach(),
        }
        self._tune_kl_weight(kl, M, out)
        return out

    def flat_adam(self) -> tuple[FlatAdam, FlatAdam]:
        """The lean step's two Adam groups (critics + encoder; V + policy), built on first use.
        The target V's parameters become views of one flat tensor too, laid out as V's are at
        the start of the second group, so the soft target update is one ``lerp_``."""
        if self._flat is None:
            self._flat = (FlatAdam((self.optimizers["qf"], self.optimizers["encoder"])),
                          FlatAdam((self.optimizers["vf"], self.optimizers["policy"])))
            targets = list(self.target_vf.parameters())
            self._target_flat = torch.cat([t.detach().reshape(-1) for t in targets])
            start = 0
            for t in targets:
                t.data = self._target_flat[start:start + t.numel()].view_as(t)
                start += t.numel()
            self._vf_flat = self._flat[1].param[:start]
        return self._flat

    @torch.no_grad()
    def update_lean(self, batch: dict[str, torch.Tensor], context: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same step as ``update_reference`` (same losses, same random draws in the same
        order, same Adam) with a hand-written backward pass: no autograd graph, two fused Adam
        calls, and the V and policy gradients from one pass (V's target is detached and the
        policy loss does not involve V, so they never mix).  The critics, target V, policy
        and V forward passes are the module's own layers applied by ``_mlp_forward`` /
        ``_twin_forward``, so both steps read the same parameters.  Vector observations only."""
        cfg, L = self.cfg, self.dims.latent
        obs, act, rew, nxt, term = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "terminals"))
        M, B = act.shape[:2]
        n = M * B
        o, a = obs.shape[-1], act.shape[-1]
        obs, act, nxt = obs.reshape(n, -1), act.reshape(n, -1), nxt.reshape(n, -1)
        rew, term = rew.reshape(n), term.reshape(n)
        critic_adam, actor_adam = self.flat_adam()
        grads = critic_adam.grads

        # ---- encoder + critics: posterior, z, Q loss, KL ----
        C = context.shape[1]
        cmask = batch.get("context_mask")  # [M, C] (padded contexts of whole paths) or None
        keep = None if cmask is None else cmask.unsqueeze(-1).to(context.dtype)
        out, enc_hs = _mlp_forward(self.encoder, context.reshape(M * C, -1))
        if cfg.use_information_bottleneck:
            out = out.view(M, C, 2 * L)
            mu_c, s = out[..., :L], out[..., L:]
            sp = F.softplus(s)
            var_c = sp.clamp(min=VAR_MIN)
            prec = 1.0 / var_c
            if keep is not None:  # a padded row has no precision; its gradients vanish with it
                prec = prec * keep
            V = 1.0 / prec.sum(1)
            S = (mu_c * prec).sum(1)
            m = V * S
            eps = torch.randn_like(m)
            sd = V.sqrt()
            z = m + sd * eps
            kl = kl_to_standard_normal(m, V).sum()
        else:
            out = out.view(M, C, L)
            if keep is None:
                count, m = C, out.mean(1)
            else:
                count = keep.sum(1).clamp(min=1.0)
                m = (out * keep).sum(1) / count
            z, V = m, None
            kl = torch.zeros((), device=obs.device)
        if cfg.z_noise > 0:  # dz/dm and dz/dV are unchanged
            z = z + cfg.z_noise * torch.randn_like(z)
        zb = z.unsqueeze(1).expand(M, B, L).reshape(n, L)
        q, q_hs = _twin_forward(self.qf, torch.cat([obs, act, zb], -1))
        v_next = _mlp_forward(self.target_vf, torch.cat([nxt, zb], -1))[0].squeeze(-1)
        y = cfg.reward_scale * rew + (1.0 - term) * cfg.discount * v_next
        diff = q - y
        qf_loss = (diff * diff).mean(-1).sum()
        # d qf_loss / d q, back through the critics to their parameters and to z
        g_zb = _twin_backward(self.qf, q_hs, diff * (2.0 / n), grads, slice(o + a, o + a + L))
        g_z = g_zb.view(M, B, L).sum(1)
        if cfg.use_information_bottleneck:
            lam = self.kl_weight()
            g_m = g_z + lam * m  # KL = 0.5 sum(V + m^2 - 1 - log V)
            g_V = g_z * eps * (0.5 / sd) + (0.5 * lam) * (1.0 - 1.0 / V)
            g_S = g_m * V  # m = V * S, V = 1 / sum_c prec_c, S = sum_c mu_c prec_c
            g_P = -(g_V + g_m * S) * V * V
            g_mu_c = g_S.unsqueeze(1) * prec
            g_prec = g_S.unsqueeze(1) * mu_c + g_P.unsqueeze(1)
            g_sp = (-g_prec * prec * prec) * (sp >= VAR_MIN)
            g_out = torch.cat([g_mu_c, g_sp * torch.sigmoid(s)], -1)
        else:
            g_out = (g_z / count).unsqueeze(1).expand(M, C, L)
            if keep is not None:
                g_out = g_out * keep
        _mlp_backward(self.encoder, enc_hs, g_out.reshape(M * C, -1), grads)
        critic_adam.step()
        grads = actor_adam.grads

        # ---- V and policy (z detached; the critics as just updated, their weights fixed) ----
        x = torch.cat([obs, zb], -1)
        pol = self.policy
        h, pol_hs = _mlp_forward(pol.net, x, head=False)
        pmean = _affine(pol.net.out.bias, h, pol.net.out.weight.t())
        ls_raw = _affine(pol.log_std.bias, h, pol.log_std.weight.t())
        plog_std = ls_raw.clamp(LOG_STD_MIN, LOG_STD_MAX)
        std = plog_std.exp()
        eps_a = torch.randn_like(pmean)
        u = pmean + std * eps_a
        new_act = torch.tanh(u)
        white = (u - pmean) / std  # eps_a up to rounding, as the reference computes it
        log_pi = (-0.5 * (white * white) - plog_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_pi = log_pi - squash_log_det(u, new_act, pol.squash)
        v_out, v_hs = _mlp_forward(self.vf, x)
        v = v_out.squeeze(-1)
        q2, qn_hs = _twin_forward(self.qf, torch.cat([obs, new_act, zb], -1))
        q_new, head = q2.min(0)
        v_err = v - (q_new - log_pi)
        vf_loss = (v_err * v_err).mean()
        reg = cfg.policy_mean_reg * (pmean * pmean).mean() + cfg.policy_std_reg * (plog_std * plog_std).mean()
        policy_loss = (log_pi - q_new).mean() + reg

        _mlp_backward(self.vf, v_hs, (v_err * (2.0 / n)).unsqueeze(-1), grads)
        # policy loss: d/d q_new = -1/n on the smaller head, back to the action only
        g_q = torch.zeros_like(q2).scatter_(0, head.unsqueeze(0), -1.0 / n)
        g_act = _twin_backward(self.qf, qn_hs, g_q, None, slice(o, o + a))
        # d log_pi / du = 2 tanh(u) (the squash correction; the Gaussian term's total
        # derivative along u = mean + std * eps is zero), d log_pi / d log_std = -1
        dsq = 1.0 - new_act * new_act  # d tanh(u) / du
        # the squash term's derivative: 2 tanh(u) (exact), 2 tanh(u) (1 - tanh^2) / (1 - tanh^2 + eps) (rlkit)
        g_squash = 2.0 * new_act if pol.squash != "rlkit" else 2.0 * new_act * dsq / (dsq + SQUASH_EPS)
        g_u = g_act * dsq + g_squash / n
        k = n * a
        g_mean = g_u + (2.0 * cfg.policy_mean_reg / k) * pmean
        g_ls = g_u * std * eps_a - 1.0 / n + (2.0 * cfg.policy_std_reg / k) * plog_std
        g_ls = g_ls * ((ls_raw >= LOG_STD_MIN) & (ls_raw <= LOG_STD_MAX))
        for lin, g in ((pol.net.out, g_mean), (pol.log_std, g_ls)):
            _linear_grads(lin, g, h, grads)
        g_h = g_mean.mm(pol.net.out.weight).addmm_(g_ls, pol.log_std.weight)
        _mlp_backward(pol.net, pol_hs, g_h, grads, head=False)
        actor_adam.step()
        if torch.compiler.is_compiling():  # per tensor: a traced graph may not mix the flat buffer and its views
            torch._foreach_lerp_(list(self.target_vf.parameters()), list(self.vf.parameters()), cfg.soft_target_tau)
        else:
            self._target_flat.lerp_(self._vf_flat, cfg.soft_target_tau)

        out = {
            "losses/qf": qf_loss,
            "losses/vf": vf_loss,
            "losses/policy": policy_loss,
            "losses/kl": kl,
            "train/q_mean": q.mean(),
            "train/v_mean": v.mean(),
            "train/log_pi": log_pi.mean(),
            "train/z_var": V.mean() if cfg.use_information_bottleneck else kl,
        }
        self._tune_kl_weight(kl, M, out)
        return out

    # ---- state ---------------------------------------------------------------------------------
    def modules(self) -> dict:
        out = {"encoder": self.encoder, "qf": self.qf, "vf": self.vf, "target_vf": self.target_vf,
               "policy": self.policy}
        if self.trunk is not None:
            out["trunk"] = self.trunk
        return out

    def state_dict(self) -> dict:
        out = {
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }
        if self.kl_log_lambda is not None:
            out["kl_log_lambda"] = self.kl_log_lambda.detach().clone()
        return out

    def load_state_dict(self, state: dict, with_optimizers: bool = True) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state["modules"][k])
        if self.kl_log_lambda is not None:
            if "kl_log_lambda" not in state:
                raise ValueError("kl_target: this checkpoint was written without a tuned KL weight")
            with torch.no_grad():
                self.kl_log_lambda.copy_(state["kl_log_lambda"])
        if with_optimizers:
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
            self._flat = None  # the loaded Adam state replaced the flat views


class LaneActor:
    """``act_batch`` for the lanes of the rollout engine without its per-step copies: the
    policy's input ``[lanes, obs + latent]`` is one tensor whose observation columns are a
    numpy view (``obs``: the engine writes observations into it) and whose latent columns
    (``z``) change only when a lane starts a trajectory.  The same float32 arithmetic as
    ``act_batch``, so the same actions bit for bit."""

    def __init__(self, policy: TanhGaussianPolicy, lanes: int, obs_dim: int, latent: int):
        self.params = policy.act_params(detach=True)  # no grad mode to switch per step
        self.x = torch.zeros(int(lanes), int(obs_dim) + int(latent))
        self.obs = self.x.numpy()[:, :obs_dim]
        self.z = self.x[:, obs_dim:]

    def act(self, active: np.ndarray | None, deterministic: bool = False) -> np.ndarray:
        """Actions ``[k, act]`` of the ``active`` lanes (None: all of them)."""
        return act_with(self.params, self.x if active is None else self.x[active], deterministic).numpy()
