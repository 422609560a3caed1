"""Sample-efficiency curves and final-performance tables across seeds (rliable's interquartile
mean with 95% stratified-bootstrap confidence intervals), one colour per strategy.

    metarelabel plot RUN_DIRS... [--out DIR] [--reps 2000] [--final-iterations K] [--smooth W]
                                 [--include-unfinished]

Runs are found recursively (a directory with config.json and progress.csv); they are grouped by
family and by strategy (relabel, plus any other config field that differs within a family).
Curves are aligned on the iteration; the x-axis is the mean over seeds of ``env_steps`` at that
iteration.  The final performance of a run is the mean of its evaluated values in its last K
iterations (``--final-iterations``, default 1: the last evaluation).

Honesty rules: a progress.csv whose iterations repeat or go backwards (two writers) is refused;
runs that have not finished are left out (named in a note on the figure and in the table) unless
``--include-unfinished``, which cuts every run of the family at the last iteration all of them
reached and says so; each strategy has one colour in every figure; the number of seeds is on
the figure, with a warning below 3.  The table also gives rliable's probability of improvement
P(X > none) of each strategy over ``none`` (same other settings) with its 95% bootstrap CI.
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
#: one colour per strategy in every figure (tab10); other strategies get one from the rest by name
STRATEGY_COLORS = {"hfr": "#1f77b4", "hfr-bellman": "#17becf", "hipi": "#ff7f0e", "hipi-q": "#8c564b",
                   "random": "#7f7f7f", "none": "#d62728"}
_SPARE_COLORS = ("#2ca02c", "#9467bd", "#e377c2", "#bcbd22")
_STYLES = ("-", "--", ":", "-.")
MIN_SEEDS = 3
BASELINE = "none"


def strategy_color(label: str) -> str:
    base = label.split(" ")[0]
    if base in STRATEGY_COLORS:
        return STRATEGY_COLORS[base]
    return _SPARE_COLORS[sum(map(ord, base)) % len(_SPARE_COLORS)]


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


def config_with_defaults(cfg: dict) -> dict:
    """A run's config.json with the fields added after it was written filled in (the value
    such a run has: ``LEGACY_DEFAULTS``, else the field's default), so that runs of different
    versions group by what they computed."""
    import dataclasses

    from .config import LEGACY_DEFAULTS, Config

    full = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    return {**full, **LEGACY_DEFAULTS, **cfg}


def load_run(run_dir: Path) -> dict:
    cfg = config_with_defaults(json.loads((run_dir / "config.json").read_text()))
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
    its = cols.get("iteration", np.zeros(0))
    if len(its) > 1 and not np.all(np.diff(its) > 0):
        bad = int(np.argmax(np.diff(its) <= 0)) + 1
        raise ConfigError(f"{run_dir / 'progress.csv'}: iterations repeat or go backwards (row {bad + 1}: "
                          f"{int(its[bad - 1])} then {int(its[bad])}), as when two processes wrote one run; "
                          "not plotted (re-run that run)")
    meta_path = run_dir / "run.json"
    try:
        finished = meta_path.exists() and bool(json.loads(meta_path.read_text()).get("finished"))
    except json.JSONDecodeError:
        finished = False
    return {"dir": run_dir, "config": cfg, "cols": cols, "finished": finished}


def cut_at(run: dict, last_iteration: int) -> dict:
    """The run with its progress rows after ``last_iteration`` dropped."""
    keep = run["cols"]["iteration"] <= last_iteration
    return {**run, "cols": {k: v[keep] for k, v in run["cols"].items()}}


def group_runs(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """family -> strategy label -> runs.  The label is ``relabel`` plus every other config field
    (except seed, run-only fields) that differs between runs of the family."""
    from .config import RUN_ONLY_FIELDS

    ignore = {"seed", *RUN_ONLY_FIELDS}
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
    import scipy.stats
    from rliable import library as rly

    scores = np.asarray(scores, np.float64)
    data = {"x": scores[:, None, :]}  # [runs, tasks=1, points]

    def func(x):  # rliable's aggregate_iqm (a 25% trimmed mean over runs and tasks) for every point at once
        return scipy.stats.trim_mean(x.reshape(-1, x.shape[-1]), proportiontocut=0.25, axis=0)

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


def improvement_ci(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0):
    """rliable's probability of improvement P(X > Y) of final scores ``x`` over ``y`` (one
    task) with a 95% stratified-bootstrap CI.  Returns (p, lower, upper)."""
    _need("rliable")
    from rliable import library as rly
    from rliable import metrics

    data = {"xy": [np.asarray(x, np.float64)[:, None], np.asarray(y, np.float64)[:, None]]}
    np.random.seed(seed)  # as in iqm_ci
    point, interval = rly.get_interval_estimates(
        data, lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps=reps)
    return float(point["xy"][0]), float(interval["xy"][0][0]), float(interval["xy"][1][0])


def baseline_of(label: str, labels) -> str | None:
    """The ``none`` group with the same other settings as ``label`` (None if absent or itself)."""
    base, _, rest = label.partition(" ")
    cand = BASELINE + (" " + rest if rest else "")
    if base == BASELINE or cand not in labels:
        return None
    return cand


def final_table(grouped, reps: int, window: int = 1, budgets: dict | None = None) -> list[dict]:
    rows = []
    for fam, groups in grouped.items():
        for label, group in groups.items():
            row = {"family": fam, "strategy": label, "seeds": len(group),
                   "env_steps": int(np.mean([g["cols"]["env_steps"][-1] for g in group])),
                   "final_iterations": int(window)}
            if budgets and fam in budgets:
                row["cut_at_iteration"] = budgets[fam]
            base = baseline_of(label, groups)
            for metric, _ in METRICS:
                s = final_scores(group, metric, window)
                if len(s):
                    m, lo, hi = iqm_ci(s[:, None], reps)
                    row.update({f"{metric} IQM": float(m[0]), f"{metric} CI low": float(lo[0]),
                                f"{metric} CI high": float(hi[0]), f"{metric} mean": float(s.mean())})
                    b = final_scores(groups[base], metric, window) if base else np.zeros(0)
                    if len(b):
                        p, plo, phi = improvement_ci(s, b, reps)
                        row.update({f"{metric} P(>{BASELINE})": p, f"{metric} P(>{BASELINE}) CI low": plo,
                                    f"{metric} P(>{BASELINE}) CI high": phi})
            rows.append(row)
    return rows


def write_tables(rows: list[dict], out: Path, window: int = 1, notes: list[str] = ()) -> tuple[Path, Path]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, md_path = out / "final_performance.csv", out / "final_performance.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)
    final = "the last evaluation" if window == 1 else f"the mean of the evaluations in the last {window} iterations"
    lines = [f"Final performance ({CI_METHOD}); value [95% CI] across seeds; a run's score is {final}. "
             f"P(> {BASELINE}): rliable's probability of improvement over `{BASELINE}` with the same other "
             "settings, on the success rate, [95% CI].", "",
             f"| family | strategy | seeds | env steps | meta-test return | meta-test success rate | P(> {BASELINE}), success |",
             "|---|---|---|---|---|---|---|"]
    succ = "meta_test/success_rate"
    for r in rows:
        cells = []
        for metric, _ in METRICS:
            if f"{metric} IQM" in r:
                cells.append(f"{r[f'{metric} IQM']:.3f} [{r[f'{metric} CI low']:.3f}, {r[f'{metric} CI high']:.3f}]")
            else:
                cells.append("n/a")
        key = f"{succ} P(>{BASELINE})"
        cells.append(f"{r[key]:.2f} [{r[key + ' CI low']:.2f}, {r[key + ' CI high']:.2f}]" if key in r else "")
        seeds = f"{r['seeds']}" + (" (few)" if r["seeds"] < MIN_SEEDS else "")
        lines.append(f"| {r['family']} | {r['strategy']} | {seeds} | {r['env_steps']:,} | {' | '.join(cells)} |")
    lines += [""] + [f"Note: {n}" for n in notes]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_family(fam: str, groups: dict[str, list[dict]], out: Path, reps: int, smooth: int = 1,
                notes: list[str] = ()) -> list[Path]:
    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    few = [f"{label} ({len(g)})" for label, g in groups.items() if len(g) < MIN_SEEDS]
    notes = list(notes) + ([f"WARNING: fewer than {MIN_SEEDS} seeds for {', '.join(few)}: "
                            "the bands are not meaningful confidence intervals"] if few else [])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 3.8 + 0.28 * len(notes)))
    seeds = sorted({len(g) for g in groups.values()})
    per_base: dict[str, int] = defaultdict(int)
    styles = {}
    for label in groups:  # variants of one strategy share its colour and differ in line style
        base = label.split(" ")[0]
        styles[label] = _STYLES[per_base[base] % len(_STYLES)]
        per_base[base] += 1
    for ax, (metric, title) in zip(np.atleast_1d(axes), METRICS):
        for label, group in groups.items():
            cur = curves(group, metric, smooth)
            if cur is None:
                continue
            _, x, y = cur
            m, lo, hi = iqm_ci(y, reps)
            color = strategy_color(label)
            ax.plot(x, m, color=color, ls=styles[label], label=f"{label} (n={len(group)})", lw=1.8)
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        if metric.endswith("success_rate"):
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("environment steps (incl. initial collection)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    seed_txt = "/".join(map(str, seeds))
    smooth_txt = f"; each run smoothed over its last {smooth} evaluations" if smooth > 1 else ""
    fig.suptitle(f"{fam}: {CI_METHOD}, {seed_txt} seed{'' if seeds == [1] else 's'} per strategy{smooth_txt}", fontsize=10)
    height = fig.get_figheight()
    for i, note in enumerate(notes):  # one line each, below the axes
        fig.text(0.01, (0.08 + 0.28 * i) / height, note, fontsize=7.5,
                 color="#b00000" if note.startswith("WARNING") else "#333333")
    fig.tight_layout(rect=(0, (0.1 + 0.28 * len(notes)) / height, 1, 1))
    paths = []
    try:
        for ext in ("png", "pdf"):
            p = out / f"{fam}.{ext}"
            fig.savefig(p, dpi=130)
            paths.append(p)
    except OSError as exc:
        raise ConfigError(f"cannot write {out / fam}.*: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return paths


def plot_runs(paths, out, reps: int = 2000, echo=print, final_iterations: int = 1, smooth: int = 1,
              include_unfinished: bool = False) -> dict:
    if final_iterations < 1:
        raise ConfigError(f"--final-iterations must be >= 1 (got {final_iterations})")
    if smooth < 1:
        raise ConfigError(f"--smooth must be >= 1 (got {smooth})")
    if reps < 1:
        raise ConfigError(f"--reps must be >= 1 (got {reps})")
    out = Path(out)
    runs = [load_run(p) for p in find_runs(paths)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out}: {exc.strerror}") from None
    from .rundir import probe_writable

    probe_writable(out, "--out")
    notes: dict[str, list[str]] = defaultdict(list)
    budgets: dict[str, int] = {}
    unfinished = [r for r in runs if not r["finished"]]
    if unfinished and not include_unfinished:
        runs = [r for r in runs if r["finished"]]
        for r in unfinished:
            notes[r["config"]["family"]].append(f"left out, not finished: {r['dir'].name} ({r['config']['relabel']})")
        echo(f"warning: {len(unfinished)} unfinished run(s) left out (--include-unfinished plots them at a "
             "common budget): " + ", ".join(str(r["dir"]) for r in unfinished))
        if not runs:
            raise ConfigError("no finished runs to plot (use --include-unfinished to plot runs in progress)")
    elif unfinished:
        for fam in {r["config"]["family"] for r in unfinished}:
            fam_runs = [r for r in runs if r["config"]["family"] == fam]
            budgets[fam] = int(min(r["cols"]["iteration"].max() for r in fam_runs if len(r["cols"].get("iteration", ()))))
            notes[fam].append(f"{sum(r['config']['family'] == fam for r in unfinished)} unfinished run(s) included; "
                              f"every run cut at iteration {budgets[fam]}, the last one all runs reached")
        runs = [cut_at(r, budgets[r["config"]["family"]]) if r["config"]["family"] in budgets else r for r in runs]
        echo("warning: unfinished runs included; " + "; ".join(f"{f}: all runs cut at iteration {b}"
                                                              for f, b in budgets.items()))
    grouped = group_runs(runs)
    files = []
    for fam, groups in grouped.items():
        files += plot_family(fam, groups, out, reps, smooth, notes.get(fam, []))
    rows = final_table(grouped, reps, final_iterations, budgets)
    try:
        files += list(write_tables(rows, out, final_iterations, [n for ns in notes.values() for n in ns]))
    except OSError as exc:
        raise ConfigError(f"cannot write the tables to {out}: {exc.strerror}") from None
    for f in files:
        echo(f"wrote {f}")
    return {"files": files, "rows": rows, "grouped": grouped}
