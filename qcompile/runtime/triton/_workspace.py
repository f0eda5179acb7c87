"""Scratch buffers that kernels share across launches: one set per device and kernel family."""

from __future__ import annotations

import torch


class Workspace:
    """Buffers of fixed dtypes, grown on demand before (never during) CUDA-graph capture, so a captured launch
    keeps pointing at the same memory. A ``zeroed`` buffer starts at zero, and the kernels that use it must leave
    it at zero when they finish (e.g. arrival counters, which the last program to arrive resets)."""

    def __init__(self, what: str, *buffers: tuple[torch.dtype, bool]):
        self.what = what
        self.specs = buffers  # (dtype, zeroed) per buffer
        self.buffers: dict[str, list[torch.Tensor]] = {}

    def get(self, device, *numels: int) -> list[torch.Tensor]:
        device = torch.device(device)
        have = self.buffers.get(str(device))
        if have is not None and all(t.numel() >= n for t, n in zip(have, numels)):
            return have
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the {self.what} workspace must be sized before CUDA-graph capture (run once eagerly)")
        out = []
        for i, ((dtype, zeroed), n) in enumerate(zip(self.specs, numels)):
            n = max(n, 0 if have is None else have[i].numel())
            out.append((torch.zeros if zeroed else torch.empty)(n, dtype=dtype, device=device))
        self.buffers[str(device)] = out
        return out
