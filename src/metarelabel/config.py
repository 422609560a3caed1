"""Typed, frozen run configuration.

Every field carries a docstring (the string literal under it; it becomes ``--help`` text) and
its valid range in ``metadata``.  ``Config.from_overrides`` builds a config from a family, a
preset and ``field=value`` overrides and validates it; every bad value is rejected with a
``ConfigError`` that names the field.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import ConfigError

RELABEL_CHOICES = ("none", "random", "hipi", "hipi-q", "hfr", "hfr-bellman")


def _f(default, *, lo=None, hi=None, choices=None, lo_open=False):
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    # ---- run ------------------------------------------------------------------------
    family: str = "four-corners"
    """Task family (see `metarelabel envs`)."""
    preset: str = "paper"
    """Preset the config was built from (`paper`, `quick`)."""
    seed: int = _f(0, lo=0)
    """Run seed: drives torch, numpy and the environment's start states."""
    task_seed: int = _f(0, lo=0)
    """Task seed: fixes the family's task set, independent of the run seed."""
    device: str = _f("cpu", choices=("cpu", "cuda", "auto"))
    """Torch device for networks and updates (`auto` = cuda when available)."""
    device_buffers: str = _f("auto", choices=("auto", "on", "off"))
    """Mirror the RL and encoder buffers on the device and gather minibatches there (`auto` =
    on for cuda): one small index copy per gradient step instead of the gathered rows."""
    torch_threads: int = _f(1, lo=1, hi=256)
    """torch intra-op threads (1 is usually fastest when anything else runs)."""
    rollouts: str = _f("vector", choices=("vector", "sequential"))
    """Rollout engine: `vector` steps all task visits (collection) and all (task, run) pairs
    (evaluation) in lockstep with one policy call per step; `sequential` is the
    one-environment-at-a-time reference."""
    grad_step: str = _f("fast", choices=("fast", "auto", "lean", "compiled", "reference"))
    """Gradient step: `lean` (hand-written backward, two fused Adam calls; vector observations
    only), `compiled` (the lean step compiled by `torch.compile`'s inductor backend: fused C++
    kernels; needs a C++ compiler, compiles for about 10-70 s on first use; vector observations
    only), `reference` (autograd, the textbook order), `auto` = lean where it applies, `fast` =
    compiled where it pays back its compile (on the CPU, at least 50,000 gradient steps in all,
    fixed-size contexts, no `kl_target`) and inductor works on this machine, else as `auto`."""
    num_iterations: int = _f(300, lo=1)
    """Meta-training iterations (after the initial collection)."""
    checkpoint_every: int = _f(10, lo=0)
    """Write a complete checkpoint every N iterations (0: only at the end)."""
    keep_checkpoints: int = _f(2, lo=1)
    """How many most recent checkpoints to keep."""
    eval_every: int = _f(1, lo=1)
    """Run the meta-test evaluation every N iterations (and always at the last)."""
    # ---- environment / collection ------------------------------------------------------
    max_path_length: int = _f(20, lo=1)
    """Trajectory length limit (the family's horizon in the presets)."""
    discount: float = _f(0.9, lo=0.0, hi=1.0)
    """Discount factor gamma."""
    num_initial_steps: int = _f(200, lo=1)
    """Steps collected per train task with z ~ prior before iteration 1."""
    num_tasks_sample: int = _f(10, lo=1)
    """Train tasks chosen (uniformly, with replacement) for collection per iteration."""
    num_steps_prior: int = _f(100, lo=0)
    """Per chosen task: steps with z ~ prior, resampled every trajectory."""
    num_steps_posterior: int = _f(900, lo=0)
    """Per chosen task: steps with z from the posterior, fed to the encoder buffer."""
    num_extra_rl_steps_posterior: int = _f(0, lo=0)
    """Per chosen task: posterior steps that go to the RL buffer only."""
    context_reward: str = _f("true", choices=("true", "dense"))
    """Reward the encoder sees: the task's true reward or the family's dense form."""
    rl_reward: str = _f("true", choices=("true", "dense"))
    """Reward the critic is trained on: the task's true reward or the dense form."""
    # ---- PEARL --------------------------------------------------------------------------
    latent_dim: int = _f(5, lo=1)
    """Size of the task latent z."""
    hidden_dim: int = _f(300, lo=1)
    """Width of the policy/Q/V hidden layers."""
    hidden_layers: int = _f(3, lo=1)
    """Number of policy/Q/V hidden layers."""
    encoder_hidden_dim: int = _f(200, lo=1)
    """Width of the context-encoder hidden layers."""
    encoder_layers: int = _f(3, lo=1)
    """Number of context-encoder hidden layers."""
    batch_size: int = _f(256, lo=1)
    """SAC transitions per task per gradient step."""
    meta_batch: int = _f(8, lo=1)
    """Tasks per gradient step (drawn with replacement)."""
    embedding_batch_size: int = _f(1024, lo=1)
    """Context transitions per task (gradient steps and posterior inference)."""
    context_trajectories: int = _f(0, lo=0)
    """Contexts of the gradient steps.  0 (PEARL): ``embedding_batch_size`` transitions drawn
    uniformly from the task's encoder buffer.  K > 0: k whole paths of that buffer, k uniform
    in 1..K and the paths drawn without replacement (padded and masked in the posterior), the
    shape of a meta-test context: the agent's own trajectories, few or many, in full."""
    num_train_steps_per_itr: int = _f(1000, lo=0)
    """Gradient steps per iteration."""
    lr: float = _f(3e-4, lo=0.0, lo_open=True, hi=1.0)
    """Adam learning rate of every network."""
    soft_target_tau: float = _f(0.005, lo=0.0, lo_open=True, hi=1.0)
    """Polyak rate of the target V network."""
    reward_scale: float = _f(100.0, lo=0.0, lo_open=True)
    """alpha: rewards are multiplied by it in the Q target (entropy temperature stays 1)."""
    kl_lambda: float = _f(1.0, lo=0.0)
    """Weight of the KL(q(z|c) || N(0, I)) term, summed over tasks (with `kl_target`: its
    starting value)."""
    kl_target: float = _f(0.0, lo=0.0)
    """Nats per task.  0 keeps `kl_lambda` fixed (PEARL).  Above 0 the KL weight is tuned
    during training so that the posterior's KL to the prior, averaged over a step's tasks,
    tracks this target: log kl_lambda takes one Adam step at `lr` per gradient step on
    (target - KL per task), as SAC tunes its entropy temperature.  A departure from PEARL and
    the release, meant to keep the task posteriors broad enough to cover the prior that the
    meta-test's exploration samples from."""
    z_noise: float = _f(0.0, lo=0.0)
    """Std of extra Gaussian noise added to the sampled z in the gradient steps only (every
    network that reads z: critics, V, target V, policy; the encoder's gradient through z is
    unchanged).  0 (PEARL, the release): none.  Above 0 the policy and critics are trained on a
    ball around each task's posterior, so that prior draws at meta-test that fall between the
    tight task posteriors still meet a trained policy.  A departure, for the Four-Corners pilots."""
    use_information_bottleneck: bool = True
    """Sample z from the product-of-Gaussians posterior (False: deterministic mean)."""
    use_next_obs_in_context: bool = False
    """Include s' in context transitions (s, a, r, s')."""
    policy_mean_reg: float = _f(1e-3, lo=0.0)
    """L2 penalty on the policy mean."""
    policy_std_reg: float = _f(1e-3, lo=0.0)
    """L2 penalty on the policy log-std."""
    init: str = _f("pearl", choices=("pearl", "rlkit"))
    """Weight init of hidden layers: `pearl` bounds by the layer's input width, U(+-1/sqrt(in));
    `rlkit` reproduces the release's fanin_init, which reads the output width of a torch
    Linear (U(+-1/sqrt(out)); first layers start several times smaller), with the policy's
    mean and log-std heads at U(+-1e-3)."""
    squash_log_prob: str = _f("exact", choices=("exact", "rlkit"))
    """log(1 - tanh(u)^2) in the policy's log-density: `exact` (the stable closed form) or
    `rlkit` (log(1 - tanh(u)^2 + 1e-6), as the release computes it: saturated actions cost at
    most ~13.8 nats per dimension)."""
    replay_buffer_size: int = _f(1_000_000, lo=1)
    """Capacity of each task's RL buffer (capped to what the run can ever collect)."""
    # ---- relabeling ----------------------------------------------------------------
    relabel: str = _f("none", choices=RELABEL_CHOICES)
    """Relabeling strategy."""
    keep_original_prob: float = _f(0.5, lo=0.0, hi=1.0)
    """Per batch of collected paths: probability that they stay with their task unchanged."""
    relabel_truncate: bool = True
    """Cut a path filed under another task at its first terminal under that task (and mask HFR's
    hindsight context there).  False keeps the whole path with every step's reward and terminal
    recomputed, as the original release does."""
    keep_initial_encoder_data: bool = False
    """False: the first iteration's collection replaces each visited task's encoder data from
    the initial collection, as every later iteration replaces the one before.  True: the
    first iteration adds to it, as the original release does (its clear-on-write flags start
    cleared after the initial collection); from the second iteration on both are the same."""
    hardmax: bool = False
    """Assign the argmax task instead of sampling from q(psi | tau)."""
    utility_batch_size: int = _f(1024, lo=1)
    """Start states B per task for the HFR utility and log Z."""
    log_z_samples: int = _f(20, lo=1)
    """Samples in the log Z estimator."""
    learned_reward: bool = False
    """Build relabeling contexts with a learned reward model instead of the true reward."""
    hipi_temperature: float = _f(1.0, lo=0.0, lo_open=True)
    """HIPI: temperature dividing the hindsight return."""
    hipi_cache_size: int = _f(100, lo=1)
    """HIPI: recent original paths used to estimate log Z."""
    # ---- evaluation ---------------------------------------------------------------
    eval_runs: int = _f(2, lo=1)
    """Meta-test runs per task (z reset to the prior each run)."""
    eval_steps: int = _f(400, lo=1)
    """Transitions collected per meta-test run."""
    exploration_trajectories: int = _f(5, lo=0)
    """Meta-test trajectories with z ~ prior before posterior inference starts."""
    num_eval_train_tasks: int = _f(5, lo=0)
    """Train tasks evaluated with the same protocol (logged as meta_train/...)."""

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **changes) -> "Config":
        return build_config(self.to_dict(), changes)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        self._check_consistency()
        return self

    def _check_consistency(self) -> None:
        from .envs import family_class

        try:
            fam = family_class(self.family)
        except ConfigError as exc:
            raise ConfigError(f"family: {exc}") from None
        if self.num_steps_prior + self.num_steps_posterior + self.num_extra_rl_steps_posterior == 0:
            raise ConfigError("num_steps_prior: prior, posterior and extra-RL steps are all 0; nothing would be collected")
        if self.eval_steps < self.max_path_length:
            raise ConfigError(
                f"eval_steps: {self.eval_steps} is shorter than one trajectory (max_path_length={self.max_path_length})"
            )
        if self.max_path_length > fam.horizon:
            raise ConfigError(f"max_path_length: {self.max_path_length} exceeds the {self.family} horizon ({fam.horizon})")
        min_traj = -(-self.eval_steps // self.max_path_length)
        if self.exploration_trajectories >= min_traj:
            raise ConfigError(
                f"exploration_trajectories: {self.exploration_trajectories} leaves no posterior trajectory in "
                f"eval_steps={self.eval_steps} (at most {min_traj} trajectories of {self.max_path_length} steps)")
        caps = self.buffer_capacities(fam.num_train)
        hold = min(caps["encoder"], caps["sampler"])
        if self.embedding_batch_size > hold:
            raise ConfigError(
                f"embedding_batch_size: {self.embedding_batch_size} exceeds what the encoder/sampler buffers can hold "
                f"({hold} transitions with these collection settings)")
        if self.grad_step in ("lean", "compiled") and getattr(fam, "image_obs", False):
            raise ConfigError(f"grad_step: {self.grad_step} supports vector observations only; {self.family} has "
                              "images (use auto or reference)")
        if self.kl_target > 0 and not (self.use_information_bottleneck and self.kl_lambda > 0):
            raise ConfigError("kl_target: needs use_information_bottleneck and a starting kl_lambda > 0")
        if self.learned_reward and self.relabel not in ("hfr", "hfr-bellman"):
            raise ConfigError(f"learned_reward: only hfr and hfr-bellman build relabeling contexts (relabel={self.relabel})")

    @property
    def context_reward_key(self) -> str:
        """Buffer/path column the encoder reads: ``rewards`` or ``dense_rewards``."""
        return "dense_rewards" if self.context_reward == "dense" else "rewards"

    @property
    def rl_reward_key(self) -> str:
        """Buffer/path column the critic is trained on."""
        return "dense_rewards" if self.rl_reward == "dense" else "rewards"

    def buffer_capacities(self, num_tasks: int) -> dict[str, int]:
        """Per-task buffer capacities.  The RL buffer holds at most what the whole run can
        collect (any one task may receive every path); the encoder buffer one iteration's worth
        of encoder-feeding steps; the sampler buffer one visit of a task (or the initial steps)."""
        H = self.max_path_length
        visit = self.num_steps_prior + self.num_steps_posterior + self.num_extra_rl_steps_posterior + 3 * H
        total = (self.num_initial_steps + H) * num_tasks + self.num_iterations * self.num_tasks_sample * visit
        rl = min(self.replay_buffer_size, total)
        per_iter_enc = self.num_tasks_sample * (self.num_steps_prior + self.num_steps_posterior + 2 * H)
        enc = min(rl, max(self.num_initial_steps + H, per_iter_enc))
        smp = min(rl, max(self.num_initial_steps + H, visit))
        return {"rl": rl, "encoder": enc, "sampler": smp}


def _type_name(tp) -> str:
    return tp if isinstance(tp, str) else tp.__name__


def _check_field(f: dataclasses.Field, value) -> None:
    tp = _type_name(f.type)
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[tp]
    if isinstance(value, bool) and tp != "bool" or not isinstance(value, expected):
        raise ConfigError(f"{f.name}: expected {tp}, got {value!r}")
    if tp == "float" and not math.isfinite(value):
        raise ConfigError(f"{f.name}: must be finite, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(meta['choices'])}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{f.name}: must be {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{f.name}: must be <= {hi}, got {value!r}")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def parse_value(name: str, text: str):
    """Convert a command-line string to the field's type; errors name the field."""
    if name not in FIELDS:
        raise ConfigError(f"unknown config field {name!r}")
    tp = _type_name(FIELDS[name].type)
    text = text.strip()
    try:
        if tp == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp == "int":
            v = float(text) if any(c in text for c in ".eE") else int(text)
            if isinstance(v, float):
                if not v.is_integer():
                    raise ValueError
                v = int(v)
            return v
        if tp == "float":
            return float(text)
        return text
    except (ValueError, OverflowError):
        raise ConfigError(f"{name}: cannot read {text!r} as {tp}") from None


def parse_sets(items) -> dict:
    """``FIELD=VALUE`` strings (``--set``; ``-`` in a name reads as ``_``) as typed overrides."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        name = name.strip().replace("-", "_")
        out[name] = parse_value(name, value)
    return out


def build_config(base: dict[str, Any], overrides: dict[str, Any]) -> Config:
    values = dict(base)
    for key, value in overrides.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown config field {key!r}")
        values[key] = value
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown config field {sorted(unknown)[0]!r}")
    return Config(**values).validate()


def load_config_json(path) -> Config:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} is not a JSON object")
    # runs started before these fields existed continue exactly as they were made
    for key, old in LEGACY_DEFAULTS.items():
        data.setdefault(key, old)
    return build_config({}, data)


#: values of fields added after the first release, for config.json files that lack them
LEGACY_DEFAULTS = {"rollouts": "sequential", "grad_step": "reference"}

#: fields that say how a run executes, not what it computes: they may differ between a run
#: directory's config and the command that continues it (everything else is the run's identity)
RUN_ONLY_FIELDS = frozenset({"device", "device_buffers", "torch_threads", "checkpoint_every", "keep_checkpoints"})


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field old->new`` for each identity field (not in ``RUN_ONLY_FIELDS``) that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RUN_ONLY_FIELDS or old.get(key) == new.get(key):
            continue
        out.append(f"{key} {old.get(key, '(unset)')}->{new.get(key, '(unset)')}")
    return out


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Attribute docstrings of ``Config`` (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Config)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
