"""Method registry. Every method — in-tree or in another package — registers through the ``mmdd.methods``
entry-point group (each entry point names a :class:`~benchmark.interface.Method` subclass); the harness never
imports ``methods/`` itself. :func:`register_method` adds a class at run time (tests, notebooks)."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from benchmark.interface import Method

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mmdd.methods"
VARIANT_SEP = "__"  # DVC stage names allow only letters, digits, '-' and '_'


def split_variant(name: str) -> tuple[str, str]:
    """``"ptm-st__pt-only"`` -> ``("ptm-st", "pt-only")``; a plain name has an empty variant.

    A variant is a registered method run with extra parameter overrides (``methods.<name>`` in the preset): a
    grid entry of its own (cells, tables), the base method's code and defaults."""
    base, sep, variant = name.partition(VARIANT_SEP)
    if sep and not variant:
        raise ValueError(f"method name {name!r} ends with {VARIANT_SEP!r}: write <method>{VARIANT_SEP}<variant>")
    return base, variant


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
    """The Method class registered as ``name`` (a variant ``<method>__<variant>`` gets its base method's class);
    a clear error lists the choices."""
    _REGISTRY.load_entry_points()
    try:
        return _REGISTRY.methods[split_variant(name)[0]]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(_REGISTRY.methods)} "
                         f"(see `mmdd methods`)") from None
