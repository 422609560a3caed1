"""Per-run wall time, phase times and final scores of a results sweep, as Markdown tables.

    python benchmarks/results_summary.py docs/results/runs [--final-iterations 10]

Reads each run's run.json (start/finish: wall time), progress.csv (summed iteration times, which
leave out the initial collection and any downtime of a resumed run) and config.json; prints one row per run
and one row per (family, strategy) with the means over seeds.  No statistics beyond means: the
IQM and its confidence interval come from ``metarelabel plot``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime

import numpy as np

from metarelabel.errors import MetaRelabelError
from metarelabel.plot import final_scores, find_runs, load_run, trailing_mean


def first_reaching(cols: dict, metric: str, level: float, window: int) -> float:
    """First iteration at which the mean of the last ``window`` evaluations of ``metric``
    reaches ``level`` (full windows only; NaN if never)."""
    v = cols.get(metric)
    if v is None:
        return float("nan")
    ok = np.isfinite(v)
    smooth = trailing_mean(v[ok][None], window)[0]
    hit = np.nonzero(smooth >= level)[0]
    hit = hit[hit >= window - 1]
    return float(cols["iteration"][ok][hit[0]]) if len(hit) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--final-iterations", type=int, default=10)
    ap.add_argument("--level", type=float, default=0.25, help="success level for the 'first reaching' column")
    ap.add_argument("--window", type=int, default=5, help="evaluations averaged for the 'first reaching' column")
    args = ap.parse_args()
    try:
        dirs = find_runs([args.root])
    except MetaRelabelError as exc:
        print(f"results_summary: error: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = []
    for d in dirs:
        run = load_run(d)
        cfg, cols = run["config"], run["cols"]
        meta = json.loads((d / "run.json").read_text())
        nan = float("nan")
        wall = nan
        if meta.get("finished"):
            t0, t1 = (datetime.fromisoformat(meta[k]) for k in ("started", "finished"))
            wall = (t1 - t0).total_seconds() / 60
        per_it = {k: float(np.nanmean(cols[f"time/{k}_s"])) if f"time/{k}_s" in cols else nan
                  for k in ("collect", "relabel", "log_z", "train", "eval", "iteration")}
        succ = final_scores([run], "meta_test/success_rate", args.final_iterations)
        ret = final_scores([run], "meta_test/return", args.final_iterations)
        compute = float(np.nansum(cols.get("time/iteration_s", [nan]))) / 60  # excludes downtime of resumed runs
        rows.append(dict(family=cfg["family"], strategy=cfg["relabel"], seed=cfg["seed"], wall=wall, compute=compute,
                         iters=int(cols["iteration"][-1]), steps=int(cols["env_steps"][-1]),
                         success=float(succ[0]) if len(succ) else nan,
                         ret=float(ret[0]) if len(ret) else nan,
                         moved=float(np.nanmean(cols.get("relabel/fraction_relabeled", [np.nan]))),
                         first=first_reaching(cols, "meta_test/success_rate", args.level, args.window), **per_it))
    print("| family | strategy | seed | iterations | env steps | wall (min) | iterations (min) | s/iteration | relabel s/it | log Z s/it "
          "| fraction relabeled | final success | final return | first iteration at success >= level |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['strategy']} | {r['seed']} | {r['iters']} | {r['steps']:,} | {r['wall']:.1f} | {r['compute']:.1f} | "
              f"{r['iteration']:.2f} | {r['relabel']:.3f} | {r['log_z']:.3f} | {r['moved']:.2f} | "
              f"{r['success']:.3f} | {r['ret']:.2f} | {r['first']:.0f} |")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["family"], r["strategy"])].append(r)
    print()
    print(f"| family | strategy | seeds | mean wall (min) | mean s/iteration | mean final success | per seed "
          f"| first iteration at success >= {args.level:g} ({args.window}-evaluation mean), per seed |")
    print("|---|---|---|---|---|---|---|---|")
    for (fam, strat), g in groups.items():
        per_seed = ", ".join(f"{r['success']:.2f}" for r in sorted(g, key=lambda r: r["seed"]))
        firsts = ", ".join("never" if np.isnan(r["first"]) else f"{r['first']:.0f}" for r in sorted(g, key=lambda r: r["seed"]))
        print(f"| {fam} | {strat} | {len(g)} | {np.mean([r['wall'] for r in g]):.1f} | "
              f"{np.mean([r['iteration'] for r in g]):.2f} | {np.mean([r['success'] for r in g]):.3f} | {per_seed} | {firsts} |")


if __name__ == "__main__":
    main()
