"""Complete, atomic checkpoints.

A checkpoint is ``checkpoints/ckpt_<iteration>.pt`` (written to a temporary file, fsynced and
renamed) plus a small JSON manifest beside it with the format version, the iteration and the
file's SHA-256.  Payloads hold only tensors and plain Python values (numpy arrays are stored as
tensors), so they load with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
Loading verifies the checksum and falls back to the newest good checkpoint, reporting each bad
one in one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "metarelabel-checkpoint"
VERSION = 2  # 2: buffers store each task's filled rows only
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def to_storable(obj):
    """numpy arrays -> tensors, recursively (weights-only loadable)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_storable(v) for v in obj)
    return obj


def to_numpy(obj):
    """Inverse of ``to_storable`` for buffer/RNG payloads: tensors -> numpy arrays."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_numpy(v) for v in obj]
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save(ckpt_dir, iteration: int, payload: dict, keep: int, run_id: str, failed: bool = False) -> Path:
    """Write checkpoint ``iteration`` atomically and keep only the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_{iteration:06d}.pt"
    body = {"format": FORMAT, "version": VERSION, "run_id": run_id, "iteration": iteration, "failed": failed,
            "payload": to_storable(payload)}
    write_atomic(path, lambda fh: torch.save(body, fh))
    manifest = {"format": FORMAT, "version": VERSION, "run_id": run_id, "iteration": iteration,
                "failed": failed, "sha256": _sha256(path), "bytes": path.stat().st_size}
    write_atomic(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(manifest, indent=1).encode()))
    if not failed:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir) -> list[Path]:
    """Checkpoint files, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_file(path: Path, run_id: str | None = None) -> dict:
    """Load and verify one checkpoint; raises ``CheckpointError`` with a one-line reason."""
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: manifest missing or unreadable") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: not a metarelabel checkpoint")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path.name}: format version {manifest.get('version')} (this build reads {VERSION})")
    if run_id is not None and manifest.get("run_id") != run_id:
        raise CheckpointError(f"{path.name}: belongs to another run")
    try:
        digest = _sha256(path)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: unreadable ({exc.strerror})") from None
    if digest != manifest.get("sha256"):
        raise CheckpointError(f"{path.name}: checksum mismatch (truncated or corrupt)")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle error, ...
        raise CheckpointError(f"{path.name}: cannot be loaded ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: not a metarelabel checkpoint")
    return body


def _warn_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def load_latest(ckpt_dir, run_id: str | None = None, warn=_warn_stderr, allow_failed: bool = False) -> dict:
    """Newest checkpoint that verifies; each bad one is reported in one line and skipped."""
    paths = list_checkpoints(ckpt_dir)
    if not paths:
        raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    for path in reversed(paths):
        try:
            body = load_file(path, run_id)
        except CheckpointError as exc:
            warn(f"warning: skipping checkpoint {exc}")
            continue
        if body.get("failed") and not allow_failed:
            warn(f"warning: skipping checkpoint {path.name}: marked as failed (training diverged)")
            continue
        return body
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}")


def load_chosen(ckpt_dir, choice=None, run_id: str | None = None, warn=_warn_stderr) -> tuple[dict, Path | None]:
    """The checkpoint a user chose: ``None`` (the newest good one), an iteration number, or
    the path of a ``.pt`` file (verified by its manifest when it has one; without one it is
    loaded weights-only after a warning that it cannot be verified).  Returns (body, path)."""
    ckpt_dir = Path(ckpt_dir)
    if choice is None:
        body = load_latest(ckpt_dir, run_id=run_id, warn=warn)
        return body, ckpt_dir / f"ckpt_{int(body['iteration']):06d}.pt"
    text = str(choice)
    if text.isdigit():
        path = ckpt_dir / f"ckpt_{int(text):06d}.pt"
        if not path.exists():
            have = ", ".join(str(int(_NAME.match(p.name).group(1))) for p in list_checkpoints(ckpt_dir)) or "none"
            raise CheckpointError(f"no checkpoint of iteration {int(text)} in {ckpt_dir} (available: {have})")
        return load_file(path, run_id), path
    path = Path(text)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.with_suffix(".json").exists():
        return load_file(path), path
    warn(f"warning: {path.name} has no manifest beside it; loading it without checksum verification")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path.name}: cannot be loaded ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or "payload" not in body:
        raise CheckpointError(f"{path.name}: not a metarelabel checkpoint")
    return body, path
