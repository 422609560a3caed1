"""Two groups of runs compared on their final scores, whatever their settings: each group's IQM
with its 95% stratified-bootstrap CI and rliable's probability of improvement P(A > B) with its
95% bootstrap CI (``metarelabel plot`` compares a strategy only with the ``none`` of the same
settings; this compares across settings, e.g. a sparse-critic strategy with dense-critic PEARL).

    python benchmarks/versus.py A_DIR B_DIR [--metric meta_test/success_rate] [--final-iterations 10]

A_DIR and B_DIR are folders holding the runs of one group each (e.g.
docs/results/runs/sparse-critic/sparse-point-robot/hfr and
docs/results/runs/dense-critic/sparse-point-robot/none); unfinished runs are left out.
"""
from __future__ import annotations

import argparse
import json
import sys

from metarelabel.errors import MetaRelabelError
from metarelabel.plot import final_scores, find_runs, improvement_ci, iqm_ci, load_run


def group(path: str) -> list[dict]:
    runs = []
    for d in find_runs([path]):
        if json.loads((d / "run.json").read_text()).get("finished"):
            runs.append(load_run(d))
    if not runs:
        raise MetaRelabelError(f"no finished run under {path}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metric", default="meta_test/success_rate")
    ap.add_argument("--final-iterations", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    try:
        scores = [final_scores(group(p), args.metric, args.final_iterations) for p in (args.a, args.b)]
    except MetaRelabelError as exc:
        print(f"versus: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for name, s in zip((args.a, args.b), scores):
        m, lo, hi = iqm_ci(s[:, None], args.reps)
        print(f"{name}: {len(s)} runs, IQM {m[0]:.3f} [{lo[0]:.3f}, {hi[0]:.3f}], "
              f"per run {', '.join(f'{x:.2f}' for x in s)}")
    p, lo, hi = improvement_ci(scores[0], scores[1], args.reps)
    print(f"P(A > B) = {p:.2f} [{lo:.2f}, {hi:.2f}]  ({args.metric}, last {args.final_iterations} iterations)")


if __name__ == "__main__":
    main()
