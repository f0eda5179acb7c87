"""The Python API: QCompileConfig is the recipe (same YAML, same validation), QCompileQuantizer runs the CLI's
pipeline, and Optimum loads what it writes."""

import filecmp
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile import QCompileConfig, QCompileQuantizer
from qcompile.cli import main
from qcompile.errors import QCompileError, RecipeError
from qcompile.recipe import RECIPE_DIR, builtin_recipes, load_recipe
from qcompile.runtime.ort import OrtCausalLM

ROOT = Path(__file__).resolve().parent.parent


def test_import_qcompile_stays_cheap():
    code = ("import sys, qcompile; assert 'torch' not in sys.modules, 'import qcompile loaded torch'; "
            "assert qcompile.QCompileConfig.__module__ == 'qcompile.api'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_config_from_yaml_equals_config_from_builtin(name, tmp_path):
    from_name = QCompileConfig.from_yaml(name)
    assert from_name == QCompileConfig.from_yaml(RECIPE_DIR / f"{name}.yaml")
    assert from_name == QCompileConfig.from_recipe(load_recipe(name))
    assert from_name.to_dict() == load_recipe(name).to_dict()
    from_name.to_yaml(tmp_path / "again.yaml")
    assert QCompileConfig.from_yaml(tmp_path / "again.yaml") == from_name  # round trip through a file


@pytest.mark.parametrize("kwargs, builtin", [
    (dict(method="rtn"), "w4a16-g64-rtn"),
    (dict(method="rtn", symmetric=True), "w4a16-g64-sym-rtn"),
    (dict(method="rtn", bits=3), "w3a16-g64-rtn"),
    (dict(method="rtn", bits=8, group_size=None, symmetric=True), "w8a16-rtn"),
    (dict(method="gptq"), "w4a16-g64-gptq"),
    (dict(method="gptq", symmetric=True), "w4a16-g64-sym-gptq"),
    (dict(method="none"), "fp32"),
])
def test_simple_constructor_builds_the_builtin_recipe(kwargs, builtin):
    config, reference = QCompileConfig(**kwargs), QCompileConfig.from_yaml(builtin)
    assert (config.passes, config.export) == (reference.passes, reference.export)
    assert config.name == builtin.replace("w8a16-rtn", "w8a16-sym-rtn")


def test_constructor_passes_other_fields_to_the_quantizer():
    config = QCompileConfig(method="gptq", bits=3, group_size=32, act_order=False, calib_samples=8,
                            accuracy_level=1, name="mine")
    gptq = config.step("gptq").config
    assert (gptq.bits, gptq.group_size, gptq.act_order, gptq.calib_samples, gptq.mse_clip) == (3, 32, False, 8, True)
    assert config.export.accuracy_level == 1 and config.name == "mine"


@pytest.mark.parametrize("make, message", [
    (lambda: QCompileConfig(method="awq"), "method must be one of rtn, gptq, none, got 'awq'"),
    (lambda: QCompileConfig(method="rtn", bits=1), "bits must be an integer from 2 to 8"),
    (lambda: QCompileConfig(method="rtn", act_order=True), "passes[1] (rtn): unknown field(s) ['act_order']"),
    (lambda: QCompileConfig(method="gptq", act_order="yes"), "act_order must be bool, got 'yes'"),
    (lambda: QCompileConfig(accuracy_level=7), "export.accuracy_level must be 0-4, got 7"),
    (lambda: QCompileConfig(method="none", calib_samples=4), "a float export has no quantizer"),
    (lambda: QCompileConfig.from_yaml("nonsense"), "unknown recipe 'nonsense'"),
    (lambda: QCompileConfig.from_dict({"passes": [{"pass": "rtn", "bitz": 4}]}), "unknown field(s) ['bitz']"),
    (lambda: QCompileConfig.from_recipe("w4a16-g64"), "from_recipe expects a qcompile.recipe.Recipe, got str"),
])
def test_bad_config_is_refused_with_a_message_naming_it(make, message):
    with pytest.raises(RecipeError) as e:
        make()
    assert message in str(e.value)


def test_bad_source_or_config_fails_before_any_work(tmp_path, tiny_model_dirs):
    with pytest.raises(QCompileError, match="model path /no/such/model does not exist"):
        QCompileQuantizer.from_pretrained("/no/such/model")
    with pytest.raises(QCompileError, match="not a Linear; save an in-memory model"):
        QCompileQuantizer.from_pretrained(torch.nn.Linear(2, 2))
    with pytest.raises(QCompileError, match="dtype must be one of"):
        QCompileQuantizer.from_pretrained(tiny_model_dirs["llama"], dtype="float8")
    quantizer = QCompileQuantizer.from_pretrained(tiny_model_dirs["llama"])
    with pytest.raises(RecipeError, match="config must be a QCompileConfig"):
        quantizer.quantize(config=4, save_dir=tmp_path / "out")
    with pytest.raises(QCompileError, match="does not divide in_features 64"):
        quantizer.quantize(config=QCompileConfig(method="rtn", group_size=48), save_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    (tmp_path / "taken").mkdir()
    with pytest.raises(QCompileError, match="already exists"):
        quantizer.quantize(config="w4a16-g64-rtn", save_dir=tmp_path / "taken")


@torch.no_grad()
@pytest.mark.filterwarnings("ignore")
def test_quantize_then_optimum_loads_and_generates(tmp_path, tiny_model_dirs):
    from optimum.onnxruntime import ORTModelForCausalLM

    config = QCompileConfig(method="rtn", bits=4, group_size=16)
    quantizer = QCompileQuantizer.from_pretrained(tiny_model_dirs["llama"])
    save_dir = quantizer.quantize(save_dir=tmp_path / "api", config=config, report=True)
    assert save_dir == (tmp_path / "api").resolve()

    model = ORTModelForCausalLM.from_pretrained(save_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    assert generated.shape == (1, 14)
    ours = OrtCausalLM.from_dir(save_dir).generate(ids[0].tolist(), 8, eos_token_id=2)
    assert generated[0, 6:].tolist()[: len(ours)] == ours  # our runner stops at eos, Optimum pads after it

    # the CLI's pipeline, not a second one: `qcompile export` with the same recipe writes the same graph
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(tmp_path / "cli"), "--recipe", "w4a16-g64-rtn",
                 "--group-size", "16"]) == 0
    for name in ("model.onnx", "model.onnx_data", "config.json", "tokenizer.json"):
        assert filecmp.cmp(save_dir / name, tmp_path / "cli" / name, shallow=False), name

    page = (save_dir / "report" / "report.html").read_text()  # report=True, no perplexity measured yet
    assert 'id="fig-layer-error"' in page and 'id="fig-sizes"' in page and "No perplexity measured yet" in page
    assert not (save_dir / "report" / "ppl.png").exists()


@pytest.mark.filterwarnings("ignore")
def test_example_runs(tmp_path, tiny_model_dirs, capsys):
    """examples/quantize_with_api.py end to end, on a tiny model instead of SmolLM2 to keep the suite quick."""
    namespace = runpy.run_path(str(ROOT / "examples" / "quantize_with_api.py"))
    answer = namespace["main"](["--model", str(tiny_model_dirs["qwen2"]), "--out", str(tmp_path / "ex"),
                                "--prompt", "hi"])
    assert isinstance(answer, str)
    assert (tmp_path / "ex" / "report" / "report.html").is_file()
    assert "exported to" in capsys.readouterr().out
