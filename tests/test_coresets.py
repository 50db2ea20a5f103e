import pytest
import torch

from benchmark.experts.store import ExpertCollection, expert_path, write_expert
from benchmark.interface import DistillTask
from benchmark.registry import get_method
from methods.coresets.forgetting import forgetting_select
from methods.coresets.herding import herding_select
from methods.coresets.kcenter import kcenter_select
from tests.helpers import random_train, tiny_student


def test_herding_known_answer_1d():
    # mean 2.0: first pick is the point closest to the mean (2.0 -> index 2); then the running mean is pulled back
    # toward 2: (2 + x)/2 closest to 2 among the rest -> 1.0 or 3.0 tie -> lowest index (1).
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    assert herding_select(f, 3).tolist() == [2, 1, 3]


def test_herding_matches_bruteforce_greedy():
    f = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    mu = f.double().mean(0)
    chosen = []
    for k in range(1, 8):
        best = min((j for j in range(30) if j not in chosen),
                   key=lambda j: ((mu - (f[chosen + [j]].double().sum(0)) / k) ** 2).sum().item())
        chosen.append(best)
    assert herding_select(f, 7).tolist() == chosen


def test_kcenter_known_answer_on_a_line():
    f = torch.tensor([[0.0], [1.0], [5.0], [9.0], [10.0]])
    # start at 2 (x=5): farthest is 0 (x=0, dist 5) vs 4 (x=10, dist 5) -> tie -> lowest index 0; then 4 (dist 10)
    assert kcenter_select(f, 3, first=2).tolist() == [2, 0, 4]


def test_kcenter_covering_radius_is_greedy_optimal_on_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centers])
    sel = kcenter_select(pts, 3, first=0)
    assert sorted((sel // 20).tolist()) == [0, 1, 2]  # one point per cluster


def test_forgetting_ranks_never_learned_first_then_by_events():
    events = torch.tensor([0, 3, 1, 0, 5])
    ever = torch.tensor([True, True, True, False, True])
    sel = forgetting_select(events, ever, 3, torch.Generator().manual_seed(0))
    assert sel.tolist() == [3, 4, 1]


def test_forgetting_ties_are_broken_by_seed():
    events = torch.zeros(50, dtype=torch.long)
    ever = torch.ones(50, dtype=torch.bool)
    a = forgetting_select(events, ever, 5, torch.Generator().manual_seed(0))
    b = forgetting_select(events, ever, 5, torch.Generator().manual_seed(1))
    assert len(set(a.tolist())) == 5 and a.tolist() != b.tolist()


@pytest.fixture()
def task_factory(tmp_path):
    train = random_train(n_images=12, caps_per_image=2)
    student = tiny_student()
    model_numel = {}
    from benchmark.models.student import FlatStudent, build_student

    flat = FlatStudent(build_student(student, seed=0))
    for k in range(2):
        traj = {t: [flat.flat(t) + 0.01 * e * (k + 1) for e in range(3)] for t in ("img", "txt")}
        stats = {"forget_count": torch.arange(train.n_pairs) % 5, "ever_learned": torch.ones(train.n_pairs,
                                                                                             dtype=torch.uint8)}
        write_expert(expert_path(tmp_path, k), traj, {"index": k}, stats)
    experts = ExpertCollection(tmp_path)
    model_numel["n"] = train.n_pairs

    def make(method, budget, seed=0):
        cls = get_method(method)
        return cls, DistillTask(train=train, student=student, budget=budget, seed=seed,
                                params=cls.resolve_params("quick", "shapes", budget), experts=experts)

    return make


@pytest.mark.parametrize("method", ["random", "herding", "kcenter", "forgetting"])
def test_coreset_methods_return_valid_real_pairs(task_factory, method):
    cls, task = task_factory(method, 7)
    ds = cls().distill(task)
    ds.validate(budget=7, image_shape=(3, 8, 8), text_dim=6)
    idx = torch.tensor(ds.meta["selected_pairs"])
    assert len(set(idx.tolist())) == 7
    x, t = task.train.pairs(idx)
    assert torch.equal(ds.phases[0].images, x) and torch.equal(ds.phases[0].texts, t)
    assert ds.phases[0].lr_img == 0.1 and ds.phases[0].similarity == "none"
    again = cls().distill(task)
    assert again.meta["selected_pairs"] == ds.meta["selected_pairs"]  # deterministic for a seed
    # the log records the selection (DVC warns on an empty output): 7 pairs covering their distinct images
    images = {int(task.train.caption_image[i]) for i in idx}
    assert task.logger.records[0] == {"step": 1, "pairs": 7.0, "distinct_images": float(len(images))}


def test_random_coreset_differs_by_seed(task_factory):
    cls, t0 = task_factory("random", 7, seed=0)
    _, t1 = task_factory("random", 7, seed=1)
    assert cls().distill(t0).meta["selected_pairs"] != cls().distill(t1).meta["selected_pairs"]


def test_coreset_rejects_budget_over_training_pairs(task_factory):
    cls, task = task_factory("random", 1000)
    with pytest.raises(ValueError, match="exceeds"):
        cls().distill(task)
