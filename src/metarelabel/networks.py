"""Networks of PEARL: MLPs, twin critics evaluated as one batched network, a tanh-Gaussian
policy and the context encoder.  Initialisation follows PEARL/rlkit: hidden weights
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), hidden biases 0.1, output layer U(-3e-3, 3e-3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
SQUASH_EPS = 1e-6
_LOG2 = math.log(2.0)


def _init_hidden_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.constant_(bias, 0.1)


def _init_last_(weight: torch.Tensor, bias: torch.Tensor, w: float = 3e-3) -> None:
    nn.init.uniform_(weight, -w, w)
    nn.init.uniform_(bias, -w, w)


class MLP(nn.Module):
    """``layers`` hidden ReLU layers of width ``hidden``, then a linear output."""

    def __init__(self, in_dim: int, hidden: int, layers: int, out_dim: int):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], out_dim)
        for lin in self.hidden:
            _init_hidden_(lin.weight, lin.bias, lin.in_features)
        _init_last_(self.out.weight, self.out.bias)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.hidden:
            x = F.relu(lin(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x))


class TwinQ(nn.Module):
    """Two independent Q networks stored as stacked weights ``[2, in, out]`` and evaluated
    with one batched matmul per layer.  ``forward(x)`` returns ``[2, n]``."""

    def __init__(self, in_dim: int, hidden: int, layers: int, n_heads: int = 2):
        super().__init__()
        dims = [in_dim] + [hidden] * layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(n_heads, a, b)
            bias = torch.empty(n_heads, 1, b)
            for h in range(n_heads):
                if i < len(dims) - 2:
                    _init_hidden_(w[h], bias[h], a)
                else:
                    _init_last_(w[h], bias[h])
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(bias))
        self.n_heads = n_heads

    def forward(self, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """``detach_params``: gradients flow to ``x`` only (no weight-gradient GEMMs)."""
        h = x.unsqueeze(0).expand(self.n_heads, *x.shape)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.relu(h)
        return h.squeeze(-1)


def squash_log_det(u: torch.Tensor, a: torch.Tensor, squash: str = "exact") -> torch.Tensor:
    """sum log(1 - tanh(u)^2) over the last axis, with ``a = tanh(u)``: the stable closed form
    ``2 (log 2 - u - softplus(-2u))`` (``exact``), or the release's ``log(1 - a^2 + 1e-6)``
    (``rlkit``: a saturated action costs at most ~13.8 nats per dimension)."""
    if squash == "rlkit":
        return torch.log(1.0 - a * a + SQUASH_EPS).sum(-1)
    return (2.0 * (_LOG2 - u - F.softplus(-2.0 * u))).sum(-1)


def act_with(params: tuple, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """``TanhGaussianPolicy.act`` from its ``act_params`` (no module-call overhead)."""
    h = x
    for w, b in params[:-2]:
        h = F.linear(h, w, b).relu_()
    mean = F.linear(h, *params[-2])
    if deterministic:
        return mean.tanh_()
    std = F.linear(h, *params[-1]).clamp_(LOG_STD_MIN, LOG_STD_MAX).exp_()
    # tanh(mean + std * eps) in place, in the same order of operations
    return torch.randn_like(mean).mul_(std).add_(mean).tanh_()


class TanhGaussianPolicy(nn.Module):
    """pi(a | s, z) = tanh(N(mean, exp(log_std)^2)), log-std clamped to [-20, 2]."""

    def __init__(self, in_dim: int, act_dim: int, hidden: int, layers: int):
        super().__init__()
        self.net = MLP(in_dim, hidden, layers, act_dim)  # .out is the mean head
        #: log-density of the tanh squash: "exact" (stable closed form) or "rlkit" (+1e-6)
        self.squash = "exact"
        self.log_std = nn.Linear(hidden, act_dim)
        _init_last_(self.log_std.weight, self.log_std.bias)

    def act(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Actions only (no log-probability): ``tanh(mean)``, or ``tanh(mean + std * eps)``
        with the same draw ``forward`` makes."""
        return act_with(self.act_params(), x, deterministic)

    def act_params(self, detach: bool = False) -> tuple:
        """The weights ``act_with`` reads: ((W, b) of each hidden layer, ..., mean head,
        log-std head); ``detach``: views that share the parameters' storage (they follow
        in-place updates) and record no autograd graph."""
        lins = [*self.net.hidden, self.net.out, self.log_std]
        return tuple((lin.weight.detach(), lin.bias.detach()) if detach else (lin.weight, lin.bias) for lin in lins)

    def forward(self, x: torch.Tensor, deterministic: bool = False, eps: torch.Tensor | None = None):
        """Action, log pi(action), mean, log_std.  Sampling is reparameterised; ``eps`` (standard
        normal noise of the action's shape) may be given to make the draw explicit."""
        h = self.net.trunk(x)
        mean = self.net.out(h)
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        if deterministic:
            return torch.tanh(mean), None, mean, log_std
        std = log_std.exp()
        u = mean + std * (torch.randn_like(mean) if eps is None else eps)
        # log N(u; mean, std) - sum log(1 - tanh(u)^2), the latter in a stable form
        log_prob = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        a = torch.tanh(u)
        return a, log_prob - squash_log_det(u, a, self.squash), mean, log_std


class ContextEncoder(MLP):
    """Maps each context transition to (mu_n, sigma^2_n-preactivation): ``2 * latent`` outputs."""


FEATURE_DIM = 50
CONV_CHANNELS = 32
#: strides of the 4 conv layers (3x3 kernels).  DrQ/SAC-AE use (2, 1, 1, 1) on 84x84 frames; on
#: 64x64 frames (2, 2, 2, 1) keeps a 5x5x32 map at ~6x fewer FLOPs, which matters because every
#: gradient step embeds meta_batch x (2 batch_size + embedding_batch_size) images.
CONV_STRIDES = (2, 2, 2, 1)


class ConvTrunk(nn.Module):
    """Image observations ``uint8 [..., C, H, W]`` -> features ``[..., FEATURE_DIM]``:
    pixels / 255, four 3x3 conv layers (``CONV_CHANNELS`` channels, ReLU), a linear layer,
    LayerNorm and tanh (as in SAC-AE / DrQ)."""

    def __init__(self, obs_shape, feature_dim: int = FEATURE_DIM, channels: int = CONV_CHANNELS,
                 strides=CONV_STRIDES):
        super().__init__()
        self.obs_shape = tuple(int(s) for s in obs_shape)
        c = self.obs_shape[0]
        layers = []
        for s in strides:
            layers += [nn.Conv2d(c, channels, 3, stride=s), nn.ReLU()]
            c = channels
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, *self.obs_shape)).numel()
        self.fc = nn.Linear(n_flat, feature_dim)
        self.norm = nn.LayerNorm(feature_dim)
        self.feature_dim = feature_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[: obs.dim() - len(self.obs_shape)]
        x = obs.reshape(-1, *self.obs_shape).float() / 255.0
        h = self.convs(x).flatten(1)
        return torch.tanh(self.norm(self.fc(h))).reshape(*lead, self.feature_dim)
