"""Method registry. Every method — in-tree or in another package — registers through the ``mmdd.methods``
entry-point group (each entry point names a :class:`~benchmark.interface.Method` subclass); the harness never
imports ``methods/`` itself. :func:`register_method` adds a class at run time (tests, notebooks)."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from benchmark.interface import Method

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mmdd.methods"


class _Registry:
    """Registered classes by name; entry points are loaded once, on first use."""

    def __init__(self) -> None:
        self.methods: dict[str, type[Method]] = {}
        self.loaded = False

    def add(self, name: str, cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} must subclass benchmark.interface.Method")
        known = self.methods.get(name)
        if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {known.__module__}")
        cls.name = name
        self.methods[name] = cls
        return cls

    def load_entry_points(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.methods:
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # a broken plug-in must not hide the others
                log.warning("entry point %s=%s failed to load: %s", ep.name, ep.value, exc)
                continue
            self.add(ep.name, cls)


_REGISTRY = _Registry()


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` in this process."""

    def wrap(cls: type[Method]) -> type[Method]:
        return _REGISTRY.add(name, cls)

    return wrap


def available_methods() -> list[str]:
    """Names of every registered method."""
    _REGISTRY.load_entry_points()
    return sorted(_REGISTRY.methods)


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``; a clear error lists the choices."""
    _REGISTRY.load_entry_points()
    try:
        return _REGISTRY.methods[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(_REGISTRY.methods)} "
                         f"(see `mmdd methods`)") from None
