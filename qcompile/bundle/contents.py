"""What an exported folder or a bundle holds, read from its graph and JSON files without running or loading the
weights: op histogram, every quantized weight's integer type and group (from its DequantizeLinear node and
initializers), bytes per kind of tensor, and the manifest's summary."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import onnx

from qcompile.bundle.archive import archive_format, read_members
from qcompile.bundle.pack import MANIFEST_FILE, META_FILE, MODEL_FILE, external_data_files, read_graph, verify
from qcompile.errors import QCompileError

_QTYPES = {onnx.TensorProto.INT4: ("int4", 4), onnx.TensorProto.UINT4: ("uint4", 4),
           onnx.TensorProto.INT8: ("int8", 8), onnx.TensorProto.UINT8: ("uint8", 8)}
_LAYER = re.compile(r"layers\.(\d+)\.")


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Stored size: the external data's length, else the raw/typed data, else dims x element size."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    bits = _QTYPES.get(t.data_type, (None, None))[1] or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return (n * bits + 7) // 8


def graph_summary(graph: onnx.ModelProto) -> dict:
    """Ops, quantized weights and bytes per tensor kind of a graph loaded without its external data."""
    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in g.node:
        for name in node.input:
            consumers[name].append(node.op_type)

    kinds: dict[str, str] = {}
    weights = []
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = inits.get(node.input[1])
        zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
        dtype, bits = _QTYPES.get(q.data_type, (onnx.TensorProto.DataType.Name(q.data_type).lower(), None))
        block = int(attrs.get("block_size", 0) or 0)
        weights.append({
            "name": node.input[0],
            "shape": list(q.dims),
            "type": dtype,
            "bits": bits,
            "group_size": block or None,
            "granularity": "blockwise" if block else ("per-channel" if scale is not None and len(scale.dims) else
                                                       "per-tensor"),
            "zero_point": zero is not None,
            "axis": int(attrs.get("axis", 1)),
            "consumer": ",".join(consumers.get(node.output[0], [])),
            "bytes": _tensor_bytes(q),
        })
        kinds[node.input[0]] = f"{dtype} weights"
        kinds[node.input[1]] = "scales"
        if zero:
            kinds[zero] = "zero points"
    for name, t in inits.items():
        if name in kinds:
            continue
        ops = set(consumers.get(name, []))
        if "Gather" in ops:
            kinds[name] = "float embeddings" + (" (shared with lm_head)" if ops - {"Gather"} else "")
        elif ops & {"MatMul", "Gemm"} and len(t.dims) == 2:
            kinds[name] = "float matmul weights"
        else:
            kinds[name] = "other float (norms, biases, constants)"
    sizes: Counter = Counter()
    for name, kind in kinds.items():
        sizes[kind] += _tensor_bytes(inits[name])
    layers = {int(m.group(1)) for w in weights if (m := _LAYER.search(w["name"]))}
    inputs = [i.name for i in g.input]
    return {
        "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": inputs,
        "outputs": [o.name for o in g.output],
        "kv_cache_layers": sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")),
        "ops": dict(Counter(n.op_type for n in g.node).most_common()),
        "quantized_weights": weights,
        "quantized_layers": len(layers),
        "bytes_by_kind": dict(sizes.most_common()),
    }


def inspect(path: str | os.PathLike, check: bool = False) -> dict:
    """Everything ``qcompile inspect`` shows for an exported folder, a bundle folder or a bundle archive.
    ``check`` also verifies the bundle's checksums (folders only; an archive is verified when it is run)."""
    path = Path(path).expanduser()
    if path.is_file() and archive_format(path):
        blobs = read_members(path, {MODEL_FILE, MANIFEST_FILE, META_FILE})
        kind = "bundle archive"
        files = None
    elif (path / MODEL_FILE).is_file():
        blobs = {n: (path / n).read_bytes() for n in (MODEL_FILE, MANIFEST_FILE, META_FILE) if (path / n).is_file()}
        kind = "bundle" if MANIFEST_FILE in blobs else "exported folder"
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    else:
        raise QCompileError(f"{path} is neither an exported folder, a bundle folder nor a .zip/.tar.gz bundle")
    if MODEL_FILE not in blobs:
        raise QCompileError(f"{path} holds no {MODEL_FILE}")
    graph = read_graph(blobs[MODEL_FILE], f"{MODEL_FILE} in {path}")
    if files is not None:
        # the weights the graph points at must be there in full: inspecting a broken export is an error
        missing = [n for n in external_data_files(path / MODEL_FILE, graph) if not (path / n).is_file()]
        if missing:
            raise QCompileError(f"{path} is incomplete: the graph's weights file(s) {', '.join(missing)} are "
                                "missing; re-export it or copy the whole folder")
    try:
        manifest = json.loads(blobs[MANIFEST_FILE]) if MANIFEST_FILE in blobs else None
        meta = json.loads(blobs[META_FILE]) if META_FILE in blobs else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QCompileError(f"cannot read the JSON files in {path}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(manifest, (dict, type(None))):
        raise QCompileError(f"cannot read the JSON files in {path}: {MANIFEST_FILE} and {META_FILE} must be JSON "
                            "objects")
    info = {"path": str(path), "kind": kind, "graph": graph_summary(graph)}
    if manifest is not None:
        info["manifest"] = {k: manifest.get(k) for k in ("qcompile_version", "exported_with", "source", "measured",
                                                         "runtime", "quantization")}
        info["manifest"]["recipe"] = (manifest.get("recipe") or {}).get("name")
        info["files"] = {n: e.get("bytes") for n, e in manifest.get("files", {}).items()}
    else:
        info["recipe"] = (meta.get("recipe") or {}).get("name")
        info["source"] = meta.get("source")
        info["session_options"] = meta.get("ort_session_options")
        info["files"] = files
    if check:
        if kind != "bundle":
            raise QCompileError(f"--verify needs a bundle folder ({path} is a {kind})")
        verify(path)
        info["verified"] = True
    return info


def _mb(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _layer_ranges(layer_specs: dict[int, tuple]) -> list[tuple[int, int, tuple]]:
    """Consecutive layers with the same weight specs, merged: (first, last, specs)."""
    out: list[tuple[int, int, tuple]] = []
    for i in sorted(layer_specs):
        if out and out[-1][1] == i - 1 and out[-1][2] == layer_specs[i]:
            out[-1] = (out[-1][0], i, layer_specs[i])
        else:
            out.append((i, i, layer_specs[i]))
    return out


def _spec(w: dict) -> str:
    group = f"g{w['group_size']}" if w["group_size"] else w["granularity"]
    return f"{w['type']} {group} {'asym' if w['zero_point'] else 'sym'}"


def format_text(info: dict) -> str:
    """The human-readable form of ``inspect``'s result."""
    g = info["graph"]
    lines = [f"{info['path']}  ({info['kind']})"]
    m = info.get("manifest")
    if m:
        rt = m.get("runtime") or {}
        ort_v = rt.get("onnxruntime") or {}
        src = m.get("source") or {}
        lines.append(f"  recipe        {m.get('recipe')}  (qcompile {m.get('exported_with')}, "
                     f"bundled by {m.get('qcompile_version')})")
        lines.append(f"  source        {src.get('model')}  sha256 {str(src.get('sha256'))[:16]}…")
        lines.append(f"  needs         onnxruntime >= {ort_v.get('min_version')} (packaged with "
                     f"{ort_v.get('packaged_with')}), {rt.get('execution_provider')}")
        opts = rt.get("session_options") or {}
        lines.append("  session opts  " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "none"))
        genai = rt.get("onnxruntime_genai") or {}
        lines.append(f"  genai         {genai.get('config')}" + (f"  note: {genai['tokenizer_note']}"
                                                                  if genai.get("tokenizer_note") else ""))
        measured = m.get("measured") or {}
        for key, q in (measured.get("quality") or {}).items():
            if isinstance(q, dict) and isinstance(q.get("ppl"), (int, float)):
                lines.append(f"  quality       ppl {q['ppl']:.3f}  ({key})")
        if not measured.get("quality"):
            lines.append("  quality       not measured (run `qcompile eval` on the exported folder before packaging)")
        if measured.get("speed"):
            lines.append(f"  speed         {json.dumps(measured['speed'])}")
    else:
        src = info.get("source") or {}
        lines.append(f"  recipe        {info.get('recipe')}  source {src.get('model')}")
        opts = info.get("session_options") or {}
        lines.append("  session opts  " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "none"))
    if info.get("verified"):
        lines.append("  checksums     all files match manifest.json")
    files = info.get("files")
    if files:
        lines.append(f"files ({len(files)}, {_mb(sum(v or 0 for v in files.values()))})")
        lines += [f"  {name:28s} {_mb(size):>10s}" for name, size in files.items()]
    lines.append(f"graph  opset {g['opset']}, {g['kv_cache_layers']} KV-cache layers, inputs: "
                 + ", ".join(n for n in g["inputs"] if not n.startswith("past_key_values.")) + ", past_key_values.*")
    lines.append("ops    " + ", ".join(f"{op} {n}" for op, n in g["ops"].items()))
    lines.append("bytes by tensor kind")
    lines += [f"  {kind:40s} {_mb(n):>10s}" for kind, n in g["bytes_by_kind"].items()]
    weights = g["quantized_weights"]
    lines.append(f"quantized weights ({len(weights)}): "
                 + ", ".join(f"{n} {s}" for s, n in Counter(_spec(w) for w in weights).most_common()))
    by_layer: dict[int, list[dict]] = defaultdict(list)
    other = []
    for w in weights:
        (by_layer[int(mt.group(1))] if (mt := _LAYER.search(w["name"])) else other).append(w)
    specs = {i: tuple(sorted(Counter(_spec(w) for w in ws).items())) for i, ws in by_layer.items()}
    for first, last, spec in _layer_ranges(specs):
        label = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"  {label:14s} " + ", ".join(f"{n} x {s}" for s, n in spec))
    for w in other:
        lines.append(f"  {w['name']:40s} {_spec(w)} {w['shape']}")
    return "\n".join(lines)
