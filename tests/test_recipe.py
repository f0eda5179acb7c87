import json

import pytest

from qcompile.errors import RecipeError
from qcompile.recipe import apply_overrides, builtin_recipes, load_recipe, recipe_from_dict


def test_every_builtin_recipe_loads_and_round_trips():
    names = builtin_recipes()
    assert {"fp32", "w4a16-g64", "w4a16-g64-rtn", "w3a16-g64-gptq"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.description
        again = recipe_from_dict(json.loads(json.dumps(r.to_dict())))
        assert again.to_dict() == r.to_dict()


def test_recipe_from_json_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"name": "mine", "passes": [{"pass": "rtn", "bits": 3, "group_size": 32}]}))
    r = load_recipe(f)
    assert r.step("rtn").config.bits == 3 and r.step("rtn").config.group_size == 32


def test_overrides_set_and_shortcuts():
    r = load_recipe("w4a16-g64-rtn")
    r2 = apply_overrides(r, ["rtn.mse_clip=true", "export.accuracy_level=1"], bits=3, group_size=None,
                         symmetric=..., calib_text=..., calib_samples=...)
    cfg = r2.step("rtn").config
    assert (cfg.bits, cfg.group_size, cfg.mse_clip, cfg.symmetric) == (3, None, True, False)
    assert r2.export.accuracy_level == 1
    assert r.step("rtn").config.bits == 4  # the original is untouched


def test_genai_recipes_fuse_projections_and_the_flag_can_be_set():
    assert all(load_recipe(n).export.fuse_projections for n in ("w4a16-g64-genai", "w4a16-g64-rtn-genai"))
    assert not load_recipe("w4a16-g64-rtn").export.fuse_projections  # off by default
    r = apply_overrides(load_recipe("w4a16-g64-rtn"), ["export.fuse_projections=true"])
    assert r.export.fuse_projections
    with pytest.raises(RecipeError, match="fuse_projections must be bool"):
        apply_overrides(load_recipe("w4a16-g64-rtn"), ["export.fuse_projections=3"])


def test_calibration_shortcuts_reach_gptq():
    r = apply_overrides(load_recipe("w4a16-g64-gptq"), [], calib_samples=8, calib_text="/x.txt")
    assert r.step("gptq").config.calib_samples == 8 and r.step("gptq").config.calib_text == "/x.txt"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"passes": [{"pass": "rtn", "bitz": 4}]}, r"unknown field\(s\) \['bitz'\]"),
        ({"passes": [{"pass": "magic"}]}, "unknown pass 'magic'"),
        ({"passes": [{"pass": "rtn", "bits": 0}]}, "bits must be an integer from 2 to 8"),
        ({"passes": [{"pass": "rtn", "bits": 9}]}, "bits must be an integer from 2 to 8"),
        ({"passes": [{"pass": "rtn", "bits": "four"}]}, "bits must be int"),
        ({"passes": [{"pass": "rtn", "group_size": 0}]}, "group_size must be a positive integer"),
        ({"passes": []}, "'passes' must be a non-empty list"),
        ({"passes": [{"pass": "rtn"}], "extra": 1}, r"unknown top-level key\(s\) \['extra'\]"),
        ({"passes": [{"pass": "rtn"}], "export": {"opset": 17}}, "opset must be 21 .* to "),
        ({"passes": [{"pass": "rtn"}], "export": {"opset": 99}}, "opset must be 21 .* got 99"),
        # read with the recipe, not after the weight passes before them (minutes of GPTQ on a real model)
        ({"passes": [{"pass": "act_quant", "bits": 0}]}, "act_quant: activation/KV bits must be"),
        ({"passes": [{"pass": "act_quant", "group_size": 0}]}, "act_quant: .*group_size must be"),
        ({"passes": [{"pass": "kv_quant", "clip_ratio": float("nan")}]}, r"kv_quant: clip_ratio must be in \(0, 1\]"),
        ({"passes": [{"pass": "kv_quant", "bits": 9}]}, "kv_quant: activation/KV bits must be"),
        # a list where a mapping belongs: its items used to read as "unknown field(s) [1]"
        ({"passes": [{"pass": "rtn"}], "export": [1]}, r"export must be a mapping of field: value, got list \[1\]"),
        ({"passes": [{"pass": "rtn"}], "export": []}, r"export must be a mapping of field: value, got list \[\]"),
        ({"passes": [{"pass": "rtn"}], "export": False}, "export must be a mapping of field: value, got bool"),
    ],
)
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="not a file and not a built-in .*w4a16-g64"):
        load_recipe("w5a16-nonsense")


def test_bad_set_syntax():
    with pytest.raises(RecipeError, match="expected PASS.FIELD=VALUE"):
        apply_overrides(load_recipe("fp32"), ["bits=3"])
    with pytest.raises(RecipeError, match="has no pass 'gptq'"):
        apply_overrides(load_recipe("w4a16-g64-rtn"), ["gptq.bits=3"])


def test_invalid_yaml(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("passes: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(f)


def test_binary_recipe_file_and_non_string_pass_name(tmp_path):
    binary = tmp_path / "r.yaml"
    binary.write_bytes(b"\xff\xfe passes")
    with pytest.raises(RecipeError, match="not a text recipe"):
        load_recipe(binary)
    listed = tmp_path / "l.yaml"
    listed.write_text("passes:\n  - pass: [rtn]\n")
    with pytest.raises(RecipeError, match=r"passes\[0\]: 'pass' must be one pass name, got \['rtn'\]"):
        load_recipe(listed)


@pytest.mark.parametrize("base", ["w4a4kv4", "w3a3-g64"])
def test_spin_recipes_are_their_base_with_spinquant_before_gptq(base):
    spin, plain = load_recipe(f"{base}-spin").to_dict(), load_recipe(base).to_dict()
    names = [s["pass"] for s in spin["passes"]]
    assert names.index("rotate") + 1 == names.index("spinquant") == names.index("gptq") - 1
    assert [s for s in spin["passes"] if s["pass"] != "spinquant"] == plain["passes"]
    assert spin["export"] == plain["export"]
    sq = next(s for s in spin["passes"] if s["pass"] == "spinquant")
    gptq = next(s for s in plain["passes"] if s["pass"] == "gptq")
    act = next(s for s in plain["passes"] if s["pass"] == "act_quant")
    kv = next((s for s in plain["passes"] if s["pass"] == "kv_quant"), None)
    assert (sq["w_bits"], sq["w_group_size"], sq["w_symmetric"]) == (
        gptq["bits"], gptq["group_size"], gptq["symmetric"])
    assert (sq["a_bits"], sq["a_group_size"], sq["a_symmetric"]) == (act["bits"], act["group_size"], act["symmetric"])
    assert sq["kv_bits"] == (kv and kv["bits"]) and (kv is None or sq["kv_symmetric"] == kv["symmetric"])
    # --bits / --group-size / --train-state reach the training-time grid and the state folder too
    r = apply_overrides(load_recipe(f"{base}-spin"), [], bits=3, group_size=32, symmetric=..., state_dir="/tmp/s")
    cfg = r.step("spinquant").config
    assert (cfg.w_bits, cfg.w_group_size, cfg.state_dir) == (3, 32, "/tmp/s") and r.step("gptq").config.bits == 3
