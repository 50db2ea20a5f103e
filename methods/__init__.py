"""Registered distillation methods. Importing this package registers every in-tree method."""

from methods import coresets  # noqa: F401
