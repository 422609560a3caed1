"""Task-family registry.  ``make_family(name, task_seed)`` builds one; optional families live
behind pip extras and say which extra to install when it is missing.

Families of your own: subclass ``TaskFamily`` and either call ``register_family(MyFamily)``
in the process that trains (the Python API), or expose the class as an entry point of the
group ``metarelabel.families`` in your package's metadata, so that every command (``train``,
``resume``, ``sweep``'s subprocesses, ``envs``) finds it by name once your package is installed:

    [project.entry-points."metarelabel.families"]
    my-family = "my_package.envs:MyFamily"
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError
from .base import TaskFamily


ENTRY_POINT_GROUP = "metarelabel.families"


@dataclass(frozen=True)
class FamilyEntry:
    module: str
    cls: str | type  # a class name in ``module``, or the class itself (registered families)
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


BUILTIN = frozenset(REGISTRY)
#: plugin families that failed to load: name -> the error, raised when that family is asked for
PLUGIN_ERRORS: dict[str, str] = {}
#: entry points that were ignored because they reuse a built-in family's name
PLUGIN_WARNINGS: list[str] = []
_plugins_loaded = False


def register_family(cls: type[TaskFamily], replace: bool = False) -> type[TaskFamily]:
    """Make a ``TaskFamily`` subclass available under its ``name`` (usable as a decorator).
    Its presets come from its ``presets`` class attribute (see ``presets.preset_values``)."""
    if not (isinstance(cls, type) and issubclass(cls, TaskFamily)):
        raise ConfigError(f"register_family: {cls!r} is not a subclass of metarelabel.envs.TaskFamily")
    name = cls.name
    problems = []
    if not isinstance(name, str) or not name:
        problems.append("a non-empty `name`")
    if not isinstance(cls.horizon, int) or cls.horizon <= 0:
        problems.append("a positive integer `horizon`")
    if not 0.0 < float(cls.discount) <= 1.0:
        problems.append("a `discount` in (0, 1]")
    if not cls.eval_is_train and (cls.num_train <= 0 or cls.num_eval < 0):
        problems.append("`num_train` > 0 and `num_eval` >= 0 (or `eval_is_train`)")
    if problems:
        raise ConfigError(f"register_family: {cls.__name__} needs " + ", ".join(problems))
    if name in BUILTIN or (name in REGISTRY and REGISTRY[name].cls is not cls and not replace):
        raise ConfigError(f"register_family: a task family named {name!r} already exists")
    REGISTRY[name] = FamilyEntry(cls.__module__, cls)
    return cls


def load_plugins() -> None:
    """Register the families that installed packages expose as ``metarelabel.families`` entry
    points (once per process).  A plugin that fails to load is recorded in ``PLUGIN_ERRORS``
    and reported when its family is asked for; it never breaks the other families."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:  # never let a plugin shadow or break a built-in family
            PLUGIN_WARNINGS.append(f"task-family plugin {ep.name!r} ({ep.value}) ignored: "
                                   f"{ep.name!r} is a built-in family")
            continue
        try:
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise ConfigError(f"the class's name is {getattr(cls, 'name', None)!r}; entry point and class name must agree")
            register_family(cls)  # registering the same class again is a no-op
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the other families down
            PLUGIN_ERRORS[ep.name] = f"task-family plugin {ep.name!r} ({ep.value}) failed to load: {exc}"


def family_names() -> list[str]:
    """Built-in and plugin family names (plugins that failed to load included)."""
    load_plugins()
    return list(REGISTRY) + [n for n in PLUGIN_ERRORS if n not in REGISTRY]


def family_class(name: str) -> type[TaskFamily]:
    if name not in REGISTRY:
        load_plugins()
    if name not in REGISTRY and name in PLUGIN_ERRORS:
        raise ConfigError(PLUGIN_ERRORS[name])
    if name not in REGISTRY:
        raise ConfigError(f"unknown task family {name!r}; choose from: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    if isinstance(entry.cls, type):
        return entry.cls
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


__all__ = ["PLUGIN_ERRORS", "PLUGIN_WARNINGS", "REGISTRY", "TaskFamily", "family_class", "family_names", "load_plugins", "make_family", "register_family"]
