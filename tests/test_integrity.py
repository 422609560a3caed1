"""Run integrity: a run's data belong to one config and one writer; sweeps own their children;
every unwritable path or invalid value is one line."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_usage_error, read_csv, run_main, snapshot_tree
from metarelabel.presets import make_config
from metarelabel.rundir import RunLock, holder_pid
from metarelabel.sweep import expand, mismatches

QUICK = ["--preset", "quick", "--set", "num_iterations=2", "--set", "num_train_steps_per_itr=5",
         "--set", "checkpoint_every=1", "--no-tensorboard"]


def _train(run_dir, capsys, *extra):
    return run_main(["train", "four-corners", "--run-dir", run_dir, *QUICK, *extra], capsys)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    code = subprocess.run([sys.executable, "-m", "metarelabel", "train", "four-corners", "--run-dir", str(run), *QUICK],
                          capture_output=True, text=True).returncode
    assert code == 0
    return run


# ---- read-only places ---------------------------------------------------------------------------------
@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` unwritable: a read-only bind mount as root, chmod otherwise."""
    path = Path(path)
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
        ok = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip("running as root without permission to bind-mount read-only")
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)


def _files(root) -> dict[str, bytes]:
    """A run's files and contents, without the lock file (which holds the last writer's PID)."""
    return {k: v for k, v in snapshot_tree(root).items() if k != ".lock"}


def _copy(run, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_resume_on_a_read_only_run_is_one_line(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _files(run)
    with read_only(run):
        code, out, err = run_main(["resume", run], capsys)
    assert_usage_error(code, err, "cannot write to run directory")
    assert _files(run) == before


def test_overwrite_of_a_read_only_run_deletes_nothing(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _files(run)
    with read_only(run / "checkpoints"):  # the run dir itself writable, one folder below it not
        code, out, err = _train(run, capsys, "--overwrite")
    assert_usage_error(code, err, "cannot write to run directory", "checkpoints")
    assert _files(run) == before


def test_plot_out_and_sweep_root_read_only_are_one_line(finished_run, tmp_path, capsys):
    pytest.importorskip("rliable")
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        code, out, err = run_main(["plot", finished_run, "--out", ro / "plots", "--reps", "10"], capsys)
        assert_usage_error(code, err, "cannot create --out")
        code, out, err = run_main(["plot", finished_run, "--out", ro, "--reps", "10"], capsys)
        assert_usage_error(code, err, "cannot write to --out")
        code, out, err = run_main(["sweep", "--families", "four-corners", "--relabel", "none", "--seeds", "0",
                                   "--preset", "quick", "--root", ro], capsys)
        assert_usage_error(code, err, "cannot write to sweep root")
        code, out, err = run_main(["sweep", "--families", "four-corners", "--relabel", "none", "--seeds", "0",
                                   "--preset", "quick", "--root", ro / "sub"], capsys)
        assert_usage_error(code, err, "cannot create sweep root")
    assert not any(ro.iterdir())


@pytest.mark.parametrize("reps", ["0", "-5"])
def test_plot_reps_must_be_positive(finished_run, tmp_path, capsys, reps):
    pytest.importorskip("rliable")
    code, out, err = run_main(["plot", finished_run, "--out", tmp_path / "p", "--reps", reps], capsys)
    assert_usage_error(code, err, "--reps must be >= 1")


def test_losing_write_access_to_the_relabel_matrix_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    from metarelabel.trainer import Trainer

    def unwritable(self, it, m):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Trainer, "_write_matrix", unwritable)
    code, out, err = _train(tmp_path / "run", capsys, "--relabel", "hfr")
    assert_usage_error(code, err, "cannot write to run directory", "Permission denied", "metarelabel resume")


def test_results_summary_on_a_missing_folder_is_one_line(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "results_summary.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr


# ---- one config per run ---------------------------------------------------------------------------------
def _sweep_args(root, *extra):
    return ["sweep", "--families", "four-corners", "--relabel", "none,hfr", "--seeds", "0", "--preset", "cpu",
            "--root", root, *extra]


def test_sweep_refuses_a_root_holding_runs_of_another_config_and_changes_nothing(tmp_path, capsys):
    root = tmp_path / "sweep"
    for relabel in ("none", "hfr"):  # finished-looking runs of the quick preset
        run = root / "four-corners" / relabel / "s0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(make_config("four-corners", "quick", {"relabel": relabel}).to_json())
        (run / "run.json").write_text(json.dumps({"run_id": "x", "finished": "2026-01-01T00:00:00"}))
    before = _files(root)
    code, out, err = run_main(_sweep_args(root, "--set", "lr=0.001"), capsys)
    assert_usage_error(code, err, "2 run(s)", "made with another config", "preset", "lr", "quick->cpu",
                       "another --root", "--restart-mismatched")
    code, out, err = run_main(_sweep_args(root, "--dry-run"), capsys)
    assert_usage_error(code, err, "made with another config")
    assert "four-corners/hfr/s0: finished; made with another config (" in out
    assert _files(root) == before
    specs = expand(["four-corners"], ["none"], [0], "quick", str(root))
    assert mismatches(specs) == {}  # the same config is not a mismatch; run-only fields never are
    specs = expand(["four-corners"], ["none"], [0], "quick", str(root), fixed={"torch_threads": "2"})
    assert mismatches(specs) == {}


def test_resume_refuses_a_config_changed_since_the_checkpoint(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["lr"] = 0.123
    (run / "config.json").write_text(json.dumps(cfg))
    before = _files(run)
    code, out, err = run_main(["resume", run], capsys)
    assert_usage_error(code, err, "differs from the config its checkpoint was made with", "lr 0.0003->0.123",
                       allow_warnings=True)
    assert _files(run) == before


def test_resume_continues_a_run_made_before_newer_fields_existed(finished_run, tmp_path, capsys):
    """A checkpoint and config.json written before ``keep_initial_encoder_data`` and
    ``relabel_truncate`` existed: the run behaved as their defaults do, so it resumes."""
    import metarelabel.checkpoint as ckpt

    run = _copy(finished_run, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    body = ckpt.load_latest(run / "checkpoints", run_id=meta["run_id"])
    for f in ("keep_initial_encoder_data", "relabel_truncate"):
        del body["payload"]["config"][f]
    ckpt.save(run / "checkpoints", body["iteration"], body["payload"], keep=5, run_id=meta["run_id"])
    cfg = json.loads((run / "config.json").read_text())
    del cfg["keep_initial_encoder_data"], cfg["relabel_truncate"]
    (run / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_main(["resume", run, "--num-iterations", "3"], capsys)
    assert code == 0, err
    rows = (run / "progress.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3


def test_sweep_dry_run_validates_the_device(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_main(_sweep_args(tmp_path / "s", "--set", "device=cuda", "--dry-run"), capsys)
    assert_usage_error(code, err, "cuda requested but torch sees no CUDA device")


# ---- one writer per run -------------------------------------------------------------------------------
def test_a_second_writer_fails_at_once_naming_the_holder(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _files(run)
    with RunLock(run):
        assert holder_pid(run) == os.getpid()
        t0 = time.perf_counter()
        code, out, err = run_main(["resume", run], capsys)
        assert_usage_error(code, err, "is in use by another metarelabel process", f"PID {os.getpid()}")
        code, out, err = _train(run, capsys, "--overwrite")
        assert_usage_error(code, err, "is in use by another metarelabel process", f"PID {os.getpid()}")
        assert time.perf_counter() - t0 < 30  # fails fast: no training started
    assert holder_pid(run) is None
    assert _files(run) == before


def test_a_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = f"from metarelabel.rundir import RunLock; import time; l = RunLock({str(run)!r}); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert holder_pid(run) == proc.pid
    proc.kill()
    proc.wait()
    assert holder_pid(run) is None
    RunLock(run).release()


def test_failed_sweep_run_prints_its_last_error_line_and_log(tmp_path, capsys):
    root = tmp_path / "sweep"
    spec = expand(["four-corners"], ["none"], [0], "quick", str(root), fixed={"num_iterations": "1"})[0]
    spec.run_dir.mkdir(parents=True)
    with RunLock(spec.run_dir):  # the run is "in use": its train process fails at once
        code, out, err = run_main(["sweep", "--families", "four-corners", "--relabel", "none", "--seeds", "0",
                                   "--preset", "quick", "--set", "num_iterations=1", "--root", root], capsys)
    assert code == 1
    line = next(ln for ln in out.splitlines() if "failed (2)" in ln)
    assert f"in use by another metarelabel process (PID {os.getpid()})" in line
    assert f"(log {root / 'four-corners' / 'none' / 's0.log'})" in line


# ---- a sweep owns its children -----------------------------------------------------------------------------
SLOW = ["--set", "num_iterations=6", "--set", "num_train_steps_per_itr=60", "--set", "checkpoint_every=1"]


def _sweep_cmd(root):
    return [sys.executable, "-m", "metarelabel", "sweep", "--families", "four-corners", "--relabel", "none,hfr",
            "--seeds", "0", "--preset", "quick", "--root", str(root), "--workers", "2", *SLOW]


def _rows(path):
    return len(read_csv(path)) if path.exists() else 0


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_ref")
    assert subprocess.run(_sweep_cmd(root), capture_output=True).returncode == 0
    return root


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_sweep_stops_its_runs_and_the_rerun_continues_exactly(tmp_path, uninterrupted, sig):
    root = tmp_path / "sweep"
    driver = subprocess.Popen(_sweep_cmd(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [root / "four-corners" / r / "s0" for r in ("none", "hfr")]
    deadline = time.time() + 120
    while not all(_rows(r / "progress.csv") >= 2 for r in runs):
        assert time.time() < deadline and driver.poll() is None, "the sweep did not get going"
        time.sleep(0.2)
    driver.send_signal(sig)
    out = driver.communicate(timeout=60)[0]
    if sig == signal.SIGTERM:
        assert driver.returncode == 130
        assert "sweep stopped" in out and "stopped (resumable)" in out
    deadline = time.time() + 30  # with -9 the children notice their parent is gone
    while any(holder_pid(r) for r in runs):
        assert time.time() < deadline, "a run kept going after its sweep died"
        time.sleep(0.2)
    sizes = [(r / "progress.csv").stat().st_size for r in runs]
    time.sleep(1.0)
    assert [(r / "progress.csv").stat().st_size for r in runs] == sizes  # nobody writes any more
    assert not all(json.loads((r / "run.json").read_text()).get("finished") for r in runs)
    proc = subprocess.run(_sweep_cmd(root), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in runs:
        rows = read_csv(r / "progress.csv")
        assert [int(x["iteration"]) for x in rows] == list(range(1, 7))
        ref = read_csv(uninterrupted / "four-corners" / r.parent.name / "s0" / "progress.csv")
        assert _strip(rows) == _strip(ref)

