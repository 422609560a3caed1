"""Which code produced a run: package version, git commit (and whether the tree was dirty),
Python, torch, numpy, the platform and the device."""
from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from . import __version__


@lru_cache(maxsize=1)
def git_state() -> dict | None:
    """``{"commit", "dirty"}`` of the work tree holding this package, or None outside one."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def version_string() -> str:
    git = git_state()
    if git is None:
        return f"metarelabel {__version__}"
    return f"metarelabel {__version__} (git {git['commit'][:12]}{', dirty tree' if git['dirty'] else ''})"


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device=None) -> dict:
    import numpy
    import torch

    out = {"metarelabel": __version__, "git": git_state(), "python": sys.version.split()[0],
           "torch": str(torch.__version__), "numpy": numpy.__version__, "platform": platform.platform()}
    if device is not None:
        out["device"] = str(device)
        out["device_name"] = device_name(device)
    return out
