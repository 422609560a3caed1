"""A small learning test: PEARL must actually learn the dense point robot.  Marked slow (about a
minute on 2 cores); run with `pytest -m slow`."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import read_csv, run_main


@pytest.mark.slow
def test_pearl_learns_point_robot(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_main([
        "train", "point-robot", "--preset", "paper", "--run-dir", run, "--no-tensorboard", "--progress", "off",
        "--num-iterations", "10", "--hidden-dim", "128", "--encoder-hidden-dim", "128", "--batch-size", "128",
        "--embedding-batch-size", "64", "--num-train-steps-per-itr", "200", "--eval-runs", "2",
        "--num-eval-train-tasks", "0", "--checkpoint-every", "0"], capsys)
    assert code == 0, err
    ret = np.array([float(r["meta_test/return"]) for r in read_csv(run / "progress.csv")])
    # a random policy scores about -20 to -25 (20 steps at about 1 to 1.2 from the goal)
    assert ret[0] < -18
    assert ret[-3:].mean() > ret[0] + 5, ret
