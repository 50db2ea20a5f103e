"""Typed options of the trajectory-matching engine, validated at the edge.

A method's ``params`` are a flat, JSON-able dict (so the harness can override single keys, e.g. ``iterations=200``);
:meth:`EngineConfig.from_params` turns them into the frozen dataclasses below and rejects bad values with a message
that names the field and the fix.

Key ↔ dataclass map (every key is optional here; the registered methods ship complete defaults):

=====================  =========================================================================================
``unroll``             ``full`` (gradient through the whole unrolled inner loop, second order) or ``tesla``
                       (memory-efficient detached-chain gradient, docs/methods.md#tesla). Different objectives.
``full_impl``          how ``full`` is differentiated: ``graph`` (one autograd graph over all steps; memory grows
                       with ``syn_steps``) or ``adjoint`` (reverse sweep that recomputes one step at a time: the
                       same gradient, memory flat in ``syn_steps``, one extra forward/backward per step).
``retain_graph``       ``tesla``/``adjoint``: build each step's gradient graph in the first pass and keep it for the
                       second instead of recomputing it (one forward and one first-order backward less per step;
                       memory grows with ``syn_steps``, like ``full_impl=graph``). Default off: recompute.
``similarity``         ``none`` | ``full`` | ``lowrank`` with ``sim_rank`` and ``sim_alpha``.
``loss``               ``ce wbce infonce cwcl kl bce mse`` (:mod:`benchmark.losses`).
``normalize``          ``separate``: Σ_m ‖θ_P^m−θ*^m‖²/‖θ_0^m−θ*^m‖²; ``merged``: Σ_m ‖·‖² / Σ_m ‖θ_0^m−θ*^m‖².
``syn_steps``          P, inner steps per iteration.   ``expert_epochs``: E, target = start + E.
``batch_size``         b, inner mini-batch (permutation stream; leftovers of a permutation are skipped);
                       null: all pairs of the phase in every step (MTT-VL's b = N).
``lr_img lr_txt``      outer SGD learning rates of the synthetic images / text features;
``lr_lr lr_sim``       ... of the learnable inner learning rates / of the similarity parameters.
``momentum``           outer momentum of images and texts; ``momentum_lr``, ``momentum_sim`` of the other groups.
``lr_init_img/_txt``   initial inner learning rates η.  ``lr_min``: η is clamped to ≥ lr_min after every step.
``iterations``         outer iterations per phase (phases may override).  ``start_window``: [min, max) start epochs.
``teacher``            ``raw`` or ``shortcut(start, end)`` (phases may override).  ``ema_decay`` likewise.
``phases``             list of phase dicts ``{pairs, teacher, start_window, iterations, ema_decay, sim_rank}`` —
                       or the column form ``{pairs: [...], teacher: [...], ...}`` whose lists must have equal length.
                       ``pairs: null`` takes the rest of the budget. Missing fields inherit the top-level keys.
``inner_dropout``      ``replay`` (student in train mode; the recompute pass replays each step's RNG so it sees the
                       same dropout masks) or ``off`` (student in eval mode, no dropout).
``dtype``              ``float32`` or ``float64`` (tests).  ``teacher_cache_mb``: RAM/VRAM cache for expert epochs.
``bug_compat``         :class:`BugCompat` flags (all off by default).
``student``            ``full`` (the task's student: trainable image tower + text head) or ``heads`` (a FROZEN
                       image encoder, then an image ProjectionHead d→d; only the two heads are θ, matched against
                       head-only expert trajectories the engine trains in memory, :mod:`.heads`).
``frozen_encoder``     ``heads``: ``expert`` (the image tower of harness expert ``encoder_expert`` at its last
                       epoch) or ``pretrained`` (the task's tower config with its published weights, e.g. NFNet-L0).
``encoder_grad``       ``heads``: ``accumulate`` (features under no_grad, ∂J/∂U summed over all steps, then one
                       encoder backward per sample used) or ``per_step`` (a VJP through the encoder in every step).
``head_experts``       ``heads``: {count, epochs, lr_img, lr_txt, batch_size, seed} of the head-only experts.
``blend_alpha``        α_b of representation blending (``heads`` only): per inner step λ ~ Beta(α_b, α_b) and one
                       permutation π; features and synthetic texts are mixed by M = λI + (1−λ)P, the target
                       similarity is not. α_b ≤ 0: off (λ ≡ 1, nothing drawn).
``checkpoint_every``   k: the harness's Checkpointer saves every k outer iterations (0: never); not an engine field.
=====================  =========================================================================================
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from benchmark.constants import SIMILARITY_KINDS as SIMILARITIES
from benchmark.losses import LOSSES

UNROLLS = ("full", "tesla")
FULL_IMPLS = ("graph", "adjoint")
NORMALIZE = ("separate", "merged")
DROPOUT = ("replay", "off")
DTYPES = ("float32", "float64")
STUDENTS = ("full", "heads")
FROZEN_ENCODERS = ("expert", "pretrained")
ENCODER_GRADS = ("accumulate", "per_step")


class ConfigError(ValueError):
    """A matching-engine option is invalid; the message names the field and the fix."""


def _fail(fld: str, msg: str, fix: str) -> ConfigError:
    return ConfigError(f"matching option {fld!r}: {msg}; {fix}")


def _from_mapping(cls, value: Any, fld: str, what: str, example: str):
    """``cls(**value)`` for a mapping whose keys are all fields of the dataclass ``cls``; else a ConfigError."""
    if not isinstance(value, dict):
        raise _fail(fld, f"must be a mapping, got {value!r}", f"pass e.g. {example}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(value) - known)
    if bad:
        raise _fail(fld, f"unknown {what}(s) {bad}", f"known {what}s: {sorted(known)}")
    return cls(**value)


@dataclass(frozen=True)
class TeacherSpec:
    """``raw`` expert trajectories, or ``shortcut(start, end)``: the straight-line (convexified) trajectories of
    docs/methods.md#shortcut-teachers over epochs ``start..end`` **inclusive** (PTM's directory ``convexified_0_6`` is
    ``shortcut(0, 5)``: its END is exclusive)."""

    kind: str = "raw"
    start: int = 0
    end: int | None = None

    _PATTERN = re.compile(r"^\s*shortcut\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")

    @classmethod
    def parse(cls, value: Any, where: str = "teacher") -> "TeacherSpec":
        if isinstance(value, TeacherSpec):
            return value
        if value is None or value == "raw":
            return cls("raw")
        if isinstance(value, str):
            m = cls._PATTERN.match(value)
            if not m:
                raise _fail(where, f"cannot parse {value!r}",
                            "write 'raw' or 'shortcut(START, END)', e.g. 'shortcut(0, 5)'")
            return cls._checked("shortcut", int(m.group(1)), int(m.group(2)), where)
        if isinstance(value, dict):
            kind = value.get("kind", "raw")
            if kind == "raw":
                return cls("raw")
            if kind == "shortcut":
                if "end" not in value:
                    raise _fail(where, "a shortcut teacher needs 'end'", "give {kind: shortcut, start: S, end: E}")
                return cls._checked("shortcut", int(value.get("start", 0)), int(value["end"]), where)
            raise _fail(where, f"unknown kind {kind!r}", "use 'raw' or 'shortcut'")
        raise _fail(where, f"unsupported value {value!r}", "write 'raw' or 'shortcut(START, END)'")

    @classmethod
    def _checked(cls, kind: str, start: int, end: int, where: str) -> "TeacherSpec":
        if start < 0 or end <= start:
            raise _fail(where, f"shortcut({start}, {end}) is empty", "need 0 <= start < end (end inclusive)")
        return cls(kind, start, end)

    def __str__(self) -> str:
        return "raw" if self.kind == "raw" else f"shortcut({self.start}, {self.end})"

    def to_json(self) -> Any:
        return str(self)


@dataclass(frozen=True)
class SimilaritySpec:
    """Learned target similarity: ``none`` (identity), ``full`` N×N (init I), or
    ``lowrank``: S = diag(a) + (alpha/rank)·L Rᵀ with a=1, L~N(0,1), R=0 at init (so S = I)."""

    kind: str = "none"
    rank: int = 10
    alpha: float = 1.0


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: ``pairs`` fresh synthetic pairs distilled for ``iterations`` outer steps against ``teacher``,
    start epochs drawn uniformly from ``[min_start, max_start)``; ``ema_decay`` 0 means no EMA."""

    pairs: int
    teacher: TeacherSpec
    min_start: int
    max_start: int
    iterations: int
    ema_decay: float = 0.0
    sim_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "teacher": str(self.teacher), "start_window": [self.min_start, self.max_start],
                "iterations": self.iterations, "ema_decay": self.ema_decay, "sim_rank": self.sim_rank}


@dataclass(frozen=True)
class BugCompat:
    """Switches that reproduce published numerics; each is off by default (docs/methods.md#bug-compatibility-flags).

    * ``mtt_logit_scale`` — MTT-VL's inner loop multiplies the cosine logits by log(1/τ)=2.66 instead of 1/τ (B2).
    * ``n_minus_one`` — the published scripts distil N−1 pairs for a nominal budget N (99/199/499, B7); with it the
      phases must sum to budget−1.
    * ``dropout_resample`` — the TESLA recompute pass draws fresh dropout masks (not the forward pass's), so the
      recomputed gradient is not the one that moved θ (docs/methods.md#dropout-in-the-inner-loop, B3).
    * ``lr_grad_separate_norm`` — LoRS normalises the η-gradient per tower even when the loss branches are merged
      (B30); off: η gets the gradient of the stated (merged) objective.
    * ``inner_temperature`` — a distillation-only temperature for the inner loop (LoRS COCO-500 used 0.1 while the
      experts and evaluators use 0.07, B8); null: the student's temperature.
    """

    mtt_logit_scale: bool = False
    n_minus_one: bool = False
    dropout_resample: bool = False
    lr_grad_separate_norm: bool = False
    inner_temperature: float | None = None

    @classmethod
    def parse(cls, value: Any) -> "BugCompat":
        if value is None:
            return cls()
        if isinstance(value, BugCompat):
            return value
        out = _from_mapping(cls, value, "bug_compat", "flag", "{n_minus_one: true}")
        if out.inner_temperature is not None and not 0 < float(out.inner_temperature) < 10:
            raise _fail("bug_compat.inner_temperature", f"{out.inner_temperature} is out of range",
                        "use (0, 10) or null")
        return out


@dataclass(frozen=True)
class EngineParams:
    """The flat, JSON-able engine keys with their neutral defaults (the table in the module docstring); a method's
    defaults start from these and override. :meth:`EngineConfig.from_params` validates them."""

    unroll: str = "tesla"
    full_impl: str = "graph"
    retain_graph: bool = False
    similarity: str = "none"
    sim_rank: int = 10
    sim_alpha: float = 1.0
    loss: str = "ce"
    normalize: str = "separate"
    syn_steps: int = 8
    expert_epochs: int = 1
    batch_size: int | None = 20
    lr_img: float = 1000.0
    lr_txt: float = 1000.0
    lr_lr: float = 0.01
    lr_sim: float = 10.0
    momentum: float = 0.5
    momentum_lr: float = 0.5
    momentum_sim: float = 0.5
    lr_init_img: float = 0.1
    lr_init_txt: float = 0.1
    lr_min: float = 1e-6
    iterations: int = 100
    start_window: tuple[int, int] = (0, 2)
    teacher: str = "raw"
    ema_decay: float = 0.0
    phases: tuple[dict, ...] = ({},)
    inner_dropout: str = "replay"
    dtype: str = "float32"
    teacher_cache_mb: int = 512
    bug_compat: dict = field(default_factory=dict)
    checkpoint_every: int = 0  # read by the harness (its Checkpointer), not by the engine


@dataclass(frozen=True)
class HeadExpertSpec:
    """Head-only expert trajectories (``student = heads``): ``count`` experts of ``epochs`` epochs, SGD on the two
    heads over the frozen-encoder features of the training pairs, symmetric CE (as the harness's experts)."""

    count: int = 8
    epochs: int = 10
    lr_img: float = 0.1
    lr_txt: float = 0.1
    batch_size: int = 128
    seed: int = 0

    @classmethod
    def parse(cls, value: Any) -> "HeadExpertSpec":
        if isinstance(value, HeadExpertSpec):
            return value
        out = _from_mapping(cls, value, "head_experts", "field", "{count: 8, epochs: 10}")
        for name in ("count", "epochs", "batch_size"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(f"head_experts.{name}", f"{v!r} is not a positive integer", "give e.g. 8")
        for name in ("lr_img", "lr_txt"):
            v = getattr(out, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise _fail(f"head_experts.{name}", f"{v!r} is not a positive number", "give e.g. 0.1")
        return out


@dataclass(frozen=True)
class RepresentationSpec:
    """The frozen-encoder student and representation blending (docs/methods.md#repblend)."""

    student: str = "full"
    frozen_encoder: str = "expert"
    encoder_expert: int = 0
    encoder_grad: str = "accumulate"
    head_experts: HeadExpertSpec = field(default_factory=HeadExpertSpec)
    blend_alpha: float = 0.0

    @property
    def blending(self) -> bool:
        return self.blend_alpha > 0


# Options of the frozen-encoder student and of blending, kept out of ENGINE_DEFAULTS so the params (and records)
# of the methods that do not use them are unchanged; a method that does lists them in its own defaults.
REPRESENTATION_DEFAULTS: dict[str, Any] = {
    "student": "full", "frozen_encoder": "expert", "encoder_expert": 0, "encoder_grad": "accumulate",
    "head_experts": dataclasses.asdict(HeadExpertSpec()), "blend_alpha": 0.0,
}


def engine_defaults() -> dict[str, Any]:
    """:class:`EngineParams` as a plain dict (lists, not tuples: the form params.yaml holds)."""
    out = dataclasses.asdict(EngineParams())
    out["start_window"] = list(out["start_window"])
    out["phases"] = [dict(ph) for ph in out["phases"]]
    return out


ENGINE_DEFAULTS: dict[str, Any] = engine_defaults()

_PHASE_KEYS = ("pairs", "teacher", "start_window", "iterations", "ema_decay", "sim_rank")


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the matching engine (see the module docstring for the meaning of each field)."""

    unroll: str
    full_impl: str
    retain_graph: bool
    similarity: SimilaritySpec
    loss: str
    normalize: str
    syn_steps: int
    expert_epochs: int
    batch_size: int | None
    lr_img: float
    lr_txt: float
    lr_lr: float
    lr_sim: float
    momentum: float
    momentum_lr: float
    momentum_sim: float
    lr_init_img: float
    lr_init_txt: float
    lr_min: float
    phases: tuple[PhaseSpec, ...]
    inner_dropout: str
    dtype: str
    teacher_cache_mb: int
    bug_compat: BugCompat
    representation: RepresentationSpec = field(default_factory=RepresentationSpec)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_params(cls, params: dict[str, Any], budget: int) -> "EngineConfig":
        """Validate a flat params dict (see :data:`ENGINE_DEFAULTS`) against ``budget``.

        Keys that are not engine options are ignored here (a method may carry its own extras)."""
        p = engine_defaults()
        p.update(REPRESENTATION_DEFAULTS)
        p.update(params)
        compat = BugCompat.parse(p["bug_compat"])

        def choice(key: str, options: tuple[str, ...]) -> str:
            v = p[key]
            if v not in options:
                raise _fail(key, f"{v!r} is not an option", f"choose one of {list(options)}")
            return v

        def num(key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
                lo_open: bool = False) -> Any:
            v = p[key]
            finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not finite:
                raise _fail(key, f"{v!r} is not a finite number", "give a number")
            if integer and int(v) != v:
                raise _fail(key, f"{v!r} is not an integer", "give an integer")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise _fail(key, f"{v} is too small", f"must be {'>' if lo_open else '>='} {lo}")
            if hi is not None and v > hi:
                raise _fail(key, f"{v} is too large", f"must be <= {hi}")
            return int(v) if integer else float(v)

        unroll = choice("unroll", UNROLLS)
        full_impl = choice("full_impl", FULL_IMPLS)
        sim_kind = choice("similarity", SIMILARITIES)
        loss = p["loss"]
        if loss not in LOSSES:
            raise _fail("loss", f"unknown loss {loss!r}", f"choose one of {sorted(LOSSES)}")
        if loss == "ce" and sim_kind != "none":
            raise _fail("loss", "'ce' ignores the target similarity, so a learned similarity would get no gradient",
                        "use wbce, infonce, cwcl, kl, bce or mse with a similarity, or similarity=none")
        sim = SimilaritySpec(sim_kind, num("sim_rank", 1, integer=True), num("sim_alpha", 0, lo_open=True))
        momenta = {k: num(k, 0, 1) for k in ("momentum", "momentum_lr", "momentum_sim")}
        if not isinstance(p["retain_graph"], bool):
            raise _fail("retain_graph", f"{p['retain_graph']!r} is not a boolean", "use true or false")

        cfg = cls(
            unroll=unroll, full_impl=full_impl, retain_graph=p["retain_graph"], similarity=sim, loss=loss,
            normalize=choice("normalize", NORMALIZE),
            syn_steps=num("syn_steps", 1, integer=True), expert_epochs=num("expert_epochs", 1, integer=True),
            batch_size=None if p["batch_size"] is None else num("batch_size", 1, integer=True),
            lr_img=num("lr_img", 0), lr_txt=num("lr_txt", 0), lr_lr=num("lr_lr", 0), lr_sim=num("lr_sim", 0),
            **momenta,
            lr_init_img=num("lr_init_img", 0, lo_open=True), lr_init_txt=num("lr_init_txt", 0, lo_open=True),
            lr_min=num("lr_min", 0),
            phases=(),
            inner_dropout=choice("inner_dropout", DROPOUT), dtype=choice("dtype", DTYPES),
            teacher_cache_mb=num("teacher_cache_mb", 0, integer=True),
            bug_compat=compat,
        )
        if cfg.lr_min >= min(cfg.lr_init_img, cfg.lr_init_txt):
            raise _fail("lr_min", f"{cfg.lr_min} is not below the initial inner learning rates",
                        "lower lr_min (it only keeps η positive)")
        cfg = dataclasses.replace(cfg, representation=_parse_representation(p, cfg, choice, num))
        phases = _parse_phases(p, cfg, budget)
        if cfg.representation.student == "heads" and any(ph.teacher.kind != "raw" for ph in phases):
            raise _fail("teacher", "the 'heads' student matches head-only experts, which have no shortcut files",
                        "use teacher: raw with student: heads")
        return dataclasses.replace(cfg, phases=phases)

    # ------------------------------------------------------------------ views
    def to_json(self) -> dict[str, Any]:
        """The resolved options as JSON (recorded in the DistilledSet meta and the checkpoint fingerprint)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "representation" and v == RepresentationSpec():
                continue  # the methods without it keep their records (and checkpoint fingerprints) unchanged
            if f.name == "phases":
                v = [ph.to_json() for ph in v]
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            out[f.name] = v
        return out


def _parse_representation(p: dict[str, Any], cfg: EngineConfig, choice, num) -> RepresentationSpec:
    rep = RepresentationSpec(
        student=choice("student", STUDENTS), frozen_encoder=choice("frozen_encoder", FROZEN_ENCODERS),
        encoder_expert=num("encoder_expert", 0, integer=True), encoder_grad=choice("encoder_grad", ENCODER_GRADS),
        head_experts=HeadExpertSpec.parse(p["head_experts"]), blend_alpha=num("blend_alpha"))
    if rep.blending and rep.student != "heads":
        raise _fail("blend_alpha", f"{rep.blend_alpha} blends pre-projection features, which only the 'heads' "
                    "student has", "set student: heads, or blend_alpha: 0")
    if rep.student == "heads" and cfg.unroll != "tesla":
        raise _fail("student", "the 'heads' student is implemented for unroll=tesla only",
                    "set unroll: tesla (RepBlend's inner loop)")
    return rep


def _parse_phases(p: dict[str, Any], cfg: EngineConfig, budget: int) -> tuple[PhaseSpec, ...]:
    raw = p["phases"]
    if raw is None:
        raw = [{}]
    if isinstance(raw, dict):  # column form: {pairs: [...], teacher: [...], ...}
        lengths = {k: len(v) for k, v in raw.items() if isinstance(v, (list, tuple))}
        bad = sorted(set(raw) - set(_PHASE_KEYS))
        if bad:
            raise _fail("phases", f"unknown column(s) {bad}", f"columns are {list(_PHASE_KEYS)}")
        if not lengths:
            raise _fail("phases", "column form needs lists", "give e.g. {pairs: [200, 300], iterations: [2000, 2000]}")
        if len(set(lengths.values())) != 1:
            raise _fail("phases", f"the per-phase lists have different lengths {lengths}",
                        "give every list one entry per phase (the PTM-ST 100-pair scripts fail on exactly this)")
        n = next(iter(lengths.values()))
        raw = [{k: (v[i] if isinstance(v, (list, tuple)) and k in lengths else v) for k, v in raw.items()}
               for i in range(n)]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise _fail("phases", f"{raw!r} is not a non-empty list", "give a list of phase dicts, e.g. [{}] for one phase")

    target = budget - 1 if cfg.bug_compat.n_minus_one else budget
    if target < 1:
        raise _fail("budget", f"{budget} leaves no pairs to distil", "use a budget of at least 2")
    fixed, open_idx = 0, []
    for k, ph in enumerate(raw):
        if not isinstance(ph, dict):
            raise _fail(f"phases[{k}]", f"{ph!r} is not a mapping", "give a dict like {pairs: 100, iterations: 500}")
        bad = sorted(set(ph) - set(_PHASE_KEYS))
        if bad:
            raise _fail(f"phases[{k}]", f"unknown field(s) {bad}", f"fields are {list(_PHASE_KEYS)}")
        if ph.get("pairs") is None:
            open_idx.append(k)
        else:
            fixed += int(ph["pairs"])
    if len(open_idx) > 1:
        raise _fail("phases", f"phases {open_idx} all leave 'pairs' empty", "leave at most one phase's pairs null")
    rest = target - fixed
    if open_idx and rest < 1:
        raise _fail("phases", f"the fixed phases take {fixed} pairs, leaving {rest} of the budget {target} for "
                    f"phase {open_idx[0]}", "lower the fixed phases' pairs")
    if not open_idx and fixed != target:
        note = " (budget − 1: bug_compat.n_minus_one is on)" if cfg.bug_compat.n_minus_one else ""
        raise _fail("phases", f"the phases' pairs sum to {fixed} but the budget is {target}{note}",
                    "make the pairs sum to the budget, or leave one phase's pairs null to take the rest")

    out = []
    for k, ph in enumerate(raw):
        where = f"phases[{k}]"
        get = lambda key: ph.get(key, p[key] if key in p else None)  # noqa: E731
        pairs = rest if k in open_idx else int(ph["pairs"])
        if pairs < 1:
            raise _fail(f"{where}.pairs", f"{pairs} is not positive", "every phase needs at least one pair")
        teacher = TeacherSpec.parse(get("teacher"), f"{where}.teacher")
        window = get("start_window")
        if not (isinstance(window, (list, tuple)) and len(window) == 2 and all(int(w) == w for w in window)):
            raise _fail(f"{where}.start_window", f"{window!r} is not [min, max)", "give two integers, e.g. [0, 2]")
        lo, hi = int(window[0]), int(window[1])
        if not 0 <= lo < hi:
            raise _fail(f"{where}.start_window", f"[{lo}, {hi}) is empty", "need 0 <= min < max (max exclusive)")
        if teacher.kind == "shortcut":
            if lo < teacher.start or hi - 1 + cfg.expert_epochs > teacher.end:
                raise _fail(f"{where}.start_window",
                            f"starts [{lo}, {hi}) with expert_epochs={cfg.expert_epochs} leave {teacher}",
                            f"pick starts in [{teacher.start}, {teacher.end - cfg.expert_epochs + 1}) or widen the "
                            "shortcut segment")
        iters = get("iterations")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise _fail(f"{where}.iterations", f"{iters!r} is not a positive integer", "give e.g. 100")
        decay = get("ema_decay")
        if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise _fail(f"{where}.ema_decay", f"{decay!r} is not in [0, 1)", "use 0 (no EMA) or e.g. 0.99")
        rank = ph.get("sim_rank")
        if rank is not None and (int(rank) != rank or rank < 1):
            raise _fail(f"{where}.sim_rank", f"{rank!r} is not a positive integer", "give e.g. 10 or null")
        if cfg.batch_size is not None and cfg.batch_size > pairs:
            raise _fail("batch_size", f"{cfg.batch_size} exceeds phase {k}'s {pairs} pairs",
                        f"lower batch_size to at most {pairs} or give the phase more pairs")
        out.append(PhaseSpec(pairs, teacher, lo, hi, int(iters), float(decay), None if rank is None else int(rank)))
    return tuple(out)
