"""Reliability: exact resume after SIGKILL, checkpoint corruption and write failures, input
validation (property-based), NaN guard, unwritable run directories."""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_usage_error, read_csv, run_main, run_subprocess
from metarelabel import checkpoint as ckpt
from metarelabel.config import FIELDS
from metarelabel.errors import CheckpointError, RunDirError, TrainingDiverged
from metarelabel.presets import make_config
from metarelabel.trainer import Trainer, load_trainer, prepare_run_dir

RUN_ARGS = ["train", "four-corners", "--preset", "quick", "--relabel", "hfr", "--num-iterations", "6",
            "--checkpoint-every", "2", "--keep-checkpoints", "3", "--num-train-steps-per-itr", "40",
            "--progress", "off"]


def _strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _assert_same_outputs(a, b):
    ra, rb = read_csv(a / "progress.csv"), read_csv(b / "progress.csv")
    assert [r["iteration"] for r in rb] == [str(i) for i in range(1, 7)]
    assert _strip_time(ra) == _strip_time(rb)
    assert (a / "relabel_matrix.csv").read_text() == (b / "relabel_matrix.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    code, out, err = run_subprocess([*RUN_ARGS, "--run-dir", run_dir])
    assert code == 0, err
    return run_dir


def _rows(path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def test_sigkill_mid_iteration_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen([sys.executable, "-m", "metarelabel", *RUN_ARGS, "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    # iteration 3 has been logged (checkpoint exists for 2): iteration 4 is in progress
    while _rows(run_dir / "progress.csv") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _rows(run_dir / "progress.csv") < 6
    code, out, err = run_subprocess(["resume", run_dir, "--progress", "off"])
    assert code == 0, err
    _assert_same_outputs(uninterrupted, run_dir)


def test_resume_falls_back_past_truncated_and_corrupt_checkpoints(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in paths] == ["ckpt_000002.pt", "ckpt_000004.pt", "ckpt_000006.pt"]
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # truncated
    raw = bytearray(paths[1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    paths[1].write_bytes(bytes(raw))
    code, out, err = run_subprocess(["resume", run_dir, "--progress", "off"])
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "ckpt_000006" in warnings[0] and "ckpt_000004" in warnings[1]
    assert all("checksum mismatch" in w for w in warnings)
    assert "from iteration 2" in out
    _assert_same_outputs(uninterrupted, run_dir)


def test_foreign_checkpoint_is_rejected(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    with pytest.raises(CheckpointError, match="another run"):
        ckpt.load_file(ckpt.list_checkpoints(run_dir / "checkpoints")[-1], run_id="someone-else")
    manifest = ckpt.list_checkpoints(run_dir / "checkpoints")[-1].with_suffix(".json")
    manifest.write_text(manifest.read_text().replace(f'"version": {ckpt.VERSION}', '"version": 99'))
    with pytest.raises(CheckpointError, match="format version 99"):
        ckpt.load_file(manifest.with_suffix(".pt"))


def _trainer(tmp_path, **overrides):
    cfg = make_config("four-corners", "quick", dict(num_iterations=3, num_train_steps_per_itr=3, **overrides))
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, overwrite=False).release()
    tr = Trainer(cfg, run_dir, echo=lambda *a: None, tensorboard=False)
    tr.start()
    return tr


def test_write_failure_during_checkpoint_keeps_previous_loadable(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.initial_collection()
    tr.run_iteration()
    good = tr.save_checkpoint()
    good_bytes = good.read_bytes()
    real_save = torch.save

    def failing_save(obj, fh, *a, **k):
        fh.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    tr.run_iteration()
    with pytest.raises(RunDirError, match="No space left on device.*previous checkpoint is intact"):
        tr.save_checkpoint()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    files = sorted(p.name for p in (tr.run_dir / "checkpoints").iterdir())
    assert files == ["ckpt_000001.json", "ckpt_000001.pt"], files  # no temporary or partial file left
    assert good.read_bytes() == good_bytes
    body = ckpt.load_latest(tr.run_dir / "checkpoints", run_id=tr.run_id)
    assert body["iteration"] == 1


def test_disk_full_while_logging_is_a_clear_error(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, checkpoint_every=1)
    calls = {"n": 0}
    real_dump = tr.logger.dump

    def dump(step):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dump(step)

    monkeypatch.setattr(tr.logger, "dump", dump)
    with pytest.raises(RunDirError, match="No space left on device.*last good checkpoint is intact"):
        tr.train()
    body = ckpt.load_latest(tr.run_dir / "checkpoints", run_id=tr.run_id)
    assert body["iteration"] == 1


def test_unwritable_run_dir_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, out, err = run_main(["train", "four-corners", "--preset", "quick", "--run-dir", blocker / "run"], capsys)
    assert_usage_error(code, err, "cannot write to run directory")


@pytest.mark.parametrize("where", ["loss", "utility"])
def test_nan_guard_stops_saves_failed_checkpoint_and_explains(tmp_path, monkeypatch, where):
    tr = _trainer(tmp_path, relabel="hfr", keep_original_prob=0.0)
    tr.initial_collection()
    tr.run_iteration()
    tr.save_checkpoint()
    if where == "loss":
        real = tr.agent.update

        def update(batch, context):
            out = real(batch, context)
            out["losses/qf"] = torch.tensor(float("nan"))
            return out

        monkeypatch.setattr(tr.agent, "update", update)
        quantity = "losses/qf"
    else:
        monkeypatch.setattr(tr.relabeler, "utilities", lambda paths: np.full((len(paths), 4), np.inf))
        quantity = "relabel/utility"
    with pytest.raises(TrainingDiverged) as info:
        tr.train()
    msg = str(info.value)
    assert quantity in msg and "iteration 2" in msg
    failed = ckpt.load_file(tr.run_dir / "checkpoints" / "ckpt_000002.pt")
    assert failed["failed"] is True
    # resume ignores the failed checkpoint and uses the last good one
    trainer, body = load_trainer(tr.run_dir)
    assert body["iteration"] == 1 and trainer.iteration == 1


# ---- property-based validation ---------------------------------------------------------------------
INVALID_COUNT = {"n": 0}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _invalid_values(f: dataclasses.Field):
    tp = f.type if isinstance(f.type, str) else f.type.__name__
    meta = f.metadata
    bad_text = st.sampled_from(["abc", "", "1x", "--", "nan?", "[1]", "0x10", "one"])
    options = [bad_text]
    if tp == "int":
        options.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not float(x).is_integer()).map(repr))
        if meta.get("lo") is not None:
            options.append(st.integers(max_value=int(meta["lo"]) - (0 if meta.get("lo_open") else 1), min_value=-10**12).map(str))
        if meta.get("hi") is not None:
            options.append(st.integers(min_value=int(meta["hi"]) + 1, max_value=10**12).map(str))
    elif tp == "float":
        options.append(st.sampled_from(["nan", "inf", "-inf"]))
        if meta.get("lo") is not None:
            lo = meta["lo"]
            below = st.floats(max_value=lo, min_value=-1e12, allow_nan=False, exclude_max=not meta.get("lo_open"))
            options.append(below.map(repr))
        if meta.get("hi") is not None:
            options.append(st.floats(min_value=meta["hi"], max_value=1e12, exclude_min=True).map(repr))
    elif tp == "bool":
        options = [st.sampled_from(["maybe", "2", "tru", "yes please", "-1"])]
    elif meta.get("choices"):
        options.append(st.text(min_size=1, max_size=12).filter(lambda s: s.strip() not in meta["choices"] and not s.startswith("-")))
    return st.one_of(*options)


FIELD_NAMES = [n for n in FIELDS if n not in ("family", "preset")]


@st.composite
def invalid_override(draw):
    name = draw(st.sampled_from(FIELD_NAMES))
    return name, draw(_invalid_values(FIELDS[name]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid_override())
def test_every_invalid_override_is_rejected_naming_the_field(capsys, override):
    name, value = override
    INVALID_COUNT["n"] += 1
    code, out, err = run_main(["config", "four-corners", "--preset", "quick", f"{_flag(name)}={value}"], capsys)
    assert_usage_error(code, err, name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FIELD_NAMES), st.integers(min_value=-5, max_value=5000))
def test_any_numeric_override_is_accepted_or_rejected_cleanly(capsys, name, value):
    """Random (possibly valid) values: either a config comes out or one clean error line."""
    INVALID_COUNT["n"] += 1
    code, out, err = run_main(["config", "sparse-point-robot", "--preset", "quick", f"{_flag(name)}={value}"], capsys)
    assert "Traceback" not in err
    if code != 0:
        assert_usage_error(code, err)
        field = err.split("error:", 1)[1].strip().split(":", 1)[0]
        assert field in FIELDS or field.startswith(("unknown", "cannot", "argument")), err


def test_report_number_of_invalid_inputs_tried():
    print(f"\nproperty tests tried {INVALID_COUNT['n']} override inputs")
    assert INVALID_COUNT["n"] >= 400


def test_inconsistent_settings_rejected_before_work(tmp_path, capsys):
    cases = [
        (["--embedding-batch-size", "100000"], "embedding_batch_size"),
        (["--eval-steps", "10"], "eval_steps"),
        (["--max-path-length", "50"], "max_path_length"),
        (["--exploration-trajectories", "5"], "exploration_trajectories"),
        (["--num-steps-prior", "0", "--num-steps-posterior", "0"], "num_steps_prior"),
        (["--learned-reward", "--relabel", "hipi"], "learned_reward"),
    ]
    for extra, field in cases:
        run_dir = tmp_path / field
        code, out, err = run_main(["train", "four-corners", "--preset", "quick", "--run-dir", run_dir, *extra], capsys)
        assert_usage_error(code, err, field)
        assert not run_dir.exists()
