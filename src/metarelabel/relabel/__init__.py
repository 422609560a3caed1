"""Relabeling strategies: one small class each, selected by name."""
from __future__ import annotations

from ..errors import ConfigError
from . import hfr, hipi, none, random  # noqa: F401  (register the strategies)
from .base import REGISTRY, Learner, RelabelContext, Relabeler


def make_relabeler(name: str, ctx: RelabelContext) -> Relabeler:
    if name not in REGISTRY:
        raise ConfigError(f"unknown relabeling strategy {name!r}; choose from: {', '.join(REGISTRY)}")
    return REGISTRY[name](ctx)


__all__ = ["REGISTRY", "Learner", "RelabelContext", "Relabeler", "make_relabeler"]
