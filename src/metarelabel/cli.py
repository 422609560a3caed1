"""Command-line interface: ``metarelabel {train,resume,eval,sweep,plot,didactic,envs,config}``.

User mistakes (unknown family/preset/field, bad values, an existing run directory, unreadable
checkpoints) print one ``error:`` line and exit with status 2; nothing on disk is destroyed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import FIELDS, field_docs, parse_sets, parse_value
from .errors import MetaRelabelError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_config_flags(p: argparse.ArgumentParser, skip=("family", "preset")) -> None:
    docs = field_docs()
    group = p.add_argument_group("config fields (override the preset; `metarelabel config FAMILY` shows values)")
    for name, f in FIELDS.items():
        if name in skip:
            continue
        tp = f.type if isinstance(f.type, str) else f.type.__name__
        meta = f.metadata
        extra = ""
        if meta.get("choices"):
            extra = f" {{{','.join(meta['choices'])}}}"
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kw = dict(dest=f"cfg__{name}", default=None, metavar=tp.upper(), help=docs.get(name, "") + extra)
        if tp == "bool":
            kw.update(nargs="?", const="true")
        group.add_argument(*flags, **kw)


def _overrides(args) -> dict:
    out = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            name = key[5:]
            if isinstance(value, list):  # argparse hands `--field=--` over as a list
                value = " ".join(value)
            out[name] = parse_value(name, value)
    out.update(parse_sets(getattr(args, "set", None) or []))
    return out


def _progress(mode: str) -> bool:
    return sys.stderr.isatty() if mode == "auto" else mode == "on"


def _stop_cleanly() -> None:
    """SIGINT/SIGTERM (and, under a sweep, the sweep's death) stop training resumably."""
    from .rundir import install_stop_handlers, watch_parent

    install_stop_handlers()
    watch_parent()


def cmd_train(args) -> int:
    from .presets import make_config
    from .rundir import prepare_run_dir
    from .trainer import Trainer

    cfg = make_config(args.family, args.preset, _overrides(args))
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:  # default name; never collides with an earlier run
        run_dir = Path(args.runs_root) / f"{cfg.family}-{cfg.preset}-{cfg.relabel}-s{cfg.seed}"
        if run_dir.exists():
            run_dir = run_dir.with_name(run_dir.name + time.strftime("-%Y%m%d-%H%M%S"))
    trainer = Trainer(cfg, run_dir, progress=_progress(args.progress), tensorboard=not args.no_tensorboard)
    _stop_cleanly()
    with prepare_run_dir(run_dir, args.overwrite):  # this process is the run's one writer
        print(f"run directory: {run_dir}")
        try:
            trainer.start()
            last = trainer.train()
        except KeyboardInterrupt:
            print(f"\ninterrupted; continue with: metarelabel resume {run_dir}", file=sys.stderr)
            return 130
    _print_final(last, run_dir, trainer)
    return 0


def cmd_resume(args) -> int:
    from .rundir import open_run
    from .trainer import load_trainer

    _stop_cleanly()
    with open_run(args.run_dir):  # this process is the run's one writer
        trainer, body = load_trainer(args.run_dir, device=args.device, tensorboard=not args.no_tensorboard,
                                     progress=_progress(args.progress), num_iterations=args.num_iterations)
        print(f"resuming {args.run_dir} from iteration {trainer.iteration} of {trainer.cfg.num_iterations}")
        trainer.prepare_resume()
        try:
            last = trainer.train()
        except KeyboardInterrupt:
            print(f"\ninterrupted; continue with: metarelabel resume {args.run_dir}", file=sys.stderr)
            return 130
    _print_final(last, Path(args.run_dir), trainer)
    return 0


def _print_final(last: dict, run_dir: Path, trainer) -> None:
    """Wall time, env steps, final and best meta-test values, and what to run next."""
    from .logger import read_progress
    from .fmt import format_duration

    wall = format_duration(getattr(trainer, "wall_s", 0.0))
    parts = []
    try:
        rows = read_progress(run_dir / "progress.csv")
    except OSError:
        rows = []
    for key in ("meta_test/success_rate", "meta_test/return"):
        vals = [(float(r[key]), int(r["iteration"])) for r in rows if r.get(key) not in (None, "", "nan")]
        vals = [v for v in vals if v[0] == v[0]]
        if vals:
            best = max(vals, key=lambda v: v[0])
            parts.append(f"{key} final {vals[-1][0]:.3f} (best {best[0]:.3f} at iteration {best[1]})")
    print(f"done in {wall} (this process): {trainer.env_steps:,} env steps, iteration {trainer.iteration}"
          + ("; " + "; ".join(parts) if parts else "") + f"; outputs in {run_dir}")
    print(f"next: metarelabel eval {run_dir}  |  metarelabel plot {run_dir} --out {run_dir / 'plots'}")


def cmd_eval(args) -> int:
    from .evaluation import evaluate_run

    metrics = evaluate_run(args.run_dir, device=args.device, eval_runs=args.eval_runs, seed=args.seed,
                           checkpoint=args.checkpoint, rollouts=args.rollouts)
    if not args.json:
        print(f"checkpoint: {metrics.pop('checkpoint')} (iteration {metrics['iteration']})")
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(len(k) for k in metrics)
        for k, v in metrics.items():
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


def cmd_export(args) -> int:
    from .agent import export_agent

    out = export_agent(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB: networks and config; load with metarelabel.load_agent)")
    return 0


def cmd_render(args) -> int:
    from .render import render_run

    out = render_run(args.run_dir, task=args.task, out=args.out, checkpoint=args.checkpoint, seed=args.seed,
                     device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_envs(args) -> int:
    from .envs import PLUGIN_WARNINGS, REGISTRY, family_class, family_names

    rows = []
    for name in family_names():
        try:
            cls = family_class(name)
        except MetaRelabelError as exc:
            entry = REGISTRY.get(name)
            hint = f"(install metarelabel[{entry.extra}])" if entry and entry.extra else f"({exc})"
            rows.append((name, "-", "-", "-", "-", hint))
            continue
        n_eval = "= train" if cls.eval_is_train else str(cls.num_eval)
        rows.append((name, str(cls.num_train), n_eval, str(cls.horizon), f"{cls.discount:g}", cls.summary))
    for warning in PLUGIN_WARNINGS:
        print(f"warning: {warning}", file=sys.stderr)
    header = ("family", "train", "eval", "horizon", "gamma", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return 0


def cmd_config(args) -> int:
    from .presets import make_config

    cfg = make_config(args.family, args.preset, _overrides(args))
    print(cfg.to_json())
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_sweep(args) -> int:
    from .sweep import expand, mismatch_error, mismatches, run_local, run_ray, run_state

    grid, fixed = {}, {}
    for item in args.grid or []:
        if "=" not in item:
            raise MetaRelabelError(f"--grid expects FIELD=V1,V2,..., got {item!r}")
        k, v = item.split("=", 1)
        grid[k.strip().replace("-", "_")] = _csv(v)
    for item in args.set or []:
        if "=" not in item:
            raise MetaRelabelError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        fixed[k.strip().replace("-", "_")] = v.strip()
    try:
        seeds = [int(x) for x in _csv(args.seeds)]
    except ValueError:
        raise MetaRelabelError(f"--seeds expects integers, got {args.seeds!r}") from None
    if args.gpus_per_run < 0:
        raise MetaRelabelError(f"--gpus-per-run must be >= 0, got {args.gpus_per_run}")
    root = str(Path(args.root).resolve())
    # the device is checked here unless the runs go to a Ray cluster's workers
    local = args.backend == "local" or args.dry_run or not args.ray_address
    specs = expand(_csv(args.families), _csv(args.relabel), seeds, args.preset, root, grid, fixed, check_device=local)
    differ = mismatches(specs)
    print(f"sweep: {len(specs)} runs under {root} (backend {args.backend})")
    if args.dry_run:
        from .rundir import holder_pid

        for spec in specs:
            pid = holder_pid(spec.run_dir)
            state = f"running (PID {pid})" if pid else run_state(spec.run_dir)
            if spec.label in differ:
                state += f"; made with another config ({', '.join(differ[spec.label])})"
            print(f"  {spec.label}: {state}")
    if differ and not args.restart_mismatched:
        raise mismatch_error(differ, root)
    if args.dry_run:
        return 0
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MetaRelabelError(f"cannot create sweep root {root}: {exc.strerror}") from None
    from .rundir import probe_writable

    probe_writable(Path(root), "sweep root")
    if args.backend == "ray":
        results = run_ray(specs, args.ray_address, num_cpus=args.workers, gpus_per_run=args.gpus_per_run,
                          restart=frozenset(differ))
    else:
        results = run_local(specs, args.workers, restart=frozenset(differ))
    if any(r["status"].startswith(("stopped", "not started")) for r in results):
        return 130
    return 0 if all(not r["status"].startswith("failed") for r in results) else 1


def cmd_plot(args) -> int:
    from .plot import plot_runs

    plot_runs(args.run_dirs, args.out, reps=args.reps, final_iterations=args.final_iterations, smooth=args.smooth,
              include_unfinished=args.include_unfinished)
    return 0


def cmd_didactic(args) -> int:
    from .didactic import didactic_figure

    didactic_figure(args.run_dir, args.out, quadrant=args.quadrant)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .presets import preset_names

    p = _Parser(prog="metarelabel", description="PEARL meta-RL with trajectory relabeling (HFR, HIPI, random, none).")
    p.add_argument("--version", action=_VersionAction, nargs=0, help="print the version (and git commit) and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="meta-train a new run")
    t.add_argument("family", help="task family (see `metarelabel envs`)")
    t.add_argument("--preset", default="paper",
                   help=f"hyperparameter preset: {', '.join(preset_names())}, or one a plugin family defines (default: paper)")
    t.add_argument("--run-dir", help="run directory (default: RUNS_ROOT/FAMILY-PRESET-RELABEL-sSEED)")
    t.add_argument("--runs-root", default="runs", help="parent of default run directories (default: runs)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bar (auto: on a terminal)")
    t.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    t.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any config field (repeatable)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("resume", help="continue a run from its newest good checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the run's device")
    r.add_argument("--progress", default="auto", choices=("auto", "on", "off"))
    r.add_argument("--no-tensorboard", action="store_true")
    r.add_argument("--num-iterations", type=int, metavar="N",
                   help="extend the run to N iterations in total (recorded in config.json and run.json)")
    r.set_defaults(func=cmd_resume)

    e = sub.add_parser("eval", help="re-evaluate a saved run with the meta-test protocol")
    e.add_argument("run_dir")
    e.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the run's device")
    e.add_argument("--eval-runs", type=int, help="runs per task (default: the run's eval_runs)")
    e.add_argument("--seed", type=int, default=12345, help="evaluation seed (default: 12345)")
    e.add_argument("--json", action="store_true", help="print metrics as JSON")
    e.add_argument("--checkpoint", metavar="ITER|PATH", help="iteration number or .pt file (default: the newest good one)")
    e.add_argument("--rollouts", choices=("vector", "sequential"),
                   help="rollout engine (default: the run's); `sequential` draws z in the order of metarelabel.load_agent")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a run's networks + config (no buffers) for metarelabel.load_agent")
    x.add_argument("run_dir")
    x.add_argument("--out", default="agent.pt", help="output file (default: agent.pt)")
    x.add_argument("--checkpoint", metavar="ITER|PATH", help="iteration number or .pt file (default: the newest good one)")
    x.set_defaults(func=cmd_export)

    rd = sub.add_parser("render", help="draw the meta-test protocol on one task: PNG (2-D families) or GIF/MP4 (MuJoCo)")
    rd.add_argument("run_dir", help="a run directory or an exported agent file")
    rd.add_argument("--task", type=int, default=0, help="index into the family's eval tasks (default: 0)")
    rd.add_argument("--out", help="output file (default: RUN_DIR/render_task<K>.png or .gif)")
    rd.add_argument("--checkpoint", metavar="ITER|PATH", help="iteration number or .pt file (default: the newest good one)")
    rd.add_argument("--seed", type=int, default=12345, help="seed of the z draws and start states (default: 12345)")
    rd.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the run's device")
    rd.set_defaults(func=cmd_render)

    w = sub.add_parser("sweep", help="run families x strategies x seeds (resumable; local pool or Ray)")
    w.add_argument("--families", required=True, help="comma-separated task families")
    w.add_argument("--relabel", default="none,random,hipi,hfr", help="comma-separated strategies (default: none,random,hipi,hfr)")
    w.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default: 0,1,2)")
    w.add_argument("--preset", default="paper", help="hyperparameter preset (default: paper)")
    w.add_argument("--root", default="runs/sweep", help="sweep directory (default: runs/sweep)")
    w.add_argument("--grid", action="append", metavar="FIELD=V1,V2", help="also sweep a config field (repeatable)")
    w.add_argument("--set", action="append", metavar="FIELD=VALUE", help="fixed override for every run (repeatable)")
    w.add_argument("--backend", default="local", choices=("local", "ray"))
    w.add_argument("--workers", type=int, default=2, help="parallel runs (local; with ray: CPUs of a local instance)")
    w.add_argument("--ray-address", help="address of an existing Ray cluster (default: start a local one)")
    w.add_argument("--gpus-per-run", type=float, default=0.0, metavar="G",
                   help="ray: GPUs reserved per run, needed for --set device=cuda (a fraction shares a GPU; default: 0)")
    w.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    w.add_argument("--restart-mismatched", action="store_true",
                   help="start anew the runs whose directory holds another config (default: refuse)")
    w.set_defaults(func=cmd_sweep)

    pl = sub.add_parser("plot", help="curves and final table (IQM, 95%% bootstrap CI across seeds)")
    pl.add_argument("run_dirs", nargs="+", help="run directories or folders containing them")
    pl.add_argument("--out", default="plots", help="output directory (default: plots)")
    pl.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    pl.add_argument("--final-iterations", type=int, default=1, metavar="K",
                    help="final score of a run = mean of its evaluations in its last K iterations (default: 1)")
    pl.add_argument("--smooth", type=int, default=1, metavar="W",
                    help="curves: each run's trailing mean over its last W evaluations (not iterations), before the IQM (default: 1, none)")
    pl.add_argument("--include-unfinished", action="store_true",
                    help="plot unfinished runs too, every run of a family cut at the last iteration all reached "
                         "(default: leave them out, with a note)")
    pl.set_defaults(func=cmd_plot)

    dd = sub.add_parser("didactic", help="Four-Corners figure: trajectories and HFR vs HIPI q(task | hovering path)")
    dd.add_argument("run_dir", help="a four-corners run directory")
    dd.add_argument("--quadrant", type=int, default=1, help="task whose -3 square the path hovers over (default: 1)")
    dd.add_argument("--out", default="didactic.png", help="output image (default: didactic.png; a PDF is written beside it)")
    dd.set_defaults(func=cmd_didactic)

    v = sub.add_parser("envs", help="list task families")
    v.set_defaults(func=cmd_envs)

    c = sub.add_parser("config", help="print the resolved config of a family/preset/overrides")
    c.add_argument("family")
    c.add_argument("--preset", default="paper", help="hyperparameter preset (default: paper)")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE")
    _add_config_flags(c)
    c.set_defaults(func=cmd_config)
    return p


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked for (it may call git)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .provenance import version_string

        print(version_string())
        parser.exit(0)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MetaRelabelError as exc:
        print(f"metarelabel: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a stop signal outside training (which handles its own)
        print("metarelabel: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `metarelabel config ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
