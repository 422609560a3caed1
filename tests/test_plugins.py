"""Task families of your own: the contract checker, ``register_family`` and entry-point
plugins (the example in examples/line_goal.py, used as a user would)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import read_csv, run_main
from metarelabel.envs import REGISTRY, make_family, register_family
from metarelabel.envs.check import check_family
from metarelabel.errors import ConfigError
from metarelabel.presets import make_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def line_goal(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import line_goal

    yield line_goal.LineGoal
    REGISTRY.pop("line-goal", None)


@pytest.mark.parametrize("family", ["four-corners", "point-robot", "sparse-point-robot"])
def test_check_family_passes_for_builtin_families(family):
    summary = check_family(make_family(family), n_steps=120)
    assert summary["episodes"] >= 4


def test_check_family_passes_for_the_example_and_catches_broken_ones(line_goal):
    assert check_family(line_goal(), n_steps=120)["tasks"] == 15

    class OffByAStep(line_goal):  # step's reward disagrees with the batched reward
        def step(self, action):
            obs, r, term, trunc, info = super().step(action)
            return obs, r - 1e-9, term, trunc, info

    with pytest.raises(AssertionError, match="batched reward of task 0 differs"):
        check_family(OffByAStep(), n_steps=40)

    class NoTruncation(line_goal):  # runs past its horizon
        def step(self, action):
            obs, r, term, _, info = super().step(action)
            return obs, r, term, False, info

    with pytest.raises(AssertionError, match="past the horizon"):
        check_family(NoTruncation(), n_steps=60)

    class Unseeded(line_goal):  # task set not fixed by task_seed
        def make_tasks(self, rng):
            return np.random.default_rng().uniform(-1, 1, (15, 1))

    with pytest.raises(AssertionError, match="same tasks"):
        check_family(Unseeded())

    class ForgetfulState(line_goal):  # get_state misses the position
        def get_state(self):
            return {"np_random": self.np_random.bit_generator.state, "task": self._task}

        def set_state(self, state):
            self.np_random.bit_generator.state = state["np_random"]
            self._task = state["task"]

    with pytest.raises(AssertionError, match="following steps"):
        check_family(ForgetfulState(), n_steps=40)


def test_registered_family_trains_with_generic_and_own_presets(line_goal, tmp_path, capsys):
    register_family(line_goal)
    assert register_family(line_goal) is line_goal  # registering the same class again is harmless
    paper = make_config("line-goal", "paper")
    assert (paper.num_iterations, paper.reward_scale) == (50, 10.0)  # the class's own values
    assert (paper.max_path_length, paper.discount) == (20, 0.9)  # from the class
    assert make_config("line-goal", "quick").num_iterations == 2
    code, _, err = run_main(["train", "line-goal", "--preset", "quick", "--relabel", "hfr", "--run-dir",
                             tmp_path / "run", "--progress", "off", "--no-tensorboard"], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "run" / "progress.csv")
    assert len(rows) == 2 and np.isfinite(float(rows[-1]["meta_test/return"]))
    with pytest.raises(ConfigError, match="no preset 'cpu'.*paper, quick"):
        make_config("line-goal", "cpu")


def test_register_family_rejects_bad_classes(line_goal):
    with pytest.raises(ConfigError, match="not a subclass"):
        register_family(dict)

    class Clash(line_goal):
        name = "four-corners"

    with pytest.raises(ConfigError, match="already exists"):
        register_family(Clash)

    class NoHorizon(line_goal):
        name = "no-horizon"
        horizon = 0

    with pytest.raises(ConfigError, match="positive integer `horizon`"):
        register_family(NoHorizon)


def _plugin_dir(root: Path, target: str = "line_goal:LineGoal", name: str = "line-goal") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / "line_goal.py", root / "line_goal.py")
    dist = root / "line_goal_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: line-goal-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[metarelabel.families]\n{name} = {target}\n")
    return root


def _cli(args, plugin_root: Path, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(plugin_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "metarelabel", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_entry_point_plugin_works_in_every_command(tmp_path):
    plugins = _plugin_dir(tmp_path / "site")
    envs = _cli(["envs"], plugins, tmp_path)
    assert envs.returncode == 0 and "line-goal" in envs.stdout and "four-corners" in envs.stdout
    run = tmp_path / "run"
    train = _cli(["train", "line-goal", "--preset", "quick", "--relabel", "hfr", "--run-dir", str(run),
                  "--progress", "off", "--no-tensorboard"], plugins, tmp_path)
    assert train.returncode == 0, train.stderr
    assert json.loads((run / "config.json").read_text())["family"] == "line-goal"
    ev = _cli(["eval", str(run), "--json"], plugins, tmp_path)  # a new process finds the family again
    assert ev.returncode == 0, ev.stderr
    assert "meta_test/return" in json.loads(ev.stdout)


def test_broken_plugin_is_one_clear_line(tmp_path):
    plugins = _plugin_dir(tmp_path / "site", target="line_goal:NoSuchClass")
    res = _cli(["train", "line-goal", "--preset", "quick"], plugins, tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "plugin 'line-goal'" in res.stderr and "failed to load" in res.stderr
    # the built-in families do not need the plugin, also once the plugins were loaded
    assert _cli(["config", "four-corners", "--preset", "quick"], plugins, tmp_path).returncode == 0
    envs = _cli(["envs"], plugins, tmp_path)
    assert envs.returncode == 0 and "failed to load" in envs.stdout
    assert "didactic" in envs.stdout  # four-corners' row is intact


def test_plugin_cannot_shadow_a_builtin_family(tmp_path):
    plugins = _plugin_dir(tmp_path / "site", name="four-corners")
    envs = _cli(["envs"], plugins, tmp_path)
    assert envs.returncode == 0 and "'four-corners' is a built-in family" in envs.stderr
    row = next(line for line in envs.stdout.splitlines() if line.startswith("four-corners"))
    assert "didactic" in row  # still the built-in
