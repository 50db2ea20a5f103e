"""The matching engine's outer loop: config validation, phases, EMA, resume, NaN handling, logging, methods."""

from __future__ import annotations

import pytest
import torch

from benchmark.registry import get_method
from matching_fixtures import make_task, write_experts
from matching_fixtures import single_thread  # noqa: F401  (autouse)
from methods.matching import DistillationDiverged, EngineConfig, MatchingEngine
from methods.matching.config import ConfigError

BASE = {"dtype": "float64", "syn_steps": 2, "batch_size": 4, "iterations": 4, "lr_img": 10.0, "lr_txt": 10.0,
        "lr_lr": 1e-3, "lr_sim": 1.0}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return write_experts(tmp_path_factory.mktemp("experts"), n_experts=2, epochs=4)


def _run(tmp_path, experts, params, budget=8, every=0, callbacks=(), seed=0):
    task = make_task(tmp_path, params, budget=budget, checkpoint_every=every, experts=experts, seed=seed)
    cfg = EngineConfig.from_params(params, budget)
    return MatchingEngine(task, cfg, "test", callbacks).run(), task


def _equal(a, b):
    assert len(a.phases) == len(b.phases)
    for pa, pb in zip(a.phases, b.phases):
        for k, v in pa.tensors().items():
            assert torch.equal(v, pb.tensors()[k]), k
        assert pa.lr_img == pb.lr_img and pa.lr_txt == pb.lr_txt


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("params, match", [
    ({"unroll": "sideways"}, "'unroll'"),
    ({"similarity": "full", "loss": "ce"}, "'loss'"),
    ({"batch_size": 9}, "'batch_size'"),
    ({"phases": [{"pairs": 3}, {"pairs": 3}]}, "sum to 6 but the budget is 8"),
    ({"phases": [{"pairs": None}, {"pairs": None}]}, "at most one"),
    ({"phases": {"pairs": [4, 4], "teacher": ["raw"], "iterations": [2, 2]}}, "different lengths"),
    ({"phases": [{"pairs": 8, "teacher": "shortcut(0, 2)", "start_window": [1, 3]}]}, "start_window"),
    ({"phases": [{"pairs": 8, "itrations": 3}]}, "unknown field"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"bug_compat": {"n_minus_one": True, "typo": 1}}, "unknown flag"),
    ({"lr_min": 0.5}, "lr_min"),
])
def test_bad_options_name_the_field(params, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig.from_params(dict(BASE, **params), 8)


def test_phase_pairs_sum_to_budget_and_column_form():
    cfg = EngineConfig.from_params(dict(BASE, batch_size=3, phases={"pairs": [3, None],
                                                                    "teacher": ["raw", "shortcut(0, 3)"],
                                                      "start_window": [[0, 2], [1, 3]]}), 8)
    assert [p.pairs for p in cfg.phases] == [3, 5]
    assert str(cfg.phases[1].teacher) == "shortcut(0, 3)" and cfg.phases[1].iterations == BASE["iterations"]
    compat = EngineConfig.from_params(dict(BASE, batch_size=3, phases=[{"pairs": None}, {"pairs": 4}],
                                           bug_compat={"n_minus_one": True}), 8)
    assert [p.pairs for p in compat.phases] == [3, 4]


def test_checkpoint_option_is_not_an_engine_field():
    assert EngineConfig.from_params(dict(BASE, checkpoint_every=5), 8).syn_steps == 2


# ------------------------------------------------------------------------------------------------ runs
def test_phases_ema_and_logging(tmp_path, experts):
    params = dict(BASE, unroll="tesla", similarity="lowrank", loss="wbce", sim_rank=2, batch_size=3,
                  phases=[{"pairs": 3, "teacher": "shortcut(0, 2)", "start_window": [0, 2], "ema_decay": 0.5,
                           "iterations": 3},
                          {"pairs": None, "teacher": "raw", "start_window": [1, 3], "ema_decay": 0.8}])
    raw: dict[int, list[dict[str, torch.Tensor]]] = {0: [], 1: []}

    def record(engine, phase, it, syn):
        raw[phase].append({k: v.detach().clone() for k, v in syn.tensors().items()})

    initial: dict[int, dict[str, torch.Tensor]] = {}
    orig = MatchingEngine._init_phase

    def spy(self, k, spec, gen):
        syn, idx = orig(self, k, spec, gen)
        initial[k] = {n: v.detach().clone() for n, v in syn.tensors().items()}
        return syn, idx

    MatchingEngine._init_phase = spy
    try:
        dset, task = _run(tmp_path, experts, params, callbacks=[record])
    finally:
        MatchingEngine._init_phase = orig
    assert dset.pairs == 8 and [p.n for p in dset.phases] == [3, 5]
    dset.validate(budget=8, image_shape=(3, 8, 8), text_dim=6)
    assert len(raw[0]) == 3 and len(raw[1]) == 4
    for k, decay in ((0, 0.5), (1, 0.8)):
        ema = dict(initial[k])
        for step in raw[k]:
            ema = {n: decay * ema[n] + (1 - decay) * step[n] for n in ema}
        phase = dset.phases[k]
        assert torch.allclose(phase.images.double(), ema["images"], rtol=0, atol=1e-6)
        assert torch.allclose(phase.sim_l.double(), ema["sim_l"], rtol=0, atol=1e-6)
        assert abs(phase.lr_img - float(ema["lr"][0])) < 1e-7 and phase.lr_img > 0
        assert not torch.allclose(phase.images.double(), raw[k][-1]["images"])  # EMA, not the raw tensors
    # phases start from different real pairs, and carry their own learned learning rates
    assert dset.meta["phases"][0]["init_pairs"] != dset.meta["phases"][1]["init_pairs"][:3]
    assert dset.meta["teacher"][0]["kind"] == "shortcut" and dset.meta["teacher"][1]["kind"] == "raw"
    assert dset.loss == "wbce" and dset.meta["engine"]["unroll"] == "tesla"
    recs = task.logger.records
    assert [r["step"] for r in recs] == list(range(1, 8))
    for key in ("match_loss", "match_loss_img", "match_loss_txt", "lr_img", "lr_txt", "sec_per_iter",
                "peak_mem_mb", "phase"):
        assert all(key in r for r in recs), key
    assert all(r["peak_mem_mb"] > 0 and r["sec_per_iter"] > 0 for r in recs)


@pytest.mark.parametrize("unroll, kill", [("tesla", 3), ("tesla", 5), ("full", 5)])
def test_resume_after_kill_equals_uninterrupted(tmp_path, experts, unroll, kill):
    """Killed after iteration ``kill`` (checkpoints every 2; 3 iterations per phase): 3 → resumes inside phase 0
    from iteration 2; 5 → resumes inside phase 1 from iteration 4. The result is bitwise the uninterrupted one."""
    params = dict(BASE, unroll=unroll, similarity="full", loss="wbce", iterations=3,
                  phases=[{"pairs": 4, "ema_decay": 0.5}, {"pairs": None, "ema_decay": 0.7}])
    ref, _ = _run(tmp_path / "ref", experts, params)

    class Kill(Exception):
        pass

    def cb(engine, phase, it, syn):
        if phase * 3 + it == kill:
            raise Kill()

    work = tmp_path / "run"
    with pytest.raises(Kill):
        _run(work, experts, params, every=2, callbacks=[cb])
    resumed, task = _run(work, experts, params, every=2)
    _equal(resumed, ref)
    assert task.logger.records[0]["step"] == kill  # restarted right after the last checkpoint (kill - 1)
    assert resumed.meta["phases"] == ref.meta["phases"]


def test_stale_checkpoint_of_another_config_is_ignored(tmp_path, experts):
    params = dict(BASE, iterations=2)
    _run(tmp_path, experts, params, every=1)
    other, task = _run(tmp_path, experts, dict(params, lr_img=5.0), every=1)
    assert task.logger.records[0]["step"] == 1


def test_nan_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, experts):
    params = dict(BASE, iterations=6)

    def poison(engine, phase, it, syn):
        if it == 3:
            syn.images[0, 0, 0, 0] = float("nan")

    with pytest.raises(DistillationDiverged, match="NaN/inf at phase 0, iteration 4.*checkpoint is kept"):
        _run(tmp_path, experts, params, every=2, callbacks=[poison])
    from benchmark.interface import Checkpointer

    tensors, state = Checkpointer(tmp_path / "ckpt", 2).load()
    assert state["phase_iteration"] == 2
    assert all(torch.isfinite(v.double()).all() for v in tensors.values() if v.is_floating_point())


def test_overflowing_update_stops_before_a_checkpoint(tmp_path, experts, monkeypatch):
    from methods.matching.engine import MomentumSGD

    orig = MomentumSGD.step

    def overflow(self, params, grads):
        orig(self, params, grads)
        params["images"][0, 0, 0, 0] = float("inf")

    monkeypatch.setattr(MomentumSGD, "step", overflow)
    with pytest.raises(DistillationDiverged, match="after the update"):
        _run(tmp_path, experts, dict(BASE, iterations=3), every=1)
    assert not (tmp_path / "ckpt" / "checkpoint.json").exists()


# ------------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("name", ["mtt-vl", "tesla-vl", "lors", "ptm-st"])
def test_registered_methods_tiny_preset(tmp_path, experts, name):
    cls = get_method(name)
    assert cls.needs_experts
    params = cls.resolve_params("tiny", "tiny-test", 10)
    task = make_task(tmp_path, params, budget=10, experts=experts)
    dset = cls().distill(task)
    dset.validate(budget=10, image_shape=(3, 8, 8), text_dim=6)
    assert dset.pairs == 10 and dset.meta["method"] == name
    assert len(dset.phases) == (2 if name == "ptm-st" else 1)
    kinds = {"mtt-vl": "none", "tesla-vl": "none", "lors": "lowrank", "ptm-st": "full"}
    assert all(p.similarity == kinds[name] for p in dset.phases)


def test_paper_presets_follow_the_published_tables():
    lors = get_method("lors").resolve_params("paper", "flickr30k", 100)
    assert (lors["batch_size"], lors["lr_img"], lors["sim_rank"], lors["sim_alpha"], lors["normalize"]) == \
        (20, 100.0, 10, 3.0, "separate")
    coco = EngineConfig.from_params(get_method("lors").resolve_params("paper", "coco", 500), 500)
    assert (coco.batch_size, coco.lr_img, coco.similarity.rank, coco.normalize) == (30, 5000.0, 40, "merged")
    mtt = EngineConfig.from_params(get_method("mtt-vl").resolve_params("paper", "flickr30k", 100), 100)
    assert (mtt.unroll, mtt.syn_steps, mtt.batch_size, mtt.lr_img) == ("full", 8, None, 1000.0)
    assert not mtt.bug_compat.mtt_logit_scale
    ptm = get_method("ptm-st")
    for budget, exact, published in ((500, [200, 300], [200, 299]), (200, [100, 100], [99, 100]),
                                     (100, [100], [99])):
        p = ptm.resolve_params("paper", "flickr30k", budget)
        assert [ph.pairs for ph in EngineConfig.from_params(p, budget).phases] == exact
        p["bug_compat"] = {"n_minus_one": True}
        cfg = EngineConfig.from_params(p, budget)
        assert [ph.pairs for ph in cfg.phases] == published
    cfg = EngineConfig.from_params(ptm.resolve_params("paper", "flickr30k", 500), 500)
    assert [str(ph.teacher) for ph in cfg.phases] == ["shortcut(0, 5)", "shortcut(0, 7)"]
    assert [(ph.min_start, ph.max_start, ph.iterations, ph.ema_decay) for ph in cfg.phases] == \
        [(0, 2, 2000, 0.99), (1, 3, 2000, 0.99)]
    assert cfg.batch_size == 40 and cfg.similarity.kind == "full" and cfg.lr_sim == 10.0


def test_requirements_follow_from_the_methods_own_params():
    from benchmark.requirements import EXPERTS, Requirement

    def segments(name, profile, ds, budget):
        cls = get_method(name)
        reqs = cls.requirements(cls.resolve_params(profile, ds, budget), budget)
        assert reqs[0] == Requirement(EXPERTS)
        return [(r.params["start"], r.params["end"]) for r in reqs if r.kind == "shortcut"]

    assert segments("ptm-st", "paper", "coco", 500) == [(0, 5), (0, 7)]
    assert segments("ptm-st", "quick", "shapes", 50) == [(0, 3), (0, 4)]
    assert segments("ptm-st", "paper", "flickr30k", 100) == [(0, 5)]
    assert segments("lors", "quick", "shapes", 50) == []
    assert get_method("random").requirements({}, 10) == []
    with pytest.raises(ValueError, match="no defaults for profile 'nosuch'"):
        get_method("lors").resolve_params("nosuch", "shapes", 50)


def test_resumed_run_log_holds_every_iteration_once_and_equals_the_uninterrupted_log(tmp_path, experts):
    """The per-iteration log is part of the checkpointed state: after a kill and a resume the log file has every
    iteration exactly once, with the values an uninterrupted run logs (timings in the separate volatile file)."""
    import json

    from benchmark.interface import JsonlLogger

    params = dict(BASE, iterations=3, phases=[{"pairs": 4}, {"pairs": None}])

    def run(work, callbacks=()):
        task = make_task(work, params, checkpoint_every=2, experts=experts)
        task.logger = JsonlLogger(work / "log.jsonl", work / "log.volatile.jsonl")
        MatchingEngine(task, EngineConfig.from_params(params, 8), "test", callbacks).run()

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    class Kill(Exception):
        pass

    def cb(engine, phase, it, syn):
        if phase * 3 + it == 5:  # after the checkpoint at iteration 4, before the one at 6
            raise Kill()

    run(tmp_path / "ref")
    with pytest.raises(Kill):
        run(tmp_path / "run", [cb])
    assert [r["step"] for r in lines(tmp_path / "run" / "log.jsonl")] == [1, 2, 3, 4, 5]
    run(tmp_path / "run")
    got, want = lines(tmp_path / "run" / "log.jsonl"), lines(tmp_path / "ref" / "log.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6] and got == want
    assert [r["step"] for r in lines(tmp_path / "run" / "log.volatile.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert "sec_per_iter" not in got[0] and "sec_per_iter" in lines(tmp_path / "run" / "log.volatile.jsonl")[0]
