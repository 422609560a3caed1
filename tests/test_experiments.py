"""Sweeps (local pool and Ray) and the plotting statistics (IQM, stratified-bootstrap CIs)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import read_csv
from metarelabel.errors import ConfigError
from metarelabel.presets import make_config
from metarelabel.sweep import RunSpec, expand, run_local, run_state

pytest.importorskip("rliable", reason="plot tests need the plot extra: pip install metarelabel[plot]")
from metarelabel.plot import (  # noqa: E402
    curves, final_scores, find_runs, group_runs, iqm_ci, load_run, plot_runs, trailing_mean,
)


def direct_iqm(x) -> float:
    x = np.sort(np.asarray(x, np.float64))
    k = int(np.floor(0.25 * len(x)))
    return float(x[k: len(x) - k].mean())


def direct_bootstrap_ci(x, reps=20000, seed=1):
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    stats = [direct_iqm(x[rng.integers(0, len(x), len(x))]) for _ in range(reps)]
    return np.percentile(stats, [2.5, 97.5])


def fake_run(root, relabel, seed, returns, success, steps=None, finished=True, iterations=None, extra=None):
    """A run directory of the quick preset; ``extra`` maps more progress columns to their values."""
    run = root / relabel / f"s{seed}"
    run.mkdir(parents=True)
    if finished:
        (run / "run.json").write_text(json.dumps({"finished": "2026-01-01T00:00:00"}))
    cfg = make_config("four-corners", "quick", {"relabel": relabel, "seed": seed})
    (run / "config.json").write_text(cfg.to_json())
    steps = steps or [100 * (i + 1) for i in range(len(returns))]
    extra = extra or {}
    lines = [",".join(["iteration", "env_steps", "meta_test/return", "meta_test/success_rate", *extra])]
    its = iterations or range(1, len(returns) + 1)
    lines += [",".join(map(repr, [i, s, r, p, *(col[k] for col in extra.values())]))
              for k, (i, s, r, p) in enumerate(zip(its, steps, returns, success))]
    (run / "progress.csv").write_text("\n".join(lines) + "\n")
    return run


def test_iqm_equals_direct_computation_and_ci_matches_direct_bootstrap():
    x = np.array([3.0, -1.0, 7.5, 2.0, 2.5, 10.0, 0.5, 4.0])
    m, lo, hi = iqm_ci(x[:, None], reps=4000)
    assert m[0] == pytest.approx(direct_iqm(x), abs=1e-12)
    assert m[0] == pytest.approx(np.mean([2.0, 2.5, 3.0, 4.0]))  # middle half by hand
    dlo, dhi = direct_bootstrap_ci(x)
    assert lo[0] == pytest.approx(dlo, abs=0.35) and hi[0] == pytest.approx(dhi, abs=0.35)
    assert lo[0] < m[0] < hi[0]


def test_iqm_ci_over_many_points_equals_rliable_point_by_point():
    # the curves' IQM is computed for all points in one vectorized call; it must equal rliable's
    # aggregate_iqm applied point by point, estimate and CI, under the same bootstrap draws
    from rliable import library as rly
    from rliable import metrics

    y = np.random.default_rng(3).random((7, 6))
    y[:, 2] = 0.5  # ties
    y[[1, 4], 3] = y[0, 3]
    m, lo, hi = iqm_ci(y, reps=300, seed=5)

    def per_point(x):
        return np.array([metrics.aggregate_iqm(x[..., i]) for i in range(x.shape[-1])])

    np.random.seed(5)
    point, interval = rly.get_interval_estimates({"x": y[:, None, :]}, per_point, reps=300)
    np.testing.assert_allclose(m, point["x"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(lo, interval["x"][0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi, interval["x"][1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m, [direct_iqm(y[:, j]) for j in range(6)], rtol=0, atol=1e-12)
    assert np.all(lo <= m) and np.all(m <= hi) and np.any(lo < hi)


def test_identical_seeds_give_a_degenerate_interval():
    m, lo, hi = iqm_ci(np.full((5, 3), 0.75), reps=500)
    np.testing.assert_allclose(m, 0.75)
    np.testing.assert_allclose(lo, 0.75)
    np.testing.assert_allclose(hi, 0.75)


def test_plot_runs_curves_and_final_table(tmp_path):
    rng = np.random.default_rng(0)
    finals = {"hfr": [0.9, 0.7, 0.8, 1.0, 0.6], "none": [0.1, 0.2, 0.0, 0.3, 0.2]}
    for relabel, vals in finals.items():
        for seed, v in enumerate(vals):
            ret = list(rng.normal(-15, 1, 4)) + [-10.0 * (1 - v)]
            succ = [0.0, 0.1, 0.2, 0.3, v]
            # env steps differ per seed (early termination): x is their mean per iteration
            fake_run(tmp_path / "runs", relabel, seed, ret, succ, steps=[100 * (i + 1) + seed for i in range(5)])
    out = tmp_path / "plots"
    res = plot_runs([tmp_path / "runs"], out, reps=2000, echo=lambda *a: None)
    for name in ("four-corners.png", "four-corners.pdf", "final_performance.csv", "final_performance.md"):
        assert (out / name).stat().st_size > 0
    rows = {r["strategy"]: r for r in res["rows"]}
    assert set(rows) == {"hfr", "none"}
    for relabel, vals in finals.items():
        r = rows[relabel]
        assert r["seeds"] == 5
        assert r["meta_test/success_rate IQM"] == pytest.approx(direct_iqm(vals))
        assert r["meta_test/success_rate mean"] == pytest.approx(np.mean(vals))
        dlo, dhi = direct_bootstrap_ci(vals)
        assert r["meta_test/success_rate CI low"] == pytest.approx(dlo, abs=0.05)
        assert r["meta_test/success_rate CI high"] == pytest.approx(dhi, abs=0.05)
    md = (out / "final_performance.md").read_text()
    assert "IQM" in md and "| four-corners | hfr | 5 |" in md
    group = res["grouped"]["four-corners"]["hfr"]
    its, x, y = curves(group, "meta_test/success_rate")
    np.testing.assert_array_equal(its, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(x, [100 * (i + 1) + 2 for i in range(5)])  # mean of seeds 0..4 offsets
    assert y.shape == (5, 5)


def test_final_window_averages_the_last_iterations(tmp_path):
    # eval every 2nd iteration (NaN between): the last 4 iterations hold evaluations 0.5 and 1.0
    fake_run(tmp_path, "hfr", 0, [-5.0, math.nan, -4.0, math.nan, -2.0, math.nan, -1.0],
             [0.0, math.nan, 0.25, math.nan, 0.5, math.nan, 1.0])
    fake_run(tmp_path, "hfr", 1, [-5.0, math.nan, -4.0, math.nan, -3.0, math.nan, -3.0],
             [0.0, math.nan, 0.0, math.nan, 0.0, math.nan, 0.5])
    grouped = group_runs([load_run(p) for p in find_runs([tmp_path])])
    group = grouped["four-corners"]["hfr"]
    np.testing.assert_allclose(final_scores(group, "meta_test/success_rate"), [1.0, 0.5])
    np.testing.assert_allclose(final_scores(group, "meta_test/success_rate", 4), [0.75, 0.25])
    np.testing.assert_allclose(final_scores(group, "meta_test/return", 100), [-3.0, -3.75])
    res = plot_runs([tmp_path], tmp_path / "out", reps=200, echo=lambda *a: None, final_iterations=4)
    assert res["rows"][0]["meta_test/success_rate mean"] == pytest.approx(0.5)
    assert "last 4 iterations" in (tmp_path / "out" / "final_performance.md").read_text()
    with pytest.raises(ConfigError, match="final-iterations"):
        plot_runs([tmp_path], tmp_path / "out", final_iterations=0)
    with pytest.raises(ConfigError, match="smooth"):
        plot_runs([tmp_path], tmp_path / "out", smooth=0)


def test_final_window_is_anchored_on_the_last_evaluation(tmp_path):
    # an interrupted run: the last rows have no evaluation; the window ends at iteration 4
    fake_run(tmp_path, "hfr", 0, [-5.0, -4.0, -3.0, -2.0, math.nan, math.nan], [0.0, 0.25, 0.5, 1.0, math.nan, math.nan])
    group = group_runs([load_run(p) for p in find_runs([tmp_path])])["four-corners"]["hfr"]
    np.testing.assert_allclose(final_scores(group, "meta_test/success_rate", 2), [0.75])
    np.testing.assert_allclose(final_scores(group, "meta_test/return", 3), [-3.0])


def test_plot_leaves_out_unfinished_runs_or_cuts_all_at_a_common_budget(tmp_path):
    fake_run(tmp_path, "hfr", 0, [-2.0, -1.0, -1.0], [0.5, 1.0, 1.0])
    fake_run(tmp_path, "none", 0, [-2.0, -1.0, -1.0], [0.0, 0.25, 0.25])
    fake_run(tmp_path, "hfr", 1, [-2.0, -1.5], [0.25, 0.75], finished=False)
    lines = []
    res = plot_runs([tmp_path], tmp_path / "out", reps=100, echo=lines.append)
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and "1 unfinished run(s) left out" in warnings[0]
    assert str(tmp_path / "hfr" / "s1") in warnings[0] and str(tmp_path / "hfr" / "s0") not in warnings[0]
    rows = {r["strategy"]: r for r in res["rows"]}
    assert rows["hfr"]["seeds"] == 1 and rows["hfr"]["meta_test/success_rate mean"] == 1.0
    assert "left out, not finished: s1 (hfr)" in (tmp_path / "out" / "final_performance.md").read_text()
    # included: every run of the family is cut at iteration 2, the last all of them reached
    res = plot_runs([tmp_path], tmp_path / "out2", reps=100, echo=lines.append, include_unfinished=True)
    rows = {r["strategy"]: r for r in res["rows"]}
    assert rows["hfr"]["seeds"] == 2 and rows["hfr"]["cut_at_iteration"] == 2
    assert rows["hfr"]["meta_test/success_rate mean"] == pytest.approx((1.0 + 0.75) / 2)
    assert rows["hfr"]["env_steps"] == 200
    assert "cut at iteration 2" in (tmp_path / "out2" / "final_performance.md").read_text()


def test_plot_refuses_a_progress_file_with_repeated_or_backward_iterations(tmp_path):
    fake_run(tmp_path, "hfr", 0, [-2.0] * 4, [0.0] * 4, iterations=[1, 3, 2, 4])  # two writers interleaved
    with pytest.raises(ConfigError, match=r"iterations repeat or go backwards \(row 3: 3 then 2\)"):
        plot_runs([tmp_path], tmp_path / "out", reps=10)
    shutil.rmtree(tmp_path / "hfr")
    fake_run(tmp_path, "hfr", 0, [-2.0] * 3, [0.0] * 3, iterations=[1, 2, 2])
    with pytest.raises(ConfigError, match="repeat"):
        plot_runs([tmp_path], tmp_path / "out", reps=10)


@pytest.mark.parametrize("reps", [0, -5])
def test_plot_rejects_non_positive_reps(tmp_path, reps):
    fake_run(tmp_path, "hfr", 0, [-2.0], [0.0])
    with pytest.raises(ConfigError, match="--reps must be >= 1"):
        plot_runs([tmp_path], tmp_path / "out", reps=reps)


def test_strategy_colour_is_fixed_and_few_seeds_are_flagged(tmp_path, monkeypatch):
    import matplotlib.axes

    from metarelabel import plot as plot_mod

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: drawn.append((k.get("label"), k.get("color"))) or real_plot(self, *a, **k))
    texts = []
    real_text = matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.figure.Figure, "text", lambda self, x, y, t, **k: texts.append(t) or real_text(self, x, y, t, **k))
    fake_run(tmp_path / "a", "none", 0, [-2.0], [0.0])
    plot_runs([tmp_path / "a"], tmp_path / "out_a", reps=10, echo=lambda *a: None)
    fake_run(tmp_path / "b", "hfr", 0, [-2.0], [0.0])
    fake_run(tmp_path / "b", "none", 0, [-2.0], [0.0])
    plot_runs([tmp_path / "b"], tmp_path / "out_b", reps=10, echo=lambda *a: None)
    colors = {}
    for label, color in drawn:
        colors.setdefault(label.split(" ")[0], set()).add(color)
    assert colors == {"none": {plot_mod.STRATEGY_COLORS["none"]}, "hfr": {plot_mod.STRATEGY_COLORS["hfr"]}}
    assert any("fewer than 3 seeds" in t and "none (1)" in t for t in texts)


def test_probability_of_improvement_over_none_equals_the_direct_count(tmp_path):
    hfr, none = [0.9, 0.5, 0.8, 0.3, 0.6], [0.1, 0.5, 0.0, 0.4, 0.2]
    for relabel, vals in (("hfr", hfr), ("none", none)):
        for seed, v in enumerate(vals):
            fake_run(tmp_path, relabel, seed, [-10.0], [v])
    res = plot_runs([tmp_path], tmp_path / "out", reps=2000, echo=lambda *a: None)
    rows = {r["strategy"]: r for r in res["rows"]}
    # P(X > Y) = (#pairs x > y + 0.5 #ties) / (n_x n_y)
    direct = sum((x > y) + 0.5 * (x == y) for x in hfr for y in none) / 25
    key = "meta_test/success_rate P(>none)"
    assert rows["hfr"][key] == pytest.approx(direct)
    assert rows["hfr"][key + " CI low"] < direct < rows["hfr"][key + " CI high"] <= 1.0
    assert key not in rows["none"]
    md = (tmp_path / "out" / "final_performance.md").read_text()
    assert f"{direct:.2f} [" in md


def test_trailing_mean_smoothing():
    y = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 6.0, 0.0, 0.0]])
    np.testing.assert_allclose(trailing_mean(y, 3), [[1.0, 1.5, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(trailing_mean(y, 1), y)
    np.testing.assert_allclose(trailing_mean(y, 10)[:, -1], y.mean(1))


def test_grouping_labels_differing_fields(tmp_path):
    a = fake_run(tmp_path, "hfr", 0, [-1.0], [0.0])
    b = tmp_path / "other"
    shutil.copytree(a, b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["keep_original_prob"] = 0.25
    (b / "config.json").write_text(json.dumps(cfg))
    grouped = group_runs([load_run(p) for p in find_runs([tmp_path])])
    assert sorted(grouped["four-corners"]) == ["hfr keep_original_prob=0.25", "hfr keep_original_prob=0.5"]


SWEEP_SET = {"num_iterations": "2", "num_train_steps_per_itr": "5", "checkpoint_every": "1"}


def _specs(root, relabels=("none", "hfr")):
    return expand(["four-corners"], list(relabels), [0], "quick", str(root), fixed=SWEEP_SET)


def test_local_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path):
    specs = _specs(tmp_path)
    assert [s.run_dir.relative_to(tmp_path).as_posix() for s in specs] == ["four-corners/none/s0", "four-corners/hfr/s0"]
    msgs = []
    res = run_local(specs, workers=2, echo=msgs.append)
    assert sorted(r["status"] for r in res) == ["done", "done"], res
    assert all(run_state(s.run_dir) == "finished" for s in specs)
    assert "2/2 runs (2 done)" in msgs[-1]
    reference = read_csv(specs[1].run_dir / "progress.csv")

    # interrupt the hfr run after iteration 1: no finished mark, no checkpoint 2, extra row left behind
    run = specs[1].run_dir
    meta = json.loads((run / "run.json").read_text())
    meta.pop("finished")
    (run / "run.json").write_text(json.dumps(meta))
    for f in (run / "checkpoints").glob("ckpt_000002.*"):
        f.unlink()
    assert run_state(run) == "resumable"
    res = run_local(specs, workers=2, echo=msgs.append)
    assert sorted(r["status"] for r in res) == ["resumed", "skipped"], res
    after = read_csv(run / "progress.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(after) == strip(reference)


def test_sweep_rejects_bad_values_before_running(tmp_path):
    from metarelabel.errors import ConfigError

    with pytest.raises(ConfigError, match="num_iterations"):
        expand(["four-corners"], ["hfr"], [0], "quick", str(tmp_path), grid={"num_iterations": ["2", "-1"]})
    with pytest.raises(ConfigError, match="seed"):
        expand(["four-corners"], ["hfr"], [0], "quick", str(tmp_path), grid={"seed": ["1"]})
    assert not any(tmp_path.iterdir())


def test_grid_expansion_names_runs_by_value(tmp_path):
    specs = expand(["four-corners"], ["hfr"], [0, 1], "quick", str(tmp_path), grid={"keep_original_prob": ["0.25", "0.75"]})
    assert len(specs) == 4
    assert {s.run_dir.parent.name for s in specs} == {"hfr-keep_original_prob=0.25", "hfr-keep_original_prob=0.75"}
    assert isinstance(specs[0], RunSpec)


def test_sweep_order_is_seed_major(tmp_path):
    specs = expand(["four-corners", "point-robot"], ["none", "hfr"], [0, 1], "quick", str(tmp_path))
    assert [(s.seed, s.family, s.relabel) for s in specs] == [
        (0, "four-corners", "none"), (0, "four-corners", "hfr"), (0, "point-robot", "none"), (0, "point-robot", "hfr"),
        (1, "four-corners", "none"), (1, "four-corners", "hfr"), (1, "point-robot", "none"), (1, "point-robot", "hfr")]


@pytest.mark.ray
def test_ray_backend_on_a_local_two_cpu_instance(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install metarelabel[ray])")
    from metarelabel.sweep import run_ray

    specs = _specs(tmp_path)
    res = run_ray(specs, address=None, num_cpus=2, echo=lambda *a: None)
    assert sorted(r["status"] for r in res) == ["done", "done"], res
    assert all(run_state(s.run_dir) == "finished" for s in specs)


def test_hovering_path_and_didactic_figure(tmp_path, capsys):
    from conftest import run_main
    from metarelabel.didactic import hovering_path
    from metarelabel.envs import make_family

    env = make_family("four-corners")
    for quadrant in range(4):
        p = hovering_path(env, quadrant)
        R = env.reward(p.infos, np.arange(4))[0].sum(1)
        # one step to (0.1, 0.1) on the square's open edge (-1), then 19 steps inside it (-3) under its
        # own task; -1 per step under the others
        assert R[quadrant] == -1 - 3 * 19
        assert all(R[k] == -20 for k in range(4) if k != quadrant)
        assert np.all(np.sign(p.infos["pos"][2:]) == np.sign(env.tasks[quadrant]))
    run = tmp_path / "run"
    code, out, err = run_main(["train", "four-corners", "--preset", "quick", "--num-iterations", "2",
                               "--num-train-steps-per-itr", "5", "--run-dir", run, "--no-tensorboard",
                               "--progress", "off"], capsys)
    assert code == 0, err
    code, out, err = run_main(["didactic", run, "--out", tmp_path / "fig.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.pdf").stat().st_size > 0
    qs = {line.split(" q:")[0].strip(): line for line in out.splitlines() if " q:" in line}
    assert set(qs) == {"HFR", "HIPI"}
    code, out, err = run_main(["didactic", tmp_path / "nope"], capsys)
    assert code == 2 and "Traceback" not in err


def test_results_runs_are_not_git_ignored():
    """The per-seed files behind docs/results.md must be committable (`runs/` is ignored elsewhere)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    probe = ["docs/results/runs/four-corners/hfr/s0/progress.csv", "docs/results/pilots/x/s0/config.json"]
    proc = subprocess.run(["git", "-C", str(root), "check-ignore", *probe], capture_output=True, text=True)
    assert proc.stdout.strip() == "", f"ignored: {proc.stdout}"
    proc = subprocess.run(["git", "-C", str(root), "check-ignore", "runs/x/progress.csv", "src/runs/a"],
                          capture_output=True, text=True)
    assert len(proc.stdout.split()) == 2  # run directories elsewhere stay ignored


def test_plot_groups_runs_written_before_a_config_field_existed_with_its_default(tmp_path):
    """A config.json without a field added later (here ``context_trajectories``) groups with
    runs that have the field's default, and apart from runs that set it."""
    from metarelabel.plot import find_runs, group_runs, load_run

    old = fake_run(tmp_path / "a", "hfr", 0, [1.0], [0.5])
    cfg = json.loads((old / "config.json").read_text())
    del cfg["context_trajectories"]
    (old / "config.json").write_text(json.dumps(cfg))
    fake_run(tmp_path / "b", "hfr", 1, [1.0], [0.5])
    new = fake_run(tmp_path / "c", "hfr", 2, [1.0], [0.5])
    cfg = json.loads((new / "config.json").read_text())
    cfg["context_trajectories"] = 3
    (new / "config.json").write_text(json.dumps(cfg))
    groups = group_runs([load_run(p) for p in find_runs([tmp_path])])["four-corners"]
    assert {k: len(v) for k, v in groups.items()} == {"hfr context_trajectories=0": 2, "hfr context_trajectories=3": 1}


def test_first_goal_reports_each_runs_first_goal_iteration_and_its_rank_correlation(tmp_path):
    pytest.importorskip("scipy")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "first_goal.py"
    root = tmp_path / "runs" / "four-corners"
    nan = float("nan")
    # early finders score high, late ones low: a perfect negative rank correlation
    fake_run(root, "hfr", 0, [0] * 4, [0, 0.5, 0.9, 0.9], extra={"collect/success_rate": [0, 0.1, 0.2, 0.3]})
    fake_run(root, "hfr", 1, [0] * 4, [0, 0, 0.5, 0.5], extra={"collect/success_rate": [0, 0, 0.06, 0.3]})
    # never above 0.05 (first = 5); evaluated every other iteration: its last 2 iterations hold one evaluation
    fake_run(root, "none", 0, [0] * 4, [nan, 0.02, nan, 0.1], extra={"collect/success_rate": [0, 0, 0, 0.04]})
    proc = subprocess.run([sys.executable, str(script), str(root), "--final-iterations", "2", "--compare", "hfr,none"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(seeds 0,1): [2, 3], median 2.5; final [0.9, 0.5]" in out
    assert "(seeds 0): [5], median 5; final [0.1]" in out
    assert "over 3 runs: -1.00" in out
    assert "median first iteration 2.5 vs 5 (2 and 1 runs)" in out
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
