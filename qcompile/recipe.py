"""Recipes: an ordered list of passes with their configs, plus export settings, loaded from YAML or JSON.

```yaml
name: w4a16-g64-rtn
description: int4 asymmetric weights, groups of 64, round-to-nearest
passes:
  - pass: canonicalize
    fuse_norms: false
  - pass: rtn
    bits: 4
    group_size: 64
export:
  accuracy_level: 4
```

Built-in names map to files in ``qcompile/recipes/``. CLI flags override fields: ``--set rtn.bits=3`` sets one
field of one pass; ``--bits/--group-size/--sym/--asym`` set those fields on every weight quantizer. Unknown
keys, unknown passes and impossible values are errors that name the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcompile import passes
from qcompile.errors import RecipeError, first_line
from qcompile.quant.targets import WeightQuantConfig

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class ExportConfig:
    opset: int = 21
    # ORT session option `session.qdq_matmulnbits_accuracy_level` for fused int4 MatMuls: 4 = int8 activations
    # (ORT's default, fastest), 1 = float32 compute. Saved in qcompile.json; `qcompile run/eval` honour it.
    accuracy_level: int = 4
    # online Hadamard rotations as "kron" (two small MatMuls per rotation, O(n(m+s))) or "dense" (one n x n MatMul)
    online_hadamard: str = "kron"
    # attention as "standard" ONNX ops (any padding, every runtime) or "gqa": ORT's GroupQueryAttention contrib op,
    # with which onnxruntime-genai shares one max-length KV buffer between steps (edge bundles, batch 1)
    attention: str = "standard"
    # q|k|v and gate|up as one MatMul each (weights side by side along N, exact for blockwise quantization), then
    # a Split (or GroupQueryAttention's packed input): fewer, larger MatMulNBits per layer (graph.fuse_projections)
    fuse_projections: bool = False

    def __post_init__(self):
        if self.attention not in ("standard", "gqa"):
            raise RecipeError(f"export.attention must be 'standard' or 'gqa', got {self.attention!r}")
        if self.online_hadamard not in ("kron", "dense"):
            raise RecipeError(f"export.online_hadamard must be 'kron' or 'dense', got {self.online_hadamard!r}")
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not 21 <= self.opset <= newest:
            raise RecipeError(f"export.opset must be 21 (int4 DequantizeLinear with block_size) to {newest} (the "
                              f"newest opset the installed onnx knows), got {self.opset}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise RecipeError(f"export.accuracy_level must be 0-4, got {self.accuracy_level}")


@dataclass
class PassStep:
    name: str
    config: Any

    def to_dict(self) -> dict:
        return {"pass": self.name, **dataclasses.asdict(self.config)}


@dataclass
class Recipe:
    name: str
    passes: list[PassStep]
    description: str = ""
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "passes": [s.to_dict() for s in self.passes],
            "export": dataclasses.asdict(self.export),
        }

    def weight_quantizers(self) -> list[PassStep]:
        return [s for s in self.passes if isinstance(s.config, WeightQuantConfig)]

    def step(self, name: str) -> PassStep:
        matches = [s for s in self.passes if s.name == name]
        if not matches:
            raise RecipeError(f"recipe {self.name!r} has no pass {name!r}; its passes: {[s.name for s in self.passes]}")
        return matches[-1]


def _check_type(value, hint, where: str):
    """Validate (and lightly coerce) a YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise RecipeError(f"{where} must be {hint.__name__}, got {value!r}")


def build_config(cls, values: dict, where: str):
    if not isinstance(values, dict):  # e.g. ``export: [1]``: a list's items would read as unknown field names
        raise RecipeError(f"{where} must be a mapping of field: value, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None
    if isinstance(cfg, WeightQuantConfig):  # bits/group-size range errors surface at load time
        cfg.spec()
        if cfg.quantize_lm_head:
            cfg.lm_head_spec()
    return cfg


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys name, description, passes, export")
    unknown = sorted(set(data) - {"name", "description", "passes", "export"})
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key(s) {unknown}; allowed: description, export, name, passes")
    steps_data = data.get("passes")
    if not isinstance(steps_data, list) or not steps_data:
        raise RecipeError(f"{source}: 'passes' must be a non-empty list")
    steps = []
    for i, item in enumerate(steps_data):
        if not isinstance(item, dict) or "pass" not in item:
            raise RecipeError(f"{source}: passes[{i}] must be a mapping with a 'pass' key")
        values = dict(item)
        name = values.pop("pass")
        if not isinstance(name, str):
            raise RecipeError(f"{source}: passes[{i}]: 'pass' must be one pass name, got {name!r}")
        module = passes.get(name)
        steps.append(PassStep(name, build_config(module.Config, values, f"{source}: passes[{i}] ({name})")))
    export = data.get("export")  # absent or empty (None) means the defaults; anything else must be a mapping
    export = build_config(ExportConfig, {} if export is None else export, f"{source}: export")
    return Recipe(name=str(data.get("name") or Path(source).stem), passes=steps,
                  description=str(data.get("description") or ""), export=export)


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe name, or a path to a YAML/JSON recipe file."""
    builtins = builtin_recipes()
    if str(name_or_path) in builtins:
        path = builtins[str(name_or_path)]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(
                f"unknown recipe {str(name_or_path)!r}: not a file and not a built-in ({', '.join(builtins)})"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a text recipe (not UTF-8: {e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return recipe_from_dict(data, str(path))


def apply_overrides(recipe: Recipe, sets: list[str] = (), strict: bool = False, **weight_fields) -> Recipe:
    """Return a new recipe with ``--set pass.field=value`` entries and shortcut fields applied.

    ``weight_fields`` (e.g. bits=3, group_size=None, symmetric=True) go to every weight quantizer (and to a
    pass's ``WEIGHT_SHORTCUTS`` aliases, e.g. spinquant's fake-quant ``w_bits``); a value of
    ``...`` (Ellipsis) means "not given". Calibration shortcuts (calib_text, calib_samples) go to every pass
    that has such a field, and so does ``state_dir`` (``--train-state``; spinquant is no weight quantizer).
    ``strict`` (the CLI): a shortcut that no pass takes is an error, not silently dropped.
    """
    data = recipe.to_dict()
    shortcuts = {k: v for k, v in weight_fields.items() if v is not ...}
    applied = set()
    for step in data["passes"]:
        module = passes.get(step["pass"])
        fields = {f.name for f in dataclasses.fields(module.Config)}
        is_wq = issubclass(module.Config, WeightQuantConfig)
        aliases = getattr(module.Config, "WEIGHT_SHORTCUTS", {})  # e.g. spinquant's bits -> w_bits
        for k, v in shortcuts.items():
            if k in fields and (is_wq or k.startswith("calib_") or k == "state_dir"):
                step[k] = v
                applied.add(k)
            elif k in aliases:
                step[aliases[k]] = v
                applied.add(k)
    unused = [k for k in shortcuts if k not in applied]
    if strict and unused:  # a flag that changes nothing would be a silent surprise (e.g. --bits 3 on fp32)
        flags = {"bits": "--bits", "group_size": "--group-size", "symmetric": "--sym/--asym",
                 "calib_text": "--calib-text", "calib_samples": "--calib-samples", "state_dir": "--train-state"}
        raise RecipeError(f"{', '.join(flags.get(k, k) for k in unused)}: no pass of recipe {recipe.name!r} takes "
                          f"it (passes: {', '.join(s['pass'] for s in data['passes']) or 'none'})")
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RecipeError(f"--set {item!r}: expected PASS.FIELD=VALUE (e.g. rtn.bits=3) or export.FIELD=VALUE")
        key, raw = item.split("=", 1)
        target, fname = key.rsplit(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({first_line(e)})") from None
        if target == "export":
            data["export"][fname] = value
            continue
        matches = [s for s in data["passes"] if s["pass"] == target]
        if not matches:
            raise RecipeError(f"--set {item!r}: recipe {recipe.name!r} has no pass {target!r}")
        for s in matches:
            s[fname] = value
    return recipe_from_dict(data, f"{recipe.name} (with overrides)")
