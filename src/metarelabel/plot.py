"""Sample-efficiency curves and final-performance tables across seeds (rliable's interquartile
mean with 95% stratified-bootstrap confidence intervals), one colour per strategy.

    metarelabel plot RUN_DIRS... [--out DIR] [--reps 2000] [--final-iterations K] [--smooth W]

Runs are found recursively (a directory with config.json and progress.csv); they are grouped by
family and by strategy (relabel, plus any other config field that differs within a family).
Curves are aligned on the iteration; the x-axis is the mean over seeds of ``env_steps`` at that
iteration.  The final performance of a run is the mean of its evaluated values in its last K
iterations (``--final-iterations``, default 1: the last evaluation).
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import ConfigError

METRICS = (("meta_test/return", "meta-test return (last trajectory)"),
           ("meta_test/success_rate", "meta-test success rate"))
CI_METHOD = "IQM, 95% stratified-bootstrap CI (rliable)"
STRATEGY_ORDER = ("hfr", "hfr-bellman", "hipi", "hipi-q", "random", "none")


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"plotting needs an optional extra: install metarelabel[plot] (missing {module})") from None


def find_runs(paths) -> list[Path]:
    runs = set()
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"no such run directory: {p}")
        cands = [p] if (p / "config.json").exists() else [c.parent for c in p.rglob("config.json")]
        runs.update(c for c in cands if (c / "progress.csv").exists())
    if not runs:
        raise ConfigError("no run directories (with config.json and progress.csv) found under: " + " ".join(map(str, paths)))
    return sorted(runs)


def load_run(run_dir: Path) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())
    with open(run_dir / "progress.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else []:
        vals = []
        for r in rows:
            try:
                vals.append(float(r[key]))
            except (TypeError, ValueError):
                vals.append(math.nan)
        cols[key] = np.asarray(vals)
    meta_path = run_dir / "run.json"
    finished = meta_path.exists() and bool(json.loads(meta_path.read_text()).get("finished"))
    return {"dir": run_dir, "config": cfg, "cols": cols, "finished": finished}


def group_runs(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """family -> strategy label -> runs.  The label is ``relabel`` plus every other config field
    (except seed, run-only fields) that differs between runs of the family."""
    ignore = {"seed", "device", "torch_threads", "checkpoint_every", "keep_checkpoints"}
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_family[r["config"]["family"]].append(r)
    out: dict[str, dict[str, list[dict]]] = {}
    for fam, rs in by_family.items():
        varying = sorted(k for k in rs[0]["config"] if k not in ignore and k != "relabel"
                         and len({json.dumps(r["config"][k]) for r in rs}) > 1)
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            label = r["config"]["relabel"] + "".join(f" {k}={r['config'][k]}" for k in varying)
            groups[label].append(r)
        order = {name: i for i, name in enumerate(STRATEGY_ORDER)}
        out[fam] = dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0].split(" ")[0], 99), kv[0])))
    return out


def iqm_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0):
    """IQM over runs per column of ``scores`` ``[runs, points]`` with 95% stratified-bootstrap
    CIs (rliable).  Returns (iqm, lower, upper), each ``[points]``."""
    _need("rliable")
    from rliable import library as rly
    from rliable import metrics

    scores = np.asarray(scores, np.float64)
    data = {"x": scores[:, None, :]}  # [runs, tasks=1, points]

    def func(x):
        return np.array([metrics.aggregate_iqm(x[..., i]) for i in range(x.shape[-1])])

    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global RNG
    point, interval = rly.get_interval_estimates(data, func, reps=reps)
    return point["x"], interval["x"][0], interval["x"][1]


def trailing_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of each row's last ``window`` values up to and including each column (fewer at
    the start)."""
    if window <= 1:
        return y
    c = np.cumsum(np.pad(y, ((0, 0), (1, 0))), axis=1)
    idx = np.arange(y.shape[1])
    lo = np.maximum(idx + 1 - window, 0)
    return (c[:, idx + 1] - c[:, lo]) / (idx + 1 - lo)


def curves(group: list[dict], metric: str, smooth: int = 1):
    """Aligned ``[runs, iterations]`` scores at the iterations every run evaluated, and x;
    with ``smooth`` > 1 each run's curve is a trailing mean over that many evaluations."""
    its = None
    for r in group:
        c = r["cols"]
        if metric not in c:
            return None
        ok = set(c["iteration"][np.isfinite(c[metric])].astype(int))
        its = ok if its is None else its & ok
    its = sorted(its or [])
    if not its:
        return None
    ys, xs = [], []
    for r in group:
        c = r["cols"]
        idx = {int(i): j for j, i in enumerate(c["iteration"])}
        ys.append([c[metric][idx[i]] for i in its])
        xs.append([c["env_steps"][idx[i]] for i in its])
    return np.asarray(its), np.mean(xs, 0), trailing_mean(np.asarray(ys, np.float64), smooth)


def final_scores(group: list[dict], metric: str, window: int = 1) -> np.ndarray:
    """Per run: the mean of ``metric`` over the evaluations in the run's last ``window``
    iterations (iteration > last evaluated iteration - window)."""
    out = []
    for r in group:
        v = r["cols"].get(metric)
        if v is None or not np.isfinite(v).any():
            continue
        it = r["cols"]["iteration"]
        ok = np.isfinite(v)
        sel = ok & (it > it[ok].max() - window)
        out.append(float(v[sel].mean()))
    return np.asarray(out)


def final_table(grouped, reps: int, window: int = 1) -> list[dict]:
    rows = []
    for fam, groups in grouped.items():
        for label, group in groups.items():
            row = {"family": fam, "strategy": label, "seeds": len(group),
                   "env_steps": int(np.mean([g["cols"]["env_steps"][-1] for g in group])),
                   "final_iterations": int(window)}
            for metric, _ in METRICS:
                s = final_scores(group, metric, window)
                if len(s):
                    m, lo, hi = iqm_ci(s[:, None], reps)
                    row.update({f"{metric} IQM": float(m[0]), f"{metric} CI low": float(lo[0]),
                                f"{metric} CI high": float(hi[0]), f"{metric} mean": float(s.mean())})
            rows.append(row)
    return rows


def write_tables(rows: list[dict], out: Path, window: int = 1) -> tuple[Path, Path]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, md_path = out / "final_performance.csv", out / "final_performance.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)
    final = "the last evaluation" if window == 1 else f"the mean of the evaluations in the last {window} iterations"
    lines = [f"Final performance ({CI_METHOD}); value [95% CI] across seeds; a run's score is {final}.", "",
             "| family | strategy | seeds | env steps | meta-test return | meta-test success rate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for metric, _ in METRICS:
            if f"{metric} IQM" in r:
                cells.append(f"{r[f'{metric} IQM']:.3f} [{r[f'{metric} CI low']:.3f}, {r[f'{metric} CI high']:.3f}]")
            else:
                cells.append("n/a")
        lines.append(f"| {r['family']} | {r['strategy']} | {r['seeds']} | {r['env_steps']:,} | {cells[0]} | {cells[1]} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_family(fam: str, groups: dict[str, list[dict]], out: Path, reps: int, smooth: int = 1) -> list[Path]:
    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 3.8))
    colors = plt.get_cmap("tab10")
    seeds = sorted({len(g) for g in groups.values()})
    for ax, (metric, title) in zip(np.atleast_1d(axes), METRICS):
        for i, (label, group) in enumerate(groups.items()):
            cur = curves(group, metric, smooth)
            if cur is None:
                continue
            _, x, y = cur
            m, lo, hi = iqm_ci(y, reps)
            ax.plot(x, m, color=colors(i), label=f"{label} (n={len(group)})", lw=1.8)
            ax.fill_between(x, lo, hi, color=colors(i), alpha=0.2, lw=0)
        if metric.endswith("success_rate"):
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("environment steps (incl. initial collection)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    seed_txt = "/".join(map(str, seeds))
    smooth_txt = f"; each run smoothed over its last {smooth} evaluations" if smooth > 1 else ""
    fig.suptitle(f"{fam}: {CI_METHOD}, {seed_txt} seeds per strategy{smooth_txt}", fontsize=10)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{fam}.{ext}"
        fig.savefig(p, dpi=130)
        paths.append(p)
    plt.close(fig)
    return paths


def plot_runs(paths, out, reps: int = 2000, echo=print, final_iterations: int = 1, smooth: int = 1) -> dict:
    if final_iterations < 1:
        raise ConfigError(f"--final-iterations must be >= 1 (got {final_iterations})")
    if smooth < 1:
        raise ConfigError(f"--smooth must be >= 1 (got {smooth})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p) for p in find_runs(paths)]
    unfinished = [str(r["dir"]) for r in runs if not r["finished"]]
    if unfinished:
        echo(f"warning: {len(unfinished)} of {len(runs)} runs have not finished (plotted as they are; "
             f"curves end at the shortest run): " + ", ".join(unfinished))
    grouped = group_runs(runs)
    files = []
    for fam, groups in grouped.items():
        files += plot_family(fam, groups, out, reps, smooth)
    rows = final_table(grouped, reps, final_iterations)
    files += list(write_tables(rows, out, final_iterations))
    for f in files:
        echo(f"wrote {f}")
    return {"files": files, "rows": rows, "grouped": grouped}
