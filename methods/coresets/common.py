"""Shared pieces of the coreset methods: the DistilledSet of chosen pairs and the pair features they select on."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from benchmark.distilled import DistilledSet, Phase
from benchmark.interface import ANY_PROFILE, DistillTask, Method
from benchmark.models.student import FlatStudent
from benchmark.requirements import EXPERTS, Requirement
from benchmark.training import encode


class CoresetMethod(Method):
    """A method that returns ``budget`` real pairs chosen by :meth:`select`; rates are fixed (not learned)."""

    # One setting for every profile: the pairs are trained at the expert's learning rate.
    defaults: ClassVar[dict[str, dict[str, Any]]] = {ANY_PROFILE: {"lr_img": 0.1, "lr_txt": 0.1}}
    uses_experts: ClassVar[bool] = False  # selection on the experts' learned joint space

    @classmethod
    def requirements(cls, params: dict[str, Any], budget: int) -> list[Requirement]:
        return [Requirement(EXPERTS)] if cls.uses_experts else []

    def select(self, task: DistillTask) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def distill(self, task: DistillTask) -> DistilledSet:
        if task.budget > task.train.n_pairs:
            raise ValueError(f"budget {task.budget} exceeds the {task.train.n_pairs} training pairs")
        idx = self.select(task)
        if len(idx) != task.budget or len(set(idx.tolist())) != task.budget:
            raise RuntimeError(f"{self.name} selected {len(idx)} pairs ({len(set(idx.tolist()))} distinct), "
                               f"expected {task.budget}")
        # the selection's record (a coreset has no iterations): how many pairs, covering how many distinct images
        task.logger.log({"pairs": float(len(idx)),
                         "distinct_images": float(len(torch.unique(task.train.caption_image[idx])))}, step=1)
        x, t = task.train.pairs(idx)
        phase = Phase(images=x.float().clone(), texts=t.float().clone(), lr_img=task.params["lr_img"],
                      lr_txt=task.params["lr_txt"])
        meta = {"method": self.name, "params": task.params, "selected_pairs": idx.tolist()}
        return DistilledSet([phase], meta, loss="ce")


def pair_features(task: DistillTask, expert_index: int) -> torch.Tensor:
    """``[n_pairs, 2D]`` features: concatenated L2-normalised image and text embeddings of every training pair,
    computed by the student at the *final* epoch of expert ``expert_index`` (the learned joint space)."""
    experts = task.require_experts("coreset features")
    traj = experts[expert_index % len(experts)]
    model = task.make_student(seed=0)
    flat = FlatStudent(model)
    last = traj.num_timestamps - 1
    for tower in ("img", "txt"):
        flat.load_flat(tower, traj.read(tower, last).to(task.device))
    e_img, e_txt = encode(model, task.train.images, task.train.texts, task.device)
    return torch.cat([e_img[task.train.caption_image], e_txt], dim=1)
