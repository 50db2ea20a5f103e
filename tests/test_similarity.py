"""Learned similarity: initialisation, batch views, and that batch gradients land on the right rows / blocks."""

from __future__ import annotations

import pytest
import torch

from matching_fixtures import engine_config, random_setup, reference_full, reference_tesla
from matching_fixtures import single_thread  # noqa: F401  (autouse)
from methods.matching.config import SimilaritySpec
from methods.matching.similarity import make_similarity


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_init_is_identity_and_batch_view_matches_full_matrix(kind):
    sim = make_similarity(SimilaritySpec(kind, rank=3, alpha=2.0), 7, _gen(), dtype=torch.float64)
    assert torch.equal(sim.matrix(), torch.eye(7, dtype=torch.float64))
    for v in sim.tensors.values():
        v.add_(torch.randn(v.shape, generator=_gen(), dtype=torch.float64))
    idx = torch.tensor([5, 1, 3])
    got = sim.batch_matrix(sim.gather(idx))
    assert torch.allclose(got, sim.matrix()[idx][:, idx], rtol=0, atol=1e-14)


def test_none_has_no_parameters():
    sim = make_similarity(SimilaritySpec("none"), 5, _gen())
    assert sim.tensors == {} and sim.batch_matrix(sim.gather(torch.arange(3))) is None and sim.matrix() is None


def test_full_scatter_hits_only_the_block_and_accumulates():
    sim = make_similarity(SimilaritySpec("full"), 6, _gen(), dtype=torch.float64)
    grads = {"sim_full": torch.zeros(6, 6, dtype=torch.float64)}
    idx = torch.tensor([4, 0, 2])
    g = torch.arange(9, dtype=torch.float64).view(3, 3) + 1
    sim.scatter_(grads, idx, {"sim_full": g})
    sim.scatter_(grads, idx, {"sim_full": g})
    want = torch.zeros(6, 6, dtype=torch.float64)
    for a, i in enumerate(idx.tolist()):
        for b, j in enumerate(idx.tolist()):
            want[i, j] = 2 * g[a, b]
    assert torch.equal(grads["sim_full"], want)


def test_lowrank_scatter_hits_only_the_rows():
    sim = make_similarity(SimilaritySpec("lowrank", rank=2, alpha=1.0), 6, _gen(), dtype=torch.float64)
    grads = {k: torch.zeros_like(v) for k, v in sim.tensors.items()}
    idx = torch.tensor([3, 1])
    parts = {"sim_a": torch.tensor([1.0, 2.0], dtype=torch.float64),
             "sim_l": torch.ones(2, 2, dtype=torch.float64), "sim_r": -torch.ones(2, 2, dtype=torch.float64)}
    sim.scatter_(grads, idx, parts)
    untouched = torch.tensor([0, 2, 4, 5])
    for k in grads:
        assert torch.equal(grads[k][untouched], torch.zeros_like(grads[k][untouched]))
    assert grads["sim_a"][3] == 1.0 and grads["sim_a"][1] == 2.0


@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("unroll", ["tesla", "full"])
def test_engine_similarity_gradients_land_on_used_rows_and_blocks(kind, unroll):
    """With batches that only ever use a subset U of the pairs, gradients outside U (rows) or outside U×U (full S)
    are exactly zero, and inside they equal autograd on the full-size parameters."""
    cfg = engine_config(unroll=unroll, similarity=kind, loss="wbce", sim_rank=2, syn_steps=2, batch_size=3)
    matcher, syn, th0, th1, plan = random_setup(cfg)
    plan.batches = [torch.tensor([7, 2, 5]), torch.tensor([2, 9, 7])]
    used = torch.tensor([2, 5, 7, 9])
    unused = torch.tensor([i for i in range(10) if i not in used.tolist()])
    res = matcher.step(syn, th0, th1, plan)
    if unroll == "tesla":
        _, want = reference_tesla(matcher, syn, th0, th1, plan)
    else:
        _, want = reference_full(matcher, syn, th0, th1, plan)
    for k, g in res.grads.items():
        assert torch.allclose(g, want[k], rtol=1e-9, atol=1e-12), k
    for k in ("images", "texts", *syn.sim.tensors):
        g = res.grads[k]
        if k == "sim_full":
            mask = torch.zeros(10, 10, dtype=torch.bool)
            for b in plan.batches:
                mask[b.unsqueeze(1), b.unsqueeze(0)] = True
            assert torch.count_nonzero(g[~mask]) == 0
            assert torch.count_nonzero(g[mask]) > 0
            assert g[5, 9] == 0 and g[9, 5] == 0  # 5 and 9 never share a batch
        else:
            assert torch.count_nonzero(g[unused]) == 0, k
            assert torch.count_nonzero(g[used]) > 0, k
