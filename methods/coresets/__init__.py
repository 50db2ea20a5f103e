"""Coreset baselines: real training pairs chosen by a rule, trained with identity targets and fixed rates.

No reference code exists for them; each selection rule is defined in its module's docstring
(docs/methods.md#coresets).
"""
