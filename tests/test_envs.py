"""The numpy task families (SPEC section 5) and the batched hindsight reward (section 4.1)."""
from __future__ import annotations

import numpy as np
import pytest

from metarelabel.envs import REGISTRY, family_class, make_family
from metarelabel.errors import ConfigError
from conftest import FAMILIES, place, record_rollout

CORNERS = np.array([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])


# ---- registry -------------------------------------------------------------------------------
def test_registry_and_unknown_family():
    assert set(FAMILIES) <= set(REGISTRY)
    with pytest.raises(ConfigError, match="no-such-family"):
        make_family("no-such-family")
    with pytest.raises(ConfigError):
        family_class("")


@pytest.mark.parametrize("family", FAMILIES)
def test_spaces_horizon_discount(family):
    env = make_family(family)
    assert env.name == family
    assert env.horizon == 20 and env.discount == pytest.approx(0.90)
    assert env.action_space.shape == (2,) and env.observation_space.shape == (2,)
    np.testing.assert_allclose(env.action_space.low, [-0.1, -0.1], rtol=1e-7)
    np.testing.assert_allclose(env.action_space.high, [0.1, 0.1], rtol=1e-7)
    obs, info = env.reset(seed=0)
    assert obs.shape == (2,) and obs.dtype == np.float32


# ---- Four-Corners ----------------------------------------------------------------------------
def test_four_corners_tasks_and_start():
    env = make_family("four-corners")
    assert sorted(map(tuple, env.tasks)) == sorted(map(tuple, CORNERS))
    np.testing.assert_array_equal(env.train_tasks, np.arange(4))
    np.testing.assert_array_equal(env.eval_tasks, np.arange(4))
    for seed in (0, 1, 99):
        obs, _ = env.reset(seed=seed)
        assert obs.tolist() == [0.0, 0.0]
        assert env.get_state()["pos"].tolist() == [0.0, 0.0]


def test_four_corners_action_clipping():
    env = make_family("four-corners")
    env.set_task(0)
    env.reset(seed=0)
    obs, *_ = env.step(np.array([5.0, -5.0]))
    np.testing.assert_array_equal(env.get_state()["pos"], [0.1, -0.1])
    obs, *_ = env.step(np.array([-0.03, 0.05]))
    np.testing.assert_allclose(env.get_state()["pos"], [0.07, -0.05], rtol=0, atol=1e-15)
    obs, *_ = env.step(np.array([-1e9, 1e9]))
    np.testing.assert_allclose(env.get_state()["pos"], [-0.03, 0.05], rtol=0, atol=1e-15)
    np.testing.assert_allclose(obs, [-0.03, 0.05], atol=1e-7)


@pytest.mark.parametrize("task", range(4))
def test_four_corners_success_radius(task):
    env = make_family("four-corners")
    env.set_task(task)
    goal = env.tasks[task]
    env.reset(seed=0)
    inward = -np.sign(goal) / np.sqrt(2)  # towards the origin
    place(env, goal + 0.199 * inward)
    _, r, term, trunc, info = env.step(np.zeros(2))
    assert (r, term, trunc, info["success"]) == (0.0, True, False, True)
    env.reset()
    place(env, goal + 0.201 * inward)
    _, r, term, trunc, info = env.step(np.zeros(2))
    assert (r, term, info["success"]) == (-1.0, False, False)
    # radius is Euclidean, not per coordinate
    env.reset()
    place(env, goal - np.sign(goal) * np.array([0.15, 0.15]))  # dist 0.212
    _, r, term, _, info = env.step(np.zeros(2))
    assert (r, term, info["success"]) == (-1.0, False, False)


def _expected_square_reward(pos, goal):
    x, y = pos
    in_square = 0.1 < abs(x) < 0.5 and 0.1 < abs(y) < 0.5
    same = np.sign(x) == np.sign(goal[0]) and np.sign(y) == np.sign(goal[1])
    return -3.0 if (in_square and same) else -1.0


SQUARE_POINTS = [
    (0.3, 0.3), (-0.3, -0.3), (0.3, -0.3), (-0.3, 0.3), (0.11, 0.49), (-0.49, 0.11),
    (0.1, 0.3), (0.3, 0.1), (0.5, 0.3), (0.3, 0.5), (0.05, 0.05), (0.6, 0.6), (0.0, 0.3),
    (0.3, 0.0), (-0.7, 0.2), (0.2, -0.55), (0.0, 0.0), (0.45, -0.45),
]


@pytest.mark.parametrize("task", range(4))
def test_four_corners_penalty_square_only_in_own_quadrant(task):
    env = make_family("four-corners")
    env.set_task(task)
    goal = env.tasks[task]
    n_minus3 = 0
    for p in SQUARE_POINTS:
        env.reset()
        place(env, p)
        _, r, term, _, info = env.step(np.zeros(2))
        exp = _expected_square_reward(p, goal)
        assert r == exp, (p, task, r)
        assert not term and not info["success"]
        n_minus3 += exp == -3.0
    assert n_minus3 >= 1  # the points exercise the square of every goal
    # the four squares' centres: -3 only for the goal of that quadrant
    rs, _, _ = env.reward({"pos": np.array([[0.3, 0.3], [-0.3, -0.3], [0.3, -0.3], [-0.3, 0.3]])}, range(4))
    expected = np.array([[_expected_square_reward(p, g) for p in [(0.3, 0.3), (-0.3, -0.3), (0.3, -0.3), (-0.3, 0.3)]]
                         for g in env.tasks])
    np.testing.assert_array_equal(rs, expected)
    assert (rs == -3).sum() == 4


@pytest.mark.parametrize("task", range(4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_four_corners_straight_diagonal(task, dtype):
    env = make_family("four-corners")
    goal = env.tasks[task]
    rec = record_rollout(env, task, [(0.1 * goal).astype(dtype)] * 20)
    assert len(rec["rewards"]) == 9
    np.testing.assert_array_equal(rec["rewards"], [-1, -3, -3, -3, -1, -1, -1, -1, 0])
    assert rec["rewards"].sum() == -14.0
    assert rec["terminals"].tolist() == [False] * 8 + [True]
    assert rec["success"].tolist() == [False] * 8 + [True]
    assert not rec["truncated"].any()


def test_four_corners_never_reaching_path():
    env = make_family("four-corners")
    # hover over task 1's square: two steps in, then back and forth
    actions = [(0.1, 0.1), (0.1, 0.1)] + [(0.1, 0.0), (-0.1, 0.0)] * 9
    assert len(actions) == 20
    for task in range(4):
        env.set_task(task)
        env.reset()
        total, truncs, terms = 0.0, [], []
        for a in actions:
            _, r, term, trunc, info = env.step(np.array(a))
            total += r
            truncs.append(trunc)
            terms.append(term)
        assert total <= -20
        assert truncs == [False] * 19 + [True]
        assert not any(terms)
        if task == 1:
            assert total < -40  # mostly inside its own square
        else:
            assert total == -20.0


# ---- sparse point robot ----------------------------------------------------------------------------
def test_sparse_point_robot_tasks():
    env = make_family("sparse-point-robot")
    assert env.tasks.shape == (100, 2)
    np.testing.assert_allclose(np.linalg.norm(env.tasks, axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all(env.tasks[:, 1] >= 0.0)
    angles = np.sort(np.arctan2(env.tasks[:, 1], env.tasks[:, 0]))
    np.testing.assert_allclose(angles, np.linspace(0, np.pi, 100), atol=1e-12)
    np.testing.assert_array_equal(env.train_tasks, np.arange(80))
    np.testing.assert_array_equal(env.eval_tasks, np.arange(80, 100))
    # shuffled: train tasks are not just the first 80% of the arc
    assert np.arctan2(env.tasks[:80, 1], env.tasks[:80, 0]).max() > np.linspace(0, np.pi, 100)[80]
    for seed in (0, 5):
        obs, _ = env.reset(seed=seed)
        assert obs.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("task", [0, 17, 85])
def test_sparse_point_robot_reward(task):
    env = make_family("sparse-point-robot")
    env.set_task(task)
    goal = env.tasks[task]
    for d in (0.0, 0.05, 0.199, 0.201, 0.5, 1.3):
        env.reset()
        direction = np.array([np.cos(1.0 + task), np.sin(1.0 + task)])
        place(env, goal + d * direction)
        _, r, term, trunc, info = env.step(np.zeros(2))
        dist = np.linalg.norm(env.get_state()["pos"] - goal)
        assert dist == pytest.approx(d, abs=1e-12)
        if d <= 0.2:
            assert r == pytest.approx(1.0 - d, abs=1e-12) and info["success"]
        else:
            assert r == 0.0 and not info["success"]
        assert info["dense_reward"] == pytest.approx(-d, abs=1e-12)
        assert term is False and trunc is False


# ---- point robot ----------------------------------------------------------------------------------
def test_point_robot_tasks_and_reward():
    env = make_family("point-robot")
    assert env.tasks.shape == (100, 2)
    assert np.all(np.abs(env.tasks) <= 1.0)
    assert env.tasks.std(0).min() > 0.4  # uniform on [-1,1] has std 0.577
    np.testing.assert_array_equal(env.train_tasks, np.arange(80))
    np.testing.assert_array_equal(env.eval_tasks, np.arange(80, 100))
    env.set_task(3)
    env.reset(seed=0)
    place(env, [0.2, -0.4])
    _, r, term, trunc, info = env.step(np.array([0.05, 0.3]))
    pos = np.array([0.25, -0.3])
    np.testing.assert_allclose(env.get_state()["pos"], pos, atol=1e-15)
    assert r == pytest.approx(-np.linalg.norm(pos - env.tasks[3]), abs=1e-12)
    assert info["dense_reward"] == r
    assert term is False and trunc is False


def test_point_robot_random_starts_depend_on_reset_seed():
    env = make_family("point-robot")
    a, _ = env.reset(seed=1)
    b, _ = env.reset(seed=1)
    c, _ = env.reset(seed=2)
    d, _ = env.reset()  # continues seed 2's stream
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(c, d)
    starts = np.array([env.reset(seed=s)[0] for s in range(50)])
    assert np.all(np.abs(starts) <= 1.0)
    assert starts.std(0).min() > 0.3
    # another instance with the same reset seed gives the same start
    np.testing.assert_array_equal(make_family("point-robot").reset(seed=1)[0], a)


@pytest.mark.parametrize("family", FAMILIES)
def test_get_set_state_continues_rng(family):
    env = make_family(family)
    env.reset(seed=3)
    env.set_task(2)
    env.step(np.array([0.05, 0.02]))
    state = env.get_state()
    first = [env.reset()[0] for _ in range(3)]
    env.set_task(0)
    env.set_state(state)
    assert env.task == 2
    np.testing.assert_array_equal([env.reset()[0] for _ in range(3)], first)


# ---- the batched hindsight reward agrees with step, for all tasks ----------------------------------
def _rollouts(env, task, rng, n_random=2, n_directed=2):
    """Random rollouts (incl. actions outside the box) and noisy goal-directed ones."""
    out = []
    low, high = env.action_space.low, env.action_space.high
    for _ in range(n_random):
        acts = rng.uniform(3 * low, 3 * high, size=(env.horizon, 2))
        out.append(record_rollout(env, task, acts))
    for _ in range(n_directed):
        # plan from the start state (record_rollout resets without a seed, so peek at the
        # start with get_state/set_state), heading for the goal with noise; the env clips
        env.set_task(task)
        state = env.get_state()
        env.reset()
        pos = env.get_state()["pos"].copy()
        env.set_state(state)
        goal = env.tasks[task]
        acts = []
        for _ in range(env.horizon):
            a = np.clip(goal - pos, -0.1, 0.1) + rng.normal(scale=0.03, size=2)
            acts.append(a)
            pos = pos + np.clip(a, -0.1, 0.1)
        out.append(record_rollout(env, task, acts))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_reward_equals_step_for_all_tasks(family):
    env = make_family(family)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    all_tasks = np.arange(env.num_tasks)
    n_success = n_penalty = n_paths = 0
    for task in all_tasks:
        for rec in _rollouts(env, int(task), rng):
            n_paths += 1
            T = len(rec["rewards"])
            r, d, s = env.reward(rec["infos"], all_tasks)
            dense = env.dense_reward(rec["infos"], all_tasks)
            assert r.shape == d.shape == s.shape == dense.shape == (env.num_tasks, T)
            # exact equality with what step returned
            assert np.array_equal(r[task], rec["rewards"]), (task, r[task], rec["rewards"])
            assert np.array_equal(d[task], rec["terminals"])
            assert np.array_equal(s[task], rec["success"])
            assert np.array_equal(dense[task], rec["dense"])
            # any subset / order of tasks gives the same rows
            sub = rng.choice(all_tasks, size=min(7, env.num_tasks), replace=True)
            r2, d2, s2 = env.reward(rec["infos"], sub)
            assert np.array_equal(r2, r[sub]) and np.array_equal(d2, d[sub]) and np.array_equal(s2, s[sub])
            # independent formula for the hindsight rewards of all tasks
            dist = np.linalg.norm(rec["pos"][None] - env.tasks[:, None], axis=-1)
            np.testing.assert_allclose(dense, -dist if family != "four-corners" else r, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(s, dist <= 0.2)
            n_success += int(rec["success"].any())
            n_penalty += int((rec["rewards"] == -3).any())
    assert n_success > n_paths // 10, "rollouts should reach goals sometimes"
    if family == "four-corners":
        assert n_penalty > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_family_reward_definitions_vectorized(family):
    env = make_family(family)
    rng = np.random.default_rng(1)
    pos = rng.uniform(-1.3, 1.3, size=(200, 2))
    pos[:20] = env.tasks[rng.integers(env.num_tasks, size=20)] + rng.normal(scale=0.1, size=(20, 2))
    r, d, s = env.reward({"pos": pos}, np.arange(env.num_tasks))
    dist = np.linalg.norm(pos[None] - env.tasks[:, None], axis=-1)
    np.testing.assert_array_equal(s, dist <= 0.2)
    if family == "point-robot":
        np.testing.assert_allclose(r, -dist, atol=1e-12)
        assert not d.any()
    elif family == "sparse-point-robot":
        np.testing.assert_allclose(r, np.where(dist <= 0.2, 1 - dist, 0.0), atol=1e-12)
        assert not d.any()
        np.testing.assert_allclose(env.dense_reward({"pos": pos}, np.arange(env.num_tasks)), -dist, atol=1e-12)
    else:
        exp = np.array([[0.0 if dist[k, t] <= 0.2 else _expected_square_reward(pos[t], env.tasks[k])
                         for t in range(len(pos))] for k in range(4)])
        np.testing.assert_array_equal(r, exp)
        np.testing.assert_array_equal(d, dist <= 0.2)
    assert s.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_pairwise_step_rewards_equal_the_batched_reward_diagonal(family):
    """The vector engine's ``step_rewards`` (computed pair by pair) gives bit for bit the (step i,
    task i) entries of ``reward`` / ``dense_reward``, as the generic diagonal implementation does;
    positions include the goal discs and the edges of the -3 squares."""
    from metarelabel.envs.base import TaskFamily

    env = make_family(family)
    rng = np.random.default_rng(2)
    k = 400
    tasks = rng.integers(env.num_tasks, size=k)
    pos = rng.uniform(-1.3, 1.3, size=(k, 2))
    pos[:100] = env.tasks[tasks[:100]] + rng.normal(scale=0.15, size=(100, 2))
    pos[100:140] = rng.choice([-0.5, -0.1, 0.0, 0.1, 0.5], size=(40, 2))  # exactly on the square edges
    infos = {"pos": pos}
    got = env.step_rewards(infos, tasks)
    want = TaskFamily.step_rewards(env, infos, tasks)
    assert type(env).step_rewards is not TaskFamily.step_rewards
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == (k,)
        np.testing.assert_array_equal(g, w)
    assert want[2].any() and not want[2].all()


# ---- task sets and the global RNG --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_task_seed(family):
    a, b, c = make_family(family, 0), make_family(family, 0), make_family(family, 1)
    np.testing.assert_array_equal(a.tasks, b.tasks)
    if family != "four-corners":
        assert not np.array_equal(a.tasks, c.tasks)
    else:
        np.testing.assert_array_equal(a.tasks, c.tasks)


@pytest.mark.parametrize("family", FAMILIES)
def test_global_numpy_rng_untouched(family):
    np.random.seed(1234)
    before = np.random.get_state()
    env = make_family(family, task_seed=7)
    env.reset(seed=3)
    env.reset()
    env.set_task(1)
    env.step(np.array([0.05, 0.05]))
    env.reward({"pos": np.zeros((3, 2))}, [0, 1])
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_set_task_range():
    env = make_family("four-corners")
    with pytest.raises(IndexError):
        env.set_task(4)
    with pytest.raises(IndexError):
        env.set_task(-1)
