"""One way to name any pluggable thing: a registered name, an import path or an entry point.

Aggregators, tasks, partitioners and client-side loss terms each have a ``Registry``. A spec
(what a config names) resolves, in this order, as

1. a name registered in this process (``@fedmerge.register``, ``@register_task``, ...);
2. an import path ``package.module:Name`` (no registration needed);
3. an entry point of that kind's group (``fedmerge.aggregators``, ``fedmerge.tasks``, ...) of an
   installed distribution, so another package adds plug-ins without touching this one.

A name may be registered again only by the same object (same module and qualified name, as after
a module reload); another one is a ValueError naming both. An unknown spec is a ValueError with
a "did you mean", what is available and how to plug one in.

Ray workers and ``fedmerge resume`` are fresh processes: a name registered by a user's module
exists there only once that module is imported. ``import_plugins`` imports the modules a run
lists in ``[run] plugins`` (module names or ``.py`` files), and ``Registry.origin`` names the
module a registered object came from, so a run adds it to that list itself. No flwr or ray here.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = [
    "BUILTIN_PREFIX",
    "PluginError",
    "Registry",
    "concrete_subclass",
    "import_plugins",
    "qualified",
]

T = TypeVar("T")

BUILTIN_PREFIX = "fedmerge."
"""Objects from modules under this package are built in: importing fedmerge registers them."""


class PluginError(ValueError):
    """A plug-in cannot be found, imported or used; the message names it and the fix."""


def qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _shown(spec: str) -> str:
    return repr(spec) if len(spec) <= 80 else f"{spec[:80]!r}... ({len(spec):,} characters)"


def concrete_subclass(base: type, noun: str) -> Callable[[Any, str], Any]:
    """An ``accept`` for a Registry of classes: ``obj`` must be a subclass of ``base`` that
    implements every abstract method (``noun`` names the base in the error)."""

    def accept(obj: Any, where: str) -> Any:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginError(f"{where} is {obj!r}, not {noun}")
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(obj.__abstractmethods__))
            raise PluginError(
                f"{where} ({qualified(obj)}) is abstract: it does not implement {missing}"
            )
        return obj

    return accept


class Registry(Generic[T]):
    """The plug-ins of one kind: ``kind`` names it in messages, ``group`` is its entry-point group.

    ``accept(obj, where)`` checks an object any route found (a subclass of the right base, not
    abstract, ...) and returns it, raising ``PluginError`` otherwise; ``how_to`` is the sentence
    that tells a user how to add one.
    """

    def __init__(
        self, kind: str, group: str, *, accept: Callable[[Any, str], T], how_to: str
    ) -> None:
        self.kind, self.group = kind, group
        self._accept = accept
        self._how_to = how_to
        self._entries: dict[str, T] = {}

    # ---- registering -----------------------------------------------------------------------
    def add(self, name: str, obj: Any) -> T:
        """Register ``obj`` (checked by ``accept``) under ``name``; the duplicate rule above."""
        if not isinstance(name, str) or not name.strip() or ":" in name:
            raise ValueError(
                f"cannot register {qualified(obj)} as {self.kind} {name!r}: a name is a "
                "non-empty string without ':'"
            )
        taken = self._entries.get(name)
        if taken is not None and qualified(taken) != qualified(obj):
            raise ValueError(
                f"{self.kind} name {name!r} is already registered by {qualified(taken)}; "
                f"cannot register {qualified(obj)} under it"
            )
        checked = self._accept(obj, f"{self.kind} {name!r} ({qualified(obj)})")
        self._entries[name] = checked
        return checked

    # ---- looking up ------------------------------------------------------------------------
    def registered(self) -> list[str]:
        """Names registered in this process, sorted."""
        return sorted(self._entries)

    def available(self) -> list[str]:
        """Registered names and installed entry-point names, sorted (import paths are open-ended)."""
        return sorted(set(self._entries) | set(self._entry_points()))

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, str) and spec in self._entries

    def _entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def resolve(self, spec: str) -> T:
        """The object ``spec`` names: a registered name, a ``module:Name`` path, an entry point."""
        if not isinstance(spec, str):
            raise PluginError(f"a {self.kind} is named by a string, got {type(spec).__name__}")
        if spec in self._entries:
            return self._entries[spec]
        if ":" in spec:
            return self._from_path(spec)
        eps = self._entry_points()
        if spec in eps:
            return self._from_entry_point(eps[spec])
        names = sorted(set(self._entries) | set(eps))
        # difflib's cost is the product of the lengths: a huge name is no typo and is not searched.
        close = difflib.get_close_matches(spec, names, n=1) if len(spec) <= 100 else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PluginError(
            f"unknown {self.kind} {_shown(spec)}.{hint} Available: {', '.join(names) or '(none)'}. "
            + self._how_to
        )

    def _from_path(self, spec: str) -> T:
        module_name, _, attr_path = spec.partition(":")
        if not module_name or not attr_path:
            raise PluginError(
                f'{self.kind} path {_shown(spec)} must look like "package.module:Name"'
            )
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(
                f"{self.kind} path {_shown(spec)}: cannot import {module_name!r}: {exc} (is its "
                "folder on PYTHONPATH?)"
            ) from exc
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as exc:
                raise PluginError(
                    f"{self.kind} path {_shown(spec)}: {part!r} not found in {obj!r}"
                ) from exc
        return self._accept(obj, f"{self.kind} path {_shown(spec)}")

    def _from_entry_point(self, ep: EntryPoint) -> T:
        dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
        where = f"{self.kind} entry point {ep.name!r} ({ep.value}, from {dist})"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must name itself, whatever it raised
            raise PluginError(f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
        return self._accept(obj, where)

    def origin(self, spec: str) -> str | None:
        """The module a fresh process must import for ``spec`` to resolve there (a name this
        process registered, or the module of an import path), or None when nothing needs
        importing (a built-in, an entry point).

        A name registered from ``__main__`` (the script being run) cannot be imported by another
        process: that is a PluginError saying how to fix it.
        """
        if ":" in spec:
            module = spec.partition(":")[0]
        elif spec not in self._entries or spec in self._entry_points():
            return None
        else:
            module = getattr(self._entries[spec], "__module__", None) or ""
        if module.startswith(BUILTIN_PREFIX) or module == "fedmerge":
            return None
        if module == "__main__":
            raise PluginError(
                f"{self.kind} {spec!r} is registered by the script being run (__main__); Ray "
                "workers and `fedmerge resume` cannot import a script: move it into a module "
                "(a .py file on PYTHONPATH) and import that, or list the file in [run] plugins"
            )
        return module


def import_plugins(entries: Iterable[str]) -> None:
    """Import each of ``entries`` once: a module name (``mypkg.tasks``) or the path of a ``.py``
    file, imported under its stem (its folder goes onto ``sys.path`` so that Ray workers, which
    inherit the driver's path, find it too). What they register becomes available by name."""
    for entry in entries:
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            if not path.is_file():
                raise PluginError(f"run.plugins: {entry!r} is not a file")
            name = path.stem
            loaded = sys.modules.get(name)
            if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
                continue
            if loaded is not None:
                raise PluginError(
                    f"run.plugins: {entry!r} would be imported as {name!r}, but a module of that "
                    f"name is already loaded from {getattr(loaded, '__file__', '?')}; rename the file"
                )
            folder = str(path.parent)
            if folder not in sys.path:
                sys.path.append(folder)
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"run.plugins: cannot import {entry!r} as a module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise PluginError(
                    f"run.plugins: importing {entry!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            continue
        if entry in sys.modules:
            continue
        try:
            importlib.import_module(entry)
        except ImportError as exc:
            raise PluginError(
                f"run.plugins: cannot import {entry!r}: {exc} (a module on PYTHONPATH, or the "
                "path of a .py file)"
            ) from exc
        except Exception as exc:
            raise PluginError(
                f"run.plugins: importing {entry!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
