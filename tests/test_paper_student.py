"""The paper-preset student (NFNet-L0 + 768→2304 text head) is built and stepped on CPU, offline (random init)."""

import torch

from benchmark.experts.store import ExpertCollection, expert_path, write_expert
from benchmark.interface import DistillTask, TrainData
from benchmark.models.student import FlatStudent, StudentConfig, build_student
from benchmark.models.towers import load_tower_config
from benchmark.registry import get_method


def _paper_student(image_size: int = 64) -> StudentConfig:
    cfg = dict(load_tower_config("nfnet_l0"), image_size=image_size)
    return StudentConfig(tower="nfnet_l0", text_dim=768, pretrained=False, tower_config=cfg)


def test_nfnet_l0_student_matches_the_reference_architecture():
    flat = FlatStudent(build_student(_paper_student(), seed=0))
    assert flat.numel("txt") == 7_087_104  # ProjectionHead(768 -> 2304), docs/protocols.md#students
    assert abs(flat.numel("img") - 32_769_488) / 32_769_488 < 0.01  # NFNet-L0 (timm), docs/protocols.md#students
    x, t = torch.randn(2, 3, 64, 64), torch.randn(2, 768)
    model = flat.model.eval()  # no dropout: the two forwards must agree exactly
    assert model.embed_images(x).shape == (2, 2304) and model.embed_texts(t).shape == (2, 2304)
    logits = flat.logits(x, t, flat.flat("img"), flat.flat("txt"))
    assert torch.allclose(logits, model(x, t), atol=1e-4)  # functional forward == module forward
    assert torch.allclose(logits.abs().max(), torch.tensor(1 / 0.07), atol=1 / 0.07)


def test_tesla_step_on_the_paper_student(tmp_path):
    student = _paper_student(32)
    flat = FlatStudent(build_student(student, seed=0))
    g = torch.Generator().manual_seed(0)
    traj = {m: [flat.flat(m), flat.flat(m) + 1e-3 * torch.randn(flat.numel(m), generator=g)] for m in ("img", "txt")}
    write_expert(expert_path(tmp_path, 0), traj, {"index": 0, "param_names": flat.names,
                                                  "param_shapes": {m: [list(s) for s in flat.shapes[m]]
                                                                   for m in flat.shapes}})
    n = 6
    train = TrainData(torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 768, generator=g), torch.arange(n))
    cls = get_method("tesla-vl")
    params = cls.resolve_params("tiny", "flickr30k", 4, {"syn_steps": 1, "batch_size": 2, "iterations": 1,
                                                          "start_window": [0, 1], "retain_graph": False})
    task = DistillTask(train=train, student=student, budget=4, seed=0, params=params,
                       experts=ExpertCollection(tmp_path))
    ds = cls().distill(task)
    ds.validate(budget=4, image_shape=(3, 32, 32), text_dim=768)
    assert ds.phases[0].lr_img > 0 and ds.phases[0].lr_img != 0.1  # one outer step moved the learned rate
