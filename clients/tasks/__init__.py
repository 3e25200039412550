"""Tasks by name: ``get_task("fashion_mnist")`` returns a fresh Task instance.

A new task is a ``Task`` subclass with a unique ``name``, registered with ``@register_task``;
importing this package registers the built-in ones.
"""

from __future__ import annotations

from fedmerge.clients.tasks.base import ArrayData, DataError, Task
from fedmerge.clients.tasks.digits import Digits
from fedmerge.clients.tasks.fashion_mnist import FashionMNIST
from fedmerge.clients.tasks.text import RottenTomatoes, TextMultiTask, WordNetNouns, WordNetVerbs

__all__ = [
    "ArrayData",
    "DataError",
    "Task",
    "available_tasks",
    "get_task",
    "register_task",
]

_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task expects a Task subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`; set the class attribute `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"task name {cls.name!r} is already taken by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    """A new instance of the task registered as ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(available_tasks())}"
        ) from None


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


register_task(FashionMNIST)
register_task(Digits)
for _text_task in (WordNetNouns, WordNetVerbs, RottenTomatoes, TextMultiTask):
    register_task(_text_task)
