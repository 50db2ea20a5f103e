"""Datasets: registry, Karpathy-format loading, caption normalisation, image transforms and the shapes generator."""

from benchmark.data.captions import pre_caption
from benchmark.data.datasets import DATASETS, DatasetInfo, annotation_path, dataset_dir, get_dataset_info
from benchmark.data.karpathy import CaptionSplit, load_split

__all__ = [
    "DATASETS", "CaptionSplit", "DatasetInfo", "annotation_path", "dataset_dir", "get_dataset_info",
    "load_split", "pre_caption",
]
