"""Evaluation students one by one against batched (:mod:`benchmark.students_batched`): seconds per student and how
far apart the trained weights are. Used by ``bench_throughput`` (CPU) and ``gpu_check`` (CUDA)."""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmark.distilled import DistilledSet, Phase
from benchmark.evaluation import EvalConfig, train_student
from benchmark.models.student import StudentConfig
from benchmark.models.towers import load_tower_config
from benchmark.perf.common import sync
from benchmark.students_batched import train_students_batched


def time_students(device: str = "cpu", students: int = 3, epochs: int = 10, pairs: int = 100,
                  tower: str = "convnet_w32_d3", text_dim: int = 384) -> dict[str, Any]:
    """Train ``students`` students of the default evaluation (batch 128, momentum 0.9, lr drop) on a random set of
    ``pairs`` pairs for ``epochs`` epochs, one by one and batched, after one warm-up epoch of each."""
    dev = torch.device(device)
    tc = load_tower_config(tower)
    student = StudentConfig(tower=tower, text_dim=text_dim, pretrained=False, tower_config=tc)
    g = torch.Generator().manual_seed(0)
    size = int(tc["image_size"])
    images, texts = torch.randn(pairs, 3, size, size, generator=g), torch.randn(pairs, text_dim, generator=g)
    dset = DistilledSet([Phase(images, texts, 0.1, 0.1)], {}, loss="ce")
    seeds = list(range(students))
    out: dict[str, Any] = {"device": str(dev), "tower": tower, "students": students, "epochs": epochs, "pairs": pairs}
    for ep, record in ((1, False), (epochs, True)):  # the first round warms up kernels and allocators
        cfg = EvalConfig(students=students, epochs=ep, batch_size=128)
        sync(dev)
        t0 = time.perf_counter()
        seq = [train_student(dset, student, cfg, s, dev) for s in seeds]
        sync(dev)
        t1 = time.perf_counter()
        bat = train_students_batched(dset, student, cfg, seeds, dev)
        sync(dev)
        t2 = time.perf_counter()
        if record:
            diff = max(float((a - b).abs().max()) for m, n in zip(seq, bat)
                       for a, b in zip(m.state_dict().values(), n.state_dict().values()) if a.is_floating_point())
            out.update(sequential_s_per_student=(t1 - t0) / students, batched_s_per_student=(t2 - t1) / students,
                       max_abs_weight_diff=diff)
    out["speedup"] = out["sequential_s_per_student"] / out["batched_s_per_student"]
    return out
