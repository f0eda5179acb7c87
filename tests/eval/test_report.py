"""The report on real tiny-model exports: the numbers it reads are right, the PNGs are the figures embedded in the
page, and a real headless browser (Debian's chromium) renders the page with every figure decoded."""

import base64
import html
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.torch import load_file

from qcompile.cli import main
from qcompile.eval.report import tensor_sizes
from qcompile.pipeline import compile_model
from qcompile.recipe import apply_overrides, load_recipe

FIGURES = {"fig-ppl": "ppl.png", "fig-layer-error": "layer_error.png", "fig-sizes": "sizes.png",
           "fig-throughput": "throughput.png"}
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dirs):
    """A GPTQ export (written with --eval --report) and an fp32 export to compare it with, both measured."""
    root = tmp_path_factory.mktemp("report")
    text = root / "text.txt"
    text.write_text(("Calibration text about rivers, cities and the weather in spring. " * 30 + "\n") * 20)
    model = str(tiny_model_dirs["llama"])
    measure = ["--eval", "--text", str(text), "--seq-len", "64", "--limit", "3"]
    assert main(["export", model, "-o", str(root / "w4"), "--recipe", "w4a16-g64-gptq", "--group-size", "16",
                 "--calib-text", str(text), "--calib-samples", "4", "--set", "gptq.calib_seq_len=64", "--report",
                 *measure]) == 0
    assert (root / "w4" / "report" / "report.html").is_file()  # --report wrote one; compare next
    assert main(["export", model, "-o", str(root / "fp32"), "--recipe", "fp32", *measure]) == 0
    assert main(["report", str(root / "w4"), str(root / "fp32")]) == 0
    return root / "w4", root / "fp32"


def test_pipeline_records_the_weight_error_of_every_quantized_linear(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["qwen2"]
    recipe = apply_overrides(load_recipe("w4a16-g64-rtn"), [], group_size=16, bits=3)
    result = compile_model(folder, tmp_path / "out", recipe)
    recorded = result.report["passes"]["1:rtn"]["weight_rel_mse"]
    original = load_file(folder / "model.safetensors")
    assert set(recorded) == set(result.handle.quant_state) and len(recorded) == 14
    for name, qw in result.handle.quant_state.items():
        w = original[f"{name}.weight"].double()
        expected = ((w - qw.dequantize().double()) ** 2).sum() / (w**2).sum()
        assert recorded[name] == pytest.approx(expected.item(), rel=1e-5), name
    assert "weight_rel_mse" not in result.report["passes"]["0:canonicalize"]  # quantizes nothing
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passes"]["1:rtn"]["weight_rel_mse"] == recorded


def test_sizes_per_tensor_type_add_up_to_the_data_file(exports):
    w4, fp32 = exports
    sizes = tensor_sizes(w4 / "model.onnx")
    report = json.loads((w4 / "report.json").read_text())
    assert sum(sum(v.values()) for v in sizes.values()) == (w4 / "model.onnx_data").stat().st_size
    assert set(sizes["quantized weights"]) == {"uint4"} and set(sizes["zero points"]) == {"uint4"}
    integer_bytes = sum(sum(sizes[k].values()) for k in ("quantized weights", "scales", "zero points"))
    assert integer_bytes == report["graph_pass"]["quantized_weight_bytes"]
    assert sizes["float embeddings"] == {"float32": 320 * 64 * 4}
    assert sizes["float linear weights"] == {"float32": 64 * 320 * 4}  # lm_head stays float
    fp32_sizes = tensor_sizes(fp32 / "model.onnx")
    assert "quantized weights" not in fp32_sizes
    assert sum(sum(v.values()) for v in fp32_sizes.values()) == (fp32 / "model.onnx_data").stat().st_size


def test_report_embeds_the_same_figures_it_writes_as_png(exports):
    from PIL import Image

    w4, fp32 = exports
    page = (w4 / "report" / "report.html").read_text()
    for fig_id, name in FIGURES.items():
        png = (w4 / "report" / name).read_bytes()
        assert Image.open(io.BytesIO(png)).size[0] > 300
        assert f'id="{fig_id}" alt="' in page and base64.b64encode(png).decode() in page, name
    # self-contained: nothing to fetch, no script
    assert "<script" not in page and "<link" not in page
    assert re.findall(r'src="([a-z]+:[^;,]*)', page) == ["data:image/png"] * len(FIGURES)
    # the numbers a reader compares: both exports' perplexities and the largest per-linear errors
    for folder in (w4, fp32):
        (entry,) = json.loads((folder / "report.json").read_text())["eval"].values()
        assert f"{entry['ppl']:.3f}" in page
    passes = json.loads((w4 / "report.json").read_text())["passes"]["1:gptq"]
    worst = passes["max_rel_error"]
    assert worst["linear"] in page and f"{worst['value']:.3e}" in page
    assert "relative to the float export" in page


def test_report_refuses_what_is_not_an_export(exports, tmp_path, capsys):
    w4, _ = exports
    assert main(["report", str(tmp_path)]) == 2
    assert main(["report", str(w4), str(tmp_path / "missing")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qcompile: error:")]
    assert len(errors) == 2 and all("is not an exported folder" in e for e in errors)
    assert not (tmp_path / "report").exists()


def _chromium(*args: str, tmp_path) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--mute-audio", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "the report's browser check needs it")
def test_report_renders_in_headless_chromium(exports, tmp_path):
    from PIL import Image

    w4, _ = exports
    page = w4 / "report" / "report.html"

    # the page as a reader sees it: a screenshot with the figures' colors in it
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2600", page.as_uri(), tmp_path=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2600, 1280, 3)
    assert (pixels != 255).any(-1).mean() > 0.05, "the screenshot is (nearly) blank"
    bar_blue = (np.abs(pixels - [31, 119, 180]) < 8).all(-1).sum()  # matplotlib's first color: the bars
    assert bar_blue > 2000, "no perplexity/size bars in the screenshot"

    # every figure decoded by the browser at the size of its PNG file: a copy of the page with a probe script
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
              "JSON.stringify([...document.images].map(i => [i.id, i.naturalWidth, i.naturalHeight, i.complete]))))"
              "</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), tmp_path=tmp_path).stdout
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, dom[:500]
    images = {i: (w, h, done) for i, w, h, done in json.loads(html.unescape(found.group(1)))}
    assert set(images) == set(FIGURES)
    for fig_id, name in FIGURES.items():
        assert images[fig_id] == (*Image.open(w4 / "report" / name).size, True), fig_id
