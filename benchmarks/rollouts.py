"""The lockstep rollout engine and the lean gradient step against their references, measured
side by side in one process (alternating, median of ``--repeats`` rounds).  Prints a table and
ends with exactly one line ``speedups: collect=X eval=Y step=Z iteration=W`` (step and iteration
with the step ``--step`` names, by default the one the default ``grad_step=fast`` takes for the
``cpu`` preset's 150,000 gradient steps, ``compiled``; the line before it gives the lean step's).

    python benchmarks/rollouts.py [--repeats 3] [--step-blocks 15] [--no-cheetah] [--step lean|compiled]

- collect: env steps/s of one iteration's collection on four-corners, 10 task visits of 100
  prior + 900 posterior steps (``cpu`` networks, relabel none), ``rollouts`` sequential vs vector;
- eval: the four-corners meta-test (4 tasks x 2 runs x 400 steps), sequential vs vector;
- step: the ``cpu``-shape gradient step (minibatch sampling + update), reference vs lean and
  vs compiled (``grad_step=compiled``: the lean step through ``torch.compile``; compiled before
  timing);
- iteration: one whole four-corners iteration at the paper's collection rate with the ``cpu``
  networks, HFR and 1000 gradient steps: (sequential, reference) vs (vector, lean) and
  (vector, compiled);
- cheetah-vel (with the mujoco extra): collection of 10 visits x 400 prior steps.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from metarelabel.presets import make_config
from metarelabel.trainer import Trainer

PAPER_RATE = {"num_tasks_sample": 10, "num_steps_prior": 100, "num_steps_posterior": 900,
              "num_extra_rl_steps_posterior": 0}


def trainer(family: str, preset: str, **over) -> Trainer:
    cfg = make_config(family, preset, {"torch_threads": 1, "seed": 0, **over})
    tr = Trainer(cfg, tempfile.mkdtemp(prefix="mrl-bench-"), echo=lambda *_: None, tensorboard=False)
    tr.start()
    tr.initial_collection()
    return tr


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rotated(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``repeats`` times."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(fn())
    return [statistics.median(t) for t in times]


def paired(fa, fb, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb``, run alternately."""
    return tuple(rotated((fa, fb), repeats))


def collect_rate(tr: Trainer) -> float:
    """Seconds per env step of one iteration's collection."""
    before = tr.env_steps
    dt = timed(tr.collect_iteration)
    return dt / (tr.env_steps - before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-blocks", type=int, default=15, help="alternating blocks of 20 gradient steps")
    ap.add_argument("--no-cheetah", action="store_true")
    ap.add_argument("--step", default="compiled", choices=("lean", "compiled"),
                    help="the new gradient step the final speedups line reports (default: compiled, what the default "
                         "grad_step=fast selects for the cpu preset)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []

    # collection
    seq = trainer("four-corners", "cpu", rollouts="sequential", relabel="none", **PAPER_RATE)
    vec = trainer("four-corners", "cpu", rollouts="vector", relabel="none", **PAPER_RATE)
    s, v = paired(lambda: collect_rate(seq), lambda: collect_rate(vec), args.repeats)
    rows.append(("collect four-corners 10 x (100+900)", "env steps/s", 1 / s, 1 / v))
    collect = s / v

    # evaluation
    s, v = paired(lambda: timed(lambda: seq.evaluator.evaluate(seq.eval_tasks, "meta_test")),
                  lambda: timed(lambda: vec.evaluator.evaluate(vec.eval_tasks, "meta_test")), args.repeats)
    rows.append(("eval four-corners 4 tasks x 2 runs x 400", "s", s, v))
    evaluate = s / v

    # gradient step (same buffers; minibatch sampling included); the compiled step compiles
    # during its warm-up steps
    steps = {name: trainer("four-corners", "cpu", grad_step=name) for name in ("reference", "lean", "compiled")}
    t_compile = timed(lambda: steps["compiled"].train_steps(20))
    for tr in steps.values():
        tr.train_steps(20)
    s, v, c = rotated([lambda tr=tr: timed(lambda: tr.train_steps(20)) / 20 for tr in steps.values()], args.step_blocks)
    rows.append(("gradient step, cpu shapes (3x64, 4x128, ctx 128)", "ms", s * 1e3, v * 1e3))
    rows.append(("gradient step, cpu shapes, compiled (vs reference)", "ms", s * 1e3, c * 1e3))
    print(f"compiled step: first 20 steps (compile included) {t_compile:.1f} s")
    step, step_c = s / v, s / c

    # a whole iteration at the paper's collection rate
    old = trainer("four-corners", "cpu", rollouts="sequential", grad_step="reference", relabel="hfr",
                  num_train_steps_per_itr=1000, **PAPER_RATE)
    new = trainer("four-corners", "cpu", rollouts="vector", grad_step="lean", relabel="hfr",
                  num_train_steps_per_itr=1000, **PAPER_RATE)
    newc = trainer("four-corners", "cpu", rollouts="vector", grad_step="compiled", relabel="hfr",
                   num_train_steps_per_itr=1000, **PAPER_RATE)
    newc.train_steps(5)  # compile outside the timed iterations
    phases = {}

    def iteration(tr, name):
        t0 = time.perf_counter()
        row = tr.run_iteration()
        phases[name] = {k[5:-2]: row[k] for k in row if k.startswith("time/") and k.endswith("_s")}
        return time.perf_counter() - t0

    s, v, c = rotated((lambda: iteration(old, "old"), lambda: iteration(new, "new"), lambda: iteration(newc, "newc")),
                      max(1, args.repeats - 1))
    rows.append(("iteration four-corners, paper rate, cpu nets, HFR, 1000 steps", "s", s, v))
    rows.append(("iteration four-corners, as above, compiled step", "s", s, c))
    iteration_x, iteration_c = s / v, s / c

    names = {"old": "sequential + reference", "new": "vector + lean", "newc": "vector + compiled"}
    for name, label in names.items():
        print(f"iteration phases ({label}): " + ", ".join(f"{k} {v:.2f}s" for k, v in phases[name].items()))

    if not args.no_cheetah:
        try:
            over = dict(num_tasks_sample=10, num_steps_prior=400, num_steps_posterior=0, num_extra_rl_steps_posterior=0,
                        relabel="none", num_initial_steps=200)
            cs = trainer("cheetah-vel", "quick", rollouts="sequential", **over)
            cv = trainer("cheetah-vel", "quick", rollouts="vector", **over)
            s, v = paired(lambda: collect_rate(cs), lambda: collect_rate(cv), args.repeats)
            rows.append(("collect cheetah-vel 10 x 400", "env steps/s", 1 / s, 1 / v))
        except Exception as exc:  # noqa: BLE001 - the extra is optional
            print(f"cheetah-vel skipped: {exc}")

    print(f"{'measurement':<62} {'unit':<12} {'reference':>10} {'new':>10} {'speedup':>8}")
    for name, unit, a, b in rows:
        x = b / a if unit.endswith("/s") else a / b
        print(f"{name:<62} {unit:<12} {a:>10.3f} {b:>10.3f} {x:>7.2f}x")
    by_step = {"lean": (step, iteration_x), "compiled": (step_c, iteration_c)}
    other = "compiled" if args.step == "lean" else "lean"
    print(f"with grad_step={other}: step={by_step[other][0]:.2f} iteration={by_step[other][1]:.2f}")
    step, iteration_x = by_step[args.step]
    print(f"speedups: collect={collect:.1f} eval={evaluate:.1f} step={step:.2f} iteration={iteration_x:.2f}")


if __name__ == "__main__":
    main()
