"""Visual-Reacher (issue 8; SPEC section 5): a 2-link reacher observed through 64x64 RGB images
with the target hidden.  Batched hindsight reward == step reward, task sets fixed by the task
seed, uint8 image observations that move with the arm and do not show the target, a scripted
reach succeeding, image buffers, the image learner (conv trunk) and a quick training run.

Needs the ``mujoco`` extra and offscreen rendering (EGL); run with ``pytest -m mujoco``."""
from __future__ import annotations

import contextlib
import io
import os
import time

import numpy as np
import pytest

from conftest import random_episodes

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering, unless the user chose a backend
mujoco = pytest.importorskip("mujoco")

import torch  # noqa: E402

from metarelabel import checkpoint as ckpt  # noqa: E402
from metarelabel.buffers import EncoderBuffers, TaskBuffers  # noqa: E402
from metarelabel.cli import main as cli_main  # noqa: E402
from metarelabel.envs import make_family  # noqa: E402
from metarelabel.pearl import PEARL, make_dims  # noqa: E402
from metarelabel.presets import make_config  # noqa: E402
from metarelabel.sampler import context_from, context_tensor, path_context, rollout  # noqa: E402

pytestmark = [pytest.mark.mujoco, pytest.mark.render]

L1, L2 = 0.1, 0.11  # link lengths of reacher.xml (the fingertip sits 0.11 along the second link)


@pytest.fixture(scope="module")
def env():
    from metarelabel.envs.visual_reacher import VisualReacher

    try:
        e = VisualReacher()
        e.reset(seed=0)
    except Exception as exc:  # no EGL / GL context on this machine
        pytest.skip(f"offscreen rendering unavailable: {type(exc).__name__}: {exc}")
    return e


@pytest.fixture(scope="module")
def visible(env):
    from metarelabel.envs.visual_reacher import VisualReacher

    return VisualReacher(show_target=True)


def ik(goal):
    """Joint angles that put the fingertip on ``goal`` (elbow solution)."""
    c = np.clip((goal @ goal - L1 * L1 - L2 * L2) / (2 * L1 * L2), -1.0, 1.0)
    q1 = np.arccos(c)
    return np.array([np.arctan2(goal[1], goal[0]) - np.arctan2(L2 * np.sin(q1), L1 + L2 * np.cos(q1)), q1])


def scripted_reach(env, task: int, seed: int):
    """Joint-space PD control to the known target; returns what step returned per step."""
    env.set_task(task)
    env.reset(seed=seed)
    q_goal = ik(env.tasks[task])
    out = []
    for _ in range(env.horizon):
        err = (q_goal - env.data.qpos[:2] + np.pi) % (2 * np.pi) - np.pi
        a = np.clip(2.0 * err - 0.3 * env.data.qvel[:2], -1.0, 1.0)
        obs, r, term, trunc, info = env.step(a)
        out.append((r, term, trunc, info))
        if term or trunc:
            break
    return out


# ---- spaces, tasks ------------------------------------------------------------------------------
def test_spaces_horizon_tasks(env):
    assert env.name == "visual-reacher" and env.horizon == 50 and env.discount == pytest.approx(0.99)
    assert env.image_obs and env.observation_space.shape == (3, 64, 64)
    assert env.observation_space.dtype == np.uint8
    assert env.action_space.shape == (2,)
    np.testing.assert_array_equal(env.train_tasks, np.arange(50))
    np.testing.assert_array_equal(env.eval_tasks, np.arange(50, 60))
    assert env.tasks.shape == (60, 2)
    r = np.hypot(env.tasks[:, 0], env.tasks[:, 1])
    assert r.min() >= 0.05 and r.max() <= 0.2  # inside the arm's reach (0.21)
    obs, r, term, trunc, info = env.step(np.zeros(2))
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and isinstance(r, float)
    assert np.shape(info["fingertip"]) == (2,)


def test_tasks_reproducible_by_task_seed():
    a, b, c = (make_family("visual-reacher", s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.tasks, b.tasks)
    assert not np.allclose(a.tasks, c.tasks)
    np.testing.assert_array_equal(a.tasks, make_family("visual-reacher", 0).tasks)


# ---- images -----------------------------------------------------------------------------------------
def test_image_changes_when_arm_moves(env):
    env.set_task(0)
    obs0, _ = env.reset(seed=0)
    obs = obs0
    for _ in range(5):
        obs, *_ = env.step(np.array([1.0, -1.0]))
    assert obs.dtype == np.uint8 and obs.shape == (3, 64, 64)
    assert (obs != obs0).any(axis=0).mean() > 0.01  # a visible part of the frame changed
    assert obs0.std() > 5  # not a blank frame
    # deterministic: the same reset seed renders the same frame
    again, _ = env.reset(seed=0)
    np.testing.assert_array_equal(again, obs0)


def test_target_not_visible(env, visible):
    frames, shown = [], []
    for task in (0, 7, 33):
        env.set_task(task)
        frames.append(env.reset(seed=3)[0])
        visible.set_task(task)
        shown.append(visible.reset(seed=3)[0])
    for f in frames[1:]:
        np.testing.assert_array_equal(f, frames[0])  # same arm pose, different targets: identical
    # sanity: on the goal-visible copy the target does change the frame
    assert any((s != shown[0]).any() for s in shown[1:])


# ---- rewards ---------------------------------------------------------------------------------------
def test_batched_reward_equals_step_reward(env):
    rng = np.random.default_rng(0)
    for task in (0, 11, 49, 55):
        for ep in random_episodes(env, task, rng, n_steps=120):
            r, d, s = env.reward(ep["infos"], [task])
            np.testing.assert_array_equal(r[0], ep["r"])
            np.testing.assert_array_equal(d[0], ep["d"])
            np.testing.assert_array_equal(s[0], ep["s"])
            np.testing.assert_array_equal(env.dense_reward(ep["infos"], [task])[0], ep["dense"])
            # all tasks at once: the row of this task is the same
            R, D, S = env.reward(ep["infos"], np.arange(env.num_tasks))
            assert R.shape == (60, len(ep["r"]))
            np.testing.assert_array_equal(R[task], ep["r"])
            assert set(np.unique(R)) <= {0.0, -1.0}


def test_scripted_reach_success_flags(visible):
    from metarelabel.envs.visual_reacher import RADIUS

    for task in (0, 5, 50, 59):
        steps = scripted_reach(visible, task, seed=task)
        r, term, trunc, info = steps[-1]
        assert term and not trunc and r == 0.0 and info["success"], f"task {task} not reached"
        assert np.linalg.norm(info["fingertip"] - visible.tasks[task]) <= RADIUS
        for r, term, _, info in steps[:-1]:  # before: -1, not done, not successful
            assert r == -1.0 and not term and not info["success"]
        # the batched reward reproduces the flags, and other tasks see no success at the end
        infos = {"fingertip": np.stack([s[3]["fingertip"] for s in steps])}
        R, D, S = visible.reward(infos, [task])
        assert S[0, -1] and D[0, -1] and not S[0, :-1].any()


# ---- buffers ------------------------------------------------------------------------------------------
def test_buffers_store_uint8_images_and_round_trip(env):
    env.set_task(2)
    cfg = make_config("visual-reacher", "quick")
    agent = PEARL(make_dims(env, cfg), cfg, torch.device("cpu"))
    path = rollout(env, agent, agent.prior_z(), 20)
    T = len(path)  # 20 unless the random policy happened to reach the target
    assert path.obs.dtype == np.uint8 and path.obs.shape == (T, 3, 64, 64)
    kw = dict(obs_shape=(3, 64, 64), obs_dtype=np.uint8)
    buf = TaskBuffers(3, 64, 3 * 64 * 64, 2, store_starts=True, **kw)
    enc = EncoderBuffers(3, 64, 3 * 64 * 64, 2, **kw)
    for b in (buf, enc):
        assert b.data["obs"].dtype == np.uint8 and b.data["obs"].shape == (3, 64, 3, 64, 64)
        assert b.data["next_obs"].dtype == np.uint8 and b.data["rewards"].dtype == np.float32
        b.add_path(1, path)
    assert buf.starts.dtype == np.uint8
    np.testing.assert_array_equal(buf.data["obs"][1, :T], path.obs)
    np.testing.assert_array_equal(buf.starts[1, 0], path.obs[0])
    assert TaskBuffers.bytes_needed(3, 64, 3 * 64 * 64, 2, True, **kw) == buf.nbytes
    rng = np.random.default_rng(0)
    s = buf.sample([1, 1], 5, rng)
    assert s["obs"].dtype == np.uint8 and s["obs"].shape == (2, 5, 3, 64, 64)
    assert buf.sample_starts([1], 4, rng).shape == (1, 4, 3, 64, 64)
    # through a checkpoint's storage format
    for b, cls in ((buf, TaskBuffers), (enc, EncoderBuffers)):
        stream = io.BytesIO()
        torch.save(ckpt.to_storable(b.state_dict()), stream)
        stream.seek(0)
        state = ckpt.to_numpy(torch.load(stream, weights_only=True))
        fresh = cls(3, 64, 3 * 64 * 64, 2, store_starts=b.store_starts, **kw)
        fresh.load_state_dict(state)
        for k in b.data:
            np.testing.assert_array_equal(fresh.data[k], b.data[k])
        if b.store_starts:
            np.testing.assert_array_equal(fresh.starts, b.starts)


# ---- the image learner ---------------------------------------------------------------------------------
def test_image_learner_trunk_and_contexts(env):
    cfg = make_config("visual-reacher", "quick", {"hidden_dim": 32, "encoder_hidden_dim": 24})
    torch.manual_seed(0)
    dims = make_dims(env, cfg)
    assert dims.image and dims.obs_shape == (3, 64, 64) and dims.context == dims.feature_dim + 2 + 1
    agent = PEARL(dims, cfg, torch.device("cpu"))
    env.set_task(4)
    path = rollout(env, agent, agent.prior_z(), 10)
    obs = torch.as_tensor(path.obs)
    feats = agent.embed_obs(obs)
    assert feats.shape == (len(path), dims.feature_dim)
    assert agent.embed_obs(obs[None]).shape == (1, len(path), dims.feature_dim)
    # an image context dict embeds to the same rows as the features concatenated by hand
    ctx = context_tensor(path_context(path, path.rewards, False), "cpu")
    with torch.no_grad():
        full = agent.context_features({k: v[None] for k, v in ctx.items()})[0]
        manual = torch.cat([agent.embed_obs(obs), ctx["actions"], ctx["rewards"]], -1)
    torch.testing.assert_close(full, manual)

    # one gradient step: the critic loss reaches the trunk; everything stays finite
    buf = TaskBuffers(2, 32, 3 * 64 * 64, 2, store_starts=True, obs_shape=(3, 64, 64), obs_dtype=np.uint8)
    buf.add_path(0, path)
    buf.add_path(1, path)
    rng = np.random.default_rng(0)
    b = buf.sample([0, 1], 8, rng)
    batch = {k: torch.as_tensor(b[k]) for k in ("obs", "actions", "rewards", "next_obs", "terminals")}
    context = context_tensor(context_from(buf.sample([0, 1], 6, rng), "rewards", False), "cpu")
    before = [p.detach().clone() for p in agent.trunk.parameters()]
    out = agent.update(batch, context)
    assert all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, agent.trunk.parameters()))
    assert "trunk" in agent.modules() and "trunk" in agent.optimizers
    z = agent.prior_z(2)
    starts = torch.as_tensor(buf.sample_starts([0, 1], 3, rng))
    assert agent.start_state_value(starts, z).shape == (2,)
    assert agent.td_error(batch, z).shape == (2,)


def test_hfr_image_hindsight_embeds_once_and_matches(env):
    """The image hindsight contexts equal the per-task image contexts embedded by the learner."""
    from metarelabel.relabel import RelabelContext, make_relabeler

    cfg = make_config("visual-reacher", "quick", {"hidden_dim": 32, "encoder_hidden_dim": 24, "relabel": "hfr"})
    torch.manual_seed(0)
    agent = PEARL(make_dims(env, cfg), cfg, torch.device("cpu"))
    n = 50
    kw = dict(obs_shape=(3, 64, 64), obs_dtype=np.uint8)
    bufs = [TaskBuffers(n, 64, 3 * 64 * 64, 2, store_starts=True, **kw), EncoderBuffers(n, 64, 3 * 64 * 64, 2, **kw),
            TaskBuffers(n, 64, 3 * 64 * 64, 2, **kw)]
    rel = make_relabeler("hfr", RelabelContext(cfg=cfg, family=env, learner=agent, rl_buffers=bufs[0],
                                               enc_buffers=bufs[1], sampler_buffers=bufs[2],
                                               rng=np.random.default_rng(0), num_tasks=n))
    env.set_task(9)
    path = rollout(env, agent, agent.prior_z(), 12)
    for t in range(n):
        for b in bufs:
            b.add_path(t, path)
    calls = []
    orig = agent.embed_obs
    agent.embed_obs = lambda x: calls.append(tuple(x.shape)) or orig(x)
    with torch.no_grad():
        ctx, mask = rel.hindsight([path])
    agent.embed_obs = orig
    assert calls == [(len(path), 3, 64, 64)]  # the path's images embedded once for all tasks
    assert ctx.shape == (1, n, len(path), agent.dims.context)
    for task in (0, 9, 31):
        r = env.reward(path.infos, [task])[0][0]
        ref = context_tensor(path_context(path, r, False), "cpu")
        with torch.no_grad():
            expect = agent.context_features(ref)
        torch.testing.assert_close(ctx[0, task], expect)
    U = rel.utilities([path])
    assert U.shape == (1, n) and np.isfinite(U).all()
    rel.update_log_z()
    assert np.isfinite(rel.log_z).all()


# ---- presets and training runs ------------------------------------------------------------------------
def test_presets():
    c = make_config("visual-reacher", "paper")
    assert (c.max_path_length, c.discount, c.context_reward, c.rl_reward) == (50, 0.99, "true", "true")
    q = make_config("visual-reacher", "quick")
    assert q.max_path_length == 50 and q.num_iterations == 2


def test_quick_train_run_hfr(tmp_path):
    from metarelabel.trainer import load_trainer

    run_dir = tmp_path / "run"
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli_main(["train", "visual-reacher", "--preset", "quick", "--relabel", "hfr", "--run-dir", str(run_dir),
                         "--no-tensorboard", "--progress", "off"])
    elapsed = time.perf_counter() - t0
    assert code == 0, out.getvalue()
    rows = (run_dir / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 2
    assert "meta_test/return" in out.getvalue() and "uint8 images 3x64x64" in out.getvalue()
    print(f"visual-reacher: quick run {elapsed:.1f}s")
    # the checkpoint restores the image buffers and the trunk
    trainer, _ = load_trainer(run_dir, echo=lambda *_: None)
    assert trainer.rl_buf.data["obs"].dtype == np.uint8 and trainer.rl_buf.size.sum() > 0
    assert trainer.agent.trunk is not None


@pytest.mark.parametrize("relabel", ["hipi-q", "hfr-bellman"])
def test_tiny_train_run_other_relabelers(relabel, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["train", "visual-reacher", "--preset", "quick", "--relabel", relabel, "--run-dir",
                         str(tmp_path / "run"), "--no-tensorboard", "--progress", "off", "--num-iterations", "1",
                         "--num-train-steps-per-itr", "2", "--keep-original-prob", "0"])
    assert code == 0, out.getvalue()


def test_image_run_resumes_exactly_and_checkpoints_hold_each_frame_once(tmp_path):
    """Image buffers keep one next frame per path (the checkpoint's next_obs rows are the path
    ends), and resuming from the iteration-1 checkpoint reproduces the uninterrupted run."""
    import csv

    import torch

    run = tmp_path / "run"
    args = ["train", "visual-reacher", "--preset", "quick", "--relabel", "hfr", "--run-dir", str(run), "--no-tensorboard",
            "--progress", "off", "--num-iterations", "2", "--num-train-steps-per-itr", "3", "--checkpoint-every", "1",
            "--keep-checkpoints", "2", "--device-buffers", "on", "--eval-runs", "1", "--num-eval-train-tasks", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(args) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    full = strip(list(csv.DictReader(open(run / "progress.csv"))))
    body = torch.load(run / "checkpoints" / "ckpt_000002.pt", weights_only=True)
    rl = body["payload"]["buffers"]["rl"]["data"]
    assert len(rl["next_obs"]) < len(rl["obs"]) / 5  # one frame per path end (paths of 50 steps, some shorter)
    for p in (run / "checkpoints").iterdir():
        if not p.name.startswith("ckpt_000001."):
            p.unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["resume", str(run), "--progress", "off", "--no-tensorboard"]) == 0
    assert strip(list(csv.DictReader(open(run / "progress.csv")))) == full
