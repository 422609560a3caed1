"""Sweeps: families x relabeling strategies x seeds (x any config field), one run directory per
run with a stable name ``ROOT/FAMILY/RELABEL[-TAG]/sSEED``.

A sweep is resumable: finished runs (``run.json`` has ``finished``) are skipped, interrupted
ones continue with ``metarelabel resume``, the rest start fresh.  Each run is its own
``python -m metarelabel`` process with one torch thread.  Backends: a local process pool
(default) or Ray (``metarelabel[ray]``; connects to ``--ray-address`` or starts a local
instance), whose tasks run the same command on the cluster's workers (run directories must be
on a filesystem every worker sees).
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


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


def execute(spec: RunSpec) -> dict:
    """Run (or resume) one run to completion in a subprocess; returns a result record."""
    state = run_state(spec.run_dir)
    if state == "finished":
        return {"label": spec.label, "status": "skipped", "seconds": 0.0, "run_dir": str(spec.run_dir)}
    spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = spec.run_dir.parent / f"{spec.run_dir.name}.log"
    with open(log, "a") as fh:
        proc = subprocess.run(command(spec, state), stdout=fh, stderr=subprocess.STDOUT)
    status = ("resumed" if state == "resumable" else "done") if proc.returncode == 0 else f"failed ({proc.returncode})"
    return {"label": spec.label, "status": status, "seconds": time.perf_counter() - t0, "run_dir": str(spec.run_dir),
            "log": str(log)}


def expand(families, relabels, seeds, preset: str, root: str, grid: dict[str, list[str]] | None = None,
           fixed: dict[str, str] | None = None) -> list[RunSpec]:
    """The cartesian product of families, strategies, seeds and any ``grid`` of config values,
    seed-major: every family and strategy gets its first seed before any gets its second, so
    a sweep stopped part-way already compares all strategies."""
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

            make_config(family, preset, {"relabel": relabel, "seed": seed,
                                         **{k: parse_value(k, str(v)) for k, v in overrides.items()}})
            tag = "-".join(f"{k}={v}" for k, v in combo.items())
            specs.append(RunSpec(family, relabel, int(seed), preset, tuple(sorted(overrides.items())), root, tag))
    return specs


@dataclass
class Progress:
    total: int
    echo: callable = print
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
        self.echo(f"[{len(self.done)}/{self.total}] {result['label']}: {result['status']} "
                  f"({result['seconds']:.0f}s){final}")

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.done:
            key = r["status"].split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        return f"sweep: {len(self.done)}/{self.total} runs ({parts}) in {time.perf_counter() - self.t0:.0f}s"


def run_local(specs: list[RunSpec], workers: int, echo=print) -> list[dict]:
    progress = Progress(len(specs), echo)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(execute, s) for s in specs]
        for fut in as_completed(futures):
            progress.update(fut.result())
    echo(progress.summary())
    return progress.done


def run_ray(specs: list[RunSpec], address: str | None, cpus_per_run: float = 1.0, echo=print,
            num_cpus: int | None = None, gpus_per_run: float = 0.0) -> list[dict]:
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
    progress = Progress(len(specs), echo)
    pending = {remote.remote(s): s for s in specs}
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
