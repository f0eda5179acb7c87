"""Resumable training state saved after every epoch, shared by the learning loops that train one parameter set
over the whole model (``learn.end_to_end``, ``passes.spinquant``).

One file per pass and configuration (``state_path``: the file name carries the configuration's fingerprint,
``learn.blockwise.fingerprint``), holding the fingerprint itself, the number of finished epochs, the
trainable tensors, the optimiser state and anything else the loop keeps (e.g. its loss history). A run under
changed settings therefore starts its own file and leaves the others as they were: going back to earlier settings
resumes (or finds finished) their training. Nothing deletes the files of settings no longer used: an end-to-end
state holds the trained tensors and two optimiser moments for each (tens of MB for SmolLM2-135M), so clear the
folder when done. Written atomically (a temporary file, then a rename) so an
interrupted run never leaves half a file; loaded with ``weights_only=True``; a file whose fingerprint does not
match its name (renamed by hand, say) is refused rather than mixed in.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from qcompile.errors import QCompileError, first_line


def state_path(folder: Path, stem: str, key: str) -> Path:
    """``folder/<stem>-<key>.pt`` (``key``: the configuration's 16-hex-digit fingerprint). A state saved by an
    earlier qcompile as ``folder/<stem>.pt`` is used when its fingerprint is ``key``, and left alone otherwise.
    Starting a configuration beside other configurations' states says so: a setting changed by accident (another
    calibration file, say) would otherwise restart training without a word."""
    keyed = folder / f"{stem}-{key}.pt"
    if keyed.is_file():
        return keyed
    legacy, unreadable = folder / f"{stem}.pt", None
    if legacy.is_file():
        try:  # (mapped, not read: only its fingerprint is wanted)
            if torch.load(legacy, map_location="cpu", weights_only=True, mmap=True).get("fingerprint") == key:
                return legacy
        except Exception as e:
            unreadable = legacy
            warnings.warn(f"cannot read the training state {legacy} ({first_line(e)}); it is left as it is",
                          stacklevel=2)
    others = sorted(p.name for p in folder.glob(f"{stem}*.pt") if p != unreadable) if folder.is_dir() else []
    if others:
        warnings.warn(f"{folder} holds training states of other settings ({', '.join(others)}); these settings "
                      f"train from the first epoch into {keyed.name} beside them", stacklevel=2)
    return keyed


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
