"""Train this library or the authors' release for K iterations from one shared state of a run of
this library (made with `--init rlkit --relabel-truncate false --squash-log-prob rlkit`): the same
weights, the same RL and encoder buffers (relbridge.fill_release_buffers), fresh Adam states in
both codes, numpy and torch seeded with SEED.  Each iteration is the code's own loop body:
collection and filing, then (the release) log Z, the gradient steps, and the meta-test.  Writes
one CSV row per iteration: meta-test success, the collected paths' own-task success, the goal
transitions filed (in all and per task).  Run once per (code, seed); compare the codes' rows in distribution.

Usage (this library's venv; the release checkout and its venv's site-packages on the path):
    cd RELEASE_DIR && python plateau.py RUN_DIR RELEASE_DIR RELEASE_SITE_PACKAGES RELEASE_CONFIG {ours,release} SEED K OUT_CSV
"""
import csv
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

run_dir, rel_dir, rel_site, rel_cfg, code, seed, K, out_csv = sys.argv[1:9]
seed, K = int(seed), int(K)
sys.path.insert(0, rel_dir)
sys.path.append(rel_site)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from metarelabel.checkpoint import list_checkpoints  # noqa: E402
from metarelabel.trainer import load_trainer  # noqa: E402

# a copy: extending a run rewrites its config.json, and several of these may run at once
copy_dir = os.path.join(tempfile.mkdtemp(), "run")
shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns("tb"))
start = int(list_checkpoints(os.path.join(copy_dir, "checkpoints"))[-1].stem.split("_")[1])  # ckpt_<iteration>.pt
trainer, _ = load_trainer(copy_dir, echo=lambda *a, **k: None, num_iterations=start + K)
cfg = trainer.cfg
assert trainer.iteration == start and cfg.eval_every == 1
torch.set_num_threads(1)
rows = []


def record(it, success, paths, goal_per_task, t0):
    """`goal_per_task`: goal-reaching transitions filed under each task this iteration."""
    own = float(np.mean(paths)) if paths else float("nan")
    rows.append({"code": code, "seed": seed, "iteration": start + it, "success": success, "collect_success": own,
                 "goal_filed": sum(goal_per_task), **{f"goal_filed_{t}": g for t, g in enumerate(goal_per_task)},
                 "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{code} seed {seed} iteration {start + it}: meta-test {success:.3f}, collected own-task success {own:.3f}, "
          f"goal transitions filed {goal_per_task}, {rows[-1]['seconds']} s", flush=True)


if code == "ours":
    trainer.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
    torch.manual_seed(seed)
    trainer.evaluator.generator.manual_seed(seed + 1)
    agent = trainer.agent
    for opt in agent.optimizers.values():  # fresh Adam: no moments, step 0 (the lean step's flat views are rebuilt)
        opt.state.clear()
    agent._flat = None
    for it in range(1, K + 1):
        t0 = time.perf_counter()
        before = trainer.rl_buf.size.copy()
        row = trainer.run_iteration()
        after = trainer.rl_buf.size
        goal = [int(trainer.rl_buf.data["terminals"][t, before[t]:after[t]].sum()) for t in range(trainer.num_tasks)]
        succ = [float(row["collect/success_rate"])]  # the iteration's mean over its collected paths
        record(it, float(row["meta_test/success_rate"]), succ, goal, t0)
else:
    import gtimer as gt
    from relbridge import build_release, fill_release_buffers, release_collect, sync_weights

    alg = build_release(rel_cfg)
    assert alg.reward_scale == cfg.reward_scale and alg.kl_lambda == cfg.kl_lambda and alg.discount == cfg.discount
    assert alg.relabel_method == {"hfr": "hfr-q"}.get(cfg.relabel, cfg.relabel)
    sync_weights(trainer.agent, alg)
    fill_release_buffers(trainer, alg)
    if cfg.relabel == "hfr":
        alg.log_Z = trainer.relabeler.log_z.copy()
    np.random.seed(seed)
    torch.manual_seed(seed)
    gt.reset()
    gt.set_def_unique(False)
    succ = []
    orig = alg.relabel_hfr_q

    def relabel_wrap(paths, *a, **k):
        succ.extend(float(any(i["success"] for i in p["env_infos"])) for p in paths)
        return orig(paths, *a, **k)

    alg.relabel_hfr_q = relabel_wrap
    bufs = alg.replay_buffer.task_buffers
    for it in range(1, K + 1):
        t0 = time.perf_counter()
        succ.clear()
        before = [bufs[t]._size for t in range(trainer.num_tasks)]
        alg.training_mode(True)
        release_collect(alg)
        goal = [int(bufs[t]._terminals[before[t]:bufs[t]._size].sum()) for t in range(trainer.num_tasks)]
        alg.compute_log_Z()
        for _ in range(alg.num_train_steps_per_itr):
            alg._do_training(np.random.choice(alg.train_tasks, alg.meta_batch))
            alg._n_train_steps_total += 1
        alg.training_mode(False)
        success = alg._do_eval(alg.eval_tasks, it)[5]
        record(it, float(success), list(succ), goal, t0)

with open(out_csv, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
shutil.rmtree(os.path.dirname(copy_dir))
