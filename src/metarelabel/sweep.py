"""Sweeps: families x relabeling strategies x seeds (x any config field), one run directory per
run with a stable name ``ROOT/FAMILY/RELABEL[-TAG]/sSEED``.

A sweep is resumable: finished runs (``run.json`` has ``finished``) are skipped, interrupted
ones continue with ``metarelabel resume``, the rest start fresh.  A run directory whose
``config.json`` differs from what the sweep would start (another preset, other ``--set``
values) is never reused: the sweep refuses before running anything, unless told to start such
runs anew (``restart``).  Each run is its own ``python -m metarelabel`` process with one torch
thread, which holds its run directory's lock.  Stopping the sweep (SIGINT, SIGTERM) stops its
runs resumably; if the sweep's process is killed outright, its runs notice and stop too.  Backends: a local process pool
(default) or Ray (``metarelabel[ray]``; connects to ``--ray-address`` or starts a local
instance), whose tasks run the same command on the cluster's workers (run directories must be
on a filesystem every worker sees).
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .fmt import format_duration
from .rundir import PARENT_ENV, holder_pid


@dataclass(frozen=True)
class RunSpec:
    family: str
    relabel: str
    seed: int
    preset: str
    overrides: tuple[tuple[str, str], ...] = ()
    root: str = "runs/sweep"
    tag: str = ""

    @property
    def run_dir(self) -> Path:
        name = self.relabel + (f"-{self.tag}" if self.tag else "")
        return Path(self.root) / self.family / name / f"s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.family}/{self.relabel}{'-' + self.tag if self.tag else ''}/s{self.seed}"


def run_state(run_dir: Path) -> str:
    """``finished``, ``resumable`` (has a checkpoint), or ``new``."""
    run_dir = Path(run_dir)
    meta = run_dir / "run.json"
    if meta.exists():
        try:
            if json.loads(meta.read_text()).get("finished"):
                return "finished"
        except json.JSONDecodeError:
            pass
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.suffix == ".pt" for p in ckpts.iterdir()):
        return "resumable"
    return "new"


def wanted_config(spec: RunSpec) -> dict:
    from .config import parse_value
    from .presets import make_config

    return make_config(spec.family, spec.preset, {"relabel": spec.relabel, "seed": spec.seed,
                                                  **{k: parse_value(k, str(v)) for k, v in spec.overrides}}).to_dict()


def mismatches(specs: list[RunSpec]) -> dict[str, list[str]]:
    """label -> differing fields, for each spec whose run directory holds another config."""
    from .config import config_differences, load_config_json

    out = {}
    for spec in specs:
        path = spec.run_dir / "config.json"
        if not path.exists():
            continue
        try:
            have = load_config_json(path).to_dict()
        except ConfigError:
            out[spec.label] = ["config.json unreadable"]
            continue
        diffs = config_differences(have, wanted_config(spec))
        if diffs:  # the preset and the sweep's own --set/--grid fields first: they are why
            first = {"preset", *(k for k, _ in spec.overrides)}
            out[spec.label] = sorted(diffs, key=lambda d: d.split(" ")[0] not in first)
    return out


def mismatch_error(found: dict[str, list[str]], root: str) -> ConfigError:
    first, diffs = next(iter(found.items()))
    fields = list(dict.fromkeys([d.split(" ")[0] for d in diffs]
                                + sorted({d.split(" ")[0] for ds in found.values() for d in ds})))

    def some(items, n=6):
        return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

    return ConfigError(f"sweep: {len(found)} run(s) under {root} were made with another config "
                       f"(fields {some(fields)}; e.g. {first}: {some(diffs, 4)}); "
                       "use another --root, or --restart-mismatched to start those runs anew")


def command(spec: RunSpec, state: str) -> list[str]:
    base = [sys.executable, "-m", "metarelabel"]
    if state == "resumable":
        return base + ["resume", str(spec.run_dir), "--progress", "off"]
    cmd = base + ["train", spec.family, "--preset", spec.preset, "--relabel", spec.relabel, "--seed", str(spec.seed),
                  "--run-dir", str(spec.run_dir), "--progress", "off", "--torch-threads", "1"]
    if spec.run_dir.exists():
        cmd.append("--overwrite")  # started but never checkpointed: nothing to keep
    for key, value in spec.overrides:
        cmd += ["--set", f"{key}={value}"]
    return cmd


class Children:
    """The sweep's live run processes; ``stop()`` (from a signal handler) terminates them and
    keeps new ones from starting."""

    def __init__(self):
        self.procs: set[subprocess.Popen] = set()
        self.stopped = False
        self.lock = threading.Lock()

    def start(self, cmd, log_fh) -> subprocess.Popen | None:
        with self.lock:
            if self.stopped:
                return None
            env = {**os.environ, PARENT_ENV: str(os.getpid())}
            proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env)
            self.procs.add(proc)
            return proc

    def done(self, proc) -> None:
        with self.lock:
            self.procs.discard(proc)

    def stop(self, *_) -> None:
        with self.lock:
            self.stopped = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


_CHILDREN = Children()


def last_line(path) -> str:
    """The last non-empty line of a log file ('' if none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def execute(spec: RunSpec, restart: bool = False, children: Children | None = None, echo=None) -> dict:
    """Run (or resume) one run to completion in a subprocess; returns a result record.
    ``restart``: start it anew even if it has finished or can be resumed."""
    children = children or _CHILDREN
    state = "new" if restart else run_state(spec.run_dir)
    rec = {"label": spec.label, "seconds": 0.0, "run_dir": str(spec.run_dir)}
    if state == "finished":
        return {**rec, "status": "skipped"}
    if children.stopped:
        return {**rec, "status": "not started"}
    spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = spec.run_dir.parent / f"{spec.run_dir.name}.log"
    with open(log, "a") as fh:
        proc = children.start(command(spec, state), fh)
        if proc is None:
            return {**rec, "status": "not started"}
        if echo is not None:
            echo(f"start {spec.label} ({'resume' if state == 'resumable' else 'new'}; log {log})")
        try:
            code = proc.wait()
        finally:
            children.done(proc)
    if code == 0:
        status = "resumed" if state == "resumable" else "done"
    elif children.stopped:
        status = "stopped (resumable)"
    else:
        status = f"failed ({code})"
    return {**rec, "status": status, "seconds": time.perf_counter() - t0, "log": str(log)}


def expand(families, relabels, seeds, preset: str, root: str, grid: dict[str, list[str]] | None = None,
           fixed: dict[str, str] | None = None, check_device: bool = False) -> list[RunSpec]:
    """The cartesian product of families, strategies, seeds and any ``grid`` of config values,
    seed-major: every family and strategy gets its first seed before any gets its second, so
    a sweep stopped part-way already compares all strategies.  Every run's config is validated
    (and with ``check_device``, its device on this machine)."""
    from .sampler import resolve_device

    from .config import FIELDS
    from .presets import make_config

    grid = grid or {}
    fixed = fixed or {}
    for key in list(grid) + list(fixed):
        if key not in FIELDS or key in ("family", "preset", "relabel", "seed"):
            raise ConfigError(f"sweep: {key!r} is not a config field that can be swept")
    specs = []
    keys = sorted(grid)
    for seed, family, relabel in itertools.product(seeds, families, relabels):
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            combo = dict(zip(keys, values))
            overrides = {**fixed, **combo}
            # validate now: one bad value must not fail the sweep after hours
            from .config import parse_value

            cfg = make_config(family, preset, {"relabel": relabel, "seed": seed,
                                               **{k: parse_value(k, str(v)) for k, v in overrides.items()}})
            if check_device:
                resolve_device(cfg.device)
            tag = "-".join(f"{k}={v}" for k, v in combo.items())
            specs.append(RunSpec(family, relabel, int(seed), preset, tuple(sorted(overrides.items())), root, tag))
    return specs


@dataclass
class Progress:
    total: int
    echo: callable = print
    workers: int = 1
    done: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def update(self, result: dict) -> None:
        self.done.append(result)
        final = ""
        try:
            meta = json.loads((Path(result["run_dir"]) / "run.json").read_text())
            f = meta.get("final", {})
            if "meta_test/success_rate" in f:
                final = f" | return {f['meta_test/return']:.2f} success {f['meta_test/success_rate']:.2f}"
        except (OSError, json.JSONDecodeError):
            pass
        why = ""
        if result["status"].startswith("failed"):
            why = f": {last_line(result['log']) or '(empty log)'} (log {result['log']})"
        self.echo(f"[{len(self.done)}/{self.total}] {result['label']}: {result['status']} "
                  f"({result['seconds']:.0f}s){final}{why} | {self.status()}")

    def status(self) -> str:
        """``k/N runs done, elapsed, eta``: the ETA is the mean time of the runs that ran here
        (not skipped ones) times the runs left, over the parallel workers (rough: it ignores
        how far the running ones are)."""
        elapsed = time.perf_counter() - self.t0
        ran = [r["seconds"] for r in self.done if r["status"] not in ("skipped", "not started")]
        left = self.total - len(self.done)
        # once the sweep is stopping, runs are accounted for without finishing: no ETA then
        stopping = any(r["status"] == "not started" or r["status"].startswith("stopped") for r in self.done)
        finished = sum(r["status"] in ("done", "resumed", "skipped") for r in self.done)
        eta = (f", eta {format_duration(np.mean(ran) * left / max(self.workers, 1))}"
               if ran and left and not stopping else "")
        return f"{finished}/{self.total} runs done, {format_duration(elapsed)} elapsed{eta}"

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.done:
            key = r["status"].split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        return f"sweep: {len(self.done)}/{self.total} runs ({parts}) in {time.perf_counter() - self.t0:.0f}s"


def run_local(specs: list[RunSpec], workers: int, echo=print, restart: frozenset = frozenset(),
              heartbeat: float = 600.0) -> list[dict]:
    """Run ``specs`` on a pool of ``workers``; ``restart``: labels to start anew.  SIGINT or
    SIGTERM stops the runs (resumably) and starts no more."""
    children = Children()
    progress = Progress(len(specs), echo, workers)
    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, children.stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = {pool.submit(execute, s, s.label in restart, children, echo) for s in specs}
            while pending:  # a status line every `heartbeat` seconds while runs go on
                done, pending = wait(pending, timeout=heartbeat, return_when=FIRST_COMPLETED)
                for fut in done:
                    progress.update(fut.result())
                if not done:
                    echo(f"sweep: {progress.status()}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    echo(progress.summary())
    if children.stopped:
        echo("sweep stopped: its runs saved their progress and can be resumed; run the same sweep command again to continue")
    return progress.done


def run_ray(specs: list[RunSpec], address: str | None, cpus_per_run: float = 1.0, echo=print,
            num_cpus: int | None = None, gpus_per_run: float = 0.0, restart: frozenset = frozenset()) -> list[dict]:
    """Each run is a Ray task of ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs.  Ray hides
    the GPUs from tasks that reserve none, so runs with ``device=cuda`` need ``gpus_per_run`` > 0
    (a fraction lets several runs share one GPU)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs an optional extra: install metarelabel[ray]") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)
    remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run)(execute)
    progress = Progress(len(specs), echo, int(num_cpus // cpus_per_run) if num_cpus else 1)
    pending = {remote.remote(s, s.label in restart): s for s in specs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                progress.update(ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()
    echo(progress.summary())
    return progress.done
