"""Host -> device copies that do not stall the stream.

``torch.tensor(list, device="cuda")`` copies from pageable memory: the host blocks until
the copy is done, i.e. until the stream has drained. These helpers stage through
page-locked memory and copy asynchronously instead."""

from __future__ import annotations

import torch


def pinned(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host staging buffer, page-locked when there is a GPU."""
    return torch.zeros(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list (or array) on ``device`` without a blocking copy."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
