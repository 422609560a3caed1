"""The command-line interface: tiny end-to-end runs, eval, and one-line errors for bad input."""
from __future__ import annotations

import json
import re

import pytest

from metarelabel import checkpoint as ckpt
from metarelabel.presets import make_config
from conftest import (FAMILIES, TINY_TRAIN_ARGS, assert_usage_error, read_csv, run_main, run_subprocess,
                      snapshot_tree)


def _metrics(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


# ---- training and evaluation -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_train_then_eval(family, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_main(["train", family, *TINY_TRAIN_ARGS, "--run-dir", run], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert "reserved" in out  # memory estimate printed at start
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["family"] == family and cfg["num_iterations"] == 2 and cfg["preset"] == "quick"
    assert cfg == make_config(family, "quick", {"num_iterations": 2, "num_train_steps_per_itr": 5}).to_dict()
    rows = read_csv(run / "progress.csv")
    assert len(rows) == 2
    assert [float(r["iteration"]) for r in rows] == [1.0, 2.0]
    steps = [float(r["env_steps"]) for r in rows]
    assert 0 < steps[0] < steps[1]
    n_train = {"four-corners": 4, "point-robot": 80, "sparse-point-robot": 80}[family]
    assert steps[0] >= cfg["num_initial_steps"] * n_train  # the x-axis includes the initial collection
    for key in ("losses/qf", "losses/vf", "losses/policy", "losses/kl", "meta_test/return",
                "meta_test/success_rate", "meta_test/return_by_trajectory_1"):
        assert key in rows[0], key
        assert all(re.fullmatch(r"-?[0-9.e+-]+", r[key]) for r in rows), key
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    pts = list((run / "checkpoints").glob("*.pt"))
    assert pts and all(p.with_suffix(".json").exists() for p in pts)
    assert any(p.name == "ckpt_000002.pt" for p in pts)
    last = [ln for ln in out.splitlines() if ln.startswith("done in ")]
    assert len(last) == 1 and "meta_test/return final" in last[0] and out.splitlines()[-1].startswith("next: metarelabel eval")

    code, out, err = run_main(["eval", run], capsys)
    assert code == 0, err
    m = _metrics(out)
    for key in ("meta_test/return", "meta_test/success_rate", "meta_test/return_by_trajectory_1", "iteration",
                "env_steps"):
        assert key in m, key
    assert int(m["iteration"]) == 2 and int(m["env_steps"]) == int(steps[1])
    ret = float(m["meta_test/return"])
    if family == "four-corners":
        assert -20 * 3 <= ret <= 0
    elif family == "point-robot":
        assert -60 <= ret <= 0
    else:
        assert 0 <= ret <= 20


@pytest.mark.parametrize("family", ["four-corners", "sparse-point-robot"])
def test_cpu_preset_runs(family, tmp_path, capsys):
    """The results preset trains end to end (shortened to one iteration of 5 gradient steps)."""
    run = tmp_path / "run"
    code, _, err = run_main(["train", family, "--preset", "cpu", "--relabel", "hfr", "--num-iterations", "1",
                             "--num-train-steps-per-itr", "5", "--progress", "off", "--no-tensorboard",
                             "--run-dir", run], capsys)
    assert code == 0, err
    rows = read_csv(run / "progress.csv")
    assert len(rows) == 1 and float(rows[0]["meta_test/num_trajectories"]) >= 20  # 400 eval steps, horizon 20


def test_eval_json_and_reproducible(quick_run, capsys):
    code, out, err = run_main(["eval", quick_run, "--json", "--eval-runs", "1", "--seed", "3"], capsys)
    assert code == 0, err
    a = json.loads(out)
    assert a["protocol"] == "pearl-online" and a["iteration"] == 2
    code, out, _ = run_main(["eval", quick_run, "--json", "--eval-runs", "1", "--seed", "3"], capsys)
    assert json.loads(out) == a


def test_eval_falls_back_when_newest_checkpoint_corrupt(run_copy, capsys):
    pts = sorted((run_copy / "checkpoints").glob("*.pt"))
    assert [p.name for p in pts] == ["ckpt_000001.pt", "ckpt_000002.pt"]
    data = bytearray(pts[-1].read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    pts[-1].write_bytes(bytes(data))
    code, out, err = run_main(["eval", run_copy], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    m = _metrics(out)
    assert "meta_test/return" in m and int(m["iteration"]) == 1
    assert "ckpt_000002" in err  # the skipped checkpoint is reported (on stderr)


def test_eval_json_stays_json_when_falling_back(run_copy, capsys):
    """Checkpoint-skip warnings go to stderr, so `eval --json` output stays machine-readable."""
    newest = sorted((run_copy / "checkpoints").glob("*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    code, out, err = run_main(["eval", run_copy, "--json"], capsys)
    assert code == 0
    assert json.loads(out)["iteration"] == 1
    assert "ckpt_000002" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["garbage", "truncate", "garbage-with-valid-checksum", "manifest-deleted"])
def test_eval_all_checkpoints_corrupt(run_copy, capsys, how):
    for pt in (run_copy / "checkpoints").glob("*.pt"):
        if how == "garbage":
            pt.write_bytes(b"not a checkpoint" * 100)
        elif how == "truncate":
            pt.write_bytes(pt.read_bytes()[:1000])
        elif how == "garbage-with-valid-checksum":  # passes the checksum, fails to load
            pt.write_bytes(b"\x00garbage" * 50)
            man = json.loads(pt.with_suffix(".json").read_text())
            man["sha256"] = ckpt._sha256(pt)
            pt.with_suffix(".json").write_text(json.dumps(man))
        else:
            pt.with_suffix(".json").unlink()
    code, out, err = run_main(["eval", run_copy], capsys)
    assert_usage_error(code, err, "checkpoint", allow_warnings=True)
    assert "ckpt_000001" in err and "ckpt_000002" in err  # each bad one is reported
    assert "meta_test/return" not in out


def test_eval_run_without_checkpoints(run_copy, capsys):
    for p in (run_copy / "checkpoints").iterdir():
        p.unlink()
    code, _, err = run_main(["eval", run_copy], capsys)
    assert_usage_error(code, err, "checkpoint")


def test_eval_not_a_run(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("hi")
    code, _, err = run_main(["eval", tmp_path], capsys)
    assert_usage_error(code, err, str(tmp_path))
    code, _, err = run_main(["eval", tmp_path / "does-not-exist"], capsys)
    assert_usage_error(code, err)


def test_eval_corrupt_config(run_copy, capsys):
    (run_copy / "config.json").write_text("{broken")
    code, _, err = run_main(["eval", run_copy], capsys)
    assert_usage_error(code, err, "config")


# ---- bad inputs to train -----------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["train", "no-such-family", "--preset", "quick"], "no-such-family"),
    (["train", "four-corners", "--preset", "nope"], "nope"),
    (["train", "four-corners", "--preset", "quick", "--no-such-option", "3"], "--no-such-option"),
    (["train", "four-corners", "--preset", "quick", "--num-iterations", "abc"], "num_iterations"),
    (["train", "four-corners", "--preset", "quick", "--num-iterations", "0"], "num_iterations"),
    (["train", "four-corners", "--preset", "quick", "--lr", "-1"], "lr"),
    (["train", "four-corners", "--preset", "quick", "--relabel", "magic"], "relabel"),
    (["train", "four-corners", "--preset", "quick", "--hardmax", "perhaps"], "hardmax"),
    (["train", "four-corners", "--preset", "quick", "--set", "nope=1"], "nope"),
    (["train", "four-corners", "--preset", "quick", "--set", "seed"], "--set"),
    (["train", "four-corners", "--preset", "quick", "--set", "seed=-2"], "seed"),
    (["train"], "family"),
    (["bogus-command"], "bogus-command"),
])
def test_train_bad_input(argv, needle, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_main([*argv, "--run-dir", run] if argv[0] == "train" and len(argv) > 1 else argv, capsys)
    assert_usage_error(code, err, needle)
    assert not run.exists()


def test_train_existing_run_dir_untouched(run_copy, capsys):
    before = snapshot_tree(run_copy)
    code, out, err = run_main(["train", "four-corners", *TINY_TRAIN_ARGS, "--run-dir", run_copy], capsys)
    assert_usage_error(code, err, "exists")
    assert snapshot_tree(run_copy) == before


def test_overwrite_refuses_non_run_directory(tmp_path, capsys):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.tex").write_text("do not delete")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_main(["train", "four-corners", *TINY_TRAIN_ARGS, "--run-dir", d, *extra], capsys)
        assert_usage_error(code, err)
        assert (d / "thesis.tex").read_text() == "do not delete"
        assert sorted(p.name for p in d.iterdir()) == ["thesis.tex"]


def test_overwrite_replaces_existing_run(run_copy, capsys):
    (run_copy / "marker").write_text("x")
    code, out, err = run_main(["train", "four-corners", *TINY_TRAIN_ARGS, "--run-dir", run_copy, "--overwrite",
                               "--no-tensorboard"], capsys)
    assert code == 0, err
    assert not (run_copy / "marker").exists()
    assert len(read_csv(run_copy / "progress.csv")) == 2


def test_config_and_envs_commands(capsys):
    code, out, err = run_main(["config", "four-corners", "--preset", "paper", "--seed", "4"], capsys)
    assert code == 0, err
    assert json.loads(out) == make_config("four-corners", "paper", {"seed": 4}).to_dict()
    code, out, err = run_main(["envs"], capsys)
    assert code == 0
    for f in FAMILIES:
        assert f in out
    code, _, err = run_main(["config", "four-corners", "--discount", "2"], capsys)
    assert_usage_error(code, err, "discount")


# ---- real processes: exit codes as a shell sees them -------------------------------------------
def test_subprocess_exit_codes(tmp_path):
    code, out, err = run_subprocess(["train", "no-such-family", "--run-dir", tmp_path / "r"])
    assert_usage_error(code, err, "no-such-family")
    code, out, err = run_subprocess(["eval", tmp_path])
    assert_usage_error(code, err)
    code, out, err = run_subprocess(["train", "four-corners", "--preset", "quick", "--num-iterations", "abc"],
                                    cwd=tmp_path)
    assert_usage_error(code, err, "num_iterations")


def test_subprocess_train_succeeds(tmp_path):
    run = tmp_path / "r"
    code, out, err = run_subprocess(["train", "point-robot", *TINY_TRAIN_ARGS, "--num-iterations", "1",
                                     "--no-tensorboard", "--run-dir", run])
    assert code == 0, err
    assert len(read_csv(run / "progress.csv")) == 1
    assert list((run / "checkpoints").glob("*.pt"))


def test_default_run_dir_never_reused(tmp_path, capsys):
    root = tmp_path / "runs"
    for _ in range(2):
        code, out, err = run_main(["train", "four-corners", *TINY_TRAIN_ARGS, "--num-iterations", "1",
                                   "--no-tensorboard", "--runs-root", root], capsys)
        assert code == 0, err
    runs = sorted(p for p in root.iterdir())
    assert len(runs) == 2
    assert runs[0].name == "four-corners-quick-none-s0"
    assert runs[1].name.startswith("four-corners-quick-none-s0-")
    for r in runs:
        assert len(read_csv(r / "progress.csv")) == 1
