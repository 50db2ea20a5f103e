import pytest
import torch

from benchmark.distilled import DistilledSet, Phase
from benchmark.evaluation import EvalConfig, SplitData, evaluate_set, evaluate_student, train_student
from benchmark.models.student import FlatStudent, build_student
from benchmark.training import index_batches
from tests.helpers import tiny_student


def test_partition_batches_cover_every_index_once():
    g = torch.Generator().manual_seed(0)
    batches = list(index_batches(10, 4, g))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in index_batches(10, 4, g, drop_last=True)] == [4, 4]


def test_overlap_batches_are_first_b_of_fresh_permutations():
    g = torch.Generator().manual_seed(0)
    batches = list(index_batches(10, 4, g, mode="overlap"))
    assert [len(b) for b in batches] == [4, 4, 4]
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(batches[1], torch.randperm(10, generator=g2)[:4] * 0 + torch.randperm(10, generator=g2)[:4])


def _set(n=6, lr_img=0.1, lr_txt=0.1, sim=None, seed=0, phases=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(phases):
        p = Phase(torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 6, generator=g), lr_img, lr_txt)
        if sim is not None:
            p.similarity, p.sim_full = "full", sim
        out.append(p)
    return DistilledSet(out, {}, loss="wbce" if sim is not None else "ce")


def _split(n_img=8, caps=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return SplitData(torch.randn(n_img, 3, 8, 8, generator=g), torch.randn(n_img * caps, 6, generator=g),
                     torch.arange(n_img).repeat_interleave(caps))


CFG = dict(students=2, epochs=4, batch_size=4, eval_every=1)


def test_learned_rates_are_applied_per_tower():
    student = tiny_student()
    init = FlatStudent(build_student(student, seed=5))
    cfg = EvalConfig(**CFG, weight_decay=0.0)
    model = train_student(_set(lr_img=0.0, lr_txt=0.1), student, cfg, seed=5)
    trained = FlatStudent(model)
    assert torch.equal(trained.flat("img"), init.flat("img"))
    assert not torch.allclose(trained.flat("txt"), init.flat("txt"))


def test_phases_train_in_order_with_their_own_rates():
    student = tiny_student()
    cfg = EvalConfig(**CFG, weight_decay=0.0)
    two = _set(phases=2)
    two.phases[1].lr_img = two.phases[1].lr_txt = 0.0  # second phase must not move the model
    one = DistilledSet([two.phases[0]], two.meta)
    a = FlatStudent(train_student(two, student, cfg, seed=3))
    b = FlatStudent(train_student(one, student, cfg, seed=3))
    assert torch.equal(a.flat("img"), b.flat("img")) and torch.equal(a.flat("txt"), b.flat("txt"))


def test_paper_protocol_is_best_of_test_evaluations_so_never_below_strict():
    student, test = tiny_student(), _split()
    ds = _set()
    both = evaluate_student(ds, student, EvalConfig(**CFG, protocols=["strict", "paper"]), 7, test)
    assert both["paper"]["r_mean"] >= both["strict"]["r_mean"]
    alone = evaluate_student(ds, student, EvalConfig(**CFG), 7, test)
    assert alone["strict"] == both["strict"]  # the test evaluations do not disturb training


def test_strict_final_reuses_the_last_hooks_test_embeddings(monkeypatch):
    """The paper protocol's evaluation after the last epoch already encoded the final model: strict (final) scores
    those embeddings instead of encoding the test split again."""
    import benchmark.evaluation as ev

    calls = []
    real = ev.encode
    monkeypatch.setattr(ev, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate_student(_set(), tiny_student(), EvalConfig(**CFG, protocols=["strict", "paper"]), 7, _split())
    assert len(calls) == CFG["epochs"]  # one per hook (eval_every = 1), none more for strict
    calls.clear()
    evaluate_student(_set(), tiny_student(), EvalConfig(**dict(CFG, eval_every=3), protocols=["strict", "paper"]), 7,
                     _split())
    assert len(calls) == 2  # hooks after epochs 3 and 4 (the last); strict reuses the last


def test_val_selection_reports_test_at_the_val_best_epoch():
    student, test, val = tiny_student(), _split(), _split(seed=2)
    res = evaluate_student(_set(), student, EvalConfig(**CFG, select="val"), 7, test, val)["strict"]
    assert "val_r_mean" in res and 0 <= res["epoch"] < 4
    with pytest.raises(ValueError, match="val split"):
        evaluate_student(_set(), student, EvalConfig(**CFG, select="val"), 7, test, None)


def test_evaluate_set_is_deterministic_and_summarises():
    student, test = tiny_student(), _split()
    sim = torch.eye(6) * 0.8 + 0.1
    a = evaluate_set(_set(sim=sim), student, EvalConfig(**CFG), test, progress=False)["protocols"]["strict"]
    b = evaluate_set(_set(sim=sim), student, EvalConfig(**CFG), test, progress=False)["protocols"]["strict"]
    assert a["students"] == b["students"]
    vals = [r["r_mean"] for r in a["students"]]
    assert a["r_mean"]["mean"] == pytest.approx(sum(vals) / 2)


def test_eval_config_validates_fields():
    with pytest.raises(ValueError, match="eval.protocols"):
        EvalConfig(protocols=["best"])
    with pytest.raises(ValueError, match="eval.students"):
        EvalConfig(students=0)
