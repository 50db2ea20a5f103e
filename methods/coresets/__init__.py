"""Coreset baselines: real training pairs chosen by a rule, trained with identity targets and fixed rates.

No reference code exists (REFERENCE_METHODS §6); each selection rule is defined in its module's docstring.
"""

from methods.coresets import forgetting, herding, kcenter, random  # noqa: F401
