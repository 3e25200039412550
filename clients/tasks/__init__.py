"""Tasks by name: ``get_task("fashion_mnist")`` returns a fresh Task instance.

A task spec resolves like any plug-in (``fedmerge.plugins``): a name registered with
``@register_task``, an import path ``package.module:TaskClass``, or an entry point of the
``fedmerge.tasks`` group. ``TaskSpec`` is how a run carries its task to other processes (Flower
clients in Ray workers, the evaluator and scoring actors, ``fedmerge resume``): the spec, the
checked ``[data.task_params]`` and the ``[run] plugins`` modules to import first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fedmerge.clients.tasks.base import ArrayData, DataError, Task
from fedmerge.clients.tasks.digits import Digits
from fedmerge.clients.tasks.fashion_mnist import FashionMNIST
from fedmerge.clients.tasks.text import RottenTomatoes, TextMultiTask, WordNetNouns, WordNetVerbs
from fedmerge.plugins import Registry, concrete_subclass, import_plugins

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASKS",
    "ArrayData",
    "DataError",
    "Task",
    "TaskSpec",
    "as_task",
    "available_tasks",
    "create_task",
    "get_task",
    "register_task",
    "task_params",
]

ENTRY_POINT_GROUP = "fedmerge.tasks"

T = TypeVar("T", bound=type[Task])


TASKS: Registry[type[Task]] = Registry(
    "task",
    ENTRY_POINT_GROUP,
    accept=concrete_subclass(Task, "a fedmerge Task subclass"),
    how_to=(
        "To plug one in: (1) decorate a Task subclass with @fedmerge.register_task in a module "
        'listed in [run] plugins; (2) give its import path, "package.module:TaskClass"; or (3) '
        f'expose it from an installed package under the entry-point group "{ENTRY_POINT_GROUP}". '
        "No code: the tabular, hf_text_classification and hf_image_classification tasks read "
        "your own files (see [data.task_params])."
    ),
)


def register_task(cls: T | str | None = None) -> Any:
    """Class decorator: make a Task subclass available as ``get_task(name)``.

    ``@register_task`` uses the class attribute ``name``; ``@register_task("name")`` sets it.
    """

    def decorator(klass: T, key: str | None = None) -> T:
        if not (isinstance(klass, type) and issubclass(klass, Task)):
            raise TypeError(f"register_task expects a Task subclass, got {klass!r}")
        key = key or klass.name
        if not key:
            raise ValueError(
                f"{klass.__qualname__} has no `name`; set the class attribute `name` or use "
                '@register_task("name")'
            )
        TASKS.add(key, klass)
        if not klass.name:
            klass.name = key
        return klass

    if cls is None or isinstance(cls, str):
        return lambda klass: decorator(klass, cls)
    return decorator(cls)


def create_task(spec: str, params: Mapping[str, Any] | None = None) -> Task:
    """A new instance of the task ``spec`` names, built with ``params`` (checked against its
    ``Params``): a bad or unknown parameter is a ValueError naming the task and the parameter."""
    from fedmerge.aggregators.params import HyperparameterError

    cls = TASKS.resolve(spec)
    try:
        return cls(**dict(params or {}))
    except HyperparameterError as exc:
        raise ValueError(f"data.task_params: {exc}") from exc
    except TypeError as exc:
        raise ValueError(f"data.task_params: {exc}") from exc


def get_task(spec: str, params: Mapping[str, Any] | None = None) -> Task:
    """A new instance of the task ``spec`` names (``create_task``)."""
    return create_task(spec, params)


def available_tasks() -> list[str]:
    """Registered and installed (entry-point) task names, sorted."""
    return TASKS.available()


def task_params(spec: str):
    """The declared parameters of the task ``spec`` names (``fedmerge list --task NAME``)."""
    from fedmerge.aggregators.params import describe

    cls = TASKS.resolve(spec)
    return [] if cls.Params is None else describe(cls.Params)


@dataclass(frozen=True)
class TaskSpec:
    """A task as a run names it, in a form that crosses processes: the spec, its parameters and
    the plug-in modules that must be imported before the spec resolves."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    adapter: Mapping[str, Any] | None = None
    """``[train.peft]`` as a dict with the run's ``seed``, when the run trains adapters."""

    def build(self) -> Task:
        import_plugins(self.plugins)
        task = create_task(self.name, self.params)
        if self.adapter:
            from fedmerge.clients.adapters import PeftConfig

            task.adapter = PeftConfig.from_dict(self.adapter)
            task.adapter_seed = int(self.adapter.get("seed", 0))
        return task

    def to_dict(self) -> dict[str, Any]:
        raw = {"name": self.name, "params": dict(self.params), "plugins": list(self.plugins)}
        if self.adapter:
            raw["adapter"] = dict(self.adapter)
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | str) -> TaskSpec:
        """From ``to_dict`` output (or a bare task name, as older runs stored it)."""
        if isinstance(raw, str):
            return cls(raw)
        return cls(
            name=str(raw["name"]),
            params=dict(raw.get("params") or {}),
            plugins=tuple(raw.get("plugins") or ()),
            adapter=dict(raw["adapter"]) if raw.get("adapter") else None,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def as_task(task: Task | TaskSpec | Mapping[str, Any] | str) -> Task:
    """A Task from what crosses processes: a Task as is, a TaskSpec or its ``to_dict`` output
    built (plug-in modules imported first), a bare name created without parameters."""
    if isinstance(task, Task):
        return task
    if isinstance(task, TaskSpec):
        return task.build()
    if isinstance(task, (Mapping, str)):
        return TaskSpec.from_dict(task).build()
    raise TypeError(f"expected a Task, a TaskSpec or a task name, got {type(task).__name__}")


register_task(FashionMNIST)
register_task(Digits)
for _text_task in (WordNetNouns, WordNetVerbs, RottenTomatoes, TextMultiTask):
    register_task(_text_task)

# The generic tasks: your own files, configured in [data.task_params].
from fedmerge.clients.tasks.hf_image import HFImageClassification  # noqa: E402
from fedmerge.clients.tasks.hf_text import HFTextClassification  # noqa: E402
from fedmerge.clients.tasks.tabular import Tabular  # noqa: E402

register_task(Tabular)
register_task(HFTextClassification)
register_task(HFImageClassification)
