"""Resumable training state saved after every epoch, shared by the learning loops that train one parameter set
over the whole model (``learn.end_to_end``, ``passes.spinquant``).

One file per pass and configuration (``state_path``: the file name carries a digest of the configuration's
fingerprint, ``learn.blockwise.fingerprint``), holding the fingerprint itself, the number of finished epochs, the
trainable tensors, the optimiser state and anything else the loop keeps (e.g. its loss history). A run under
changed settings therefore starts its own file and leaves the others as they were: going back to earlier settings
resumes (or finds finished) their training. Written atomically (a temporary file, then a rename) so an
interrupted run never leaves half a file; loaded with ``weights_only=True``; a file whose fingerprint does not
match its name (renamed by hand, say) is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from qcompile.errors import QCompileError


def state_path(folder: Path, stem: str, key: str) -> Path:
    """``folder/<stem>-<digest of key>.pt``; a state saved by an earlier qcompile as ``folder/<stem>.pt`` is used
    when its fingerprint is ``key`` (and left alone otherwise)."""
    legacy = folder / f"{stem}.pt"
    if legacy.is_file():
        try:
            if torch.load(legacy, map_location="cpu", weights_only=True).get("fingerprint") == key:
                return legacy
        except Exception:  # unreadable: not ours to judge here; the keyed file is used
            pass
    return folder / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


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
        raise QCompileError(f"training state {path} belongs to another configuration than its name says; delete "
                            f"that file to train this stage again (other files in {path.parent.parent} stay valid)")
    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    optimizer.load_state_dict(saved["optimizer"])
    return saved
