"""The report a person reads after an export: one self-contained HTML page (figures embedded as base64 PNG, so
it can be mailed or attached as one file) and the same figures as PNG files, in ``OUT/report/``.

What it shows, and where each number comes from (nothing is re-measured here):

* perplexity of each compared export, next to the float export's when one is given (``report.json`` ``eval``,
  written by ``qcompile eval`` / ``export --eval``);
* per-linear quantization error: weight ``||W-Q||^2/||W||^2`` (recorded by the pipeline while quantizing) and,
  for GPTQ, output ``||(W-Q)X||^2/||WX||^2`` on the calibration data (``report.json`` ``passes``);
* bytes per tensor type (integer weights, scales, zero points, float embeddings, ...) read from the initializers
  of ``model.onnx`` (external-data lengths, the data itself is not loaded);
* ONNX Runtime tokens/s of the perplexity runs, when measured.

matplotlib draws on its Agg canvas directly (no pyplot), so a caller's backend and global state are untouched.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qcompile.errors import QCompileError

REPORT_DIR = "report"
HTML_FILE = "report.html"
MODEL_FILE = "model.onnx"
REPORT_JSON = "report.json"

# one color per tensor category and per linear role, the same in every figure
SIZE_ORDER = ("quantized weights", "scales", "zero points", "float embeddings", "float linear weights", "other float")
SIZE_COLORS = dict(zip(SIZE_ORDER, ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#7f7f7f")))
_LAYER = re.compile(r"layers\.(\d+)\.")
_DTYPE_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "DOUBLE": "float64"}
_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


@dataclass
class Export:
    """One exported folder as the report sees it."""

    path: Path
    report: dict
    label: str = ""
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> dtype -> bytes

    @property
    def recipe(self) -> str:
        return self.report.get("recipe", {}).get("name", "?")

    @property
    def is_float(self) -> bool:
        """No quantized linear: the reference the quantized exports are compared with."""
        quant = self.report.get("quantization")
        return quant is not None and not quant.get("linears_by_spec")


def load_export(path: str | os.PathLike) -> Export:
    folder = Path(path)
    if not (folder / MODEL_FILE).is_file():
        raise QCompileError(f"{folder} is not an exported folder (no {MODEL_FILE}); run `qcompile export` first")
    from qcompile.fsutil import read_json

    return Export(folder, read_json(folder / REPORT_JSON), sizes=tensor_sizes(folder / MODEL_FILE))


# -- data ---------------------------------------------------------------------------------------------------
def _nbytes(tensor) -> int:
    """Stored bytes of an initializer: its external-data length, else its raw data, else its shape and type."""
    import onnx

    ext = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location == onnx.TensorProto.EXTERNAL and "length" in ext:
        return int(ext["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
    bits = _BITS.get(type_name) or onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * 8
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def tensor_sizes(model_path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Bytes of the graph's initializers by what they are (from the nodes that read them) and element type."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, i))
    out: dict[str, dict[str, int]] = {}
    for t in graph.initializer:
        use = uses.get(t.name, set())
        type_name = onnx.TensorProto.DataType.Name(t.data_type)
        dtype = _DTYPE_NAMES.get(type_name, type_name.lower())
        if ("DequantizeLinear", 0) in use:
            kind = "quantized weights"
        elif ("DequantizeLinear", 1) in use:
            kind = "scales"
        elif ("DequantizeLinear", 2) in use:
            kind = "zero points"
        elif ("Gather", 0) in use:
            kind = "float embeddings"
            if len({op for op, _ in use}) > 1:  # tied: the lm_head reads it too (through a Transpose)
                dtype += ", shared with lm_head"
        elif use & {("MatMul", 1), ("Gemm", 1), ("MatMul", 0)}:
            kind = "float linear weights"
        else:
            kind = "other float"  # norms, biases, rotary tables, shape constants
        out.setdefault(kind, {}).setdefault(dtype, 0)
        out[kind][dtype] += _nbytes(t)
    return out


def layer_errors(report: dict) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """(linear names in quantization order, weight rel. MSE by name, output rel. MSE by name); a linear
    quantized by several passes keeps the last one's numbers."""
    names: dict[str, None] = {}
    weight: dict[str, float] = {}
    output: dict[str, float] = {}
    for stats in report.get("passes", {}).values():
        for name, v in (stats.get("weight_rel_mse") or {}).items():
            names.setdefault(name)
            weight[name] = v
        for name, v in (stats.get("rel_errors") or {}).items():  # GPTQ: ||(W-Q)X||^2 / ||WX||^2
            names.setdefault(name)
            output[name] = v
    return list(names), weight, output


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass
class EvalPoint:
    export: Export
    ppl: float
    text: str
    windows: int
    seq_len: int
    accuracy_level: int | None
    seconds: float | None

    @property
    def setting(self) -> tuple:
        """Perplexities are comparable only on the same text and windows."""
        return (self.text, self.windows, self.seq_len)

    @property
    def tokens_per_s(self) -> float | None:
        return self.windows * self.seq_len / self.seconds if self.seconds else None


def eval_points(exports: list[Export]) -> list[EvalPoint]:
    points = []
    for ex in exports:
        for entry in ex.report.get("eval", {}).values():
            if not isinstance(entry, dict) or "ppl" not in entry:
                continue
            points.append(EvalPoint(ex, float(entry["ppl"]), Path(str(entry.get("text", "?"))).name,
                                    int(entry.get("windows", 0)), int(entry.get("seq_len", 0)),
                                    entry.get("accuracy_level"), entry.get("seconds")))
    return points


# -- figures ------------------------------------------------------------------------------------------------
def require_matplotlib() -> None:
    """Fail with the install command, and before an export's minutes of work when the report was asked for."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QCompileError("the report needs matplotlib: python -m pip install matplotlib==3.11.2") from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _setting_title(setting: tuple) -> str:
    text, windows, seq_len = setting
    return f"{text}: {windows} × {seq_len} tokens"


def figure_ppl(points: list[EvalPoint]):
    """One panel per eval setting: each export's perplexity, the float export's as a dashed line."""
    settings = list(dict.fromkeys(p.setting for p in points))
    fig = _figure(max(6.0, 1.3 * max(sum(p.setting == s for p in points) for s in settings) + 2), 3.2 * len(settings))
    for ax, setting in zip(fig.subplots(len(settings), 1, squeeze=False)[:, 0], settings):
        pts = [p for p in points if p.setting == setting]
        refs = [p for p in pts if p.export.is_float]
        ref = min(refs, key=lambda p: p.ppl) if refs else None
        labels = [p.export.label + (f"\nacc. level {p.accuracy_level}" if not p.export.is_float and
                                    len({q.accuracy_level for q in pts}) > 1 else "") for p in pts]
        colors = ["#7f7f7f" if p.export.is_float else "#1f77b4" for p in pts]
        bars = ax.bar(range(len(pts)), [p.ppl for p in pts], color=colors, width=0.6)
        for bar, p in zip(bars, pts):
            note = f"{p.ppl:.3f}"
            if ref is not None and p is not ref:
                note += f"\n{100 * (p.ppl / ref.ppl - 1):+.1f}%"
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        if ref is not None:
            ax.axhline(ref.ppl, color="#7f7f7f", linestyle="--", linewidth=1, label=f"float: {ref.export.label}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(pts)), labels, fontsize=8)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_ylim(0, max(p.ppl for p in pts) * 1.25)
        ax.set_title(_setting_title(setting), fontsize=10)
    return fig


def figure_layer_errors(names: list[str], weight: dict[str, float], output: dict[str, float]):
    """Bars per quantized linear in quantization order, colored by role; layers marked on the x axis."""
    import matplotlib
    from matplotlib.patches import Patch

    panels = [(d, label) for d, label in (
        (weight, "weight rel. MSE\n‖W−Q‖² / ‖W‖²"),
        (output, "output rel. MSE (GPTQ)\n‖(W−Q)X‖² / ‖WX‖²"),
    ) if d]
    roles = list(dict.fromkeys(_role(n) for n in names))
    cmap = matplotlib.colormaps["tab10"]
    color = {r: cmap(i % 10) for i, r in enumerate(roles)}
    fig = _figure(min(20.0, max(8.0, 3 + 0.06 * len(names))), 2.8 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    x = list(range(len(names)))
    layers = [_layer(n) for n in names]
    starts = [i for i, layer in enumerate(layers) if layer is not None and (i == 0 or layers[i - 1] != layer)]
    step = max(1, math.ceil(len(starts) / 30))
    for ax, (values, label) in zip(axes, panels):
        ys = [values.get(n, float("nan")) for n in names]
        ax.bar(x, ys, color=[color[_role(n)] for n in names], width=0.85)
        positive = [y for y in ys if y > 0]
        if positive and max(positive) > 30 * min(positive):  # a wide range: log, else bars from zero read better
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(axis="y", which="major", alpha=0.3)
        for i in starts[1:]:
            ax.axvline(i - 0.5, color="#dddddd", linewidth=0.6, zorder=0)
    axes[-1].set_xticks([starts[i] for i in range(0, len(starts), step)],
                        [str(layers[starts[i]]) for i in range(0, len(starts), step)], fontsize=8)
    axes[-1].set_xlabel("decoder layer (bars in quantization order within each layer)")
    axes[-1].set_xlim(-0.7, len(names) - 0.3)
    fig.legend(handles=[Patch(color=color[r], label=r) for r in roles], ncols=min(len(roles), 8), fontsize=8,
               loc="outside upper center", frameon=False)
    return fig


def figure_sizes(exports: list[Export]):
    """One stacked bar per export: megabytes per tensor category."""
    fig = _figure(8.0, 1.2 + 0.6 * len(exports))
    ax = fig.subplots()
    rows = range(len(exports))
    left = [0.0] * len(exports)
    for kind in SIZE_ORDER:
        widths = [sum(ex.sizes.get(kind, {}).values()) / 1e6 for ex in exports][::-1]
        if any(widths):
            ax.barh(rows, widths, left=left, color=SIZE_COLORS[kind], label=kind, height=0.55)
            left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(rows, [ex.label for ex in exports][::-1])
    for y, total in enumerate(left):
        ax.annotate(f"{total:.2f} MB", (total, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, max(left) * 1.18 if max(left) > 0 else 1)
    ax.set_xlabel("MB of initializers in model.onnx(+_data)")
    fig.legend(fontsize=8, ncols=3, loc="outside lower center", frameon=False)
    return fig


def figure_throughput(points: list[EvalPoint]):
    """Tokens/s of each measured perplexity run (the only speed report.json holds)."""
    pts = [p for p in points if p.tokens_per_s]
    fig = _figure(8.0, 1.2 + 0.5 * len(pts))
    ax = fig.subplots()
    labels = [f"{p.export.label}\n{_setting_title(p.setting)}, acc. {p.accuracy_level}" for p in pts][::-1]
    values = [p.tokens_per_s for p in pts][::-1]
    ax.barh(range(len(pts)), values, color="#2ca02c", height=0.55)
    ax.set_yticks(range(len(pts)), labels)
    for y, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.18)
    ax.set_xlabel("tokens/s (ONNX Runtime, whole windows without cache, as qcompile eval ran them)")
    ax.tick_params(axis="y", labelsize=8)
    return fig


# -- the page -----------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{_esc(c)}</td>" if i in numeric else f"<td>{_esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f} MB"


def _summary(exports: list[Export], points: list[EvalPoint]) -> str:
    rows = []
    for ex in exports:
        rep = ex.report
        quant = rep.get("quantization", {})
        specs = ", ".join(f"{n} × {s}" for s, n in quant.get("linears_by_spec", {}).items()) or "none (float)"
        ppl = "; ".join(f"{p.ppl:.3f} ({_setting_title(p.setting)})" for p in points if p.export is ex)
        files = rep.get("files", {})
        graph_bytes = files.get("model.onnx", 0) + files.get("model.onnx_data", 0)
        rows.append([ex.label, str(ex.path), rep.get("recipe", {}).get("description", ""),
                     rep.get("source", {}).get("model", "?"), specs, _mb(graph_bytes) if graph_bytes else "?",
                     ppl or "not measured",
                     f"{rep.get('timings_s', {}).get('passes', '?')} s"])
    return _table(["export", "folder", "recipe", "source model", "quantized linears", "graph size", "perplexity",
                   "passes took"], rows)


def _figure_html(fig_id: str, png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img id="{fig_id}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def build_report(out_dir: str | os.PathLike, compare: list[str | os.PathLike] = ()) -> tuple[str, dict[str, bytes]]:
    """The HTML page and its figures (file name -> PNG bytes) for ``out_dir``, compared with ``compare``."""
    require_matplotlib()
    exports = [load_export(out_dir)] + [load_export(p) for p in compare]
    recipes = [ex.recipe for ex in exports]
    for ex in exports:
        ex.label = ex.recipe if recipes.count(ex.recipe) == 1 else f"{ex.recipe} · {ex.path.name}"
    main = exports[0]
    points = eval_points(exports)
    figures: dict[str, bytes] = {}
    sections: list[str] = []

    # perplexity
    sections.append("<h2>Perplexity</h2>")
    if points:
        figures["ppl.png"] = _png(figure_ppl(points))
        has_ref = any(p.export.is_float for p in points)
        sections.append(_figure_html(
            "fig-ppl", figures["ppl.png"], "perplexity per export",
            "WikiText-2-protocol perplexity through ONNX Runtime, as <code>qcompile eval</code> measured it; one panel "
            "per text and window count (only those are comparable). "
            + ("Percentages are relative to the float export (dashed line)." if has_ref else
               "No float export measured on the same windows: add one to compare with, e.g. "
               "<code>qcompile export MODEL -o OUT-fp32 --recipe fp32 --eval</code> and "
               "<code>qcompile report OUT OUT-fp32</code>.")))
    else:
        sections.append('<p class="note">No perplexity measured yet: run <code>qcompile eval OUT</code> (or '
                        "<code>qcompile export ... --eval</code>), then the report again.</p>")

    # per-linear error
    names, weight, output = layer_errors(main.report)
    sections.append(f"<h2>Per-linear quantization error ({_esc(main.label)})</h2>")
    if names:
        figures["layer_error.png"] = _png(figure_layer_errors(names, weight, output))
        sections.append(_figure_html(
            "fig-layer-error", figures["layer_error.png"], "per-linear quantization error",
            "Relative squared error of each quantized linear. Weight error is measured against the float "
            "weight the quantizer received; output error (GPTQ only) weights it by the calibration inputs X, "
            "which is what the layer's output sees."))
        worst = sorted(names, key=lambda n: output.get(n, weight.get(n, 0.0)), reverse=True)[:8]
        sections.append("<p>Largest errors:</p>" + _table(
            ["linear", "weight rel. MSE", "output rel. MSE"],
            [[n, f"{weight[n]:.3e}" if n in weight else "—", f"{output[n]:.3e}" if n in output else "—"]
             for n in worst], numeric={1, 2}))
    else:
        sections.append('<p class="note">No per-linear errors in report.json: a float export, or a folder exported '
                        "before qcompile recorded them.</p>")

    # sizes
    figures["sizes.png"] = _png(figure_sizes(exports))
    sections.append("<h2>Size per tensor type</h2>")
    sections.append(_figure_html(
        "fig-sizes", figures["sizes.png"], "bytes per tensor type",
        "Initializers of <code>model.onnx</code>, classified by the node that reads them: integer weights, their "
        "scales and zero points (DequantizeLinear inputs), float embeddings (Gather), float linear weights "
        "(MatMul: lm_head and anything left unquantized), and other float tensors (norms, biases, constants)."))
    rows = [[ex.label, kind, dtype, f"{n:,}"] for ex in exports for kind in SIZE_ORDER
            for dtype, n in sorted(ex.sizes.get(kind, {}).items())]
    sections.append(_table(["export", "tensor type", "element type", "bytes"], rows, numeric={3}))

    # speed
    sections.append("<h2>Speed</h2>")
    if any(p.tokens_per_s for p in points):
        figures["throughput.png"] = _png(figure_throughput(points))
        sections.append(_figure_html(
            "fig-throughput", figures["throughput.png"], "tokens per second",
            "Tokens scored per second during the perplexity runs (whole windows, no KV cache, on the machine and "
            "threads of that run). Decode speed with the cache is not recorded in report.json; "
            "<code>bench/decode_speed.py</code> measures it."))
    else:
        sections.append('<p class="note">No speed measured: the perplexity run (<code>qcompile eval</code>) records '
                        "it.</p>")

    source = main.report.get("source", {}).get("model", "?")
    title = f"qcompile report: {Path(str(source)).name} → {main.label}"
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{_esc(title)}</h1>\n"
            f"<p class=\"note\">qcompile {_esc(main.report.get('qcompile_version', '?'))}; "
            f"figures also in <code>{REPORT_DIR}/*.png</code> beside this page.</p>\n"
            f"{_summary(exports, points)}\n" + "\n".join(sections) + "\n</body></html>\n")
    return page, figures


def write_report(out_dir: str | os.PathLike, compare: list[str | os.PathLike] = ()) -> Path:
    """Write ``out_dir/report/report.html`` and its PNG figures (replacing an earlier report atomically);
    returns the HTML path. ``compare``: other exported folders to set beside this one (e.g. the fp32 export)."""
    from qcompile.fsutil import atomic_dir

    page, figures = build_report(out_dir, compare)
    target = Path(out_dir) / REPORT_DIR
    with atomic_dir(target, overwrite=True) as tmp:
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
        (tmp / HTML_FILE).write_text(page, encoding="utf-8")
    return target.resolve() / HTML_FILE
