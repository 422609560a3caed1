"""When each run first collected goal-reaching paths, and how that relates to its final score.

    python benchmarks/first_goal.py DIR [DIR ...] [--threshold 0.05] [--final-iterations 10]
                                    [--compare hfr,none]

For every finished run under the DIRs: the first iteration whose ``collect/success_rate`` exceeds
``--threshold`` (151 and so on, one past the last iteration, if it never does) and the final score
(mean ``meta_test/success_rate`` over the evaluations of the last ``--final-iterations`` iterations,
as ``metarelabel plot`` scores a run).  Prints the
runs grouped by (settings folder, strategy), each group's median first iteration, Spearman's rank
correlation between first iteration and final score over all runs, and, with ``--compare A,B``,
a two-sided Mann-Whitney U test of A's first iterations against B's (needs scipy, which the
``plot`` extra brings).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from metarelabel.errors import MetaRelabelError
from metarelabel.plot import final_scores, find_runs, load_run


def first_above(values: np.ndarray, threshold: float) -> int:
    """1-based index of the first value above ``threshold``; len + 1 if none is."""
    hits = np.flatnonzero(values > threshold)
    return int(hits[0]) + 1 if hits.size else len(values) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--final-iterations", type=int, default=10)
    ap.add_argument("--compare", default="", help="two strategies, e.g. hfr,none")
    args = ap.parse_args()
    try:
        from scipy.stats import mannwhitneyu, spearmanr
    except ImportError:
        sys.exit("error: benchmarks/first_goal.py needs scipy (pip install -e '.[plot]')")
    groups: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
    try:
        for d in find_runs(args.dirs):
            run = load_run(d)
            if not run["finished"]:
                continue
            cols, cfg = run["cols"], run["config"]
            first = first_above(cols["collect/success_rate"], args.threshold)
            final = final_scores([run], "meta_test/success_rate", args.final_iterations)
            if not final.size:  # never evaluated
                continue
            score = float(final[0])
            groups.setdefault((str(d.parent.parent), cfg["relabel"]), []).append((first, score, int(cfg["seed"])))
    except (MetaRelabelError, KeyError, OSError) as exc:
        sys.exit(f"error: {exc}")
    if not groups:
        sys.exit(f"error: no finished run under {' '.join(args.dirs)}")
    firsts, scores = [], []
    for (settings, strategy), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r[2])
        print(f"{settings}/{strategy}: first iteration with collected success > {args.threshold:g} "
              f"(seeds {','.join(str(r[2]) for r in rows)}): {[r[0] for r in rows]}, median "
              f"{np.median([r[0] for r in rows]):g}; final {[round(r[1], 2) for r in rows]}")
        firsts += [r[0] for r in rows]
        scores += [r[1] for r in rows]
    rho = spearmanr(firsts, scores)
    print(f"Spearman(first iteration, final score) over {len(firsts)} runs: {rho.statistic:.2f} (p = {rho.pvalue:.3g})")
    if args.compare:
        a, b = (s.strip() for s in args.compare.split(","))
        fa = [r[0] for (_, s), rows in groups.items() if s == a for r in rows]
        fb = [r[0] for (_, s), rows in groups.items() if s == b for r in rows]
        if not fa or not fb:
            sys.exit(f"error: --compare {args.compare}: no runs of {a if not fa else b}")
        u = mannwhitneyu(fa, fb, alternative="two-sided")
        print(f"{a} vs {b}: median first iteration {np.median(fa):g} vs {np.median(fb):g} "
              f"({len(fa)} and {len(fb)} runs), Mann-Whitney U = {u.statistic:g}, p = {u.pvalue:.3g}")


if __name__ == "__main__":
    main()
