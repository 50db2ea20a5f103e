"""The reference-compatible tie order of the retrieval metrics (docs/protocols.md#tie-order): among equal scores the
higher index ranks first, as ``np.argsort(score, kind="stable")[::-1]`` orders them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.metrics import retrieval_metrics, retrieval_ranks


def reference_loop_ranks(sim: torch.Tensor, txt2img: torch.Tensor) -> tuple[list[int], list[int]]:
    """The BLIP ``itm_eval`` loop with a stable sort: per query, reverse the ascending stable argsort and take the
    first ground-truth position."""
    s, t2i = sim.double().numpy(), txt2img.numpy()
    tr = []
    for i in range(s.shape[0]):
        order = np.argsort(s[i], kind="stable")[::-1]
        tr.append(int(np.flatnonzero(t2i[order] == i)[0]))
    ir = []
    for c in range(s.shape[1]):
        order = np.argsort(s[:, c], kind="stable")[::-1]
        ir.append(int(np.flatnonzero(order == t2i[c])[0]))
    return tr, ir


def test_hand_computed_all_ties() -> None:
    t2i = torch.tensor([0, 0, 1, 1])
    sim = torch.ones(2, 4)
    tr, ir = retrieval_ranks(sim, t2i, ties="reference")
    # descending order of every row is caption 3, 2, 1, 0: image 0's first GT (1) is at 2, image 1's (3) at 0
    assert tr.tolist() == [2, 0]
    # every column ranks image 1 before image 0
    assert ir.tolist() == [1, 1, 0, 0]
    tr_p, ir_p = retrieval_ranks(sim, t2i)
    assert tr_p.tolist() == [2, 2] and ir_p.tolist() == [1, 1, 1, 1]  # the pessimistic rule, for contrast


def test_hand_computed_mixed_strict_and_ties() -> None:
    t2i = torch.tensor([1, 0, 1, 0, 2])
    sim = torch.tensor([[0.5, 0.5, 0.9, 0.2, 0.5],   # image 0: GT {1, 3}, best 0.5 at caption 1; 0.9 above, captions
                        [0.3, 0.3, 0.3, 0.0, 0.1],   # 4 (index > 1) tie -> rank 2; caption 0 (index < 1) is after
                        [0.3, 0.5, 0.2, 0.2, 0.7]])  # image 1: GT {0, 2} all at 0.3 with caption 1: c* = 2 -> rank 0
    tr, ir = retrieval_ranks(sim, t2i, ties="reference")
    assert tr.tolist() == [2, 0, 0]
    # caption 0 (image 1, 0.3): image 2 ties at 0.3 with a higher index, image 0 (0.5) is above -> 2
    # caption 1 (image 0, 0.5): image 2 ties at 0.5 -> 1; caption 2 (image 1, 0.3): image 0 at 0.9 above -> 1
    # caption 3 (image 0, 0.2): image 2 ties at 0.2 -> 1; caption 4 (image 2, 0.7): top -> 0
    assert ir.tolist() == [2, 1, 1, 1, 0]
    assert (tr.tolist(), ir.tolist()) == reference_loop_ranks(sim, t2i)


@pytest.mark.parametrize("levels", [2, 3, 5])
@pytest.mark.parametrize("block_bytes", [None, 64])  # one block / many ragged blocks over parallel workers
def test_tie_heavy_matches_stable_argsort_loop(levels: int, block_bytes: int | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.metrics as m

    if block_bytes:
        monkeypatch.setattr(m, "_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(levels)
    per = 5 + (torch.rand(17, generator=gen) < 0.3).long()
    t2i = torch.repeat_interleave(torch.arange(17), per)
    t2i = t2i[torch.randperm(t2i.numel(), generator=gen)]
    sim = torch.randint(0, levels, (17, t2i.numel()), generator=gen)
    tr, ir = retrieval_ranks(sim.float(), t2i, ties="reference")
    want_tr, want_ir = reference_loop_ranks(sim, t2i)
    assert tr.tolist() == want_tr and ir.tolist() == want_ir
    assert retrieval_ranks(sim, t2i, ties="reference")[0].tolist() == want_tr  # integer scores too


def duplicated_caption_case(n_images: int = 200, n_dup_images: int = 40, seed: int = 0):
    """Informative scores where ``n_dup_images`` images share one caption's features with another image (as COCO's
    test split has captions with identical strings), so those caption columns tie exactly."""
    gen = torch.Generator().manual_seed(seed)
    t2i = torch.repeat_interleave(torch.arange(n_images), 5)
    img = torch.randn(n_images, 16, generator=gen)
    txt = img[t2i] + 0.8 * torch.randn(t2i.numel(), 16, generator=gen)
    perm = torch.randperm(n_images, generator=gen)[:n_dup_images]
    for a, b in zip(perm[0::2].tolist(), perm[1::2].tolist()):  # caption 0 of b = caption 0 of a
        txt[5 * b] = txt[5 * a]
    return img @ txt.T, t2i


def test_duplicated_captions_reference_never_below_pessimistic() -> None:
    sim, t2i = duplicated_caption_case()
    pess = retrieval_metrics(sim, t2i)
    ref = retrieval_metrics(sim, t2i, ties="reference")
    tr_p, ir_p = retrieval_ranks(sim, t2i)
    tr_r, ir_r = retrieval_ranks(sim, t2i, ties="reference")
    assert torch.all(tr_r <= tr_p) and torch.all(ir_r <= ir_p)  # the pessimistic rule is the worst case
    assert torch.equal(ir_r, ir_p)  # image columns have no ties: only text retrieval (TR) changes
    assert (tr_r < tr_p).sum() > 0 and ref["tr1"] > pess["tr1"]
    assert (tr_r.tolist(), ir_r.tolist()) == reference_loop_ranks(sim, t2i)


def test_tie_free_scores_agree() -> None:
    gen = torch.Generator().manual_seed(4)
    t2i = torch.repeat_interleave(torch.arange(30), 5)
    sim = torch.randn(30, 150, generator=gen, dtype=torch.float64)
    assert retrieval_metrics(sim, t2i) == retrieval_metrics(sim, t2i, ties="reference")


def test_unknown_tie_rule() -> None:
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_metrics(torch.ones(1, 1), torch.tensor([0]), ties="optimistic")


def test_paper_protocol_ranks_ties_in_reference_order() -> None:
    """With one evaluation at the end, ``paper`` and ``strict`` score the same trained model: ``paper`` with the
    reference order, ``strict`` pessimistically; duplicated test captions (identical features) make them differ."""
    from benchmark.distilled import DistilledSet, Phase
    from benchmark.evaluation import EvalConfig, SplitData, evaluate_student, score, train_student
    from tests.helpers import tiny_student

    g = torch.Generator().manual_seed(0)
    dset = DistilledSet([Phase(torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 6, generator=g), 0.1, 0.1)], {})
    texts = torch.randn(12, 6, generator=g)
    texts[1::2] = texts[0]  # every image's second caption is one string shared by all images: ties everywhere
    test = SplitData(torch.randn(6, 3, 8, 8, generator=g), texts, torch.arange(6).repeat_interleave(2))
    student = tiny_student()
    cfg = EvalConfig(students=1, epochs=3, batch_size=4, eval_every=100, protocols=["strict", "paper"])
    res = evaluate_student(dset, student, cfg, 7, test)
    model = train_student(dset, student, cfg, 7)
    strict, paper = score(model, test, "cpu"), score(model, test, "cpu", "reference")
    assert {k: res["strict"][k] for k in strict} == strict
    assert {k: res["paper"][k] for k in paper} == paper
    assert paper["tr1"] > strict["tr1"]  # the shared caption is ground truth of every image: reference order helps
