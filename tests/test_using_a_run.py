"""Using a run: time estimates and summaries, extending a run, evaluating a chosen checkpoint,
the trained agent in Python (load_agent, export), rendering, provenance."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TRAIN_ARGS, assert_usage_error, read_csv, run_main, run_subprocess

import metarelabel
from metarelabel.evaluation import evaluate_run

ROOT = Path(__file__).resolve().parents[1]


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_non_tty_output_has_estimates_eta_and_a_summary(tmp_path):
    code, out, err = run_subprocess(["train", "four-corners", *TINY_TRAIN_ARGS, "--run-dir", tmp_path / "run",
                                     "--no-tensorboard"])
    assert code == 0, err
    assert re.search(r"^estimate: \S+ for 2 iterations of gradient steps alone \([\d.]+ ms per lean step x 5 per "
                     r"iteration on cpu;.*the last checkpoint will be about [\d.]+ \w+", out, re.M), out
    assert re.search(r"^iter 1/2 \|.*\| \d+s elapsed, eta \d+s$", out, re.M), out
    assert re.search(r"^estimated time to finish: \d+s \([\d.]+ s per iteration, 1 to go\)$", out, re.M), out
    assert re.search(r"^done in \d+s \(this process\): [\d,]+ env steps, iteration 2; meta_test/success_rate final "
                     r"[\d.]+ \(best [\d.]+ at iteration \d\); meta_test/return final", out, re.M), out
    assert f"next: metarelabel eval {tmp_path / 'run'}" in out and "metarelabel plot" in out


def test_slow_presets_warn_at_start(tmp_path, monkeypatch):
    from metarelabel.trainer import Trainer

    monkeypatch.setattr(Trainer, "time_gradient_step", lambda self, steps=2: 10.0)  # a very slow machine
    lines = []
    from metarelabel.presets import make_config

    cfg = make_config("four-corners", "quick", {"num_iterations": 1, "num_train_steps_per_itr": 1000})
    tr = Trainer(cfg, tmp_path, echo=lines.append, tensorboard=False)
    tr.start()
    tr.initial_collection()
    tr.initial_done = True
    total, line = tr.time_estimate()
    assert total == pytest.approx(10.0 * 1000)
    tr.echo(line)
    monkeypatch.setattr(Trainer, "run_iteration", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    warn = [ln for ln in lines if ln.startswith("warning: this run will take about")]
    assert warn and "2h46m" in warn[0] and "--preset cpu" in warn[0], lines


def test_time_estimate_leaves_the_run_unchanged(tmp_path):
    """Timing gradient steps on a copy must not change the run's networks or random streams."""
    from metarelabel.presets import make_config
    from metarelabel.trainer import Trainer

    cfg = make_config("four-corners", "quick", {"num_iterations": 2, "num_train_steps_per_itr": 5})
    rows = []
    for timed in (False, True):
        tr = Trainer(cfg, tmp_path / f"r{timed}", echo=lambda *a: None, tensorboard=False)
        (tmp_path / f"r{timed}").mkdir()
        tr.start()
        tr.initial_collection()
        tr.initial_done = True
        if timed:
            tr.time_estimate()
        rows.append({k: v for k, v in tr.run_iteration().items() if not k.startswith("time/")})
    assert rows[0] == rows[1]


def test_resume_extends_a_finished_run_exactly(run_copy, tmp_path, capsys):
    code, out, err = run_main(["resume", run_copy, "--num-iterations", "4", "--progress", "off", "--no-tensorboard"],
                              capsys)
    assert code == 0, err
    assert "from iteration 2 of 4" in out
    extended = read_csv(run_copy / "progress.csv")
    assert [int(r["iteration"]) for r in extended] == [1, 2, 3, 4]
    assert json.loads((run_copy / "config.json").read_text())["num_iterations"] == 4
    meta = json.loads((run_copy / "run.json").read_text())
    assert meta["extended"][0]["from"] == 2 and meta["extended"][0]["to"] == 4 and meta["finished"]
    ref = tmp_path / "ref"
    code, out, err = run_main(["train", "four-corners", *TINY_TRAIN_ARGS, "--num-iterations", "4",
                               "--checkpoint-every", "1", "--run-dir", ref], capsys)
    assert code == 0, err
    assert _strip(extended) == _strip(read_csv(ref / "progress.csv"))
    code, out, err = run_main(["resume", run_copy, "--num-iterations", "3"], capsys)
    assert_usage_error(code, err, "--num-iterations 3 is below the 4 iterations")


def test_eval_uses_the_named_checkpoint(quick_run, capsys):
    code, out, err = run_main(["eval", quick_run, "--checkpoint", "1"], capsys)
    assert code == 0, err
    assert f"checkpoint: {quick_run / 'checkpoints' / 'ckpt_000001.pt'} (iteration 1)" in out
    assert re.search(r"^iteration\s+1$", out, re.M)
    m = evaluate_run(quick_run, checkpoint=str(quick_run / "checkpoints" / "ckpt_000002.pt"))
    assert m["iteration"] == 2
    code, out, err = run_main(["eval", quick_run, "--checkpoint", "7"], capsys)
    assert_usage_error(code, err, "no checkpoint of iteration 7", "available: 1, 2")


def test_eval_loads_a_checkpoint_without_manifest_with_a_warning(quick_run, tmp_path, capsys):
    lone = tmp_path / "lone.pt"
    shutil.copy(quick_run / "checkpoints" / "ckpt_000002.pt", lone)
    code, out, err = run_main(["eval", quick_run, "--checkpoint", lone], capsys)
    assert code == 0, err
    assert "no manifest" in err and "iteration 2" in out


def _protocol_returns(agent, tasks, runs, seed):
    """The meta-test protocol driven through the adapt/act interface: the mean last return."""
    env = agent.make_env()
    env.reset(seed=seed)
    finals = []
    for t in tasks:
        for _ in range(runs):
            finals.append(agent.run_task(env, int(t))[-1]["return"])
    return float(np.mean(finals))


def test_load_agent_reproduces_eval(quick_run):
    m = evaluate_run(quick_run, seed=7, rollouts="sequential")
    agent = metarelabel.load_agent(quick_run, seed=7)
    env = agent.make_env()
    assert _protocol_returns(agent, env.eval_tasks, agent.cfg.eval_runs, 7) == pytest.approx(m["meta_test/return"])
    mean, var = agent.posterior()
    assert mean.shape == var.shape == (agent.pearl.dims.latent,) and np.all(var > 0)


def test_load_agent_observe_and_posterior_by_hand(quick_run):
    agent = metarelabel.load_agent(quick_run, checkpoint=1)
    assert agent.info["iteration"] == 1
    env = agent.make_env()
    env.set_task(2)
    obs, _ = env.reset(seed=0)
    prior_mean, prior_var = agent.posterior()
    np.testing.assert_array_equal(prior_mean, 0)
    np.testing.assert_array_equal(prior_var, 1)
    a = agent.act(obs)
    assert env.action_space.contains(a.astype(np.float32))
    nxt, r, *_ , info = env.step(a)
    agent.observe(obs, a, r, nxt, info)
    mean, var = agent.posterior()
    with __import__("torch").no_grad():  # the same context through the networks directly
        ctx = np.concatenate([obs, agent._current["actions"][0], [r]]).astype(np.float32)[None, None]
        mu, v = agent.pearl.infer_posterior(__import__("torch").as_tensor(ctx))
    np.testing.assert_allclose(mean, mu[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(var, v[0].numpy(), rtol=1e-6)


def test_export_round_trip_is_small_and_equal(quick_run, tmp_path, capsys):
    out = tmp_path / "agent.pt"
    code, stdout, err = run_main(["export", quick_run, "--out", out], capsys)
    assert code == 0, err
    ckpt = quick_run / "checkpoints" / "ckpt_000002.pt"
    assert out.stat().st_size < ckpt.stat().st_size / 2
    a = metarelabel.load_agent(quick_run, seed=3)
    b = metarelabel.load_agent(out, seed=3)
    assert b.info["iteration"] == 2 and b.info["source"]["run_dir"] == str(quick_run)
    env = a.make_env()
    assert _protocol_returns(a, env.eval_tasks, 1, 3) == _protocol_returns(b, env.eval_tasks, 1, 3)
    code, stdout, err = run_main(["export", quick_run, "--out", tmp_path / "x.pt", "--checkpoint", "9"], capsys)
    assert_usage_error(code, err, "no checkpoint of iteration 9")


def test_example_script_runs(quick_run):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "adapt.py"), str(quick_run)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "meta-test return" in proc.stdout and "equals metarelabel eval" in proc.stdout


def test_render_a_planar_family(quick_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fc.png"
    code, stdout, err = run_main(["render", quick_run, "--task", "1", "--out", out], capsys)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    code, stdout, err = run_main(["render", quick_run, "--task", "9"], capsys)
    assert_usage_error(code, err, "--task 9", "4 eval tasks")


@pytest.mark.mujoco
def test_render_a_mujoco_family(tmp_path, capsys):
    pytest.importorskip("mujoco")
    imageio = pytest.importorskip("imageio.v2")
    run = tmp_path / "cv"
    code, out, err = run_main(["train", "cheetah-vel", "--preset", "quick", "--num-iterations", "1",
                               "--num-train-steps-per-itr", "2", "--max-path-length", "30", "--eval-steps", "60", "--progress", "off",
                               "--no-tensorboard", "--run-dir", run], capsys)
    assert code == 0, err
    gif = tmp_path / "cv.gif"
    code, out, err = run_main(["render", run, "--out", gif], capsys)
    assert code == 0, err
    frames = list(imageio.get_reader(gif))
    assert len(frames) >= 30 and frames[0].shape[2] == 3
    assert np.std(frames[len(frames) // 2]) > 10  # a drawn scene, not a blank frame


def test_version_and_provenance(quick_run, capsys):
    code, out, err = run_main(["--version"], capsys)
    assert code == 0
    assert out.startswith(f"metarelabel {metarelabel.__version__}")
    meta = json.loads((quick_run / "run.json").read_text())
    for key in ("metarelabel", "python", "torch", "numpy", "device", "device_name", "platform"):
        assert meta[key], key
    if meta["git"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"]) and isinstance(meta["git"]["dirty"], bool)
        assert meta["git"]["commit"][:12] in out


def test_readme_synopsis_lists_every_option():
    """Every subcommand and long option of the CLI appears in the README's command synopsis."""
    from metarelabel.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        lines = [ln for ln in block.splitlines()]
        start = next((i for i, ln in enumerate(lines) if ln.startswith(f"metarelabel {name}")), None)
        if start is None:
            missing.append(name)
            continue
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("metarelabel ")), len(lines))
        text = "\n".join(lines[start:end])
        config_flags = set()
        if name in ("train", "config"):  # the config fields: documented as `--FIELD VALUE`
            config_flags = {f"--{f.replace('_', '-')}" for f in metarelabel.config.FIELDS} | {
                f"--{f}" for f in metarelabel.config.FIELDS}
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt not in ("--help",) and opt not in config_flags and opt not in text:
                    missing.append(f"{name} {opt}")
    assert not missing, f"README synopsis misses: {missing}"


def test_sweep_prints_starts_progress_and_eta(tmp_path):
    from metarelabel.sweep import expand, run_local

    specs = expand(["four-corners"], ["none", "hfr"], [0], "quick", str(tmp_path),
                   fixed={"num_iterations": "2", "num_train_steps_per_itr": "5"})
    lines = []
    run_local(specs, workers=1, echo=lines.append, heartbeat=0.3)
    assert any(ln.startswith("start four-corners/none/s0 (new; log ") for ln in lines), lines
    first = next(ln for ln in lines if ln.startswith("[1/2]"))
    assert re.search(r"\| 1/2 runs done, \d+s elapsed, eta \d+s$", first), first
    assert any(re.fullmatch(r"sweep: [01]/2 runs done, \d+s elapsed(, eta \d+s)?", ln) for ln in lines), lines


def test_sweep_progress_counts_only_finished_runs_and_drops_the_eta_when_stopping():
    """A stopped sweep accounts for runs it never started: they are not "done", and an ETA
    for them would be meaningless."""
    from metarelabel.sweep import Progress

    p = Progress(total=4, echo=lambda *_: None, workers=2)
    p.done = [{"status": "done", "seconds": 60.0}, {"status": "skipped", "seconds": 0.0}]
    assert re.fullmatch(r"2/4 runs done, \d+s elapsed, eta 1m00s", p.status()), p.status()
    p.done += [{"status": "stopped (resumable)", "seconds": 30.0}, {"status": "not started", "seconds": 0.0}]
    assert re.fullmatch(r"2/4 runs done, \d+s elapsed", p.status()), p.status()


def test_sweep_parent_never_imports_the_trainer():
    """The sweep's own process must not import the training code while its runs go on: an
    import after the source changed on disk mixes two versions of the package (a sweep of
    hours crashed that way).  Its status and summary lines use only light modules."""
    code = ("import sys; from metarelabel.sweep import Progress, expand; "
            "p = Progress(total=2, echo=lambda *_: None); "
            "p.update({'label': 'x', 'status': 'done', 'seconds': 5.0, 'run_dir': '.', 'log': 'x.log'}); "
            "p.status(); p.summary(); expand(['four-corners'], ['hfr'], [0], 'quick', 'runs'); "
            "bad = sorted(m for m in sys.modules if m in ('metarelabel.trainer', 'metarelabel.pearl')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
