"""The artifact kinds of the matching methods: what their phases ask the harness to prepare (``mmdd prepare``).

* ``shortcut`` — a phase whose teacher is ``shortcut(start, end)`` requires ``Requirement.of("shortcut", start=start,
  end=end)``; :class:`ShortcutArtifact` builds it into ``data/prepared/<dataset>/<method>/shortcut-end<e>-start<s>/``
  and the engine reads it from there (docs/methods.md#shortcut-teachers).
* ``head-experts`` — the ``heads`` student (RepBlend) requires its head-only expert trajectories
  (:func:`head_experts_requirement`); :class:`HeadExpertsArtifact` trains them once per dataset from the training
  pairs and writes them in the expert store format; the engine reads them lazily (docs/methods.md#repblend).

Both are registered under the ``mmdd.artifacts`` entry-point group (pyproject.toml).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmark.experts.store import ExpertCollection
from benchmark.requirements import ArtifactKind, BuildContext, Requirement
from methods.matching.config import ConfigError, EngineConfig, HeadExpertSpec, RepresentationSpec, TeacherSpec
from methods.matching.heads import build_head_experts, frozen_encoder
from methods.matching.shortcut import build_shortcuts, shortcut_bytes_report

KIND = "shortcut"
HEAD_EXPERTS = "head-experts"


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


# ---------------------------------------------------------------------------------------------------- head experts
def trained_head_spec(cfg: EngineConfig) -> HeadExpertSpec:
    """The head-expert recipe of ``cfg`` cut to the last epoch its phases can reach (its trajectories are exactly the
    first epochs of the full-length recipe: no schedule), so epochs no start window reaches are never trained."""
    spec = cfg.representation.head_experts
    last = max(ph.max_start - 1 + cfg.expert_epochs for ph in cfg.phases)
    if not 1 <= last <= spec.epochs:
        raise ConfigError(f"the phases' start windows reach head-expert epoch {last}, but head_experts.epochs is "
                          f"{spec.epochs}: narrow start_window or raise head_experts.epochs")
    return dataclasses.replace(spec, epochs=last)


def head_experts_requirement(cfg: EngineConfig) -> Requirement:
    """What the ``heads`` student of ``cfg`` reads: its trained head-expert recipe over its frozen encoder."""
    rep = cfg.representation
    encoder = {"encoder": rep.frozen_encoder}
    if rep.frozen_encoder == "expert":
        encoder["encoder_expert"] = rep.encoder_expert
    return Requirement.of(HEAD_EXPERTS, **dataclasses.asdict(trained_head_spec(cfg)), **encoder)


class HeadExpertsArtifact(ArtifactKind):
    """Head-only expert trajectories of the frozen-encoder (``heads``) student, trained from the training pairs."""

    kind = HEAD_EXPERTS
    needs_train_data = True

    def build(self, requirement: Requirement, ctx: BuildContext) -> dict[str, Any]:
        p = requirement.params
        spec = HeadExpertSpec.parse({f.name: p[f.name] for f in dataclasses.fields(HeadExpertSpec)})
        rep = RepresentationSpec(student="heads", frozen_encoder=p["encoder"],
                                 encoder_expert=int(p.get("encoder_expert", 0)))
        if ctx.student is None or ctx.train_id is None:
            raise ValueError(f"{HEAD_EXPERTS} needs the student config and the training data's identity in its "
                             "BuildContext (the prepare stage passes them)")
        experts = ExpertCollection(ctx.experts_dir) if rep.frozen_encoder == "expert" else None
        encoder, _, _, source = frozen_encoder(ctx.student, rep, experts, HEAD_EXPERTS)
        paths = build_head_experts(ctx.out_dir, encoder, source, spec, ctx.student, ctx.train_pairs, ctx.train_id,
                                   ctx.device)
        return {"files": [p.name for p in paths], "experts": spec.count, "epochs": spec.epochs, "encoder": source,
                "bytes": sum(p.stat().st_size for p in paths)}
