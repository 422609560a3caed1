"""``random``: every path (no keep-original coin) goes to a train task drawn uniformly."""
from __future__ import annotations

import numpy as np

from .base import Relabeler, register


@register
class RandomRelabel(Relabeler):
    name = "random"
    uses_keep_original = False

    def choose(self, paths):
        tasks = self.ctx.rng.integers(0, self.ctx.num_tasks, size=len(paths))
        return [np.full(len(p), k, np.int64) for p, k in zip(paths, tasks)]
