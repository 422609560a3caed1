"""Families behind a pip extra: when the extra is missing, asking for one says which extra to
install (a one-line usage error, exit status 2), and the rest of the CLI keeps working.  The
missing import is simulated (``sys.modules[name] = None``) in a subprocess, so this runs whether
or not the extra is installed."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from metarelabel.envs import REGISTRY

MUJOCO_FAMILIES = [name for name, entry in REGISTRY.items() if entry.extra == "mujoco"]


def _run_without(module: str, code: str) -> subprocess.CompletedProcess:
    prog = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)


def test_mujoco_families_registered():
    assert set(MUJOCO_FAMILIES) == {"cheetah-vel", "cheetah-vel-sparse", "cheetah-highdim", "ant-vel", "ant-goal",
                                    "visual-reacher"}


@pytest.mark.parametrize("extra,train_family", [("mujoco", "ant-goal"), ("metaworld", "sawyer-push")])
def test_missing_extra_message(tmp_path, extra, train_family):
    families = [name for name, entry in REGISTRY.items() if entry.extra == extra]
    assert train_family in families
    proc = _run_without(extra, f"""
        from metarelabel.envs import family_class
        from metarelabel.errors import ConfigError
        for name in {families!r}:
            try:
                family_class(name)
            except ConfigError as exc:
                assert "install metarelabel[{extra}]" in str(exc), exc
            else:
                raise SystemExit(f"{{name}} imported without {extra}")
        family_class("four-corners")  # the numpy families do not need it
        from metarelabel.cli import main
        sys.exit(main(["train", {train_family!r}, "--preset", "quick", "--run-dir", {str(tmp_path / "run")!r}]))
    """)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and f"install metarelabel[{extra}]" in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["envs"], ["config", "cheetah-vel"]])
def test_cli_without_mujoco(argv):
    proc = _run_without("mujoco", f"""
        from metarelabel.cli import main
        sys.exit(main({argv!r}))
    """)
    if argv == ["envs"]:
        assert proc.returncode == 0, proc.stderr
        for name in MUJOCO_FAMILIES:
            assert name in proc.stdout and "install metarelabel[mujoco]" in proc.stdout
    else:
        assert proc.returncode == 2 and "install metarelabel[mujoco]" in proc.stderr, proc.stderr
