"""Small pieces the performance scripts share: device synchronisation for timing, and markdown tables.

torch is imported only where it is used, so orchestrating scripts (``bench_throughput``) stay light."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock timer around a call measures the call."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def md_table(rows: list[tuple[str, ...]]) -> str:
    """A markdown table: the first row is the header."""
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
