import pytest
import torch

from benchmark.distilled import DistilledSet, InvalidDistilledSet, Phase


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
    ds = DistilledSet([_phase(4, "full"), _phase(3, "lowrank"), _phase(2)], {"method": "x", "loss": "wbce"})
    ds.phases[1].epochs = 7
    ds.save(tmp_path / "d")
    back = DistilledSet.load(tmp_path / "d")
    assert back.pairs == 9 and back.meta["method"] == "x"
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
