"""Sawyer families on Meta-World 3.1.1 (issue 8; SPEC section 5): batched hindsight rewards agree
with ``step`` exactly, task sets fixed by the task seed, object/goal separation, success flags
with goal-visible scripted controllers, seeding that really takes effect, checkpoint state,
presets and a quick training run per family.

Needs the ``metaworld`` extra; run with ``pytest -m metaworld``.  The missing-extra message is
tested in tests/test_optional_extras.py (default suite)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import check_batched_reward, quick_hfr_run, random_episodes

from metarelabel.envs import REGISTRY

SAWYER_FAMILIES = ("sawyer-reach", "sawyer-push")
metaworld_test = pytest.mark.metaworld


@pytest.fixture(scope="module")
def mw():
    """The ``sawyer`` module (skips the test without the ``metaworld`` extra)."""
    pytest.importorskip("metaworld")
    from metarelabel.envs import sawyer

    return sawyer


@pytest.fixture(scope="module")
def envs(mw):
    from metarelabel.envs import make_family

    return {name: make_family(name) for name in SAWYER_FAMILIES}


def _make(name, task_seed=0):
    from metarelabel.envs import make_family

    return make_family(name, task_seed)


# ---- goal-visible scripted controllers (test-only: they read the task's goal) ------------------
def reach_action(goal, info):
    """Move the fingertip centre (``info['hand']``) straight to the goal, gripper open."""
    if info is None:
        return np.array([0.0, 0.0, 0.0, -1.0])
    return np.r_[np.clip(10.0 * (goal - info["hand"]), -1.0, 1.0), -1.0]


def push_action(goal_xy, obs):
    """Meta-World's push-v3 scripted policy on our observation (hand xyz obs[0:3], puck obs[4:7])
    with the known goal: over the puck, down onto it, close the gripper, move to the goal."""
    hand, puck = obs[0:3].astype(np.float64), obs[4:7].astype(np.float64)
    p = puck + np.array([-0.005, 0.0, 0.0])
    if np.linalg.norm(hand[:2] - p[:2]) > 0.02:
        target = p + np.array([0.0, 0.0, 0.2])
    elif abs(hand[2] - p[2]) > 0.04:
        target = p + np.array([0.0, 0.0, 0.03])
    else:
        target = np.array([goal_xy[0], goal_xy[1], p[2]])
    near = np.linalg.norm(hand[:2] - puck[:2]) <= 0.02 and abs(hand[2] - puck[2]) <= 0.1
    return np.r_[np.clip(10.0 * (target - hand), -1.0, 1.0), 0.6 if near else 0.0]


def scripted_episode(env, task, max_steps=150):
    """Reset on ``task`` and run the family's scripted controller; per step what ``step``
    returned and the stored infos."""
    env.set_task(task)
    obs, _ = env.reset()
    goal = env.tasks[task]
    rec = {"r": [], "d": [], "s": [], "dense": [], "trunc": []}
    infos = {k: [] for k in env.info_spec}
    info = None
    for _ in range(max_steps):
        a = reach_action(goal, info) if env.name == "sawyer-reach" else push_action(goal, obs)
        obs, r, term, trunc, info = env.step(a)
        for key, v in (("r", r), ("d", term), ("s", info["success"]), ("dense", info["dense_reward"]),
                       ("trunc", trunc)):
            rec[key].append(v)
        for k in infos:
            infos[k].append(info[k])
        if term or trunc:
            break
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["infos"] = {k: np.asarray(v) for k, v in infos.items()}
    return out




# ---- spaces, tasks ----------------------------------------------------------------------------
@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_spaces_horizon_tasks(envs, family):
    env = envs[family]
    assert env.name == family and env.horizon == 150 and env.discount == pytest.approx(0.99)
    assert env.observation_space.shape == (22,) and env.action_space.shape == (4,)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(env.action_space.high, 1.0)
    np.testing.assert_array_equal(env.train_tasks, np.arange(50))
    np.testing.assert_array_equal(env.eval_tasks, np.arange(50, 60))
    assert env.num_tasks == 60
    obs, _ = env.reset(seed=0)
    assert obs.shape == (22,) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[:11], obs[11:])  # at reset the previous frame is the current one
    obs2, r, term, trunc, info = env.step(np.zeros(4))
    assert obs2.dtype == np.float32 and isinstance(r, float) and r == -1.0 and not term and not trunc
    assert set(env.info_spec) <= set(info)
    for k, shape in env.info_spec.items():
        assert np.shape(info[k]) == shape, k
    np.testing.assert_array_equal(obs2[11:], obs[:11])  # frame stacking: previous step's frame
    np.testing.assert_array_equal(obs2[4:7], info["obj"].astype(np.float32))


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_goal_hidden(envs, family):
    """Two tasks, same seed, same actions: identical observations (the goal is not in them)."""
    env = envs[family]
    rng = np.random.default_rng(3)
    actions = rng.uniform(-1, 1, (40, 4))
    out = []
    for task in (0, 55):
        env.set_task(task)
        obs = [env.reset(seed=4)[0]] + [env.step(a)[0] for a in actions]
        out.append(np.stack(obs))
        assert np.allclose(env.mw._target_pos[:2], env.tasks[task][:2])  # Meta-World got the goal
    np.testing.assert_array_equal(out[0], out[1])


@metaworld_test
def test_goal_boxes(envs):
    reach, push = envs["sawyer-reach"].tasks, envs["sawyer-push"].tasks
    assert reach.shape == (60, 3) and push.shape == (60, 2)
    for goals, low, high in ((reach, (-0.1, 0.8, 0.05), (0.1, 0.9, 0.3)), (push, (-0.1, 0.8), (0.1, 0.9))):
        assert (goals >= np.array(low)).all() and (goals <= np.array(high)).all()
        # spread over the box, not a constant
        assert (goals.max(0) - goals.min(0) > 0.6 * (np.array(high) - np.array(low))).all()


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_task_seed(mw, family):
    a, b, c = _make(family, 0), _make(family, 0), _make(family, 1)
    np.testing.assert_array_equal(a.tasks, b.tasks)
    assert not np.array_equal(a.tasks, c.tasks)
    # the global numpy RNG is neither used nor reseeded (construction, reset, step)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    env = _make(family, 3)
    env.reset(seed=1)
    for _ in range(3):
        env.step(np.ones(4))
    env.reset()
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ---- object start: separation, box, seeding ---------------------------------------------------------
@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_object_goal_separation(mw, envs, family):
    env = envs[family]
    env.reset(seed=0)
    closest = np.inf
    for task in range(env.num_tasks):
        env.set_task(task)
        for _ in range(5):
            obs, _ = env.reset()
            obj = obs[4:7].astype(np.float64)
            goal = env.tasks[task]
            # Meta-World put the object where the family drew it, inside v3's box ...
            np.testing.assert_allclose(obj[:2], env._rand_vec[:2], atol=1e-6)
            assert (obj[:2] >= mw.OBJECT_LOW - 1e-6).all() and (obj[:2] <= mw.OBJECT_HIGH + 1e-6).all()
            # ... at least 0.15 (xy) from the goal
            sep = np.linalg.norm(env._rand_vec[:2] - goal[:2])
            assert sep >= mw.MIN_SEPARATION
            closest = min(closest, sep)
    assert closest < 0.2  # the rejection boundary is actually exercised


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_seeding_determinism(family):
    """Same seed, same actions: identical observation/reward sequences over several episodes
    (with task switches), regardless of the global numpy RNG and of the env's history; another
    seed gives other object starts."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (4, 60, 4))
    tasks = (0, 7, 51, 7)

    def run(env, seed, history: bool = False):
        if history:  # some unrelated use first
            env.set_task(30)
            env.reset(seed=123)
            for a in actions[0, :20]:
                env.step(-a)
        np.random.seed(int(rng.integers(1 << 30)))  # the global RNG must not matter
        env.set_task(tasks[0])
        out = [env.reset(seed=seed)[0]]
        for ep, task in enumerate(tasks):
            if ep:
                env.set_task(task)
                out.append(env.reset()[0])
            for a in actions[ep]:
                obs, r, term, trunc, info = env.step(a)
                out.append(np.r_[obs, r, term, trunc, info["hand"], info["obj"]])
                if term or trunc:
                    break
        return out

    a, b = _make(family), _make(family)
    first = run(a, 42)
    for second in (run(b, 42), run(a, 42, history=True)):
        assert len(first) == len(second)
        for x, y in zip(first, second):
            np.testing.assert_array_equal(x, y)
    # other seeds: other object starts (what Meta-World randomizes), the same hand start
    starts = [a.reset(seed=s)[0] for s in range(6)]
    assert len({tuple(s[4:6]) for s in starts}) == 6
    np.testing.assert_array_equal(np.stack([s[:4] for s in starts]), np.broadcast_to(starts[0][:4], (6, 4)))
    # without a seed, consecutive resets continue the stream (also different starts)
    a.reset(seed=9)
    assert not np.array_equal(a.reset()[0], a.reset()[0])


# ---- the batched hindsight reward agrees with step ---------------------------------------------
def _check_batched(env, ep, task):
    r, d, s = check_batched_reward(env, ep, task, [task, 0, env.num_tasks - 1, task])
    assert np.array_equal(d, s) and np.array_equal(r, np.where(s, 0.0, -1.0))
    assert not d[task][:-1].any() and not ep["trunc"][:-1].any()
    return s


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_batched_reward_equals_step(envs, family):
    env = envs[family]
    env.reset(seed=11)
    rng = np.random.default_rng(0)
    for task in (0, 1, 49, 50, 59):
        for ep in random_episodes(env, task, rng, 330):
            _check_batched(env, ep, task)
        # scripted episodes end in success: terminal steps and hindsight successes under
        # other tasks whose goals are close
        ep = scripted_episode(env, task)
        _check_batched(env, ep, task)
        assert ep["d"][-1] and ep["r"][-1] == 0.0


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_reward_definitions(envs, family):
    """The batched reward against a per-element formula, around the success radius."""
    env = envs[family]
    rng = np.random.default_rng(2)
    T = 400
    goals = env.tasks[rng.integers(env.num_tasks, size=T)]
    hand = rng.uniform([-0.3, 0.5, 0.0], [0.3, 1.0, 0.35], (T, 3))
    obj = rng.uniform([-0.3, 0.5, 0.0], [0.3, 1.0, 0.05], (T, 3))
    direction = rng.normal(size=(T, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = 0.05 if family == "sawyer-reach" else 0.07
    dist = rng.uniform(0.5 * radius, 1.5 * radius, T)
    if family == "sawyer-reach":
        hand[:200] = goals[:200] + dist[:200, None] * direction[:200]
    else:
        d2 = direction[:200, :2] / np.linalg.norm(direction[:200, :2], axis=1, keepdims=True)
        obj[:200, :2] = goals[:200, :2] + dist[:200, None] * d2
    infos = {"hand": hand, "obj": obj}
    K = np.arange(env.num_tasks)
    r, d, s = env.reward(infos, K)
    if family == "sawyer-reach":
        true = np.linalg.norm(hand[None] - env.tasks[:, None], axis=-1)
    else:
        true = np.linalg.norm(obj[None, :, :2] - env.tasks[:, None], axis=-1)
    # the tcp's / object's distance decides, nothing else (object for reach, hand for push, z for push)
    margin = np.abs(true - radius) > 1e-12
    np.testing.assert_array_equal(s[margin], (true <= radius)[margin])
    np.testing.assert_array_equal(r, np.where(s, 0.0, -1.0))
    np.testing.assert_array_equal(d, s)
    np.testing.assert_allclose(env.dense_reward(infos, K), -true, rtol=0, atol=1e-12)
    assert s.any() and not s.all()


# ---- success with goal-visible scripted controllers -------------------------------------------------
@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_scripted_controller_succeeds(envs, family):
    env = envs[family]
    env.reset(seed=5)
    lengths = []
    for task in list(range(0, 50, 7)) + [50, 55, 59]:
        ep = scripted_episode(env, task)
        T = len(ep["r"])
        assert ep["d"][-1] and ep["s"][-1] and ep["r"][-1] == 0.0 and T < 150, (task, T)
        assert (ep["r"][:-1] == -1.0).all() and not ep["s"][:-1].any()
        # the success flag is the distance test on the stored positions
        goal = env.tasks[task]
        if family == "sawyer-reach":
            dist = np.linalg.norm(ep["infos"]["hand"] - goal, axis=1)
            radius = 0.05
        else:
            dist = np.linalg.norm(ep["infos"]["obj"][:, :2] - goal, axis=1)
            radius = 0.07
        np.testing.assert_array_equal(ep["s"], dist <= radius)
        np.testing.assert_allclose(ep["dense"], -dist, rtol=0, atol=1e-12)
        lengths.append(T)
    print(f"{family}: scripted episode lengths {lengths}")


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_matches_unmodified_metaworld(mw, envs, family):
    """Same reset vector and actions in an unmodified Meta-World v3 env (goal hidden): the same
    observations (our 22 of its 39 values; the quaternion comes from scipy there), and for
    sawyer-reach the same success flags as Meta-World's own (tcp within 0.05 of its target)."""
    import pickle

    from metaworld.envs import SawyerPushEnvV3, SawyerReachEnvV3
    from metaworld.types import Task

    env = envs[family]
    cls = SawyerReachEnvV3 if family == "sawyer-reach" else SawyerPushEnvV3
    ref = cls()
    ref.max_path_length = 10**9
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    n_success = 0
    for task in (3, 52):
        env.set_task(task)
        obs = env.reset()[0]
        data = dict(rand_vec=env._rand_vec, env_cls=cls, partially_observable=True)
        ref.set_task(Task(env_name=env.mw_name, data=pickle.dumps(data)))
        ref_obs = ref.reset()[0]
        assert not ref_obs[36:].any()  # Meta-World's goal slot is hidden (zeros) too
        np.testing.assert_allclose(obs, ref_obs[mw.OBS_INDEX], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ref._target_pos[:2], env.tasks[task][:2], rtol=0, atol=1e-12)
        info = None
        for _ in range(150):
            if family == "sawyer-reach":
                a = reach_action(env.tasks[task], info)
            else:
                a = push_action(env.tasks[task], obs) + np.r_[rng.normal(0, 0.3, 3), 0.0]
            obs, _, term, _, info = env.step(a)
            ref_obs, _, _, _, ref_info = ref.step(np.clip(a, -1, 1))
            np.testing.assert_allclose(obs, ref_obs[mw.OBS_INDEX], rtol=0, atol=1e-6)
            np.testing.assert_allclose(info["hand"], ref.tcp_center, rtol=0, atol=1e-12)
            if family == "sawyer-reach":
                assert bool(ref_info["success"]) == info["success"]
            n_success += info["success"]
            if term:
                break
    assert family == "sawyer-push" or n_success == 2
@metaworld_test
def test_push_success_by_placing_the_object(envs):
    """Placing the object (through the sim state) within 0.07 of the goal in xy succeeds and
    ends the episode, whatever its height and the hand; just outside does not."""
    import mujoco

    env = envs["sawyer-push"]
    env.reset(seed=2)
    for task, offset, expect in ((4, 0.06, True), (4, 0.08, False), (57, 0.0, True), (57, 0.1, False)):
        env.set_task(task)
        env.reset()
        goal = env.tasks[task]
        qpos = env.mw.data.qpos.copy()
        toward_centre = -1.0 if goal[0] > 0 else 1.0
        qpos[9:11] = goal + np.array([toward_centre * offset, 0.0])  # qpos[9:12]: the object's position
        env.mw.data.qpos[:] = qpos
        mujoco.mj_forward(env.mw.model, env.mw.data)
        _, r, term, trunc, info = env.step(np.array([0.0, 0.0, 1.0, -1.0]))
        dist = np.linalg.norm(info["obj"][:2] - goal)
        assert abs(dist - offset) < 0.005
        assert info["success"] == expect and term == expect and r == (0.0 if expect else -1.0) and not trunc


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_no_success_truncates_at_horizon(envs, family):
    env = envs[family]
    env.set_task(0)
    env.reset(seed=0)
    for t in range(150):
        _, r, term, trunc, info = env.step(np.array([0.0, -1.0, 0.0, 0.0]))  # away from every goal
        assert r == -1.0 and not term and not info["success"]
        assert trunc == (t == 149)


# ---- env state for checkpoints -------------------------------------------------------------------
@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_get_set_state_continues_exactly(family):
    import torch

    from metarelabel import checkpoint as ckpt

    env = _make(family)
    env.set_task(3)
    env.reset(seed=7)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (40, 4))
    for a in actions[:15]:
        env.step(a)
    buf = io.BytesIO()
    torch.save(ckpt.to_storable(env.get_state()), buf)
    buf.seek(0)
    state = ckpt.to_numpy(torch.load(buf, weights_only=True))

    def run(e):
        out = [np.r_[o, r, d] for o, r, d in (e.step(a)[:3] for a in actions[15:35])]
        out.append(e.reset()[0])  # the RNG continues too (next object start)
        out += [e.step(a)[0] for a in actions[35:]]
        return out

    first = run(env)
    env.set_task(0)
    env.reset(seed=99)
    env.step(actions[0])
    env.set_state(state)
    assert env.task == 3
    # a fresh instance restores too; a state taken before any reset holds the RNG and task only
    fresh = _make(family)
    assert "physics" not in fresh.get_state()
    fresh.set_state(state)
    assert fresh.task == 3
    for other in (run(env), run(fresh)):
        assert len(other) == len(first)
        for x, y in zip(first, other):
            np.testing.assert_array_equal(x, y)


# ---- registry, presets, a quick training run per family -------------------------------------------
def test_sawyer_families_registered():
    for name in SAWYER_FAMILIES:
        assert REGISTRY[name].extra == "metaworld" and REGISTRY[name].module == "metarelabel.envs.sawyer"


@metaworld_test
def test_paper_presets(mw):
    from metarelabel.presets import make_config

    for family, iters, scale in (("sawyer-reach", 40, 10.0), ("sawyer-push", 90, 100.0)):
        c = make_config(family, "paper")
        assert (c.num_iterations, c.max_path_length, c.discount, c.num_initial_steps, c.num_tasks_sample,
                c.num_steps_prior, c.num_steps_posterior, c.num_extra_rl_steps_posterior, c.meta_batch,
                c.embedding_batch_size, c.utility_batch_size, c.reward_scale, c.kl_lambda, c.eval_runs,
                c.eval_steps, c.exploration_trajectories, c.num_eval_train_tasks) == (
            iters, 150, 0.99, 2000, 10, 400, 600, 0, 16, 64, 256, scale, 0.1, 2, 600, 2, 5)
        assert (c.latent_dim, c.hidden_dim, c.encoder_hidden_dim, c.num_train_steps_per_itr) == (5, 300, 200, 1000)
        q = make_config(family, "quick")
        assert q.max_path_length == 150 and q.num_initial_steps == 150 and q.num_iterations == 2


@metaworld_test
@pytest.mark.parametrize("family", SAWYER_FAMILIES)
def test_quick_train_run(mw, family, tmp_path):
    out, rows = quick_hfr_run(family, tmp_path / "run")
    assert "meta_test/success_rate" in rows[0] and "meta_test/return" in out



@metaworld_test
def test_render_a_sawyer_family(mw, tmp_path):
    import contextlib
    import io

    imageio = pytest.importorskip("imageio.v2")
    from metarelabel.cli import main as cli_main

    run = tmp_path / "sr"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["train", "sawyer-reach", "--preset", "quick", "--num-iterations", "1",
                         "--num-train-steps-per-itr", "2", "--max-path-length", "30", "--eval-steps", "60",
                         "--progress", "off", "--no-tensorboard", "--run-dir", str(run)]) == 0
        assert cli_main(["render", str(run), "--out", str(tmp_path / "sr.gif")]) == 0
    frames = list(imageio.get_reader(tmp_path / "sr.gif"))
    assert len(frames) >= 30 and np.std(frames[len(frames) // 2]) > 10
