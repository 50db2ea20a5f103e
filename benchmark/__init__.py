"""mmdd-bench: a reproducible benchmark for multimodal (image-text) dataset distillation."""

__version__ = "0.1.0"
