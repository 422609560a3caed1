"""About the size of a run's last checkpoint per family and preset (its buffers' contents by
then; networks and optimizer state add a few MiB at most), as a Markdown table.

    python benchmarks/checkpoint_sizes.py [--presets quick,cpu,paper]

The same accounting as the start-of-run estimate (``trainer.checkpoint_bytes``): every
collected path up to the RL buffers' capacity, plus the encoder and sampler buffers; image
buffers keep one next frame per path end.
Families whose extra is not installed are listed as such.
"""
from __future__ import annotations

import argparse

import numpy as np

from metarelabel.envs import family_names, make_family
from metarelabel.errors import MetaRelabelError
from metarelabel.pearl import make_dims
from metarelabel.presets import make_config
from metarelabel.fmt import format_bytes as fmt
from metarelabel.trainer import checkpoint_bytes


def size(family: str, preset: str) -> str:
    try:
        cfg = make_config(family, preset, {})
    except MetaRelabelError:
        return "-"  # the preset does not cover this family
    try:
        env = make_family(family, cfg.task_seed)
    except MetaRelabelError:
        return "(extra not installed)"
    dims = make_dims(env, cfg)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    return fmt(checkpoint_bytes(cfg, len(env.train_tasks), obs_dim, act_dim, dims.obs_shape if dims.image else None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="quick,cpu,paper")
    presets = [p for p in ap.parse_args().presets.split(",") if p]
    print("| family | " + " | ".join(presets) + " |")
    print("|---|" + "---|" * len(presets))
    for fam in family_names():
        print(f"| {fam} | " + " | ".join(size(fam, p) for p in presets) + " |")


if __name__ == "__main__":
    main()
