"""The ``shortcut`` artifact kind: what PTM-ST-style phases ask the harness to prepare (``mmdd prepare``).

A phase whose teacher is ``shortcut(start, end)`` requires ``Requirement.of("shortcut", start=start, end=end)``;
the harness's generic ``prepare`` stage builds it with :class:`ShortcutArtifact` (registered under the
``mmdd.artifacts`` entry-point group) into ``data/prepared/<dataset>/<method>/shortcut-end<e>-start<s>/``, and the
engine reads it from there (docs/methods.md#shortcut-teachers).
"""

from __future__ import annotations

from typing import Any

from benchmark.requirements import ArtifactKind, BuildContext, Requirement
from methods.matching.config import TeacherSpec
from methods.matching.shortcut import build_shortcuts, shortcut_bytes_report

KIND = "shortcut"


def shortcut_requirement(teacher: TeacherSpec) -> Requirement:
    """The artifact a ``shortcut(start, end)`` teacher reads."""
    return Requirement.of(KIND, start=int(teacher.start), end=int(teacher.end))


class ShortcutArtifact(ArtifactKind):
    """Straight-line (convexified) teachers with per-layer β over one segment of every expert."""

    kind = KIND

    def build(self, requirement: Requirement, ctx: BuildContext) -> dict[str, Any]:
        spec = requirement.params
        paths = build_shortcuts(ctx.experts_dir, ctx.out_dir, int(spec["start"]), int(spec["end"]))
        report = shortcut_bytes_report(ctx.experts_dir, ctx.out_dir)
        return {"files": [p.name for p in paths], **report}
