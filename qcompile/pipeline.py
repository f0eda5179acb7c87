"""The one straight line: load -> canonicalize -> model passes -> export -> graph passes -> save.

Each stage has one home: ``models`` loads, ``passes`` change the torch model, ``export`` writes the float graph,
``graph`` rewrites it (integer weights + DequantizeLinear), ``export.artifact`` saves the folder. Running and
evaluating the result (``runtime``, ``eval``) read only the saved folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qcompile
from qcompile import passes
from qcompile.fsutil import atomic_dir, check_output
from qcompile.models import ModelHandle, load
from qcompile.recipe import Recipe

REPORT_FILE = "report.json"


@dataclass
class CompileResult:
    out_dir: Path
    handle: ModelHandle  # the torch model after the passes: the fake-quant reference for parity
    report: dict = field(default_factory=dict)


def run_passes(handle: ModelHandle, recipe: Recipe) -> dict:
    """Apply the recipe's passes in order; returns per-pass statistics and seconds."""
    stats = {}
    for i, step in enumerate(recipe.passes):
        t0 = time.perf_counter()
        with recording_weight_errors(handle) as weight_errors:
            result = passes.get(step.name).apply(handle, step.config) or {}
        handle.applied_passes.append(step.name)
        if weight_errors:
            result = {**result, "weight_rel_mse": weight_errors}
        stats[f"{i}:{step.name}"] = {**result, "seconds": round(time.perf_counter() - t0, 3)}
    return stats


@contextlib.contextmanager
def recording_weight_errors(handle: ModelHandle):
    """Collect ``||W - Q||^2 / ||W||^2`` of every linear quantized meanwhile, keyed by name (for the report).

    Measured in ``set_quantized``, the one moment both the float weight and its quantized form exist: the module
    keeps only the dequantized weight afterwards and the exported graph only the integers.
    """
    errors: dict[str, float] = {}
    set_quantized = handle.set_quantized

    def recording(name, qw):
        w = handle.model.get_submodule(name).weight.detach().float()
        sq = w.pow(2).sum(dtype=torch.float64)
        diff = (w - qw.dequantize().to(w.device, torch.float32)).pow(2).sum(dtype=torch.float64)
        errors[name] = float(diff / sq) if sq > 0 else float(diff > 0)
        set_quantized(name, qw)

    handle.set_quantized = recording
    try:
        yield errors
    finally:
        del handle.set_quantized  # the class's method again


def to_export_precision(handle: ModelHandle) -> None:
    """Move the model to float32 on the CPU, as the graph computes, re-setting quantized weights from their exact
    integers and scales (an fp16 GPU copy would have rounded them)."""
    if handle.dtype == torch.float32 and handle.device.type == "cpu":
        return
    handle.model.to("cpu", torch.float32)
    for name, qw in handle.quant_state.items():
        handle.set_quantized(name, qw)


def quantization_summary(handle: ModelHandle) -> dict:
    """What the graph will hold: per-spec linear counts and bytes of quantized vs float weights."""
    by_spec: dict[str, int] = {}
    for qw in handle.quant_state.values():
        by_spec[qw.spec.describe()] = by_spec.get(qw.spec.describe(), 0) + 1
    quantized_params = sum(qw.qweight.numel() for qw in handle.quant_state.values())
    total_params = sum(p.numel() for p in {id(p): p for p in handle.model.parameters()}.values())
    return {
        "linears_by_spec": by_spec,
        "quantized_params": quantized_params,
        "float_params": total_params - quantized_params,
        "quantized_weight_bytes": sum(qw.nbytes for qw in handle.quant_state.values()),
    }


def runtime_summary(handle: ModelHandle) -> dict:
    """What the graph computes at run time besides the weights: online rotations, activation and KV quantization
    (the KV prefix here is what ``qcompile run`` reports against the system prompt's length)."""
    specs: dict[str, int] = {}
    for spec in handle.act_quant.values():
        specs[spec.describe()] = specs.get(spec.describe(), 0) + 1
    return {
        "online_rotations": sorted(handle.online_rotations),
        "activations": specs,
        "kv_cache": None if handle.kv_quant is None else handle.kv_quant.to_dict(),
    }


def export(handle: ModelHandle, out_dir: str | os.PathLike, recipe: Recipe, *, overwrite: bool = False,
           extra_report: dict | None = None) -> dict:
    """Export ``handle`` (after its passes) into ``out_dir`` atomically; returns the report written there."""
    from qcompile.export.artifact import write_artifact
    from qcompile.export.onnx_builder import build_graph
    from qcompile.graph import fuse_projections, runtime_quant, weight_qdq
    from qcompile.runtime.ort import ACCURACY_KEY

    t0 = time.perf_counter()
    graph = build_graph(handle, opset=recipe.export.opset, attention=recipe.export.attention)
    t_build = time.perf_counter() - t0
    qdq_stats = weight_qdq.apply(graph, handle.quant_state)
    runtime_stats = runtime_quant.apply(graph, handle, dense_hadamard=recipe.export.online_hadamard == "dense")
    # last: the run-time rewrites above find each linear's own MatMul; fusion keeps what they inserted
    fuse_stats = fuse_projections.apply(graph, handle) if recipe.export.fuse_projections else None
    meta = {
        "qcompile_version": qcompile.__version__,
        "recipe": recipe.to_dict(),
        "source": {"model": handle.source, "sha256": handle.source_sha256},
        "quantization": quantization_summary(handle),
        "runtime_quantization": runtime_summary(handle),
        "ort_session_options": {ACCURACY_KEY: str(recipe.export.accuracy_level)},
    }
    extra = dict(extra_report or {})
    earlier_timings = extra.pop("timings_s", {})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        sizes = write_artifact(handle, graph, tmp, meta)
        report = {
            **meta,
            "files": sizes,
            "timings_s": {**earlier_timings, "export_graph": round(t_build, 3),
                          "export_total": round(time.perf_counter() - t0, 3)},
            "graph_pass": {**qdq_stats, "runtime_quant": runtime_stats,
                           **({"fuse_projections": fuse_stats} if fuse_stats is not None else {})},
            "machine": {"platform": platform.platform(), "torch": torch.__version__},
            **extra,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report


def compile_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: Recipe,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> CompileResult:
    from qcompile.models.loader import BUILTIN_MODELS

    # fail before minutes of calibration, not after; a built-in name is not a path in this folder
    out = check_output(out_dir, overwrite, inputs=() if str(source) in BUILTIN_MODELS else (source,))
    t0 = time.perf_counter()
    handle = load(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    t_load = time.perf_counter() - t0
    pass_stats = run_passes(handle, recipe)
    t_passes = time.perf_counter() - t0 - t_load
    to_export_precision(handle)
    report = export(
        handle, out, recipe, overwrite=overwrite,
        extra_report={"passes": pass_stats, "timings_s": {"load": round(t_load, 3), "passes": round(t_passes, 3)}},
    )
    return CompileResult(out_dir=out, handle=handle, report=report)


def update_report(out_dir: str | os.PathLike, section: str, value) -> None:
    """Merge ``value`` under ``section`` into OUT/report.json (e.g. measured perplexity)."""
    from qcompile.fsutil import atomic_write_text, read_json

    path = Path(out_dir) / REPORT_FILE
    report = read_json(path)
    report.setdefault(section, {})
    if isinstance(value, dict):
        report[section].update(value)
    else:
        report[section] = value
    atomic_write_text(path, json.dumps(report, indent=2, default=str))
