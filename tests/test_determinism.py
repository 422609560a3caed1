"""Same seed -> identical progress.csv (apart from wall-clock columns); another seed -> different."""
from __future__ import annotations

import shutil

import pytest

from conftest import read_csv, run_main

ARGS = ["--preset", "quick", "--num-iterations", "2", "--progress", "off", "--no-tensorboard"]


def _train(capsys, run_dir, family, seed, *extra):
    code, out, err = run_main(["train", family, *ARGS, "--seed", str(seed), "--run-dir", run_dir, *extra], capsys)
    assert code == 0, err
    return read_csv(run_dir / "progress.csv")


def _strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("family,extra", [
    ("four-corners", []),
    ("sparse-point-robot", ["--num-train-steps-per-itr", "10"]),
    ("four-corners", ["--relabel", "hfr", "--num-train-steps-per-itr", "10"]),
    ("four-corners", ["--relabel", "hfr", "--num-train-steps-per-itr", "10", "--context-trajectories", "3"]),
])
def test_same_seed_identical_progress(tmp_path, capsys, family, extra):
    a = _train(capsys, tmp_path / "a", family, 7, *extra)
    b = _train(capsys, tmp_path / "b", family, 7, *extra)
    assert len(a) == len(b) == 2
    assert list(a[0]) == list(b[0])  # same columns in the same order
    assert any(k.startswith("time/") for k in a[0])
    sa, sb = _strip_time(a), _strip_time(b)
    for i, (ra, rb) in enumerate(zip(sa, sb)):
        diff = {k: (ra[k], rb[k]) for k in ra if ra[k] != rb[k]}
        assert not diff, f"row {i} differs: {diff}"
    # the relabel matrix is part of the run's output too
    ma, mb = tmp_path / "a" / "relabel_matrix.csv", tmp_path / "b" / "relabel_matrix.csv"
    assert ma.read_text() == mb.read_text()

    c = _train(capsys, tmp_path / "c", family, 8, *extra)
    sc = _strip_time(c)
    assert sc != sa
    loss_keys = [k for k in sa[0] if k.startswith("losses/")]
    assert loss_keys and any(sa[i][k] != sc[i][k] for i in range(2) for k in loss_keys)


def test_in_process_equals_fresh_process(tmp_path, capsys):
    """No hidden global state: a run in this (already busy) process equals one in a fresh one."""
    from conftest import run_subprocess

    a = _train(capsys, tmp_path / "a", "point-robot", 3, "--num-train-steps-per-itr", "10")
    code, _, err = run_subprocess(["train", "point-robot", *ARGS, "--seed", "3", "--run-dir", tmp_path / "b",
                                   "--num-train-steps-per-itr", "10"])
    assert code == 0, err
    assert _strip_time(a) == _strip_time(read_csv(tmp_path / "b" / "progress.csv"))


@pytest.mark.parametrize("device_buffers,extra", [
    ("off", []), ("on", []), ("off", ["--kl-target", "0.5"]), ("on", ["--context-trajectories", "3"]),
    pytest.param("off", ["--grad-step", "compiled"], marks=pytest.mark.skipif(
        not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a C++ compiler")),
])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, capsys, device_buffers, extra):
    """Resuming from the iteration-1 checkpoint reproduces the uninterrupted run exactly (with
    the device mirror, rebuilt from the loaded host buffers, too; with a tuned KL weight, whose
    value and Adam state the checkpoint carries; with the compiled step, compiled again by the
    resumed run)."""
    run = tmp_path / "run"
    full = _train(capsys, run, "point-robot", 5, "--num-iterations", "3", "--num-train-steps-per-itr", "5",
                  "--checkpoint-every", "1", "--keep-checkpoints", "3", "--device-buffers", device_buffers, *extra)
    if "--kl-target" in extra:  # the tuned weight moved in every iteration
        lams = [float(r["train/kl_lambda"]) for r in full]
        assert len(set(lams)) == 3
    full_matrix = (run / "relabel_matrix.csv").read_text()
    for p in (run / "checkpoints").iterdir():
        if not p.name.startswith("ckpt_000001."):
            p.unlink()
    code, out, err = run_main(["resume", run, "--progress", "off", "--no-tensorboard"], capsys)
    assert code == 0, err
    assert "iteration 1" in out
    resumed = read_csv(run / "progress.csv")
    assert len(resumed) == 3  # rows 2 and 3 were dropped and written again, once each
    assert _strip_time(resumed) == _strip_time(full)
    assert (run / "relabel_matrix.csv").read_text() == full_matrix


@pytest.mark.parametrize("family,extra", [
    ("four-corners", ["--relabel", "hfr", "--num-train-steps-per-itr", "10"]),
    ("four-corners", ["--relabel", "hfr", "--learned-reward", "true", "--num-train-steps-per-itr", "10"]),
    ("sparse-point-robot", ["--num-train-steps-per-itr", "10", "--rl-reward", "dense", "--use-next-obs-in-context"]),
])
def test_device_buffers_give_the_same_run(tmp_path, capsys, family, extra):
    """Minibatches gathered from the device mirror (``--device-buffers on``; here the device is
    the CPU) are the host's rows at the same indices: the run is identical."""
    rows = {}
    for mode in ("off", "on"):
        code, out, err = run_main(["train", family, *ARGS, "--seed", "5", "--run-dir", tmp_path / mode,
                                   "--device-buffers", mode, *extra], capsys)
        assert code == 0, err
        assert ("device mirror on cpu" in out) == (mode == "on")  # the mirror was used, or not
        rows[mode] = _strip_time(read_csv(tmp_path / mode / "progress.csv"))
    assert rows["off"] == rows["on"]
