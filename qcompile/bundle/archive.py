"""Bundle archives (.zip, .tar.gz): written deterministically, extracted only member by member after a check.

Extraction refuses, before writing anything, any member with an absolute path, a ``..`` component or a path
that resolves outside the target, and any member that is not a plain file or folder (symlinks, hard links,
devices): an archive from elsewhere must not be able to write outside the folder it is unpacked into.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from qcompile.errors import QCompileError

FORMATS = ("dir", "zip", "tar.gz")
_CHUNK = 1 << 20
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same bundle gives the same archive bytes


class ArchiveError(QCompileError):
    """An archive that may not be extracted (unsafe member, unreadable file)."""


def archive_format(path: str | os.PathLike) -> str | None:
    """``zip`` or ``tar.gz`` from the file name, else None."""
    name = Path(path).name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    return None


def write_archive(folder: Path, dest: Path, fmt: str) -> None:
    """Pack every file directly in ``folder`` into ``dest`` (members at the archive's root, sorted)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if fmt == "zip":
        with zipfile.ZipFile(dest, "w", allowZip64=True) as zf:
            for p in files:
                info = zipfile.ZipInfo(p.name, date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                with open(p, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    elif fmt == "tar.gz":
        with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for p in files:
                info = tarfile.TarInfo(p.name)
                info.size, info.mode, info.mtime = p.stat().st_size, 0o644, 0
                with open(p, "rb") as src:
                    tf.addfile(info, src)
    else:
        raise ValueError(fmt)


def _member_path(archive: Path, target: Path, name: str) -> Path:
    """Where member ``name`` goes under ``target``; refuses names that would land anywhere else."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise ArchiveError(f"archive {archive} has a member with an absolute path ({name!r}); refusing to extract it")
    parts = [p for p in PurePosixPath(posix).parts if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive {archive} has a member that escapes the extraction folder ({name!r}); "
                           "refusing to extract it")
    dest = target.joinpath(*parts).resolve() if parts else target.resolve()
    if not dest.is_relative_to(target.resolve()):
        raise ArchiveError(f"archive {archive} has a member that escapes the extraction folder ({name!r}); "
                           "refusing to extract it")
    return dest


def _zip_members(archive: Path, zf: zipfile.ZipFile):
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArchiveError(f"archive {archive} has a symbolic link ({info.filename!r}); refusing to extract it")
        yield info.filename, info.is_dir(), (lambda info=info: zf.open(info))


def _tar_members(archive: Path, tf: tarfile.TarFile):
    for m in tf.getmembers():
        if m.issym() or m.islnk():
            raise ArchiveError(f"archive {archive} has a link ({m.name!r} -> {m.linkname!r}); refusing to extract it")
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(f"archive {archive} has a member that is not a file or folder ({m.name!r}); "
                               "refusing to extract it")
        yield m.name, m.isdir(), (lambda m=m: tf.extractfile(m))


def _open(archive: Path):
    fmt = archive_format(archive)
    try:
        if fmt == "zip":
            zf = zipfile.ZipFile(archive)
            return zf, _zip_members(archive, zf)
        if fmt == "tar.gz":
            tf = tarfile.open(archive, "r:gz")
            return tf, _tar_members(archive, tf)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"cannot read archive {archive} (corrupt or truncated?): {e}") from None
    raise ArchiveError(f"{archive} is not a .zip or .tar.gz archive")


def extract(archive: str | os.PathLike, target: str | os.PathLike) -> None:
    """Extract ``archive`` into the existing folder ``target`` after checking every member's path and type."""
    archive, target = Path(archive), Path(target)
    handle, members = _open(archive)
    try:
        with handle:
            plan = [(_member_path(archive, target, name), is_dir, opener) for name, is_dir, opener in members]
            for dest, is_dir, opener in plan:  # nothing is written unless every member passed
                if is_dir:
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with opener() as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zipfile.LargeZipFile) as e:
        raise ArchiveError(f"cannot read archive {archive} (corrupt or truncated?): {e}") from None


def read_members(archive: str | os.PathLike, names: set[str]) -> dict[str, bytes]:
    """The bytes of the members whose base names are in ``names`` (the shallowest of each), nothing extracted."""
    archive = Path(archive)
    handle, members = _open(archive)
    found: dict[str, tuple[int, bytes]] = {}
    try:
        with handle:
            for name, is_dir, opener in members:
                base, depth = PurePosixPath(name).name, len(PurePosixPath(name).parts)
                if is_dir or base not in names or (base in found and found[base][0] <= depth):
                    continue
                with opener() as src:
                    found[base] = (depth, src.read())
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"cannot read archive {archive} (corrupt or truncated?): {e}") from None
    return {k: v for k, (_, v) in found.items()}
