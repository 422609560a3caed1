"""The lockstep rollout engine against the one-environment-at-a-time reference
(``sampler.rollout``, ``rollouts = sequential``): the same paths for the same z's and
environment seeds, the same meta-test protocol, and the same collection bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_agent, small_config
from metarelabel.envs import make_family
from metarelabel.evaluation import Evaluator
from metarelabel.rollout import Job, lane_seeds, run_jobs
from metarelabel.sampler import ActionMap, rollout
from metarelabel.trainer import Trainer

FIELDS = ("obs", "actions", "rewards", "dense_rewards", "terminals", "next_obs", "success")


class ElementwiseAgent:
    """A policy whose action for one row depends on that row only, through elementwise float32
    operations, so a batch of k rows gives bit for bit the actions of k single calls (a real
    network's batched GEMM need not).  It steers towards a point set by z, with a wobble."""

    def __init__(self, obs_dim: int, act_dim: int, latent: int = 5):
        from metarelabel.pearl import Dims

        self.dims = Dims(obs_dim, act_dim, latent)
        self.device = torch.device("cpu")

    def _act(self, obs: np.ndarray, z: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, np.float32).reshape(len(obs), -1)
        z = np.asarray(z, np.float32)
        a = self.dims.act
        target = np.tile(z, (1, -(-a // z.shape[1])))[:, :a]
        base = np.resize(obs, (len(obs), a)) if obs.shape[1] < a else obs[:, :a]
        return np.tanh(np.float32(3.0) * (target - base) + np.float32(0.3) * np.sin(np.float32(7.0) * base))

    def act(self, obs, z, deterministic=False):
        return self._act(np.asarray(obs)[None], z.numpy())[0]

    def act_batch(self, obs, z, deterministic=False):
        return self._act(obs, z.numpy())


class FixedZ(Job):
    """A job of trajectories with given z's."""

    def __init__(self, task: int, zs: torch.Tensor):
        self.task, self.zs, self.paths = task, zs, []

    def want(self):
        return "fixed" if len(self.paths) < len(self.zs) else None

    def take(self, path):
        self.paths.append(path)


def fixed_z(jobs, kinds):
    return torch.stack([j.zs[len(j.paths)] for j in jobs])


def assert_same_path(got, want, exact: bool = True):
    assert len(got) == len(want) and got.task == want.task
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.shape == b.shape, f
        if exact or a.dtype == bool:
            np.testing.assert_array_equal(a, b, err_msg=f)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f)
    assert set(got.infos) == set(want.infos)
    for k in got.infos:
        if exact:
            np.testing.assert_array_equal(got.infos[k], want.infos[k], err_msg=k)
        else:
            np.testing.assert_allclose(got.infos[k], want.infos[k], rtol=1e-4, atol=1e-5, err_msg=k)


def engine_vs_sequential(family: str, agent_fn, exact: bool, n_lanes: int = 3, n_traj: int = 4, H: int | None = None,
                         deterministic: bool = True):
    fam = make_family(family)
    H = H or fam.horizon
    obs_dim = int(np.prod(fam.observation_space.shape))
    act_dim = int(np.prod(fam.action_space.shape))
    agent = agent_fn(obs_dim, act_dim)
    gen = torch.Generator().manual_seed(4)
    tasks = [int(t) for t in np.asarray(fam.train_tasks)[[0, -1, 1, 2, 0][:n_lanes]]]
    jobs = [FixedZ(t, 0.8 * torch.randn(n_traj, agent.dims.latent, generator=gen)) for t in tasks]
    seeds = lane_seeds(11, n_lanes)
    venv = fam.vector_env(seeds)
    finished = []
    steps = run_jobs(venv, agent, jobs, H, fixed_z, on_paths=finished.extend, deterministic=deterministic)
    assert steps == sum(len(p) for j in jobs for p in j.paths)
    assert len(finished) == n_lanes * n_traj
    for job, seed in zip(jobs, seeds):
        env = make_family(family)
        env.reset(seed=seed)
        env.set_task(job.task)
        assert len(job.paths) == n_traj
        for z, got in zip(job.zs, job.paths):
            assert_same_path(got, rollout(env, agent, z[None], H, deterministic=deterministic), exact)
    return jobs


@pytest.mark.parametrize("family", ["four-corners", "point-robot", "sparse-point-robot"])
def test_engine_paths_equal_sequential_paths_exactly(family):
    """Array families: lane i replays a single environment seeded like lane i, bit for bit,
    including trajectories that end early (four-corners terminates on success)."""
    jobs = engine_vs_sequential(family, ElementwiseAgent, exact=True)
    lengths = {len(p) for j in jobs for p in j.paths}
    assert lengths  # and the rollouts really moved
    assert any(np.abs(p.next_obs - p.obs).max() > 0.05 for j in jobs for p in j.paths)


def test_action_map_maps_the_unit_box_onto_the_action_box_and_back():
    import gymnasium as gym

    box = gym.spaces.Box(low=np.array([-2.0, 0.0, 1.0], np.float32), high=np.array([2.0, 1.0, 5.0], np.float32))
    amap = ActionMap(box)
    a = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.5, -0.5]], np.float32)
    np.testing.assert_array_equal(amap.to_env(a), [[-2.0, 0.0, 1.0], [2.0, 1.0, 5.0], [0.0, 0.75, 2.0]])
    back = amap.to_policy(amap.to_env(a))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, a, atol=1e-7)


def test_engine_ends_trajectories_on_termination():
    """On four-corners a z at a corner walks into the goal: the lane's trajectory ends at the
    terminal step and the lane starts its next trajectory while the others keep going."""
    fam = make_family("four-corners")
    agent = ElementwiseAgent(2, 2)
    z_goal = torch.tensor([[1.0, 1.0, 0, 0, 0]] * 2)
    z_far = torch.tensor([[0.0, 0.0, 0, 0, 0]] * 2)
    jobs = [FixedZ(1, z_goal), FixedZ(2, z_far)]
    run_jobs(fam.vector_env(lane_seeds(0, 2)), agent, jobs, 20, fixed_z)
    assert all(p.terminals[-1] and len(p) < 20 and p.terminals.sum() == 1 for p in jobs[0].paths)
    assert all(len(p) == 20 and not p.terminals.any() for p in jobs[1].paths)


def test_engine_runs_more_jobs_than_lanes_in_order():
    fam = make_family("point-robot")
    agent = ElementwiseAgent(2, 2)
    gen = torch.Generator().manual_seed(0)
    jobs = [FixedZ(t, torch.randn(k, 5, generator=gen)) for t, k in [(0, 2), (5, 1), (7, 3), (9, 2), (3, 1)]]
    order = []
    run_jobs(fam.vector_env(lane_seeds(3, 2)), agent, jobs, 20, fixed_z,
             on_paths=lambda done: order.extend(j.task for j, _ in done))
    assert [len(j.paths) for j in jobs] == [2, 1, 3, 2, 1]
    assert all(p.task == j.task for j in jobs for p in j.paths)
    assert sorted(order) == sorted(j.task for j in jobs for _ in j.paths)
    assert order.index(3) > order.index(0)  # the last job starts only when a lane is free


def test_engine_with_a_real_policy_matches_to_float_tolerance():
    """A PEARL policy: one batched call per step instead of one call per env step; the
    batched GEMMs may differ from single-row ones in the last bits only."""
    engine_vs_sequential("point-robot", lambda o, a: make_agent(seed=1, obs=o, act=a), exact=False)


@pytest.mark.parametrize("deterministic", [True, False])
def test_lane_actor_acts_as_act_batch_bit_for_bit(deterministic):
    """The engine's lane actor (the policy input kept in one tensor, the observations written
    into its numpy view) gives ``act_batch``'s actions exactly, for all lanes and for a subset,
    and follows in-place parameter updates (an optimizer step between collections)."""
    agent = make_agent(seed=3, obs=3, act=2)
    actor = agent.lane_actor(5)
    gen = np.random.default_rng(0)
    obs = gen.normal(size=(5, 3)).astype(np.float32)
    z = torch.randn(5, agent.dims.latent, generator=torch.Generator().manual_seed(1))
    actor.obs[:] = obs
    actor.z[:] = z
    for active in (None, np.array([0, 2, 3])):
        rows = slice(None) if active is None else active
        torch.manual_seed(7)
        want = agent.act_batch(obs[rows], z[rows], deterministic)
        torch.manual_seed(7)
        got = actor.act(active, deterministic)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.add_(0.1)
    torch.manual_seed(7)
    want = agent.act_batch(obs, z, deterministic)
    torch.manual_seed(7)
    np.testing.assert_array_equal(actor.act(None, deterministic), want)
    # the actor reads detached views: acting records no autograd graph even in grad mode
    assert all(not w.requires_grad and not b.requires_grad for w, b in actor.params)


class ColumnObs:
    """A vector env whose observations are ``[k, obs, 1]`` columns (not flat vectors)."""

    def __init__(self, venv):
        self.venv = venv

    def __getattr__(self, name):
        return getattr(self.venv, name)

    def reset(self, lanes, tasks):
        return self.venv.reset(lanes, tasks)[..., None]

    def step(self, lanes, actions):
        obs, *rest = self.venv.step(lanes, actions)
        return (obs[..., None], *rest)


def test_engine_acts_through_act_batch_when_observations_are_not_flat():
    """The lane actor holds flat observations only; other shapes fall back to ``act_batch``
    with the same actions, and the paths keep the env's observation shape."""
    fam = make_family("point-robot")
    agent = make_agent(seed=4)
    zs = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    runs = []
    for wrap in (lambda v: v, ColumnObs):
        jobs = [FixedZ(t, zs[i]) for i, t in enumerate((0, 3, 5))]
        run_jobs(wrap(fam.vector_env(lane_seeds(2, 3))), agent, jobs, 20, fixed_z, deterministic=True)
        runs.append(jobs)
    for flat_job, col_job in zip(*runs):
        for p, q in zip(flat_job.paths, col_job.paths):
            assert q.obs.shape == p.obs.shape + (1,) and q.next_obs.shape == p.next_obs.shape + (1,)
            np.testing.assert_array_equal(q.obs[..., 0], p.obs)
            np.testing.assert_array_equal(q.actions, p.actions)


def test_stochastic_engine_draws_policy_noise_once_per_step():
    fam = make_family("point-robot")
    agent = make_agent(seed=2)
    jobs = [FixedZ(t, torch.zeros(2, 5)) for t in (0, 1, 2)]
    torch.manual_seed(0)
    run_jobs(fam.vector_env(lane_seeds(0, 3)), agent, jobs, 20, fixed_z, deterministic=False)
    torch.manual_seed(0)
    jobs2 = [FixedZ(t, torch.zeros(2, 5)) for t in (0, 1, 2)]
    run_jobs(fam.vector_env(lane_seeds(0, 3)), agent, jobs2, 20, fixed_z, deterministic=False)
    for a, b in zip(jobs, jobs2):  # deterministic given the seeds
        for p, q in zip(a.paths, b.paths):
            assert_same_path(p, q)
    # and the noise is real: same z, same start distribution, different actions per lane
    assert not np.allclose(jobs[0].paths[0].actions, jobs[1].paths[0].actions)


# ---- the meta-test protocol ---------------------------------------------------------------------
@pytest.mark.parametrize("family,ib", [("four-corners", False), ("sparse-point-robot", False), ("point-robot", True)])
def test_vector_evaluation_equals_sequential_protocol(family, ib):
    """Same fixed networks: trajectory counts, contexts, returns and metrics of every (task,
    run) pair equal the sequential protocol's.  Without the information bottleneck the
    protocol draws nothing; with it, the prior and posterior draws come in another order, so
    only counts and context lengths must agree."""
    cfg = small_config(family, eval_steps=100, exploration_trajectories=2, eval_runs=2,
                       use_information_bottleneck=ib)
    fam = make_family(family)
    agent = make_agent(seed=5, hidden_dim=32, encoder_hidden_dim=24, use_information_bottleneck=ib)
    agent.cfg = cfg
    tasks = np.asarray(fam.eval_tasks)[:3]
    seq = Evaluator(make_family(family), agent, cfg.replace(rollouts="sequential"), seed=3)
    vec = Evaluator(make_family(family), agent, cfg, seed=3)
    assert seq.venv is None and vec.venv is not None
    if family != "point-robot":  # fixed starts: the two engines see the same episodes
        a, b = seq.runs(tasks), vec.runs(tasks)
        assert [p.task for p in a] == [p.task for p in b]
        for p, q in zip(a, b):
            assert len(p.returns) == len(q.returns)
            np.testing.assert_allclose(p.returns, q.returns, rtol=1e-5, atol=1e-5)
            assert p.successes == q.successes
            for c, d in zip(p.contexts, q.contexts):
                np.testing.assert_allclose(c, d, rtol=1e-5, atol=1e-5)
        ms, mv = seq.evaluate(tasks, "m"), vec.evaluate(tasks, "m")
        assert ms.keys() == mv.keys()
        for k in ms:
            np.testing.assert_allclose(mv[k], ms[k], rtol=1e-5, atol=1e-5, err_msg=k)
    else:
        a, b = seq.runs(tasks), vec.runs(tasks)
        assert len(a) == len(b) == 3 * cfg.eval_runs
        for p, q in zip(a, b):
            assert sum(map(len, q.contexts)) >= cfg.eval_steps
            assert [len(c) for c in q.contexts] == [20] * len(q.contexts)  # point-robot never ends early
            assert len(p.returns) == len(q.returns)


def test_vector_evaluation_is_deterministic_and_seeded():
    cfg = small_config("point-robot", eval_steps=60, exploration_trajectories=1)
    agent = make_agent(seed=5, hidden_dim=32, encoder_hidden_dim=24)
    runs = [Evaluator(make_family("point-robot"), agent, cfg, seed=s).evaluate([80, 81], "m") for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# ---- collection -----------------------------------------------------------------------------------
def _trainer(tmp_path, **over):
    base = dict(num_tasks_sample=7, num_steps_prior=30, num_steps_posterior=50, num_extra_rl_steps_posterior=20,
                relabel="none")
    cfg = small_config("four-corners", **{**base, **over})
    return Trainer(cfg, tmp_path, echo=lambda *_: None, tensorboard=False)


def test_vector_collection_visits_every_drawn_task_with_its_phases(tmp_path):
    """7 visits of 4 tasks: every visit is collected (repeated tasks twice, side by side with
    their own posterior contexts); each phase collects whole trajectories until its step
    count; the sampler buffer of a task ends with its last visit's paths, as after visiting
    one after another; the encoder buffer gets prior + posterior paths, the RL buffer all."""
    tr = _trainer(tmp_path)
    tr.initial_collection()
    before = tr.env_steps
    assert before >= 4 * tr.cfg.num_initial_steps
    visits = []
    orig = tr.run_visits

    def spy(vs, clear_sampler):
        visits.extend(vs)
        orig(vs, clear_sampler)

    tr.run_visits = spy
    rl_before = tr.rl_buf.size.sum()
    tr.collect_iteration()
    assert len(visits) == 7 and len({v.task for v in visits}) < 7
    for v in visits:
        per_phase = [0, 0, 0]
        lens = [len(p) for p in v.paths]
        assert v.phase == 3 and len(v.feeds) == len(v.paths)
        phase = 0
        for p, feeds in zip(v.paths, v.feeds):
            while per_phase[phase] >= (30, 50, 20)[phase]:
                phase += 1
            per_phase[phase] += len(p)
            assert feeds == (phase < 2)
        assert all(s >= need and s - need < 20 for s, need in zip(per_phase, (30, 50, 20))), per_phase
        assert sum(lens) == sum(per_phase)
    assert tr.env_steps - before == sum(len(p) for v in visits for p in v.paths)
    assert tr.rl_buf.size.sum() - rl_before == tr.env_steps - before  # relabel none: everything filed as is
    for task in {v.task for v in visits}:
        last = [v for v in visits if v.task == task][-1]
        assert tr.smp_buf.size[task] == sum(len(p) for p in last.paths)
        np.testing.assert_array_equal(tr.smp_buf.data["obs"][task, :len(last.paths[0])], last.paths[0].obs)
    enc_expected = {}
    for v in visits:
        enc_expected[v.task] = enc_expected.get(v.task, 0) + sum(len(p) for p, f in zip(v.paths, v.feeds) if f)
    for task, n in enc_expected.items():
        assert tr.enc_buf.size[task] == n


def test_posterior_z_comes_from_the_visits_own_paths(tmp_path):
    """Two visits of the same task run side by side; posterior inference for each reads that
    visit's own rows of the visit buffer, which hold exactly that visit's paths."""
    tr = _trainer(tmp_path, num_tasks_sample=2)
    tr.initial_collection()
    real = tr.rng

    class SameTask:  # the iteration's task draw picks task 1 twice; everything else is real
        def integers(self, *a, **k):
            return np.array([1, 1]) if k.get("size") == 2 else real.integers(*a, **k)

        def __getattr__(self, name):
            return getattr(real, name)

    seen, visits = [], []
    sample, run = tr.visit_buf.sample, tr.run_visits

    def spy_sample(rows, n, rng, keys):
        seen.append([int(tr.visit_buf.size[r]) for r in rows])
        return sample(rows, n, rng, keys=keys)

    tr.visit_buf.sample = spy_sample
    tr.run_visits = lambda vs, clear_sampler: (visits.extend(vs), run(vs, clear_sampler))
    tr.rng = SameTask()
    tr.collect_iteration()
    assert [v.task for v in visits] == [1, 1]
    assert seen and all(min(sizes) > 0 for sizes in seen)
    for v in visits:
        n = sum(len(p) for p in v.paths)
        assert tr.visit_buf.size[v.index] == n
        np.testing.assert_array_equal(tr.visit_buf.data["actions"][v.index, :n],
                                      np.concatenate([p.actions for p in v.paths]))
    # the task's sampler buffer ends with the second visit's paths only
    assert tr.smp_buf.size[1] == sum(len(p) for p in visits[1].paths)


def test_evaluation_diagnostics_count_goals_and_separate_posteriors():
    """explore_goals_reached counts the evaluated tasks whose success condition some
    exploration trajectory met; posterior_separation is the tasks' mean pairwise posterior-mean
    distance over the mean posterior std (checked by hand on the evaluator's own pairs)."""
    from metarelabel.buffers import Path
    from metarelabel.evaluation import Pair

    cfg = small_config("four-corners", eval_steps=100, exploration_trajectories=2, eval_runs=1)
    fam = make_family("four-corners")
    agent = make_agent(seed=5, hidden_dim=32, encoder_hidden_dim=24)
    ev = Evaluator(fam, agent, cfg, seed=0)

    def path(task, pos):
        pos = np.asarray(pos, np.float64)
        r, d, s = fam.reward({"pos": pos}, [task])
        o = np.asarray(pos, np.float32)
        return Path(obs=o, actions=np.zeros_like(o), rewards=r[0], dense_rewards=r[0], terminals=d[0], next_obs=o,
                    success=s[0], infos={"pos": pos}, task=task)

    pairs = [Pair(t, cfg) for t in range(4)]
    pairs[0].take(path(0, [[0.1, 0.1], [0.9, 0.95]]))   # reaches task 1's goal (1, 1)
    pairs[0].take(path(0, [[-0.5, -0.5], [-0.95, -1.0]]))  # reaches its own goal (-1, -1)
    pairs[1].take(path(1, [[0.0, 0.1]]))
    pairs[1].take(path(1, [[0.9, 0.9]]))  # goal 1 again: counted once
    pairs[2].take(path(2, [[0.0, 0.0]]))
    pairs[2].take(path(2, [[0.0, 0.0]]))
    pairs[2].take(path(2, [[1.0, -1.0]]))  # third trajectory: not exploration
    pairs[3].take(path(3, [[0.3, 0.3]]))
    pairs[3].take(path(3, [[0.3, 0.4]]))
    out = ev.diagnostics(pairs, "m")
    assert out["m/explore_goals_reached"] == 2.0
    mus, sds = [], []
    for p in pairs:
        ctx = torch.as_tensor(np.concatenate(p.contexts)[None])
        with torch.no_grad():
            m, v = agent.infer_posterior(ctx)
        mus.append(m[0])
        sds.append(v[0].sqrt())
    mus, std = torch.stack(mus), float(torch.stack(sds).mean())
    d = [float((mus[i] - mus[j]).norm()) for i in range(4) for j in range(4) if i != j]
    np.testing.assert_allclose(out["m/posterior_std"], std, rtol=1e-5)
    np.testing.assert_allclose(out["m/posterior_separation"], np.mean(d) / std, rtol=1e-4)


@pytest.mark.parametrize("truncate", [True, False])
def test_relabeled_path_filing_truncates_only_when_asked(tmp_path, truncate):
    """A four-corners path that enters task 1's goal disc at step 2 and stays: filed under task 1
    it ends at step 2 (``relabel_truncate``) or keeps all 4 steps with every reward and terminal
    recomputed (the release)."""
    from metarelabel.buffers import Path

    tr = _trainer(tmp_path, relabel_truncate=truncate)
    pos = np.array([[0.3, 0.3], [0.9, 0.9], [0.95, 0.95], [1.0, 0.9]])
    r, d, s = tr.env.reward({"pos": pos}, [2])
    o = pos.astype(np.float32)
    p = Path(obs=o, actions=np.zeros_like(o), rewards=r[0], dense_rewards=r[0], terminals=d[0], next_obs=o,
             success=s[0], infos={"pos": pos}, task=2)
    size = tr.rl_buf.size[1]
    rl, enc = [], []
    tr._file(p, np.full(4, 1), False, rl, enc)
    assert enc == [] and [k for k, _, _ in rl] == [1]
    tr.rl_buf.add_many(rl)
    n = tr.rl_buf.size[1] - size
    assert n == (2 if truncate else 4)
    np.testing.assert_array_equal(tr.rl_buf.data["terminals"][1, size:size + n, 0], [0, 1] if truncate else [0, 1, 1, 1])
    np.testing.assert_array_equal(tr.rl_buf.data["rewards"][1, size:size + n, 0], [-3, 0] if truncate else [-3, 0, 0, 0])


@pytest.mark.parametrize("rollouts", ["vector", "sequential"])
def test_first_iteration_keeps_initial_encoder_data_only_when_asked(tmp_path, rollouts):
    """Same seed, same draws: the first iteration collects the same paths either way.  With
    ``keep_initial_encoder_data`` (the release) a visited task's encoder buffer holds its initial
    rows followed by the rows the default run holds alone; the second iteration's visits replace
    both."""
    def snap(buf):
        return [{k: v[t, :buf.size[t]].copy() for k, v in buf.data.items()} for t in range(buf.num_tasks)]

    runs = []
    for k in (False, True):  # one after the other: the policy draws from torch's global generator
        tr = _trainer(tmp_path / str(k), keep_initial_encoder_data=k, rollouts=rollouts)
        states = []
        for step in (tr.initial_collection, tr.collect_iteration, tr.collect_iteration):
            step()
            states.append(snap(tr.enc_buf))
        runs.append(states)
    (init, replace, again), (init_k, keep, again_k) = runs
    visited = 0
    for t in range(4):
        revisited = not all(np.array_equal(again[t][k], replace[t][k]) for k in init[t])
        for k in init[t]:
            np.testing.assert_array_equal(init_k[t][k], init[t][k])
            # the second iteration replaces a visited task's data in both; others keep theirs
            np.testing.assert_array_equal(again_k[t][k], again[t][k] if revisited else keep[t][k])
        if all(np.array_equal(replace[t][k], init[t][k]) for k in init[t]):
            assert all(np.array_equal(keep[t][k], init[t][k]) for k in init[t])  # not visited
            continue
        visited += 1
        for k in init[t]:
            np.testing.assert_array_equal(keep[t][k], np.concatenate([init[t][k], replace[t][k]]))
    assert visited >= 2
