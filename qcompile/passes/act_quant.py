"""Activation quantization: every targeted linear reads its input quantized per token, with scales computed from
the data at run time (dynamic), as the exported graph does (``qcompile.graph.act_qdq``).

The pass records a :class:`~qcompile.quant.activations.TokenQuantSpec` per linear in ``handle.act_quant`` and
installs a forward pre-hook on each so the torch model computes exactly that (the fake-quant reference for
parity and evaluation). Put it after the weight quantizers in a recipe: GPTQ then calibrates on float
activations, as QuaRot does, and its Hessian hooks never see quantized inputs. Online rotations (R4) installed
earlier by ``rotate`` run first, so the hook quantizes the rotated input, which is the point of rotating.
lm_head is left in float activations unless ``quantize_lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.errors import RecipeError
from qcompile.models.adapters import LINEAR_ROLES
from qcompile.models.handle import ModelHandle
from qcompile.quant.activations import TokenQuantSpec, fake_quantize_tokens, token_spec


@dataclass
class ActQuantConfig:
    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None  # None: per token
    clip_ratio: float = 1.0
    roles: list = field(default_factory=lambda: list(LINEAR_ROLES))
    quantize_lm_head: bool = False

    def __post_init__(self):
        bad = [r for r in self.roles if r not in LINEAR_ROLES]
        if bad:
            raise RecipeError(f"act_quant roles {bad} unknown; roles are {', '.join(LINEAR_ROLES)}")
        self.spec()  # bits, group size and clip ratio: refused when the recipe is read, not after the passes before

    def spec(self) -> TokenQuantSpec:
        return token_spec("act_quant", self.bits, self.symmetric, self.group_size, self.clip_ratio)


Config = ActQuantConfig


def _hook(specs: dict, name: str):
    # the spec is looked up on every call: a training pass (bisup) may replace it with a learned clip ratio,
    # and while it trains one it sets ``module._qcompile_act_clip`` (a tensor) to use instead
    def fn(module, args):
        clip = getattr(module, "_qcompile_act_clip", None)
        return (fake_quantize_tokens(args[0], specs[name], f"input of {name}", clip), *args[1:])

    return fn


def apply(handle: ModelHandle, config: ActQuantConfig) -> dict:
    spec = config.spec()
    todo = [(n, m) for n, role, m in handle.linears(include_lm_head=config.quantize_lm_head)
            if role in config.roles or role == "lm_head"]
    for name, module in todo:  # every check before any hook
        spec.group(module.in_features, f"input of {name}")
    for name, module in todo:
        if name in handle.act_quant:
            raise RecipeError(f"act_quant: the input of {name} is already quantized by an earlier act_quant step")
        handle.act_quant[name] = spec
        handle.quant_hooks.append(module.register_forward_pre_hook(_hook(handle.act_quant, name)))
    return {"quantized_inputs": len(todo), "spec": spec.describe()}
