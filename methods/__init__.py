"""Registered distillation methods. Importing this package registers every in-tree method."""

from methods import coresets  # noqa: F401
from methods import mtt_vl  # noqa: F401
from methods import tesla_vl  # noqa: F401
from methods import lors  # noqa: F401
from methods import ptm_st  # noqa: F401
