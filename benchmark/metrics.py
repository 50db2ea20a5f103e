"""Image-text retrieval metrics (docs/protocols.md#retrieval-metrics), vectorised.

Conventions
-----------
``sim`` is the ``[n_images, n_captions]`` score matrix and ``txt2img[c]`` the image of caption ``c``.

* **TR@K** (image -> text): for each image, the rank of its best-ranked ground-truth caption among all captions;
  ``TR@K = 100 * mean(rank < K)`` over images.
* **IR@K** (text -> image): for each caption, the rank of its image among all images; ``IR@K = 100 * mean(rank < K)``
  over captions.
* ``tr_mean`` / ``ir_mean`` are the means over K in {1, 5, 10}; ``r_mean = (tr_mean + ir_mean) / 2``, i.e. the mean of
  the six recalls.

Tie rule (pessimistic): a query's rank is the number of **non-ground-truth** candidates scoring **greater than or
equal to** its best ground-truth score. Exact ties therefore never help the model. This equals the position of the
first ground-truth candidate in a stable descending sort by score in which, among equal scores, non-ground-truth
candidates come before ground-truth ones (e.g. ``numpy.lexsort((is_gt, -score))``). On tie-free scores it equals any
descending argsort, i.e. the BLIP reference. A NaN at a non-ground-truth position never outranks anything (it sorts
last); a NaN ground-truth score is an error.

Tie rule ``ties="reference"`` (the BLIP/LoRS evaluation code, ``np.argsort(score)[::-1]`` per query): among equal
scores the candidate with the **higher index** ranks first, whether or not it is ground truth. This is the order of
a stable ascending sort, reversed: ``np.argsort(score, kind="stable")[::-1]``. NumPy's default ``quicksort`` is not
stable, so the reference code's own order among ties is an implementation detail of the NumPy build (insertion sort
below 17 elements, introsort or SIMD sorts above); the stable order is the one deterministic reading of it
(docs/protocols.md#tie-order). The ``paper`` protocol uses it; everything else uses the pessimistic rule.

How it is computed (one pass over ``sim``, in cache-sized row blocks, split over threads):

* IR: ``g[c] = sim[txt2img[c], c]``; ``rank[c] = #{i : sim[i, c] >= g[c]} - 1`` (the ground truth counts itself).
* TR: ``m[i] = max_{c in GT(i)} sim[i, c]``; ``rank[i] = #{c : sim[i, c] >= m[i]} - #{c in GT(i) : sim[i, c] == m[i]}``
  (no ground-truth caption scores above ``m[i]``).
* ``reference``: IR ``rank[c] = #{i : sim[i, c] > g[c]} + #{i > txt2img[c] : sim[i, c] == g[c]}``; TR with
  ``c*[i]`` = the highest-index ground-truth caption scoring ``m[i]``:
  ``rank[i] = #{c : sim[i, c] > m[i]} + #{c > c*[i] : sim[i, c] == m[i]}``.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

KS: tuple[int, ...] = (1, 5, 10)
TIES: tuple[str, ...] = ("pessimistic", "reference")
METRIC_KEYS: tuple[str, ...] = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "ir_mean", "tr_mean", "r_mean")

# Target bytes of one row block: small enough to stay in L2/L3 while it is compared twice.
_BLOCK_BYTES = 1 << 21


def _validate(sim: torch.Tensor, txt2img: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(sim, torch.Tensor):
        raise TypeError(f"sim must be a torch.Tensor, got {type(sim).__name__}")
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D [n_images, n_captions], got shape {tuple(sim.shape)}")
    if sim.dtype == torch.bool or sim.is_complex():
        raise ValueError(f"sim must hold real scores, got dtype {sim.dtype}")
    txt2img = torch.as_tensor(txt2img, device=sim.device)
    if txt2img.ndim != 1:
        raise ValueError(f"txt2img must be 1-D [n_captions], got shape {tuple(txt2img.shape)}")
    if txt2img.dtype.is_floating_point or txt2img.is_complex() or txt2img.dtype == torch.bool:
        raise ValueError(f"txt2img must be an integer tensor (caption -> image index), got dtype {txt2img.dtype}")
    n_images, n_captions = sim.shape
    if n_images == 0 or n_captions == 0:
        raise ValueError(f"sim is empty: shape {tuple(sim.shape)}")
    if txt2img.numel() != n_captions:
        raise ValueError(
            f"shape mismatch: sim has {n_captions} caption columns but txt2img has {txt2img.numel()} entries "
            "(sim must be [n_images, n_captions])")
    txt2img = txt2img.long()
    lo, hi = int(txt2img.min()), int(txt2img.max())
    if lo < 0 or hi >= n_images:
        raise ValueError(f"txt2img values must lie in [0, {n_images}) (n_images = sim.shape[0]); found range [{lo}, {hi}]")
    per_image = torch.bincount(txt2img, minlength=n_images)
    empty = (per_image == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{empty.numel()} image(s) have no caption in txt2img (first: {empty[:10].tolist()}); "
            "every image row of sim needs at least one ground-truth caption")
    return sim, txt2img


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def retrieval_ranks(sim: torch.Tensor, txt2img: torch.Tensor | Sequence[int],
                    ties: str = "pessimistic") -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-based ranks ``(tr_rank [n_images], ir_rank [n_captions])`` (int64) under tie rule ``ties``
    (``pessimistic`` or ``reference``, see the module docstring).

    On CPU the work is split over ``torch.get_num_threads()`` Python threads that each run single-threaded torch ops
    (torch's own thread count is set to 1 for the duration of the call and restored afterwards): many short
    OpenMP-parallel ops stall badly (10x and more, measured) when the cores are shared with other processes.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    sim, txt2img = _validate(sim, txt2img)
    if sim.device.type != "cpu":
        return _ranks(sim, txt2img, workers=1, ties=ties)
    workers = torch.get_num_threads()
    with _intra_op_threads(1):
        return _ranks(sim, txt2img, workers, ties)


def _ranks(sim: torch.Tensor, txt2img: torch.Tensor, workers: int,
           ties: str = "pessimistic") -> tuple[torch.Tensor, torch.Tensor]:
    n_images, n_captions = sim.shape
    cols = torch.arange(n_captions, device=sim.device)
    gt = sim[txt2img, cols]                                               # [C] ground-truth score per caption
    if torch.isnan(gt).any():
        raise ValueError("sim contains NaN at ground-truth positions; ranks are undefined")
    best = torch.full((n_images,), float("-inf"), dtype=sim.dtype, device=sim.device) if sim.dtype.is_floating_point \
        else torch.full((n_images,), torch.iinfo(sim.dtype).min, dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, txt2img, gt, reduce="amax")             # [I] best ground-truth score per image
    at_best = gt == best[txt2img]
    gt_ties = torch.bincount(txt2img[at_best], minlength=n_images)    # GT captions equal to that best
    if ties == "reference":  # the highest-index GT caption at the best score, and each caption's image
        last_gt = torch.full((n_images,), -1, dtype=torch.int64, device=sim.device)
        last_gt = last_gt.scatter_reduce(0, txt2img[at_best], cols[at_best], reduce="amax")
        row_ids = torch.arange(n_images, device=sim.device)

    row_count = torch.empty(n_images, dtype=torch.int64, device=sim.device)
    rows = max(1, _BLOCK_BYTES // max(1, n_captions * sim.element_size()))
    workers = max(1, min(workers, -(-n_images // rows)))
    bounds = [n_images * k // workers for k in range(workers + 1)]
    partial = [torch.zeros(n_captions, dtype=torch.int64, device=sim.device) for _ in range(workers)]

    def count(w: int) -> None:  # the rows bounds[w]:bounds[w+1], in cache-sized blocks
        gt_row = gt.unsqueeze(0)
        for a in range(bounds[w], bounds[w + 1], rows):
            b = min(a + rows, bounds[w + 1])
            block = sim[a:b]
            if ties == "reference":
                later_img = row_ids[a:b, None] > txt2img[None, :]
                partial[w] += torch.count_nonzero((block > gt_row) | (block == gt_row) & later_img, dim=0)
                m = best[a:b, None]
                later_cap = cols[None, :] > last_gt[a:b, None]
                row_count[a:b] = torch.count_nonzero((block > m) | (block == m) & later_cap, dim=1)
                continue
            partial[w] += torch.count_nonzero(block >= gt_row, dim=0)
            row_count[a:b] = torch.count_nonzero(block >= best[a:b, None], dim=1)

    if workers == 1:
        count(0)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(count, range(workers)))
    col_count = torch.stack(partial).sum(0)
    if ties == "reference":
        return row_count, col_count
    return row_count - gt_ties, col_count - 1


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = KS) -> list[float]:
    """``100 * mean(ranks < k)`` for each ``k``."""
    return [100.0 * float((ranks < k).double().mean()) for k in ks]


def retrieval_metrics(sim: torch.Tensor, txt2img: torch.Tensor | Sequence[int],
                      ties: str = "pessimistic") -> dict[str, float]:
    """IR@{1,5,10}, TR@{1,5,10} (percent), ``ir_mean``, ``tr_mean`` and ``r_mean`` from a score matrix.

    ``sim`` is ``[n_images, n_captions]`` (higher = more similar), ``txt2img`` maps each caption to its image index.
    Raises ``ValueError`` on mismatched shapes, out-of-range ``txt2img``, an image without captions or NaN ground-truth
    scores. ``ties``: ``pessimistic`` (default) or ``reference`` (the BLIP code's order), see the module docstring.
    """
    tr_rank, ir_rank = retrieval_ranks(sim, txt2img, ties)
    ir1, ir5, ir10 = recall_at_k(ir_rank)
    tr1, tr5, tr10 = recall_at_k(tr_rank)
    ir_mean = (ir1 + ir5 + ir10) / 3.0
    tr_mean = (tr1 + tr5 + tr10) / 3.0
    return {"ir1": ir1, "ir5": ir5, "ir10": ir10, "tr1": tr1, "tr5": tr5, "tr10": tr10,
            "ir_mean": ir_mean, "tr_mean": tr_mean, "r_mean": (ir_mean + tr_mean) / 2.0}
