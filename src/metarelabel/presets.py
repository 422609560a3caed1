"""Named presets per task family.

``paper`` holds the hyperparameters of the HFR paper (SPEC section 6; point robots follow
PEARL).  ``quick`` is a small variant that finishes in well under 3 minutes on 2 CPU cores:
for demos, smoke tests and CI, not for results.  ``cpu`` (four-corners and sparse-point-robot
only) is sized for results on a CPU: 10-20 minutes per run on one core.
"""
from __future__ import annotations

from typing import Any

from .config import FIELDS, Config, build_config
from .errors import ConfigError

_COMMON = dict(
    latent_dim=5, hidden_dim=300, hidden_layers=3, encoder_hidden_dim=200, encoder_layers=3,
    batch_size=256, lr=3e-4, soft_target_tau=0.005, use_information_bottleneck=True,
    replay_buffer_size=1_000_000, keep_original_prob=0.5, num_train_steps_per_itr=1000,
    log_z_samples=20,
)

PAPER: dict[str, dict[str, Any]] = {
    "four-corners": dict(
        num_iterations=300, max_path_length=20, discount=0.90, num_initial_steps=200,
        num_tasks_sample=10, num_steps_prior=100, num_steps_posterior=900,
        num_extra_rl_steps_posterior=0, meta_batch=8, embedding_batch_size=1024,
        utility_batch_size=1024, reward_scale=100.0, kl_lambda=1.0, eval_runs=2,
        eval_steps=400, exploration_trajectories=5, num_eval_train_tasks=4,
    ),
    "point-robot": dict(
        num_iterations=500, max_path_length=20, discount=0.90, num_initial_steps=200,
        num_tasks_sample=5, num_steps_prior=200, num_steps_posterior=0,
        num_extra_rl_steps_posterior=200, meta_batch=16, embedding_batch_size=100,
        utility_batch_size=256, reward_scale=100.0, kl_lambda=0.1, eval_runs=2,
        eval_steps=60, exploration_trajectories=2, num_eval_train_tasks=5,
    ),
    "sparse-point-robot": dict(
        num_iterations=500, max_path_length=20, discount=0.90, num_initial_steps=200,
        num_tasks_sample=10, num_steps_prior=100, num_steps_posterior=900,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=1024,
        utility_batch_size=256, reward_scale=100.0, kl_lambda=1.0, eval_runs=2,
        eval_steps=400, exploration_trajectories=5, num_eval_train_tasks=5,
        context_reward="true", rl_reward="true",
    ),
    # MuJoCo locomotion (SPEC section 6); horizon 200, gamma 0.99, 2000 initial steps per task
    "cheetah-vel": dict(
        num_iterations=160, max_path_length=200, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=5, num_steps_prior=400, num_steps_posterior=0,
        num_extra_rl_steps_posterior=600, meta_batch=16, embedding_batch_size=100,
        utility_batch_size=256, reward_scale=5.0, kl_lambda=0.1, eval_runs=1,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
    ),
    "cheetah-vel-sparse": dict(
        num_iterations=160, max_path_length=200, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=5, num_steps_prior=400, num_steps_posterior=600,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=100,
        utility_batch_size=256, reward_scale=5.0, kl_lambda=0.1, eval_runs=2,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
        context_reward="true", rl_reward="true",
    ),
    "cheetah-highdim": dict(
        num_iterations=180, max_path_length=200, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=10, num_steps_prior=400, num_steps_posterior=0,
        num_extra_rl_steps_posterior=600, meta_batch=16, embedding_batch_size=100,
        utility_batch_size=256, reward_scale=5.0, kl_lambda=0.1, eval_runs=1,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
    ),
    "ant-vel": dict(
        num_iterations=160, max_path_length=200, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=10, num_steps_prior=400, num_steps_posterior=0,
        num_extra_rl_steps_posterior=600, meta_batch=10, embedding_batch_size=256,
        utility_batch_size=256, reward_scale=5.0, kl_lambda=1.0, eval_runs=1,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
    ),
    "ant-goal": dict(
        num_iterations=180, max_path_length=200, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=10, num_steps_prior=400, num_steps_posterior=600,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=256,
        utility_batch_size=64, reward_scale=5.0, kl_lambda=1.0, eval_runs=1,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
        context_reward="true", rl_reward="true",
    ),
    # Meta-World Sawyer (SPEC section 6); horizon 150, gamma 0.99, sparse reward everywhere
    "sawyer-reach": dict(
        num_iterations=40, max_path_length=150, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=10, num_steps_prior=400, num_steps_posterior=600,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=64,
        utility_batch_size=256, reward_scale=10.0, kl_lambda=0.1, eval_runs=2,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
        context_reward="true", rl_reward="true",
    ),
    "sawyer-push": dict(
        num_iterations=90, max_path_length=150, discount=0.99, num_initial_steps=2000,
        num_tasks_sample=10, num_steps_prior=400, num_steps_posterior=600,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=64,
        utility_batch_size=256, reward_scale=100.0, kl_lambda=0.1, eval_runs=2,
        eval_steps=600, exploration_trajectories=2, num_eval_train_tasks=5,
        context_reward="true", rl_reward="true",
    ),
    # Visual-Reacher (64x64 RGB images, hidden target, sparse): horizon 50, gamma 0.99.  Like
    # sawyer-reach's column; the RL buffer is capped at 20,000 transitions per task (images cost
    # ~24.6 kB per transition, obs + next_obs), 10 trajectories per task initially.
    "visual-reacher": dict(
        num_iterations=100, max_path_length=50, discount=0.99, num_initial_steps=500,
        num_tasks_sample=10, num_steps_prior=200, num_steps_posterior=300,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=64,
        utility_batch_size=64, reward_scale=10.0, kl_lambda=0.1, eval_runs=2,
        eval_steps=300, exploration_trajectories=2, num_eval_train_tasks=5,
        context_reward="true", rl_reward="true", replay_buffer_size=20_000,
    ),
}

# Small networks, few iterations: a run takes well under a minute on 2 cores.
_QUICK = dict(
    num_iterations=10, hidden_dim=64, encoder_hidden_dim=64, batch_size=64, meta_batch=4,
    embedding_batch_size=64, utility_batch_size=64, num_train_steps_per_itr=50,
    num_tasks_sample=4, num_initial_steps=40, eval_runs=1, num_eval_train_tasks=2,
    checkpoint_every=5, log_z_samples=8,
)
QUICK: dict[str, dict[str, Any]] = {
    "four-corners": dict(_QUICK, num_steps_prior=20, num_steps_posterior=40, eval_steps=100,
                         exploration_trajectories=2),
    "point-robot": dict(_QUICK, num_steps_prior=40, num_steps_posterior=0,
                        num_extra_rl_steps_posterior=40, eval_steps=60, exploration_trajectories=1),
    "sparse-point-robot": dict(_QUICK, num_steps_prior=20, num_steps_posterior=40, eval_steps=100,
                               exploration_trajectories=2),
}
# MuJoCo families keep the 200-step horizon: one trajectory per train task initially, 2 tasks
# of one trajectory per phase and 2 iterations, evaluation of 2 trajectories (10-30 s on 2 cores).
_QUICK_MUJOCO = dict(_QUICK, num_iterations=2, num_initial_steps=200, num_tasks_sample=2,
                     num_steps_prior=200, eval_steps=400, exploration_trajectories=1, checkpoint_every=0)
for _name in ("cheetah-vel", "cheetah-highdim", "ant-vel"):  # prior / extra-RL columns
    QUICK[_name] = dict(_QUICK_MUJOCO, num_steps_posterior=0, num_extra_rl_steps_posterior=200)
for _name in ("cheetah-vel-sparse", "ant-goal"):  # prior / posterior columns
    QUICK[_name] = dict(_QUICK_MUJOCO, num_steps_posterior=200, num_extra_rl_steps_posterior=0)
# Sawyer families keep the 150-step horizon: one trajectory per train task initially (50 x 150
# steps), 2 tasks of one prior and one posterior trajectory per iteration, 2 iterations.
for _name in ("sawyer-reach", "sawyer-push"):
    QUICK[_name] = dict(_QUICK_MUJOCO, num_initial_steps=150, num_steps_prior=150, num_steps_posterior=150,
                        num_extra_rl_steps_posterior=0, eval_steps=300)
# Visual-Reacher: one 50-step trajectory per train task initially, 2 tasks of one prior and one
# posterior trajectory per iteration, 2 iterations of 20 small gradient steps (the conv trunk
# dominates on a CPU), evaluation of 2 trajectories per task.
QUICK["visual-reacher"] = dict(_QUICK_MUJOCO, num_initial_steps=50, num_steps_prior=50, num_steps_posterior=50,
                               num_extra_rl_steps_posterior=0, eval_steps=100, num_train_steps_per_itr=20,
                               batch_size=32, embedding_batch_size=32, utility_batch_size=8, log_z_samples=4,
                               replay_buffer_size=2_000)

# ``cpu``: one run in 10-20 minutes on one core of this project's 2-core machine, sized with
# pilot runs (docs/results.md).  Against ``paper``: 3x64 networks and encoder instead of 3x300 /
# 3x200, meta-batch 4-8 x 128 transitions with 128 context transitions (paper 8-16 x 256 with
# 1024) and 150 iterations (paper 300 / 500).  Four-corners keeps the paper's collection rate
# and gradient steps and departs in discount and KL weight; sparse-point-robot runs 400
# gradient steps and 5 tasks of 100 prior + 300 posterior steps per iteration.  Reward scale,
# horizon and each evaluation episode (steps, exploration trajectories) are the paper's;
# evaluation runs less often / on fewer tasks.
_CPU = dict(
    hidden_dim=64, encoder_hidden_dim=64, batch_size=128, embedding_batch_size=128,
    utility_batch_size=128, num_steps_prior=100, num_steps_posterior=300, num_iterations=150,
    checkpoint_every=25,
)
CPU: dict[str, dict[str, Any]] = {
    # The paper's collection rate (10 x (100 + 900) steps, 1000 gradient steps per iteration)
    # with gamma 0.99 and KL weight 25 (docs/results.md, pilots: with gamma 0.9 reaching the
    # goal straight is worth less than never arriving; a weaker bottleneck leaves the meta-test
    # exploration with z ~ prior nowhere to go).  Eval tasks are the 4 train tasks, so no
    # separate meta_train evaluation.
    "four-corners": dict(_CPU, meta_batch=4, num_train_steps_per_itr=1000, num_tasks_sample=10,
                         num_steps_posterior=900, discount=0.99, kl_lambda=25.0, num_eval_train_tasks=0),
    # PEARL's recipe: the encoder sees the sparse reward, the critic learns from the dense one
    # (rl_reward=true, the sparse critic, learns better over 150 iterations: docs/results.md).  20 eval tasks: one run
    # per task, every 5th iteration.
    "sparse-point-robot": dict(_CPU, meta_batch=8, num_train_steps_per_itr=400, num_tasks_sample=5,
                               eval_every=5, eval_runs=1, num_eval_train_tasks=0, rl_reward="dense"),
}

PRESETS = {"paper": PAPER, "quick": QUICK, "cpu": CPU}


def preset_names() -> list[str]:
    return list(PRESETS)


def plugin_preset_values(cls, preset: str) -> dict[str, Any]:
    """Presets of a registered (plugin) family: generic ``paper`` and ``quick`` settings sized
    in trajectories of the family's horizon, updated by the class's own ``presets`` mapping
    (``{"paper": {...}, "quick": {...}, "any-name": {...}}``); other names only if it has them."""
    own = dict(getattr(cls, "presets", None) or {})
    H = int(cls.horizon)
    n_train = int(cls.num_train) if not cls.eval_is_train else 0
    paper = dict(
        _COMMON, max_path_length=H, discount=float(cls.discount), num_iterations=100,
        num_initial_steps=10 * H, num_tasks_sample=5, num_steps_prior=2 * H, num_steps_posterior=3 * H,
        num_extra_rl_steps_posterior=0, meta_batch=16, embedding_batch_size=min(256, 8 * H),
        utility_batch_size=256, eval_runs=1, eval_steps=3 * H, exploration_trajectories=1,
        num_eval_train_tasks=min(5, n_train),
    )
    paper.update(own.get("paper", {}))
    if preset == "paper":
        return paper
    if preset == "quick":
        quick = dict(paper, **_QUICK)
        quick.update(num_iterations=2, num_initial_steps=H, num_steps_prior=H, num_steps_posterior=H,
                     num_extra_rl_steps_posterior=0, eval_steps=2 * H, exploration_trajectories=1,
                     embedding_batch_size=min(64, 2 * H), utility_batch_size=min(64, 2 * H), checkpoint_every=0)
        quick.update(own.get("quick", {}))
        return quick
    if preset in own:
        return dict(paper, **own[preset])
    raise ConfigError(f"task family {cls.name!r} has no preset {preset!r} (it has: "
                      f"{', '.join(sorted({'paper', 'quick', *own}))})")


def preset_values(family: str, preset: str) -> dict[str, Any]:
    from .envs import BUILTIN, family_class

    if family not in BUILTIN:
        cls = family_class(family)  # a registered plugin family, or a clear error
        values = plugin_preset_values(cls, preset)
        values.update(family=family, preset=preset)
        return values
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    table = PRESETS[preset]
    if family not in table:
        raise ConfigError(f"preset {preset!r} has no entry for family {family!r} "
                          f"(it covers: {', '.join(table)})")
    base = dict(_COMMON)
    if preset != "paper":
        base.update(PAPER.get(family, {}))
    base.update(table[family])
    base.update(family=family, preset=preset)
    return base


def make_config(family: str, preset: str = "paper", overrides: dict[str, Any] | None = None) -> Config:
    """Config for ``family`` from ``preset`` with ``overrides`` applied and validated."""
    overrides = dict(overrides or {})
    for key in ("family", "preset"):
        if key in overrides:
            raise ConfigError(f"{key}: set it with the positional argument / --preset, not as an override")
    for key in overrides:
        if key not in FIELDS:
            raise ConfigError(f"unknown config field {key!r}")
    return build_config(preset_values(family, preset), overrides)
