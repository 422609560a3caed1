"""Task-family registry.  ``make_family(name, task_seed)`` builds one; optional families live
behind pip extras and say which extra to install when it is missing."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError
from .base import TaskFamily


@dataclass(frozen=True)
class FamilyEntry:
    module: str
    cls: str
    extra: str | None = None


REGISTRY: dict[str, FamilyEntry] = {
    "four-corners": FamilyEntry("metarelabel.envs.point", "FourCorners"),
    "point-robot": FamilyEntry("metarelabel.envs.point", "PointRobot"),
    "sparse-point-robot": FamilyEntry("metarelabel.envs.point", "SparsePointRobot"),
    "cheetah-vel": FamilyEntry("metarelabel.envs.mujoco_locomotion", "CheetahVel", "mujoco"),
    "cheetah-vel-sparse": FamilyEntry("metarelabel.envs.mujoco_locomotion", "CheetahVelSparse", "mujoco"),
    "cheetah-highdim": FamilyEntry("metarelabel.envs.mujoco_locomotion", "CheetahHighdim", "mujoco"),
    "ant-vel": FamilyEntry("metarelabel.envs.mujoco_locomotion", "AntVel", "mujoco"),
    "ant-goal": FamilyEntry("metarelabel.envs.mujoco_locomotion", "AntGoal", "mujoco"),
    "sawyer-reach": FamilyEntry("metarelabel.envs.sawyer", "SawyerReach", "metaworld"),
    "sawyer-push": FamilyEntry("metarelabel.envs.sawyer", "SawyerPush", "metaworld"),
    "visual-reacher": FamilyEntry("metarelabel.envs.visual_reacher", "VisualReacher", "mujoco"),
}


def family_class(name: str) -> type[TaskFamily]:
    if name not in REGISTRY:
        raise ConfigError(f"unknown task family {name!r}; choose from: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        if entry.extra is None:
            raise
        raise ConfigError(
            f"task family {name!r} needs an optional extra: install metarelabel[{entry.extra}] ({exc})"
        ) from None
    return getattr(module, entry.cls)


def make_family(name: str, task_seed: int = 0) -> TaskFamily:
    return family_class(name)(task_seed=task_seed)


__all__ = ["REGISTRY", "TaskFamily", "family_class", "make_family"]
