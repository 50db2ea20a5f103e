"""The one SGD loop that trains a dual encoder on pairs: used by experts, evaluation students and full-data students."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from benchmark.losses import get_loss
from benchmark.models.student import DualEncoder


def index_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False,
                  mode: str = "partition") -> Iterator[torch.Tensor]:
    """Index batches for one epoch.

    ``partition``: a fresh permutation cut into consecutive batches (the last one partial unless ``drop_last``).
    ``overlap``: ceil(n / b) batches, each the first b entries of a fresh permutation (the LoRS/PTM evaluation
    sampler, docs/protocols.md#training-a-student-on-a-distilledset; batches overlap and some pairs are skipped).
    """
    if mode == "partition":
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            chunk = perm[start:start + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield chunk
    elif mode == "overlap":
        for _ in range(-(-n // batch_size)):
            yield torch.randperm(n, generator=generator)[:batch_size]
    else:
        raise ValueError(f"batching mode must be 'partition' or 'overlap', got {mode!r}")


@dataclass
class SGDConfig:
    lr_img: float
    lr_txt: float
    momentum: float = 0.0
    weight_decay: float = 0.0


def make_optimizer(model: DualEncoder, cfg: SGDConfig) -> torch.optim.SGD:
    """One SGD with two parameter groups: the image tower and the text head."""
    return torch.optim.SGD([
        {"params": list(model.image_encoder.parameters()), "lr": cfg.lr_img},
        {"params": list(model.text_projection.parameters()), "lr": cfg.lr_txt},
    ], lr=cfg.lr_img, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def contrastive_step(model: DualEncoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
                     target: torch.Tensor | None, loss: str | Callable = "ce") -> torch.Tensor:
    """One optimiser step on a batch; returns the (detached) logits for callers that track per-pair statistics."""
    loss_fn = get_loss(loss) if isinstance(loss, str) else loss
    model.train()
    logits = model(x, t)
    value = loss_fn(logits, target)
    if not torch.isfinite(value):
        raise FloatingPointError(f"non-finite training loss {value.item()}: lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return logits.detach()


def image_chunks(images, size: int) -> Iterator[torch.Tensor]:
    """``images`` (a tensor, or an indexable dataset of image tensors) as consecutive batches of at most ``size``."""
    n = len(images)
    for s in range(0, n, size):
        if isinstance(images, torch.Tensor):
            yield images[s:s + size]
        else:
            yield torch.stack([images[i] for i in range(s, min(n, s + size))])


@torch.no_grad()
def encode(model: DualEncoder, images, texts: torch.Tensor, device: str | torch.device,
           batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings of all images (a tensor or an indexable dataset) and caption features (eval mode)."""
    model.eval()
    img = [model.embed_images(xb.to(device)).float().cpu() for xb in image_chunks(images, batch_size)]
    txt = [model.embed_texts(texts[s:s + batch_size].to(device)).float().cpu() for s in range(0, len(texts), batch_size)]
    return torch.cat(img), torch.cat(txt)


def freeze_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _PairImages(torch.utils.data.Dataset):
    """Pair index -> transformed image of that pair (for loading through DataLoader workers)."""

    def __init__(self, images, caption_image: torch.Tensor):
        self.images = images
        self.caption_image = caption_image

    def __len__(self) -> int:
        return len(self.caption_image)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.images[int(self.caption_image[j])]


def pair_batches(train, batches: list[torch.Tensor], num_workers: int, seed: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(pair indices, images, caption features) per batch. Preloaded tensors are indexed directly; image datasets
    (decoded and augmented per access) are loaded by ``num_workers`` seeded DataLoader workers."""
    if isinstance(train.images, torch.Tensor):
        for idx in batches:
            x, t = train.pairs(idx)
            yield idx, x, t
        return
    from benchmark.seeding import seed_worker

    loader = torch.utils.data.DataLoader(_PairImages(train.images, train.caption_image), batch_sampler=batches,
                                         num_workers=num_workers, worker_init_fn=seed_worker, pin_memory=False,
                                         generator=torch.Generator().manual_seed(seed))
    for idx, x in zip(batches, loader):
        yield idx, x, train.texts[idx]
