import json
import re

import pytest
import torch

from benchmark.distilled import DistilledSet, EvalBounds, InvalidDistilledSet, Phase


def _phase(n=4, sim="none", size=8, d=6, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    p = Phase(images=torch.randn(n, 3, size, size, generator=gen), texts=torch.randn(n, d, generator=gen),
              lr_img=0.1, lr_txt=0.2, similarity=sim)
    if sim == "full":
        p.sim_full = torch.eye(n) + 0.1 * torch.randn(n, n, generator=gen)
    if sim == "lowrank":
        p.sim_a, p.sim_l, p.sim_r, p.sim_alpha = torch.rand(n), torch.randn(n, 2), torch.randn(n, 2), 3.0
    return p


def test_roundtrip_preserves_every_tensor_and_scalar(tmp_path):
    ds = DistilledSet([_phase(4, "full"), _phase(3, "lowrank"), _phase(2)], {"method": "x"}, loss="wbce")
    ds.phases[1].epochs = 7
    ds.save(tmp_path / "d")
    back = DistilledSet.load(tmp_path / "d")
    assert back.pairs == 9 and back.meta["method"] == "x" and back.loss == "wbce"
    for a, b in zip(ds.phases, back.phases):
        assert a.similarity == b.similarity and a.lr_img == b.lr_img and a.lr_txt == b.lr_txt and a.epochs == b.epochs
        for k, v in a.tensors().items():
            assert torch.equal(v, b.tensors()[k])
        ta, tb = a.target_similarity(), b.target_similarity()
        assert (ta is None and tb is None) or torch.allclose(ta, tb)


def test_lowrank_target_is_diag_plus_scaled_product():
    p = _phase(5, "lowrank")
    expected = torch.diag(p.sim_a) + (3.0 / 2) * p.sim_l @ p.sim_r.T
    assert torch.allclose(p.target_similarity(), expected)


def test_pairs_and_bytes_are_counted_by_the_harness():
    ds = DistilledSet([_phase(4, "full", size=8, d=6)])
    assert ds.pairs == 4
    assert ds.nbytes == 4 * (4 * 3 * 8 * 8 + 4 * 6 + 4 * 4) + 8


@pytest.mark.parametrize("mutate, rule", [
    (lambda ds: None, "budget"),
    (lambda ds: ds.phases[0].images.__setitem__((0, 0, 0, 0), float("nan")), "finite"),
    (lambda ds: setattr(ds.phases[0], "texts", ds.phases[0].texts[:2]), "shapes"),
    (lambda ds: setattr(ds.phases[0], "images", ds.phases[0].images.double()), "dtypes"),
    (lambda ds: setattr(ds.phases[0], "lr_img", -1.0), "finite"),
    (lambda ds: setattr(ds.phases[0], "sim_full", torch.eye(2)), "shapes"),
])
def test_validate_names_the_broken_rule(mutate, rule):
    ds = DistilledSet([_phase(4, "full")])
    mutate(ds)
    budget = 3 if rule == "budget" else 10
    with pytest.raises(InvalidDistilledSet, match=f"rule '{rule}'"):
        ds.validate(budget=budget, image_shape=(3, 8, 8), text_dim=6)


def test_validate_checks_student_shapes():
    ds = DistilledSet([_phase(4)])
    with pytest.raises(InvalidDistilledSet, match="student expects"):
        ds.validate(image_shape=(3, 16, 16))
    with pytest.raises(InvalidDistilledSet, match="caption features have 5"):
        ds.validate(text_dim=5)


def test_incomplete_set_is_rejected(tmp_path):
    ds = DistilledSet([_phase(2)])
    st, js = ds.save(tmp_path / "d")
    js.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        DistilledSet.load(tmp_path / "d")


def test_non_set_json_is_rejected(tmp_path):
    ds = DistilledSet([_phase(2)])
    _, js = ds.save(tmp_path / "d")
    js.write_text('{"format": "something-else", "phases": []}')
    with pytest.raises(InvalidDistilledSet, match="format"):
        DistilledSet.load(tmp_path / "d")


# ------------------------------------------------------------------ what a set may ask of evaluation
def _set_with(**changes):
    ds = DistilledSet([_phase(4)], {}, loss="ce")
    for name, value in changes.items():
        setattr(ds.phases[0], name, value)
    return ds


@pytest.mark.parametrize("changes, rule", [
    ({"epochs": 10**12}, "rule 'epochs': phase 0 epochs=1000000000000 must be in [1, 1000]"),
    ({"epochs": 0}, "rule 'epochs'"),
    ({"epochs": 5.0}, "rule 'epochs': phase 0 epochs=5.0 must be an integer"),
    ({"epochs": True}, "rule 'epochs'"),
    ({"lr_img": 1e9}, "rule 'lr': phase 0 lr_img=1000000000.0 exceeds 10.0"),
    ({"lr_txt": float("inf")}, "rule 'finite'"),
    ({"lr_txt": "0.1"}, "rule 'finite'"),
    ({"sim_alpha": float("nan")}, "rule 'finite'"),
])
def test_evaluation_requests_are_bounded(changes, rule):
    with pytest.raises(InvalidDistilledSet, match=re.escape(rule)):
        _set_with(**changes).validate()


def test_phases_and_total_epochs_are_bounded():
    many = DistilledSet([_phase(1) for _ in range(17)])
    with pytest.raises(InvalidDistilledSet, match=r"rule 'phases': 17 phases, at most 16"):
        many.validate()
    long = DistilledSet([_phase(2), _phase(2), _phase(2)])
    for p in long.phases:
        p.epochs = 900
    with pytest.raises(InvalidDistilledSet, match=r"rule 'epochs': the phases ask for 2700 epochs in all"):
        long.validate()
    long.validate(bounds=EvalBounds(max_total_epochs=3000))  # the bounds are the caller's


def test_loss_must_be_known_and_lowrank_rank_at_most_n():
    ds = _set_with()
    ds.loss = "__import__('os')"
    with pytest.raises(InvalidDistilledSet, match=r"rule 'loss'"):
        ds.validate()
    wide = DistilledSet([_phase(3, "lowrank")])
    wide.phases[0].sim_l, wide.phases[0].sim_r = torch.randn(3, 50), torch.randn(3, 50)
    with pytest.raises(InvalidDistilledSet, match=r"0 < r <= n"):
        wide.validate()


def test_epoch_bomb_in_the_json_sidecar_is_refused_after_loading(tmp_path):
    ds = DistilledSet([_phase(2)], {}, loss="ce")
    _, js = ds.save(tmp_path / "d")
    doc = json.loads(js.read_text())
    doc["phases"][0]["epochs"] = 10**12
    js.write_text(json.dumps(doc))
    with pytest.raises(InvalidDistilledSet, match=r"rule 'epochs'"):
        DistilledSet.load(tmp_path / "d").validate()
