"""A run directory has one writer, and that writer stops cleanly.

- ``prepare_run_dir`` / ``open_run`` give the process that trains (``train``, ``resume``) an OS
  file lock on ``RUN/.lock`` for its whole life.  A second writer fails at once with one line
  naming the holder's PID; a writer killed with ``-9`` releases the lock with its process.
  Both check that every folder of the run can be written before anything is deleted or started.
- ``install_stop_handlers``: SIGINT and SIGTERM stop training at once, except inside
  ``critical()`` sections (writing progress rows, checkpoints, run.json), which finish first.
  What was written after the last checkpoint is dropped by ``resume``, so a stopped run always
  continues exactly.
- ``watch_parent``: a run started by ``metarelabel sweep`` stops when the sweep's process dies,
  however it died (Linux: the kernel's parent-death signal; elsewhere the parent is polled
  between iterations via ``parent_gone``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from .errors import RunDirError

LOCK_NAME = ".lock"
PARENT_ENV = "METARELABEL_SWEEP_PARENT"


def probe_writable(run_dir: Path, what: str = "run directory") -> None:
    """Create and remove a file in ``run_dir`` and in each folder below it."""
    run_dir = Path(run_dir)
    folders = [run_dir] + sorted(p for p in run_dir.rglob("*") if p.is_dir())
    for folder in folders:
        probe = folder / ".write_test"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            where = "" if folder == run_dir else f" ({folder.relative_to(run_dir)})"
            raise RunDirError(f"cannot write to {what} {run_dir}{where}: {exc.strerror}") from None


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, holding the writer's PID."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd = None
        try:
            import fcntl
        except ImportError:  # no POSIX locks on this platform: one writer is the user's job
            return
        try:  # the lock is held on a read-only descriptor: no file of the run stays open for writing
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise RunDirError(f"cannot write to run directory {self.run_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"run directory {self.run_dir} is in use by another metarelabel process "
                              f"(PID {holder}); stop it or wait for it to finish") from None
        try:
            with open(self.path, "w") as fh:
                fh.write(f"{os.getpid()}\n")
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"cannot write to run directory {self.run_dir}: {exc.strerror}") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder_pid(run_dir) -> int | None:
    """PID of the process holding ``run_dir``'s lock, or None when nobody holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        text = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        return int(text) if text.isdigit() else -1
    os.close(fd)
    return None


def prepare_run_dir(run_dir, overwrite: bool) -> RunLock:
    """Create a fresh run directory and lock it.  An existing non-empty one is refused unless
    ``overwrite`` (and then only if it is a run directory nobody is writing and every folder
    of it can be written; only then is its old content deleted)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    old = [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []
    if old:
        if not overwrite:
            raise RunDirError(f"run directory {run_dir} already exists (use --overwrite, `metarelabel resume`, or another --run-dir)")
        if not (run_dir / "config.json").exists():
            raise RunDirError(f"refusing to overwrite {run_dir}: it is not a metarelabel run directory")
        lock = _lock_writable(run_dir)
        try:
            for p in old:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except BaseException:
            lock.release()
            raise
        return lock
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot write to run directory {run_dir}: {exc.strerror}") from None
    return _lock_writable(run_dir)


def open_run(run_dir) -> RunLock:
    """Lock an existing run directory for continuing it (``resume``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise RunDirError(f"{run_dir} is not a metarelabel run directory (no config.json)")
    return _lock_writable(run_dir)


def _lock_writable(run_dir: Path) -> RunLock:
    """The run's lock, once every folder of it has been found writable."""
    lock = RunLock(run_dir)
    try:
        probe_writable(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


# ---- stopping -------------------------------------------------------------------------------------
_depth = 0
_pending: int | None = None


def _on_stop(signum, frame):
    global _pending
    if _depth:
        _pending = signum  # finish the write under way, then stop
        return
    raise KeyboardInterrupt


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, deferred out of ``critical()`` sections."""
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGTERM, _on_stop)


@contextlib.contextmanager
def critical():
    """A section a stop signal does not interrupt (it takes effect when the section ends)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            _pending = None
            raise KeyboardInterrupt


def watch_parent() -> None:
    """In a run started by a sweep (``METARELABEL_SWEEP_PARENT`` set): ask the kernel for a
    SIGTERM when the parent dies, and stop at once if it is already gone."""
    if PARENT_ENV not in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: parent_gone() is polled between iterations
        pass
    if parent_gone():
        raise KeyboardInterrupt


def parent_gone() -> bool:
    expected = os.environ.get(PARENT_ENV)
    return bool(expected) and expected.isdigit() and os.getppid() != int(expected)
