"""Write a bundle from an exported folder, and check one before it is loaded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import onnx

import qcompile
from qcompile.bundle.archive import FORMATS, archive_format, extract, write_archive
from qcompile.bundle.genai import GENAI_CONFIG_FILE, genai_config, tokenizer_note
from qcompile.errors import QCompileError, first_line
from qcompile.fsutil import atomic_dir, check_output, read_json
from qcompile.runtime.ort import META_FILE, MODEL_FILE

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "qcompile-bundle"
FORMAT_VERSION = 1
REPORT_FILE = "report.json"  # qcompile.pipeline's, not imported: it pulls in torch
REQUIRED = (MODEL_FILE, "config.json")
OPTIONAL = (META_FILE, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
            "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# The oldest ONNX Runtime that runs our graphs: opset-21 DequantizeLinear on int4/uint4 blocks. Checked on a tiny
# uint4 export: 1.19.0 gives the same logits as 1.32.0; 1.18.0 refuses the uint4 type.
MIN_ORT_VERSION = "1.19.0"
_CHUNK = 1 << 20


class BundleError(QCompileError):
    """A bundle that must not be loaded: missing, truncated or altered files, or an unreadable manifest."""


def sha256_file(path: Path) -> str:
    """As qcompile.models.loader's, without importing torch (inspect and verify need none)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _copy_hashed(src: Path, dest: Path) -> dict:
    """Copy one file, hashing it on the way (one read of each byte)."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while block := fin.read(_CHUNK):
            h.update(block)
            fout.write(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, subgraphs included: everything that may hold external data."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                yield from _all_tensors(sub)


def external_data_files(model_path: Path, graph: onnx.ModelProto | None = None) -> list[str]:
    """The files the graph's initializers live in (names relative to the graph's folder). ``graph``: the graph
    already read from ``model_path`` (without its external data), so it is not parsed twice."""
    if graph is None:
        try:
            graph = onnx.load(str(model_path), load_external_data=False)
        except Exception as e:  # a truncated or foreign file: protobuf's DecodeError and the like
            raise QCompileError(f"{model_path} is not a readable ONNX graph (damaged? re-export it): "
                                f"{type(e).__name__}") from None
    ends: dict[str, int] = {}  # per weights file, where its last tensor ends
    for tensor in _all_tensors(graph.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            parts = PurePosixPath(location.replace("\\", "/")).parts
            if not location or location.startswith(("/", "\\")) or ".." in parts or len(parts) != 1:
                raise QCompileError(f"{model_path} keeps weights in {location!r}, outside its folder; "
                                    "re-export it")
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            ends[location] = max(ends.get(location, 0), end)
    for location, end in ends.items():  # a missing file is the caller's message; a short one is damage
        path = Path(model_path).parent / location
        if path.is_file() and path.stat().st_size < end:
            raise QCompileError(f"{path} is truncated ({path.stat().st_size} bytes, the graph's weights need {end}); "
                                "re-export it")
    return sorted(ends)


def _measured(report: dict) -> dict:
    """Quality and speed figures from report.json, without machine-local paths."""
    quality = {}
    for key, res in (report.get("eval") or {}).items():
        res = dict(res)
        if "text" in res:
            res["text"] = Path(str(res["text"])).name
        quality[key] = res
    return {"quality": quality or None, "speed": report.get("speed") or None}


def _runtime_versions() -> dict:
    import onnxruntime

    try:
        import onnxruntime_genai

        genai = onnxruntime_genai.__version__
    except ImportError:
        genai = None
    return {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": genai}


def read_graph(blob: bytes, where: str) -> onnx.ModelProto:
    """The graph of a model.onnx's bytes (its external weights not loaded); a damaged or empty one is one clear
    error naming ``where``."""
    try:
        graph = onnx.load_model_from_string(blob)
    except Exception as e:  # protobuf raises its own DecodeError
        raise QCompileError(f"cannot read {where} (corrupt?): {first_line(e)}; re-export it") from None
    if not graph.graph.node:
        raise QCompileError(f"{where} holds no graph (empty or damaged); re-export it")
    return graph


def _write_bundle(src: Path, out: Path) -> dict:
    """Fill the empty folder ``out`` with the bundle of the exported folder ``src``; returns the manifest."""
    for name in REQUIRED:
        if not (src / name).is_file():
            raise QCompileError(f"{src} has no {name}: not an exported folder; run `qcompile export` first")
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise QCompileError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); re-export it")
    names = [MODEL_FILE] + external_data_files(src / MODEL_FILE)
    names += [n for n in REQUIRED + OPTIONAL if n not in names and (src / n).is_file()]
    for name in names:
        if not (src / name).is_file():
            raise QCompileError(f"{src} is incomplete: the graph's weights file {name} is missing; re-export it")
    files = {name: _copy_hashed(src / name, out / name) for name in names}

    # read from the export (the same bytes as the copies) so that an error names the user's folder
    graph = read_graph((src / MODEL_FILE).read_bytes(), str(src / MODEL_FILE))
    (out / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(src, graph, MODEL_FILE), indent=2))
    files[GENAI_CONFIG_FILE] = {"sha256": sha256_file(out / GENAI_CONFIG_FILE),
                                "bytes": (out / GENAI_CONFIG_FILE).stat().st_size}

    meta, report = read_json(src / META_FILE), read_json(src / REPORT_FILE)  # {} when absent
    versions = _runtime_versions()
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "qcompile_version": qcompile.__version__,
        "exported_with": meta.get("qcompile_version"),
        "recipe": meta.get("recipe"),
        "source": meta.get("source"),
        "quantization": meta.get("quantization"),
        "measured": _measured(report),
        "runtime": {
            "onnxruntime": {"min_version": MIN_ORT_VERSION, "packaged_with": versions["onnxruntime"]},
            "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
            "execution_provider": "CPUExecutionProvider",
            "session_options": meta.get("ort_session_options", {}),
            "onnxruntime_genai": {"config": GENAI_CONFIG_FILE, "packaged_with": versions["onnxruntime_genai"],
                                  "tokenizer_note": tokenizer_note(out)},
        },
        "files": dict(sorted(files.items())),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def resolve_format(dest: str | os.PathLike, fmt: str | None) -> str:
    if fmt is None:
        return archive_format(dest) or "dir"
    if fmt not in FORMATS:
        raise QCompileError(f"unknown bundle format {fmt!r}; choose one of {', '.join(FORMATS)}")
    named = archive_format(dest)
    if named is not None and named != fmt:  # a tar in a .zip name (or the reverse) misleads whoever opens it
        raise QCompileError(f"{dest} names a .{named} archive but --format is {fmt}; make them agree")
    return fmt


def package(src: str | os.PathLike, dest: str | os.PathLike, fmt: str | None = None,
            overwrite: bool = False) -> dict:
    """Bundle the exported folder ``src`` as ``dest`` (a folder, .zip or .tar.gz), atomically; returns the
    manifest. An error or an interrupt leaves no ``dest`` and no temporary files."""
    src = Path(src).expanduser()
    if not (src / MODEL_FILE).is_file():
        raise QCompileError(f"{src} is not an exported folder (no {MODEL_FILE}); run `qcompile export` first")
    fmt = resolve_format(dest, fmt)
    if fmt == "dir":
        target = check_output(dest, overwrite, inputs=(src,))
        with atomic_dir(target, overwrite=overwrite) as tmp:
            return _write_bundle(src, tmp)
    if not str(dest).strip():
        raise QCompileError("the output path is empty; name the file to write")
    target = Path(dest).expanduser().resolve()
    if target.exists() and not overwrite:
        raise QCompileError(f"output {target} already exists; choose another path or pass --overwrite")
    if target.is_dir():
        raise QCompileError(f"output {target} is a folder; give a file name ending in .{fmt}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (work / "bundle").mkdir()
        manifest = _write_bundle(src, work / "bundle")
        write_archive(work / "bundle", work / target.name, fmt)
        os.replace(work / target.name, target)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_manifest(folder: Path, where: str | None = None) -> dict:
    where = where or f"bundle {folder}"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where} has an unreadable {MANIFEST_FILE}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{where}: its {MANIFEST_FILE} is not a qcompile bundle manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{where} was made by a newer qcompile (manifest format "
                          f"{manifest['format_version']}); upgrade qcompile to load it")
    if not isinstance(manifest.get("files"), dict) or MODEL_FILE not in manifest["files"]:
        raise BundleError(f"{where} has a {MANIFEST_FILE} that lists no {MODEL_FILE}")
    return manifest


def verify(folder: str | os.PathLike, label: str | None = None) -> dict:
    """Check every file the manifest lists (size first, then sha256); returns the manifest or raises
    ``BundleError`` naming the first bad file. Files not in the manifest are ignored: nothing loads them.
    ``label`` names the bundle in messages (an archive, not the temporary folder it was extracted to)."""
    folder = Path(folder)
    where = label or f"bundle {folder}"
    manifest = read_manifest(folder, where)
    fix = "re-copy or re-package the bundle"
    for name, entry in manifest["files"].items():
        parts = PurePosixPath(name).parts
        if len(parts) != 1 or name in (".", "..") or "\\" in name:
            raise BundleError(f"{where} has a {MANIFEST_FILE} naming a file outside the bundle ({name!r})")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{where} is incomplete: {name} is missing; {fix}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(f"{where} is damaged: {name} has {size} bytes, {MANIFEST_FILE} says "
                              f"{entry.get('bytes')} (truncated or altered); {fix}")
        if sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{where} is damaged: {name} does not match its sha256 in {MANIFEST_FILE} "
                              f"(altered or corrupted); {fix}")
    return manifest


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_runtime(manifest: dict) -> None:
    """Refuse to load a bundle on an ONNX Runtime older than it needs."""
    import onnxruntime

    need = (manifest.get("runtime", {}).get("onnxruntime") or {}).get("min_version")
    if need and _version_tuple(onnxruntime.__version__) < _version_tuple(need):
        raise BundleError(f"this bundle needs onnxruntime >= {need}; installed is {onnxruntime.__version__}")


@contextlib.contextmanager
def opened(path: str | os.PathLike) -> Iterator[Path]:
    """The folder to load for ``path``: an exported folder as it is; a bundle folder once verified; a .zip or
    .tar.gz bundle extracted (safely) into a temporary folder, verified, and removed afterwards."""
    path = Path(path).expanduser()
    if path.is_file() and archive_format(path):
        with tempfile.TemporaryDirectory(prefix="qcompile-bundle-") as tmp:
            extract(path, tmp)
            folder = Path(tmp)
            if not (folder / MANIFEST_FILE).is_file():
                subdirs = [p for p in folder.iterdir() if p.is_dir()]
                if len(subdirs) == 1 and (subdirs[0] / MANIFEST_FILE).is_file():
                    folder = subdirs[0]
                else:
                    raise BundleError(f"archive {path} holds no {MANIFEST_FILE}: not a qcompile bundle")
            check_runtime(verify(folder, f"bundle archive {path}"))
            yield folder
        return
    if (path / MANIFEST_FILE).is_file():
        check_runtime(verify(path))
    elif all((path / n).is_file() for n in (GENAI_CONFIG_FILE, META_FILE, MODEL_FILE)):  # never in an export
        raise BundleError(f"bundle {path} is incomplete: {MANIFEST_FILE} is missing; re-copy or re-package it")
    yield path
