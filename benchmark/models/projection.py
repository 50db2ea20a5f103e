"""Text projection head (docs/protocols.md#students)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ProjectionHead(nn.Module):
    """``LayerNorm(h + Dropout(W2·GELU(h) + b2))`` with ``h = W1·x + b1`` (exact-erf GELU, LayerNorm eps 1e-5).

    Parameter order: projection.weight, projection.bias, fc.weight, fc.bias, layer_norm.weight, layer_norm.bias.
    """

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(d_in, d_out)
        self.fc = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_out, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.projection(x)
        return self.layer_norm(h + self.dropout(self.fc(F.gelu(h))))
