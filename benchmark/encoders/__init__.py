"""Frozen encoders used to precompute features (text: [CLS] of a Hugging Face encoder)."""

from benchmark.encoders.text import (
    TEXT_ENCODERS, embed_split, encode_texts, load_features, read_feature_metadata, text_encoder_dim,
)

__all__ = ["TEXT_ENCODERS", "embed_split", "encode_texts", "load_features", "read_feature_metadata", "text_encoder_dim"]
