"""Milliseconds per PEARL gradient step for a preset's network and batch shapes.

    python benchmarks/grad_step.py [--family four-corners] [--preset paper] [--steps 30] [--threads 1]
                                   [--device cpu|cuda] [--device-buffers auto|on|off]
                                   [--set KEY=VALUE ...]

On a GPU, compare ``--device-buffers off`` (minibatches gathered on the host, copied per step)
with ``on`` (gathered from the buffers' device mirror; only the indices are copied).

Fills each task's buffers with random transitions (the step's cost does not depend on the data),
runs warm-up steps, then times ``--steps`` full gradient steps (batch sampling + update) and
prints ms/step and steps/s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from metarelabel.config import parse_sets
from metarelabel.errors import MetaRelabelError
from metarelabel.presets import make_config
from metarelabel.trainer import Trainer


def fill_random(trainer: Trainer, n: int = 4096) -> None:
    rng = np.random.default_rng(0)
    d = trainer.dims
    for task in range(trainer.num_tasks):
        rows = {"obs": rng.standard_normal((n, d.obs)), "actions": rng.uniform(-1, 1, (n, d.act)),
                "rewards": rng.standard_normal(n), "dense_rewards": rng.standard_normal(n),
                "terminals": np.zeros(n), "next_obs": rng.standard_normal((n, d.obs))}
        trainer.rl_buf.add(task, rows, rows["obs"][0])
        trainer.enc_buf.add(task, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="four-corners")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--device-buffers", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, as in `metarelabel train --set` (repeatable)")
    args = ap.parse_args()
    try:
        overrides = parse_sets(args.set)
        overrides.update({"torch_threads": args.threads, "device": args.device, "device_buffers": args.device_buffers})
        cfg = make_config(args.family, args.preset, overrides)
    except MetaRelabelError as exc:
        raise SystemExit(f"error: {exc}") from None
    trainer = Trainer(cfg, "/nonexistent", echo=lambda *_: None, tensorboard=False)
    fill_random(trainer)
    trainer.train_steps(args.warmup)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train_steps(args.steps)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    print(f"family={cfg.family} preset={cfg.preset} nets={cfg.hidden_layers}x{cfg.hidden_dim} "
          f"encoder={cfg.encoder_layers}x{cfg.encoder_hidden_dim} meta_batch={cfg.meta_batch} "
          f"batch={cfg.batch_size} context={cfg.embedding_batch_size} threads={args.threads} device={trainer.device} "
          f"device_buffers={'on' if trainer.rl_mirror is not None else 'off'} step={trainer.agent.step_kind}")
    print(f"gradient step: {dt * 1e3:.1f} ms/step  ({1.0 / dt:.1f} steps/s; "
          f"{cfg.num_train_steps_per_itr} steps/iteration = {dt * cfg.num_train_steps_per_itr:.1f} s)")


if __name__ == "__main__":
    main()
