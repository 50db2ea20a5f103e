import torch

from benchmark.interface import TrainData
from benchmark.training import index_batches, pair_batches
from tests.helpers import random_train


class ListImages:
    """An indexable image source that is not a tensor (like ImageFolder)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_pair_batches_agree_for_tensor_and_dataset_sources():
    train = random_train()
    lazy = TrainData(ListImages(list(train.images)), train.texts, train.caption_image, train.captions)
    batches = list(index_batches(train.n_pairs, 5, torch.Generator().manual_seed(0)))
    for workers in (0, 2):
        got = list(pair_batches(lazy, batches, workers, seed=0))
        want = list(pair_batches(train, batches, 0, seed=0))
        assert len(got) == len(want) == len(batches)
        for (i1, x1, t1), (i2, x2, t2) in zip(got, want):
            assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(t1, t2)
