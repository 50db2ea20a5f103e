"""Retrieval metrics equal a straightforward per-row ranking (docs/protocols.md#retrieval-metrics), ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.metrics import METRIC_KEYS, retrieval_metrics, retrieval_ranks


def loop_metrics(sim: torch.Tensor, txt2img: torch.Tensor) -> dict[str, float]:
    """Reference: sort every row / column by (score desc, non-ground-truth first), take the first GT position."""
    s = sim.double().numpy()
    t2i = txt2img.numpy()
    n_img, n_cap = s.shape
    tr = []
    for i in range(n_img):
        is_gt = t2i == i
        order = np.lexsort((is_gt, -s[i]))  # last key is primary
        tr.append(int(np.flatnonzero(is_gt[order])[0]))
    ir = []
    for c in range(n_cap):
        is_gt = np.arange(n_img) == t2i[c]
        order = np.lexsort((is_gt, -s[:, c]))
        ir.append(int(np.flatnonzero(is_gt[order])[0]))
    tr, ir = np.array(tr), np.array(ir)
    out = {f"tr{k}": 100.0 * np.mean(tr < k) for k in (1, 5, 10)}
    out.update({f"ir{k}": 100.0 * np.mean(ir < k) for k in (1, 5, 10)})
    out["tr_mean"] = (out["tr1"] + out["tr5"] + out["tr10"]) / 3
    out["ir_mean"] = (out["ir1"] + out["ir5"] + out["ir10"]) / 3
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


def make_txt2img(n_images: int, gen: torch.Generator) -> torch.Tensor:
    """5 or 6 captions per image, shuffled so an image's captions are not contiguous."""
    per = 5 + (torch.rand(n_images, generator=gen) < 0.3).long()
    t2i = torch.repeat_interleave(torch.arange(n_images), per)
    return t2i[torch.randperm(t2i.numel(), generator=gen)]


def assert_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert set(METRIC_KEYS) <= set(a)
    for k in METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_bytes", [None, 4096])  # one block / several blocks over parallel workers
def test_random_matches_loop(seed: int, block_bytes: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.metrics as m

    if block_bytes:
        monkeypatch.setattr(m, "_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(seed)
    t2i = make_txt2img(40, gen)
    # informative scores so recalls are spread over (0, 100)
    img = torch.randn(40, 8, generator=gen)
    txt = img[t2i] + 1.5 * torch.randn(t2i.numel(), 8, generator=gen)
    sim = img @ txt.T
    got = retrieval_metrics(sim, t2i)
    assert_close(got, loop_metrics(sim, t2i))
    assert 0 < got["r_mean"] < 100


@pytest.mark.parametrize("levels", [2, 3, 7])
def test_tie_heavy_integer_scores_match_loop(levels: int) -> None:
    gen = torch.Generator().manual_seed(levels)
    t2i = make_txt2img(30, gen)
    sim = torch.randint(0, levels, (30, t2i.numel()), generator=gen)
    assert_close(retrieval_metrics(sim.float(), t2i), loop_metrics(sim, t2i))
    assert_close(retrieval_metrics(sim, t2i), loop_metrics(sim, t2i))  # integer dtype works too


def test_ranks_match_loop_exactly_with_ties_over_many_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.metrics as m

    monkeypatch.setattr(m, "_BLOCK_BYTES", 64)  # several row blocks, including a ragged last one
    gen = torch.Generator().manual_seed(5)
    t2i = make_txt2img(13, gen)
    sim = torch.randint(0, 3, (13, t2i.numel()), generator=gen).double()
    threads = torch.get_num_threads()
    tr, ir = retrieval_ranks(sim, t2i)
    assert torch.get_num_threads() == threads  # restored after the parallel section
    s, t = sim.numpy(), t2i.numpy()
    for i in range(13):  # pessimistic rule, spelled out: non-GT candidates scoring >= the best GT score
        assert tr[i] == np.sum((s[i] >= s[i, t == i].max()) & (t != i))
    for c in range(t2i.numel()):
        assert ir[c] == np.sum(s[:, c] >= s[t[c], c]) - 1


def test_float64_and_float32_agree() -> None:
    gen = torch.Generator().manual_seed(3)
    t2i = make_txt2img(25, gen)
    sim = torch.randn(25, t2i.numel(), generator=gen, dtype=torch.float64)
    assert retrieval_metrics(sim, t2i) == retrieval_metrics(sim.float(), t2i)
    assert_close(retrieval_metrics(sim, t2i), loop_metrics(sim, t2i))


def test_hand_made_2x4() -> None:
    t2i = torch.tensor([0, 0, 1, 1])
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                        [0.3, 0.4, 0.5, 0.6]])
    tr, ir = retrieval_ranks(sim, t2i)
    assert tr.tolist() == [0, 0]        # image 0: caption 0 is top; image 1: caption 3 is top
    assert ir.tolist() == [0, 1, 1, 0]  # caption 1 prefers image 1, caption 2 prefers image 0
    got = retrieval_metrics(sim, t2i)
    assert got["tr1"] == got["tr5"] == got["tr10"] == 100.0
    assert got["ir1"] == 50.0 and got["ir5"] == got["ir10"] == 100.0
    assert got["r_mean"] == pytest.approx((100 * 5 + 50) / 6)


def test_hand_made_2x4_best_gt_caption_and_ranks() -> None:
    t2i = torch.tensor([1, 0, 1, 0])
    sim = torch.tensor([[0.5, 0.1, 0.9, 0.7],   # image 0: GT {1, 3}; best GT 0.7, beaten by 0.9 -> rank 1
                        [0.2, 0.3, 0.1, 0.4]])  # image 1: GT {0, 2}; best GT 0.2, beaten by 0.3, 0.4 -> rank 2
    tr, ir = retrieval_ranks(sim, t2i)
    assert tr.tolist() == [1, 2]
    assert ir.tolist() == [1, 1, 1, 0]
    got = retrieval_metrics(sim, t2i)
    assert got["tr1"] == 0.0 and got["tr5"] == 100.0
    assert got["ir1"] == 25.0 and got["ir5"] == 100.0


def test_ties_are_pessimistic() -> None:
    t2i = torch.tensor([0, 0, 1, 1])
    sim = torch.ones(2, 4)
    tr, ir = retrieval_ranks(sim, t2i)
    assert tr.tolist() == [2, 2]  # both non-GT captions tie with the GT and rank ahead of it
    assert ir.tolist() == [1, 1, 1, 1]
    got = retrieval_metrics(sim, t2i)
    assert got["tr1"] == got["ir1"] == 0.0
    assert got["tr5"] == got["ir5"] == 100.0
    # a tie between two ground-truth captions does not count against the image
    sim = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert retrieval_ranks(sim, t2i)[0].tolist() == [0, 0]


def test_r_mean_formula() -> None:
    gen = torch.Generator().manual_seed(9)
    t2i = make_txt2img(20, gen)
    got = retrieval_metrics(torch.randn(20, t2i.numel(), generator=gen), t2i)
    assert got["tr_mean"] == pytest.approx((got["tr1"] + got["tr5"] + got["tr10"]) / 3)
    assert got["ir_mean"] == pytest.approx((got["ir1"] + got["ir5"] + got["ir10"]) / 3)
    six = [got[k] for k in ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10")]
    assert got["r_mean"] == pytest.approx(sum(six) / 6)
    assert all(isinstance(v, float) for v in got.values())
    assert got["tr1"] <= got["tr5"] <= got["tr10"] and got["ir1"] <= got["ir5"] <= got["ir10"]


def test_perfect_and_nan_off_ground_truth() -> None:
    t2i = torch.tensor([0, 1, 2, 0])
    sim = torch.full((3, 4), -1.0)
    sim[t2i, torch.arange(4)] = 1.0
    assert all(retrieval_metrics(sim, t2i)[k] == 100.0 for k in METRIC_KEYS)
    sim[1, 0] = float("nan")  # a NaN candidate never outranks the ground truth
    assert retrieval_metrics(sim, t2i)["r_mean"] == 100.0


@pytest.mark.parametrize(
    ("sim", "t2i", "message"),
    [
        (torch.zeros(2, 4), torch.tensor([0, 0, 1]), "shape mismatch"),
        (torch.zeros(2, 4), torch.tensor([0, 0, 1, 2]), r"\[0, 2\)"),
        (torch.zeros(2, 4), torch.tensor([0, -1, 1, 1]), r"\[0, 2\)"),
        (torch.zeros(3, 4), torch.tensor([0, 0, 1, 1]), r"no caption.*\[2\]"),
        (torch.zeros(4), torch.tensor([0, 0, 1, 1]), "2-D"),
        (torch.zeros(2, 4), torch.tensor([[0, 0, 1, 1]]), "1-D"),
        (torch.zeros(2, 4), torch.tensor([0.0, 0.0, 1.0, 1.0]), "integer"),
        (torch.zeros(2, 4, dtype=torch.bool), torch.tensor([0, 0, 1, 1]), "real scores"),
        (torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([[float("nan"), 0, 0, 0], [0, 0, 0, 0]]), torch.tensor([0, 0, 1, 1]), "NaN"),
    ],
)
def test_validation_errors(sim: torch.Tensor, t2i: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, t2i)
