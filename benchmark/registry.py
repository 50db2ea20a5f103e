"""Method registry: in-tree methods register with :func:`register_method`; out-of-tree packages through the
``mmdd.methods`` entry-point group (each entry point names a Method subclass)."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from benchmark.interface import Method

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mmdd.methods"
_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} must subclass benchmark.interface.Method")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_METHODS[name].__module__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    importlib.import_module("methods")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _METHODS:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            log.warning("entry point %s=%s failed to load: %s", ep.name, ep.value, exc)
            continue
        register_method(ep.name)(cls)


def available_methods() -> list[str]:
    """Names of every registered method (in-tree and entry points)."""
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``; a clear error lists the choices."""
    _load_all()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(_METHODS)} "
                         f"(see `mmdd methods`)") from None
