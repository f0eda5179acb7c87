"""Atomic output folders: work happens in a hidden temporary sibling, renamed into place only on success, so an
error or an interrupt never leaves a half-written result behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from qcompile.errors import QCompileError


def check_output(target: str | os.PathLike, overwrite: bool, inputs: tuple = ()) -> Path:
    """The resolved output folder, or a clear error if it may not be (over)written. Checked before any work, so a
    long export does not fail at its last step. Never a folder that holds the user's work: the current folder or
    one of its parents, the home folder, the root, or ``inputs`` (paths the command reads) or a folder holding them:
    ``--overwrite`` replaces the whole output."""
    if not str(target).strip():
        raise QCompileError("the output path is empty; name the folder to write")
    target = Path(target).expanduser().resolve()
    protected = {Path(target.anchor)}
    for where, with_parents in ((Path.cwd, True), (Path.home, False)):
        try:  # either can be unknowable (a deleted current folder; no HOME and no passwd entry)
            folder = where().resolve()
        except (OSError, RuntimeError, KeyError):
            continue
        protected.add(folder)
        if with_parents:
            protected.update(folder.parents)
    if target in protected:
        raise QCompileError(f"output {target} is the current folder, the home folder or a folder above them; "
                            "writing it would replace their contents: name a new output, or run from another "
                            "folder")
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if src.exists() and (target == src or target in src.parents):
            raise QCompileError(f"output {target} would replace the input {src}; choose another output")
    if target.exists() and not overwrite:
        raise QCompileError(f"output {target} already exists; choose another path or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise QCompileError(f"output {target} exists and is not a folder")
    ancestor = target.parent
    while not ancestor.exists():  # the folders atomic_dir would create: the first existing one must take them
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QCompileError(f"cannot write {target}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise QCompileError(f"cannot write {target}: no write permission in {ancestor}")
    return target


def cache_root() -> Path:
    """qcompile's cache folder (converted GGUF models, kernel tuning): ``$QCOMPILE_CACHE``, else
    ``~/.cache/qcompile``."""
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file of an export or bundle ({} when absent); a damaged one is a clear error, not a traceback."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QCompileError(f"{path} is damaged (not valid JSON: {e}); re-export the model") from None
    if not isinstance(data, dict):
        raise QCompileError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); re-export the model")
    return data


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    target = check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
