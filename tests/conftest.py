"""Shared helpers for the foundation test suite."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metarelabel.cli import main as cli_main
from metarelabel.envs import check as _check
from metarelabel.pearl import PEARL, Dims
from metarelabel.presets import make_config

FAMILIES = ("four-corners", "point-robot", "sparse-point-robot")

# Tiny overrides that keep a CLI training run to about a second.
TINY_TRAIN_ARGS = ["--preset", "quick", "--num-iterations", "2", "--num-train-steps-per-itr", "5",
                   "--progress", "off"]


# ---- agents ---------------------------------------------------------------------------------------
def small_config(family: str = "four-corners", **overrides):
    """Validated quick-preset config with small networks (fast math tests)."""
    base = dict(hidden_dim=32, encoder_hidden_dim=24)
    base.update(overrides)
    return make_config(family, "quick", base)


def make_agent(seed: int = 0, obs: int = 2, act: int = 2, **overrides) -> PEARL:
    cfg = small_config(**overrides)
    torch.manual_seed(seed)
    dims = Dims(obs, act, cfg.latent_dim, cfg.use_next_obs_in_context)
    return PEARL(dims, cfg, torch.device("cpu"))


def random_batch(gen: torch.Generator, M: int, B: int, obs: int = 2, act: int = 2, p_terminal: float = 0.3):
    return {
        "obs": torch.randn(M, B, obs, generator=gen),
        "actions": torch.rand(M, B, act, generator=gen) * 2 - 1,
        "rewards": torch.randn(M, B, 1, generator=gen),
        "next_obs": torch.randn(M, B, obs, generator=gen),
        "terminals": (torch.rand(M, B, 1, generator=gen) < p_terminal).float(),
    }


# ---- environments --------------------------------------------------------------------------------
def place(env, pos) -> None:
    """Teleport the point agent through the public get_state/set_state API."""
    state = env.get_state()
    state["pos"] = np.asarray(pos, np.float64)
    env.set_state(state)


def record_rollout(env, task: int, actions) -> dict:
    """Reset on ``task`` and step through ``actions`` until termination.  Returns what ``step``
    returned, stacked per step."""
    env.set_task(task)
    env.reset()
    rec = {"rewards": [], "terminals": [], "truncated": [], "success": [], "dense": [], "pos": []}
    for a in actions:
        _, r, term, trunc, info = env.step(a)
        rec["rewards"].append(r)
        rec["terminals"].append(term)
        rec["truncated"].append(trunc)
        rec["success"].append(info["success"])
        rec["dense"].append(info["dense_reward"])
        rec["pos"].append(info["pos"])
        if term:
            break
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["infos"] = {"pos": out["pos"]}
    return out


# ---- random rollouts split into episodes, batched reward == step reward (the public checks) ----
random_episodes = _check.random_episodes
check_batched_reward = _check.check_batched_reward


def quick_hfr_run(family: str, run_dir) -> tuple[str, list[str]]:
    """``train FAMILY --preset quick --relabel hfr`` in-process; asserts success and two logged
    iterations, prints the wall time; returns stdout and the progress.csv lines."""
    import contextlib
    import io
    import time

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli_main(["train", family, "--preset", "quick", "--relabel", "hfr", "--run-dir", str(run_dir),
                         "--no-tensorboard", "--progress", "off"])
    elapsed = time.perf_counter() - t0
    assert code == 0, out.getvalue()
    rows = (Path(run_dir) / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + 2 iterations
    print(f"{family}: quick run {elapsed:.1f}s")
    return out.getvalue(), rows


# ---- CLI -------------------------------------------------------------------------------------------
def run_main(argv, capsys):
    """Run the CLI in-process; argparse errors (SystemExit) count as return codes."""
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(argv, cwd=None, timeout=120):
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    proc = subprocess.run([sys.executable, "-m", "metarelabel", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_usage_error(code, err: str, *needles: str, allow_warnings: bool = False) -> None:
    """Exit status 2, exactly one non-empty stderr line containing ``error:`` (with
    ``allow_warnings``: the last one, after ``warning:`` lines only), no traceback."""
    assert code == 2, f"exit code {code}, stderr={err!r}"
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if allow_warnings:
        assert lines and all(ln.startswith("warning:") for ln in lines[:-1]), lines
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert "error:" in lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def snapshot_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One finished four-corners quick run with checkpoints after iterations 1 and 2.  Tests that
    modify it must copy it first (see ``run_copy``)."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("quick") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["train", "four-corners", *TINY_TRAIN_ARGS, "--checkpoint-every", "1",
                         "--run-dir", str(run_dir)])
    assert code == 0, out.getvalue()
    return run_dir


@pytest.fixture
def run_copy(quick_run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(quick_run, dst)
    return dst
