"""MuJoCo locomotion families (issue 7; SPEC section 5): batched hindsight rewards agree with
``step`` exactly, sparse rewards vanish outside the goal radius, termination only when
unhealthy, task sets fixed by the task seed, and a quick training run per family.

Needs the ``mujoco`` extra; run with ``pytest -m mujoco``."""
from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import check_batched_reward, quick_hfr_run, random_episodes

mujoco = pytest.importorskip("mujoco")

import torch  # noqa: E402

from metarelabel import checkpoint as ckpt  # noqa: E402
from metarelabel.envs import make_family  # noqa: E402
from metarelabel.envs import mujoco_locomotion as ml  # noqa: E402
from metarelabel.presets import make_config  # noqa: E402

pytestmark = pytest.mark.mujoco

MUJOCO_FAMILIES = ("cheetah-vel", "cheetah-vel-sparse", "cheetah-highdim", "ant-vel", "ant-goal")
# obs dim, act dim, (train, eval)
SHAPES = {
    "cheetah-vel": (17, 6, (100, 30)),
    "cheetah-vel-sparse": (17, 6, (100, 30)),
    "cheetah-highdim": (18, 6, (100, 30)),
    "ant-vel": (113, 8, (150, 30)),
    "ant-goal": (113, 8, (100, 30)),
}
ANTS = ("ant-vel", "ant-goal")


@pytest.fixture(scope="module")
def envs():
    return {name: make_family(name) for name in MUJOCO_FAMILIES}


# ---- spaces, tasks -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_spaces_horizon_tasks(envs, family):
    env = envs[family]
    obs_dim, act_dim, (n_train, n_eval) = SHAPES[family]
    assert env.name == family and env.horizon == 200 and env.discount == pytest.approx(0.99)
    assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (act_dim,)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(env.action_space.high, 1.0)
    np.testing.assert_array_equal(env.train_tasks, np.arange(n_train))
    np.testing.assert_array_equal(env.eval_tasks, np.arange(n_train, n_train + n_eval))
    assert env.num_tasks == n_train + n_eval and env.tasks.ndim == 2
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    obs, r, term, trunc, info = env.step(np.zeros(act_dim))
    assert obs.dtype == np.float32 and isinstance(r, float)
    assert set(env.info_spec) <= set(info)
    for k, shape in env.info_spec.items():
        assert np.shape(info[k]) == shape, k


def test_task_distributions(envs):
    for name in ("cheetah-vel", "cheetah-vel-sparse", "ant-vel"):
        t = envs[name].tasks
        assert t.shape[1] == 1 and t.min() >= 0.0 and t.max() <= 3.0 and t.std() > 0.6
    w = envs["cheetah-highdim"].tasks
    assert w.shape == (130, 18) and np.abs(w).max() <= 1.0 and w.std() > 0.5
    goals = envs["ant-goal"].tasks
    np.testing.assert_allclose(np.linalg.norm(goals, axis=1), 2.0, atol=1e-12)
    assert goals[:, 1].min() >= -1e-12
    angles = np.sort(np.arctan2(goals[:, 1], goals[:, 0]) % (2 * np.pi))
    angles[angles > 1.5 * np.pi] -= 2 * np.pi  # the angle-0 goal
    np.testing.assert_allclose(np.sort(angles), np.linspace(0, np.pi, 130), atol=1e-9)
    # shuffled: the eval tasks are not just the end of the arc
    assert np.arctan2(goals[100:, 1], goals[100:, 0]).min() < np.pi / 2


@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_task_seed(family):
    a, b, c = make_family(family, 0), make_family(family, 0), make_family(family, 1)
    np.testing.assert_array_equal(a.tasks, b.tasks)
    assert not np.array_equal(a.tasks, c.tasks)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    env = make_family(family, 3)
    env.reset(seed=1)
    env.step(np.zeros(env.action_space.shape))
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global RNG untouched
    # start states come from the reset seed only
    s1, s1b, s2 = a.reset(seed=1)[0], c.reset(seed=1)[0], a.reset(seed=2)[0]
    np.testing.assert_array_equal(s1, s1b)
    assert not np.array_equal(s1, s2)


def test_low_gear_ant(envs):
    np.testing.assert_array_equal(envs["ant-goal"].model.actuator_gear[:, 0], 30.0)
    np.testing.assert_array_equal(envs["ant-vel"].model.actuator_gear[:, 0], 150.0)
    assert envs["ant-goal"].model.nu == 8 and envs["ant-goal"].model.nbody == 14


# ---- the batched hindsight reward agrees with step ---------------------------------------------
@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_batched_reward_equals_step(envs, family):
    env = envs[family]
    env.reset(seed=11)
    rng = np.random.default_rng(0)
    all_tasks = np.arange(env.num_tasks)
    tasks = [0, 1, env.num_train - 1, int(env.eval_tasks[0]), int(env.eval_tasks[-1])]
    for task in tasks:
        for ep in random_episodes(env, task, rng, 200):
            _, d, _ = check_batched_reward(env, ep, task, rng.choice(all_tasks, size=7))
            # only the last step of an episode can end it
            assert not d[task][:-1].any()
            assert not ep["trunc"][:-1].any()


# ---- reward definitions, vectorized against a per-element formula ---------------------------
def _synthetic_infos(env, rng, T=300):
    infos = {"ctrl_cost": rng.uniform(0, 0.5, T)}
    if "x_velocity" in env.info_spec:
        v = rng.uniform(-1, 4, T)
        v[:40] = env.tasks[rng.integers(env.num_tasks, size=40), 0] + rng.uniform(-0.35, 0.35, 40)
        infos["x_velocity"] = v
    if "xy" in env.info_spec:
        xy = rng.uniform(-3, 3, (T, 2))
        xy[:60] = env.tasks[rng.integers(env.num_tasks, size=60)] + rng.uniform(-0.9, 0.9, (60, 2))
        infos["xy"] = xy
        infos["z"] = rng.uniform(0.1, 1.1, T)
        infos["z"][:3] = [np.nan, 0.2, 1.0]
        infos["contact_cost"] = rng.uniform(0, 0.05, T)
    if "next_obs" in env.info_spec:
        infos["next_obs"] = ml.HIGHDIM_MU + ml.HIGHDIM_SIGMA * rng.normal(scale=3.0, size=(T, 18))
    return infos


@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_reward_definitions(envs, family):
    env = envs[family]
    rng = np.random.default_rng(2)
    infos = _synthetic_infos(env, rng)
    K = np.arange(env.num_tasks)
    r, d, s = env.reward(infos, K)
    dense = env.dense_reward(infos, K)
    ctrl = infos["ctrl_cost"][None]
    if family in ("cheetah-vel", "cheetah-vel-sparse", "ant-vel"):
        err = np.abs(infos["x_velocity"][None] - env.tasks[:, :1])
        np.testing.assert_array_equal(s, err <= 0.3)
    if family == "cheetah-vel":
        np.testing.assert_allclose(r, -err - ctrl, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(dense, r)
    elif family == "cheetah-vel-sparse":
        np.testing.assert_allclose(r, (2 - err) * (err <= 0.3) - ctrl, rtol=0, atol=1e-12)
        # outside the goal radius only the control cost is left
        assert np.array_equal(r[err > 0.3], np.broadcast_to(-ctrl, r.shape)[err > 0.3])
        np.testing.assert_allclose(dense, -err - ctrl, rtol=0, atol=1e-12)
        assert s.any() and not s.all()
    elif family == "cheetah-highdim":
        s_hat = (infos["next_obs"] - ml.HIGHDIM_MU) / ml.HIGHDIM_SIGMA
        lin = env.tasks @ s_hat.T
        np.testing.assert_allclose(r, lin - ctrl, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(s, lin / np.linalg.norm(env.tasks, axis=1, keepdims=True) >= 10.0)
    elif family == "ant-vel":
        costs = ctrl + infos["contact_cost"][None]
        np.testing.assert_allclose(r, 1 - err - costs + 0.05, rtol=0, atol=1e-12)
    elif family == "ant-goal":
        costs = ctrl + infos["contact_cost"][None]
        diff = infos["xy"][None] - env.tasks[:, None]
        inside = np.linalg.norm(diff, axis=-1) <= 0.8
        l1 = np.abs(diff).sum(-1)
        origin = 4 - np.abs(env.tasks).sum(1, keepdims=True)
        np.testing.assert_array_equal(s, inside)
        np.testing.assert_allclose(r, np.where(inside, 4 - l1, origin) + 0.05 - costs, rtol=0, atol=1e-12)
        # outside the goal radius: the task's constant (its value at the origin) and the costs
        out = ~inside
        np.testing.assert_allclose(r[out], (np.broadcast_to(origin, r.shape) + 0.05 - costs)[out], atol=1e-12)
        np.testing.assert_allclose(dense, 4 - l1 + 0.05 - costs, rtol=0, atol=1e-12)
        assert s.any() and not s.all()
    if family in ANTS:
        z = infos["z"]
        unhealthy = ~((z >= 0.2) & (z <= 1.0))  # NaN: unhealthy
        assert unhealthy[0] and not unhealthy[1] and not unhealthy[2]
        np.testing.assert_array_equal(d, np.broadcast_to(unhealthy, d.shape))
    else:
        assert not d.any()


# ---- termination only when unhealthy ------------------------------------------------------------
@pytest.mark.parametrize("family", ANTS)
def test_termination_only_when_unhealthy(envs, family):
    env = envs[family]
    env.set_task(0)
    env.reset(seed=4)
    rng = np.random.default_rng(4)
    n_term = 0
    for _ in range(600):
        _, _, term, trunc, info = env.step(rng.uniform(-1, 1, 8))
        healthy = 0.2 <= info["z"] <= 1.0
        assert term == (not healthy)
        if term or trunc:
            n_term += term
            env.reset()
    # lift the torso above z = 1: the next step terminates, under every task
    env.reset()
    env.data.qpos[2] = 1.5
    mujoco.mj_forward(env.model, env.data)
    _, _, term, trunc, info = env.step(np.zeros(8))
    assert term and not trunc and info["z"] > 1.0
    _, d, _ = env.reward({k: np.asarray([info[k]]) for k in env.info_spec}, np.arange(env.num_tasks))
    assert d.all()


@pytest.mark.parametrize("family", ("cheetah-vel", "cheetah-highdim"))
def test_cheetah_never_terminates_and_truncates_at_horizon(envs, family):
    env = envs[family]
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for t in range(200):
        _, _, term, trunc, _ = env.step(rng.uniform(-1, 1, 6))
        assert not term
        assert trunc == (t == 199)


# ---- env state for checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_get_set_state_continues_exactly(family):
    env = make_family(family)
    env.set_task(3)
    env.reset(seed=7)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (30,) + env.action_space.shape)
    for a in actions[:5]:
        env.step(a)
    # through a checkpoint's storage format (numpy -> tensors -> weights-only load -> numpy)
    buf = io.BytesIO()
    torch.save(ckpt.to_storable(env.get_state()), buf)
    buf.seek(0)
    state = ckpt.to_numpy(torch.load(buf, weights_only=True))

    def run():
        out = [env.step(a)[:3] for a in actions[5:15]]
        out += [(env.reset()[0], 0.0, False)]
        return out

    first = run()
    env.set_task(0)
    env.reset(seed=99)
    env.step(actions[0])
    env.set_state(state)
    assert env.task == 3
    second = run()
    for (o1, r1, d1), (o2, r2, d2) in zip(first, second):
        assert np.array_equal(o1, o2) and r1 == r2 and d1 == d2


# ---- presets and a quick training run per family ------------------------------------------------
def test_paper_presets():
    for family in MUJOCO_FAMILIES:
        c = make_config(family, "paper")
        assert (c.max_path_length, c.discount, c.num_initial_steps, c.num_eval_train_tasks) == (200, 0.99, 2000, 5)
        assert (c.latent_dim, c.hidden_dim, c.encoder_hidden_dim, c.num_train_steps_per_itr) == (5, 300, 200, 1000)
        assert c.reward_scale == 5.0 and c.eval_steps == 600 and c.exploration_trajectories == 2
    c = make_config("cheetah-vel-sparse", "paper")
    assert (c.num_iterations, c.num_tasks_sample, c.num_steps_prior, c.num_steps_posterior,
            c.num_extra_rl_steps_posterior, c.meta_batch, c.embedding_batch_size, c.utility_batch_size,
            c.kl_lambda, c.eval_runs) == (160, 5, 400, 600, 0, 16, 100, 256, 0.1, 2)
    c = make_config("ant-goal", "paper")
    assert (c.num_iterations, c.num_tasks_sample, c.num_steps_posterior, c.meta_batch, c.embedding_batch_size,
            c.utility_batch_size, c.kl_lambda) == (180, 10, 600, 16, 256, 64, 1.0)
    c = make_config("ant-vel", "paper")
    assert (c.num_iterations, c.num_extra_rl_steps_posterior, c.meta_batch,
            c.embedding_batch_size) == (160, 600, 10, 256)
    c = make_config("cheetah-highdim", "paper")
    assert (c.num_iterations, c.num_tasks_sample, c.num_extra_rl_steps_posterior, c.kl_lambda) == (180, 10, 600, 0.1)


@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_quick_train_run(family, tmp_path):
    out, rows = quick_hfr_run(family, tmp_path / "run")
    assert "meta_test/return" in out
