"""Python API in the shape of ``optimum.onnxruntime.ORTQuantizer``: a config object and a quantizer that writes
a folder ``ORTModelForCausalLM.from_pretrained`` loads.

```python
from qcompile import QCompileConfig, QCompileQuantizer

config = QCompileConfig(method="rtn", bits=4, group_size=64)        # or QCompileConfig.from_yaml("w4a16-g64")
QCompileQuantizer.from_pretrained("smollm2-135m").quantize(save_dir="out/w4", config=config)
```

Nothing here quantizes on its own: ``quantize`` is ``qcompile.pipeline.compile_model``, the same straight line
``qcompile export`` runs, so the API and the CLI cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from qcompile.errors import QCompileError, RecipeError
from qcompile.recipe import Recipe, load_recipe, recipe_from_dict

# the built-in recipe each method starts from, so its measured defaults (act-order, MSE clipping, ...) carry over
METHOD_BASE = {"rtn": "w4a16-g64-rtn", "gptq": "w4a16-g64-gptq", "none": "fp32"}
METHOD_WORDS = {"rtn": "round-to-nearest", "gptq": "GPTQ"}


@dataclass(init=False)
class QCompileConfig(Recipe):
    """A recipe (ordered passes + export settings) as one object, validated like a recipe file.

    The constructor covers the common case, one weight quantizer: ``method`` ("rtn", "gptq" or "none" for a
    float export), ``bits``, ``group_size`` (None = per-channel), ``symmetric``, ``accuracy_level`` and any other
    field of that quantizer (``act_order=False``, ``calib_samples=16``, ``quantize_lm_head=True``, ...). Any
    other recipe comes from ``from_yaml`` (a built-in name or a YAML/JSON file) or ``from_recipe``.
    """

    def __init__(self, method: str = "gptq", bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
                 *, accuracy_level: int = 4, name: str | None = None, description: str | None = None, **fields):
        if method not in METHOD_BASE:
            raise RecipeError(f"QCompileConfig: method must be one of {', '.join(METHOD_BASE)}, got {method!r}")
        data = load_recipe(METHOD_BASE[method]).to_dict()
        source = f"QCompileConfig(method={method!r})"
        if method == "none":
            if fields:
                raise RecipeError(f"{source}: a float export has no quantizer to take {sorted(fields)}")
            default_name, default_description = "fp32", "float32 export, no quantization"
        else:
            step = next(s for s in data["passes"] if s["pass"] == method)
            step.update(bits=bits, group_size=group_size, symmetric=symmetric, **fields)
            default_name = (f"w{bits}a16" + (f"-g{group_size}" if group_size else "") + ("-sym" if symmetric else "")
                            + f"-{method}")
            grouping = f"groups of {group_size}" if group_size else "per-channel"
            default_description = (f"int{bits} {'symmetric' if symmetric else 'asymmetric'} weights, {grouping}, "
                                   f"{METHOD_WORDS[method]}")
        data["export"]["accuracy_level"] = accuracy_level
        data["name"] = name or default_name
        data["description"] = default_description if description is None else description
        self._assign(recipe_from_dict(data, source))

    def _assign(self, recipe: Recipe) -> None:
        self.name, self.passes, self.description, self.export = (recipe.name, recipe.passes, recipe.description,
                                                                 recipe.export)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> QCompileConfig:
        """A validated copy of ``recipe`` (fields edited by hand are checked again)."""
        if not isinstance(recipe, Recipe):
            raise RecipeError(f"from_recipe expects a qcompile.recipe.Recipe, got {type(recipe).__name__}")
        return cls.from_dict(recipe.to_dict(), source=recipe.name)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> QCompileConfig:
        """The mapping a recipe file holds (keys name, description, passes, export)."""
        config = cls.__new__(cls)
        config._assign(recipe_from_dict(data, source))
        return config

    @classmethod
    def from_yaml(cls, path_or_name: str | os.PathLike) -> QCompileConfig:
        """A built-in recipe name (``qcompile recipes``) or a YAML/JSON recipe file, as ``--recipe`` takes."""
        config = cls.__new__(cls)
        config._assign(load_recipe(path_or_name))
        return config

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The recipe file for this config (``--recipe`` and ``from_yaml`` read it back); written to ``path`` if
        given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def _as_config(config) -> QCompileConfig:
    if isinstance(config, QCompileConfig):
        return config
    if isinstance(config, Recipe):
        return QCompileConfig.from_recipe(config)
    if isinstance(config, (str, os.PathLike)):
        return QCompileConfig.from_yaml(config)
    raise RecipeError("config must be a QCompileConfig, a qcompile Recipe, a built-in recipe name or a recipe "
                      f"file path, got {type(config).__name__}")


class QCompileQuantizer:
    """Quantizes one source model into exported folders; one ``quantize`` call per folder, each from the source
    (the passes change the loaded model in place, so it is reloaded rather than quantized twice)."""

    def __init__(self, source: str, *, trust_remote_code: bool = False, device: str = "cpu", dtype="float32"):
        self.source = source
        self.trust_remote_code = trust_remote_code
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike, *, trust_remote_code: bool = False,
                        device: str = "cpu", dtype="float32") -> QCompileQuantizer:
        """``model_or_path``: a Hugging Face folder, a ``.gguf`` file or a built-in name (``smollm2-135m``).

        ``device`` is where the passes run (``cuda`` for GPTQ calibration); ``dtype`` ("float32", "float16",
        "bfloat16" or a torch dtype) is the precision they run in. The export is float32 either way. The model is
        loaded by ``quantize``; a wrong path fails here.
        """
        from qcompile.models import BUILTIN_MODELS

        if not isinstance(model_or_path, (str, os.PathLike)):
            raise QCompileError(
                f"from_pretrained takes a model folder, a .gguf file or a built-in name, not a "
                f"{type(model_or_path).__name__}; save an in-memory model with save_pretrained(folder) first")
        source = str(model_or_path)
        if source not in BUILTIN_MODELS:
            path = Path(source).expanduser()
            if not path.exists():
                raise QCompileError(f"model path {source} does not exist (and is not a built-in name: "
                                    f"{', '.join(BUILTIN_MODELS)})")
            if (path / "model.onnx").is_file():
                raise QCompileError(f"{source} is already an exported ONNX folder; give the model it came from")
        _torch_dtype(dtype)  # an unknown dtype fails before any loading
        return cls(source, trust_remote_code=trust_remote_code, device=device, dtype=dtype)

    def quantize(self, config: QCompileConfig | Recipe | str | os.PathLike, save_dir: str | os.PathLike, *,
                 overwrite: bool = False, report: bool = False) -> Path:
        """Run ``config``'s passes and export into ``save_dir`` (written atomically); returns its path.

        ``config`` may also be a built-in recipe name or a recipe file. ``report=True`` also writes
        ``save_dir/report/`` (see ``qcompile.eval.report``).
        """
        from qcompile.pipeline import compile_model

        config = _as_config(config)
        result = compile_model(self.source, save_dir, config, device=self.device, dtype=_torch_dtype(self.dtype),
                               overwrite=overwrite, trust_remote_code=self.trust_remote_code)
        if report:
            from qcompile.eval.report import write_report

            write_report(result.out_dir)
        return result.out_dir

    def __repr__(self) -> str:
        return f"QCompileQuantizer({self.source!r}, device={self.device!r}, dtype={self.dtype!r})"


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise QCompileError(f"dtype must be one of {', '.join(names)} or a torch dtype, got {dtype!r}")
    return names[dtype]
