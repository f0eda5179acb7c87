"""Resumable training state saved after every epoch, shared by the learning loops that train one parameter set
over the whole model (``learn.end_to_end``, ``passes.spinquant``).

One file per pass: the configuration's fingerprint (``learn.blockwise.fingerprint``), the number of finished
epochs, the trainable tensors, the optimiser state and anything else the loop keeps (e.g. its loss history).
Written atomically (a temporary file, then a rename) so an interrupted run never leaves half a file; loaded with
``weights_only=True``; a state written under another configuration is refused rather than silently mixed in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qcompile.errors import QCompileError


def save(path: Path, key: str, epoch: int, params: list[torch.Tensor], optimizer, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": key, "epoch": epoch, "params": [p.detach() for p in params],
                "optimizer": optimizer.state_dict(), **extra}, tmp)
    tmp.replace(path)


def resume(path: Path | None, key: str, device, params: list[torch.Tensor], optimizer) -> dict | None:
    """Load ``path`` into ``params`` and ``optimizer`` if it exists; returns what was saved (None: start fresh)."""
    if path is None or not path.is_file():
        return None
    saved = torch.load(path, map_location=device, weights_only=True)
    if saved.get("fingerprint") != key:
        raise QCompileError(f"training state {path} belongs to another configuration; use another state_dir, or "
                            f"delete that file to train this stage again (other files in {path.parent.parent} "
                            "stay valid)")
    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    optimizer.load_state_dict(saved["optimizer"])
    return saved
