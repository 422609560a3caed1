"""Numerical cross-check of this library against the authors' release on Four-Corners.

Loads a trained run of this library (made with `--init rlkit --relabel-truncate false
--squash-log-prob rlkit`), builds the release's PEARLSoftActorCritic through its own launcher with
the same settings (the modified release described in docs/results.md, *The authors' release at
the same settings*), copies the trained weights into it, and compares:
  1. posteriors (mean, variance) of the same contexts;
  2. the HFR logits U(tau, psi) - log Z(psi) of the same paths, through the release's own
     relabel_hfr_q (its softmax input captured), with the same log Z and the same noise;
  3. log Z itself from the same contexts and noise;
  4. the gradient step: the change of every parameter after 1 and 5 steps on the same batches,
     contexts and noise, from fresh Adam states;
  5. R iterations of collection and filing in each code (the release's own loop body), from the
     same weights and log Z, compared in distribution (own-task success of the collected paths,
     goal-reaching transitions filed, per iteration and per task);
  6. the meta-test protocol, E times in each code on the same weights, compared in distribution.
A `none` run (the release's `none` config) skips 2 and 3.
In 1-4 both codes take their standard-normal draws from one queue, in the order each code draws
them, so they must agree to float rounding.

Usage (this library's venv; the release checkout and its venv's site-packages on the path):
    cd RELEASE_DIR && python crosscheck.py RUN_DIR RELEASE_DIR RELEASE_SITE_PACKAGES RELEASE_CONFIG [R [E]]
"""
import copy
import json
import os
import sys

import numpy as np
import torch

run_dir, rel_dir, rel_site, rel_cfg = sys.argv[1:5]
sys.path.insert(0, rel_dir)
sys.path.append(rel_site)

from metarelabel.sampler import context_from, context_tensor, rollout  # noqa: E402
from metarelabel.trainer import load_trainer  # noqa: E402

# ---------------------------------------------------------------------------------------------
# noise feeding: both codes take their standard normals from FEED, in the order they draw them
FEED: list = []


def _next(shape):
    e = FEED.pop(0)
    assert tuple(e.shape) == tuple(shape), (tuple(e.shape), tuple(shape))
    return e


def _rsample(self, sample_shape=torch.Size()):
    return self.loc + self.scale * _next(self.loc.shape)


def _sample(self, sample_shape=torch.Size()):
    with torch.no_grad():
        return self.loc + self.scale * _next(self.loc.shape)


_randn_like = torch.randn_like
_NormalRsample = torch.distributions.Normal.rsample
_NormalSample = torch.distributions.Normal.sample


def _fed_randn_like(x, *a, **k):
    return _next(x.shape).to(x.dtype) if FEED else _randn_like(x, *a, **k)


# ---------------------------------------------------------------------------------------------
R = int(sys.argv[5]) if len(sys.argv) > 5 else 10
with open(os.path.join(run_dir, "config.json")) as fh:  # room in the buffers for part 5's R more iterations
    planned = json.load(fh)["num_iterations"]
trainer, _ = load_trainer(run_dir, echo=lambda *a, **k: None, num_iterations=planned + R)
ours = trainer.agent
cfg = trainer.cfg
print(f"our run: {run_dir} at iteration {trainer.iteration}; init={cfg.init} truncate={cfg.relabel_truncate} "
      f"squash={cfg.squash_log_prob}")

# the release's algorithm, built by its own launcher
import rlkit.torch.sac.sac as sac_module  # noqa: E402
from relbridge import build_release, critic_pairs, layer_pairs, release_collect, sync_weights  # noqa: E402

alg = build_release(rel_cfg)
rel_agent = alg.agent
assert alg.reward_scale == cfg.reward_scale and alg.kl_lambda == cfg.kl_lambda and alg.discount == cfg.discount
sync_weights(ours, alg)


def report(name, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b).max()
    scale = max(np.abs(a).max(), 1e-12)
    print(f"  {name:<34s} max |diff| {d:.3g}  (max |value| {scale:.3g}, rel {d / scale:.2g})")
    return d / scale


g = torch.Generator().manual_seed(0)
L, A = cfg.latent_dim, 2

# ---- 1. posteriors ----------------------------------------------------------------------------
print("1. posteriors of the same contexts (4 tasks x 128 transitions from the run's encoder buffers)")
batch, context = trainer.sample_training_batch(np.random.default_rng(1))
with torch.no_grad():
    mu, var = ours.infer_posterior(context)
    rel_agent.infer_posterior(context)
report("posterior mean", mu, rel_agent.z_means)
report("posterior variance", var, rel_agent.z_vars)

_softmax = sac_module.softmax
# from here to part 5 both codes' Normal draws come from FEED
torch.distributions.Normal.rsample = _rsample
torch.distributions.Normal.sample = _sample


def hfr_parts():
    """Parts 2 and 3 (an HFR run only); returns this library's log Z, set in both codes."""
    # ---- 2. HFR logits of the same paths -----------------------------------------------------------
    print("2. HFR logits U - log Z of the same paths (the release's relabel_hfr_q)")
    fam = trainer.env
    paths = []
    torch.manual_seed(3)

    class Walker:
        """Walks to a corner at full speed and stays there."""

        def __init__(self, goal):
            self.goal = np.asarray(goal, np.float64)

        def act(self, obs, z, deterministic=False):
            return np.clip((self.goal - obs) * 10.0, -1.0, 1.0).astype(np.float32)

    brng = np.random.default_rng(5)
    for task in range(4):
        fam.set_task(task)
        for _ in range(4):  # prior z: the meta-test's exploration trajectories
            paths.append(rollout(fam, ours, ours.prior_z(1), cfg.max_path_length))
        c = trainer.enc_buf.gather(np.array([task]), trainer.enc_buf.sample_indices(np.array([task]), 128, brng), trainer.ctx_keys)
        with torch.no_grad():
            z = ours.sample_z(*ours.infer_posterior(context_tensor(context_from(c, trainer.ctx_key, False), trainer.device)))
        for det in (False, False, False, True):  # posterior z of the task's own context
            paths.append(rollout(fam, ours, z, cfg.max_path_length, deterministic=det))
        # a path collected on this task that walks to the next task's corner and lingers there
        paths.append(rollout(fam, Walker(fam.tasks[(task + 1) % 4]), None, cfg.max_path_length))
    P, N, B = len(paths), 4, cfg.utility_batch_size
    print(f"  {P} paths, lengths {sorted(len(p) for p in paths)}; successes {sum(bool(p.success.any()) for p in paths)}")

    def release_path(p):
        infos = [{"x": float(x), "y": float(y)} for x, y in p.infos["pos"]]
        return {"observations": p.obs.astype(np.float64), "actions": p.actions.astype(np.float64),
                "rewards": p.rewards.reshape(-1, 1).astype(np.float64), "next_observations": p.next_obs.astype(np.float64),
                "terminals": p.terminals.reshape(-1, 1).astype(np.float64), "env_infos": infos,
                "agent_infos": [{} for _ in infos]}

    # rewards of the release's env.reward against this library's family.reward, every step x task
    pos = np.concatenate([p.infos["pos"] for p in paths])
    rew, term, _ = fam.reward({"pos": pos}, np.arange(N))
    rel_rd = np.array([[alg.env.reward({"x": x, "y": y}, goal) for x, y in pos]
                       for goal in alg.train_goals])
    report("hindsight rewards", rel_rd[..., 0], rew)
    report("hindsight terminals", rel_rd[..., 1], term)

    # start states: the release's replay buffers get the origin, ours hold the run's own
    starts = trainer.rl_buf.sample_starts(np.arange(N), 64, np.random.default_rng(0))
    print(f"  our stored start states: max |s0| = {np.abs(starts).max():.3g}")
    for idx in range(N):
        alg.replay_buffer.task_buffers[idx].add_start_obs(np.zeros(2))

    rel = trainer.relabeler
    log_z = rel.log_z.copy()
    alg.log_Z = log_z.copy()
    z_eps = torch.randn(P * N, L, generator=g)
    a_eps = torch.randn(P * N, B, A, generator=g)
    with torch.no_grad():
        U = rel.utilities(paths, z_eps, a_eps)
    ours_logits = U - log_z[None]

    captured_logits = []
    sac_module.softmax = lambda x: (captured_logits.append(np.array(x)), _softmax(x))[1]
    FEED.clear()
    for k in range(P * N):
        FEED.extend([torch.zeros(L), z_eps[k], a_eps[k]])  # infer_posterior's draw (discarded), sample_z's, actions
    alg.task_idx = 0
    alg.relabel_hfr_q([release_path(p) for p in paths], add_to_enc_buffer=True, add_original=False)
    assert not FEED
    rel_logits = np.stack(captured_logits)
    report("HFR logits", ours_logits, rel_logits)
    p_ours = np.exp(ours_logits - ours_logits.max(1, keepdims=True))
    p_ours /= p_ours.sum(1, keepdims=True)
    p_rel = np.stack([_softmax(x) for x in rel_logits])
    report("assignment probabilities", p_ours, p_rel)
    print(f"  argmax agrees on {(p_ours.argmax(1) == p_rel.argmax(1)).sum()} of {P} paths; "
          f"argmax = own task on {(p_ours.argmax(1) == np.array([p.task for p in paths])).sum()}")

    # ---- 3. log Z from the same contexts ---------------------------------------------------------------
    print("3. log Z from the same contexts (20 draws per task of 20 transitions from the run's encoder buffers)")
    S, H = 20, cfg.max_path_length
    ctxs = [trainer.sample_training_batch(np.random.default_rng(100 + i))[1][:, :H] for i in range(S)]
    zs = [torch.randn(N, L, generator=g) for _ in range(S)]
    acts = [torch.randn(N * B, A, generator=g) for _ in range(S)]
    starts0 = torch.zeros(N, B, 2)
    with torch.no_grad():
        vals = torch.stack([ours.start_state_value(starts0, ours.sample_z(*ours.infer_posterior(c), zs[i]),
                                                   acts[i].reshape(N, B, A)) for i, c in enumerate(ctxs)], 1)
    ours_logz = (torch.logsumexp(vals.double(), 1) - np.log(S)).numpy()
    FEED.clear()
    for i in range(S):
        FEED.extend([torch.zeros(L)] * N + list(zs[i]) + [acts[i]])
    ci = iter(ctxs)
    alg.sample_context = lambda indices, use_sampler_buffer=False, batch_size=None: (next(ci), indices)
    alg.sample_start_obs = lambda indices, batch_size=None: torch.zeros(len(indices), batch_size, 2)
    alg.compute_log_Z()
    assert not FEED
    report("log Z", ours_logz, alg.log_Z)
    return log_z


if cfg.relabel == "hfr":
    log_z = hfr_parts()
else:  # `none` keeps every path with its task: no utilities, no log Z
    print(f"2-3. skipped: the run's relabeling is {cfg.relabel}")
    log_z = np.zeros(4)

# ---- 4. gradient steps --------------------------------------------------------------------------
STEP = os.environ.get("CROSSCHECK_STEP", "update_reference")  # or "update": the run's own step kind
print(f"4. gradient steps ({STEP}, {ours.step_kind if STEP == 'update' else 'reference'}) on the same batches, contexts and noise (fresh Adam states in both):")
print("   the change of every weight matrix, ours against the release's")
ref = copy.deepcopy(ours)
ref.optimizers = {k: torch.optim.Adam(getattr(ref, k).parameters(), lr=cfg.lr) for k in ("policy", "qf", "vf", "encoder")}
for opt_name in ("qf1_optimizer", "qf2_optimizer", "vf_optimizer", "policy_optimizer", "context_optimizer"):
    getattr(alg, opt_name).state.clear()


def snapshot():
    """All parameters of each network, flattened, in this library and in the release."""
    def flat(lins):
        return torch.cat([torch.cat([lin.weight.detach().flatten(), lin.bias.detach().flatten()]) for lin in lins])

    o, r = {}, {}
    for k, (o_lins, r_lins) in layer_pairs(ref, alg).items():
        o[k], r[k] = flat(o_lins), flat(r_lins)
    for k, (h, o_layers, r_lins) in critic_pairs(ref, alg).items():
        o[k] = torch.cat([torch.cat([w[h].detach().T.flatten(), bias[h, 0].detach()]) for w, bias in o_layers])
        r[k] = flat(r_lins)
    return o, r


o0, r0 = snapshot()
for k in o0:
    assert torch.equal(o0[k], r0[k]), k
batches = [trainer.sample_training_batch(np.random.default_rng(200 + i)) for i in range(5)]
torch.randn_like = _fed_randn_like
M = cfg.meta_batch
for step, (b, c) in enumerate(batches):
    ze = torch.randn(M, L, generator=g)
    ae = torch.randn(M * cfg.batch_size, A, generator=g)
    FEED.clear()
    FEED += [ze, ae]
    out = getattr(ref, STEP)(b, c)
    assert not FEED
    FEED += [torch.zeros(L)] * M + list(ze) + [ae]
    sb = [b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"]]
    alg.sample_sac = lambda indices, batch_size=None: sb
    alg.eval_statistics = None
    alg._take_step(np.arange(M), c)
    assert not FEED
    if step in (0, 4):
        es = alg.eval_statistics
        print(f"  after {step + 1} step(s): losses ours / release: qf {float(out['losses/qf']):.7g} / {float(es['QF Loss']):.7g}, "
              f"vf {float(out['losses/vf']):.7g} / {float(es['VF Loss']):.7g}, policy {float(out['losses/policy']):.7g} / "
              f"{float(es['Policy Loss']):.7g}, kl {float(out['losses/kl']):.7g} / {float(es['KL Divergence']):.7g}")
        o1, r1 = snapshot()
        for k in o1:
            report(f"change of {k}", o1[k] - o0[k], r1[k] - r0[k])
torch.randn_like = _randn_like

if R == 0:
    sys.exit(0)

# ---- 5. one iteration's collection and filing ------------------------------------------------------
print(f"5. collection and filing of {R} iterations in each code (10 visits of 100 + 900 steps), from the same")
print("   trained weights and log Z (no gradient steps in between; the release's own loop body)")
sync_weights(ours, alg)
alg.log_Z = log_z.copy()
trainer.relabeler.log_z = log_z.copy()
sac_module.softmax = _softmax
torch.distributions.Normal.rsample = _NormalRsample
torch.distributions.Normal.sample = _NormalSample
for name in ("sample_context", "sample_start_obs", "sample_sac"):  # the replacements parts 3-4 installed
    vars(alg).pop(name, None)
torch.manual_seed(11)
np.random.seed(11)


CL = {"ours": [[] for _ in range(4)], "release": [[] for _ in range(4)]}  # per task: success of each iteration's visits
PER = {"ours": np.zeros((4, 5)), "release": np.zeros((4, 5))}  # per task: paths, successes, steps, filed, goal filed


def stats(recs, filed, who):
    for t, s_, l_ in recs:
        PER[who][t, :3] += (1, s_, l_)
    for t, (f_, g_) in enumerate(filed):
        PER[who][t, 3:] += (f_, g_)
    for t in range(4):
        mine = [s_ for tt, s_, _ in recs if tt == t]
        if mine:
            CL[who][t].append(float(np.mean(mine)))
    n = len(recs)
    succ = sum(s for _, s, _ in recs)
    steps = sum(t for _, _, t in recs)
    tr = sum(f[0] for f in filed)
    goal = sum(f[1] for f in filed)
    return n, succ / n, steps, tr, goal


ours_rows, rel_rows = [], []
orig_store = trainer.store
recs = []


def store_wrap(paths, feeds_encoder, relabel=True, sampler=True, groups=None):
    recs.extend((p.task, bool(p.success.any()), len(p)) for p in paths)
    return orig_store(paths, feeds_encoder, relabel=relabel, sampler=sampler, groups=groups)


trainer.store = store_wrap
for r in range(R):
    recs.clear()
    before = trainer.rl_buf.size.copy()
    assert np.all(trainer.rl_buf.ptr == before)
    trainer.collect_iteration()
    after = trainer.rl_buf.size
    filed = [(int(after[t] - before[t]), int(trainer.rl_buf.data["terminals"][t, before[t]:after[t]].sum())) for t in range(4)]
    ours_rows.append(stats(recs, filed, 'ours'))

orig_relabel = alg.relabel_hfr_q


def relabel_wrap(paths, *a, **k):
    recs.extend((alg.task_idx, any(i["success"] for i in p["env_infos"]), len(p["observations"])) for p in paths)
    return orig_relabel(paths, *a, **k)


alg.relabel_hfr_q = relabel_wrap
import gtimer as gt  # noqa: E402
gt.reset()
gt.set_def_unique(False)
for r in range(R):
    recs.clear()
    bufs = alg.replay_buffer.task_buffers
    before = [bufs[t]._size for t in range(4)]
    assert all(bufs[t]._top == before[t] for t in range(4))
    release_collect(alg)
    filed = [(bufs[t]._size - before[t], int(bufs[t]._terminals[before[t]:bufs[t]._size].sum())) for t in range(4)]
    rel_rows.append(stats(recs, filed, 'release'))

for name, rows in (("ours", ours_rows), ("release", rel_rows)):
    a = np.array(rows, np.float64)
    m, sd = a.mean(0), a.std(0, ddof=1)
    print(f"  {name:<8s} paths {m[0]:.1f} ({sd[0]:.1f}), own-task success {m[1]:.3f} ({sd[1]:.3f}), steps {m[2]:.0f}, "
          f"filed transitions {m[3]:.0f}, goal transitions filed {m[4]:.1f} ({sd[4]:.1f})")
from scipy.stats import mannwhitneyu  # noqa: E402
for j, what in ((1, "own-task success"), (4, "goal transitions filed")):
    p = mannwhitneyu([x[j] for x in ours_rows], [x[j] for x in rel_rows]).pvalue
    print(f"  Mann-Whitney p, {what}: {p:.2f}")
print("  per task (all iterations): collected paths, own-task success rate; transitions filed, goal transitions per 1,000 filed")
for t in range(4):
    o, r_ = PER["ours"][t], PER["release"][t]
    po, pr = o[1] / max(o[0], 1), r_[1] / max(r_[0], 1)
    pool = (o[1] + r_[1]) / max(o[0] + r_[0], 1)
    zz = (po - pr) / max(np.sqrt(pool * (1 - pool) * (1 / max(o[0], 1) + 1 / max(r_[0], 1))), 1e-12)
    pt = mannwhitneyu(CL["ours"][t], CL["release"][t]).pvalue if CL["ours"][t] and CL["release"][t] else float("nan")
    print(f"  task {t}: Mann-Whitney p over iterations' per-task success rates {pt:.2f}")
    print(f"  task {t}: ours {int(o[0])} paths, success {po:.3f}; release {int(r_[0])}, {pr:.3f} (z = {zz:+.1f});  "
          f"goal per 1,000 filed: ours {1000 * o[4] / max(o[3], 1):.1f} of {int(o[3])}, release {1000 * r_[4] / max(r_[3], 1):.1f} of {int(r_[3])}")

# ---- 6. the meta-test protocol ----------------------------------------------------------------------
E = int(sys.argv[6]) if len(sys.argv) > 6 else 30
print(f"6. the meta-test (4 tasks x 2 runs x 400 steps, 5 exploration trajectories), {E} times in each code, same weights")
sync_weights(ours, alg)
ours_succ, rel_succ = [], []
for _ in range(E):
    ours_succ.append(trainer.evaluator.evaluate(trainer.eval_tasks, "meta_test")["meta_test/success_rate"])
assert alg.num_exp_traj_eval == cfg.exploration_trajectories and alg.num_steps_per_eval == cfg.eval_steps
for _ in range(E):
    rel_succ.append(alg._do_eval(alg.eval_tasks, 0)[5])
print(f"  success rate (any posterior trajectory succeeds): ours {np.mean(ours_succ):.3f} (sd {np.std(ours_succ, ddof=1):.3f}), "
      f"release {np.mean(rel_succ):.3f} (sd {np.std(rel_succ, ddof=1):.3f}); Mann-Whitney p = {mannwhitneyu(ours_succ, rel_succ).pvalue:.2f}")
