"""Fields every weight quantizer shares, and the choice of which linears a quantizer touches."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qcompile.errors import RecipeError
from qcompile.models.handle import ModelHandle
from qcompile.quant.grid import QuantSpec


@dataclass
class WeightQuantConfig:
    bits: int = 4
    symmetric: bool = False
    group_size: int | None = 64
    # lm_head stays float unless asked: an int4 lm_head has caused repetitive output elsewhere; int8 is the
    # common compromise (lm_head_bits: 8). Embeddings are never quantized by weight quantizers.
    quantize_lm_head: bool = False
    lm_head_bits: int | None = None
    lm_head_group_size: int | None = None
    mse_clip: bool = False

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size)

    def lm_head_spec(self) -> QuantSpec:
        """lm_head's spec: the ``lm_head_*`` fields where set (None: the linears' own; 0 is refused, not taken
        for unset)."""
        try:
            return QuantSpec(self.bits if self.lm_head_bits is None else self.lm_head_bits, self.symmetric,
                             self.group_size if self.lm_head_group_size is None else self.lm_head_group_size)
        except RecipeError as e:
            raise RecipeError(f"lm_head: {e}") from None

    def validate(self, handle: ModelHandle) -> None:
        """Fail before any work on impossible lm_head fields (even unused) or a group size that cannot divide a
        target's input dimension."""
        if self.lm_head_bits is not None or self.lm_head_group_size is not None:
            self.lm_head_spec()
        for name, _, module, spec in targets(handle, self):
            spec.groups(module.in_features, name)


def targets(handle: ModelHandle, config: WeightQuantConfig) -> list[tuple[str, str, nn.Linear, QuantSpec]]:
    """(name, role, module, spec) of each linear the quantizer must process, in execution order."""
    spec, head_spec = config.spec(), (config.lm_head_spec() if config.quantize_lm_head else None)
    out = []
    for name, role, module in handle.linears(include_lm_head=config.quantize_lm_head):
        out.append((name, role, module, head_spec if role == "lm_head" else spec))
    return out
