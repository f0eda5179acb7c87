"""DL-QAT: group-specific quantization magnitude plus LoRA in quantization space (arXiv 2504.09223).

Per linear, on the integer grid of its groups (scale ``s_g``, zero point ``z_g``):
``q = clamp(round((W0 + B A) / s_g) + z_g)``, ``W_hat = alpha_g * s_g * (q - z_g)``, with straight-through
rounding, ``alpha_g`` one learnable magnitude per group (init 1) and ``B A`` a LoRA term (``B`` zero at init).
Stage 1 trains ``alpha`` alone for ``magnitude_epochs``; stage 2 trains ``alpha``, ``A`` and ``B`` together for
``epochs``. Trained end to end (:mod:`qcompile.learn.end_to_end`): the whole quantized model against the float
model's output distribution (KL) on calibration text (WikiText-2 *validation* by default; never the test split).

Readings of what the paper leaves to us, written down:

* ``s_g``, ``z_g`` and ``W0`` come from the linear's current quantized state when an earlier pass produced one
  with the same spec (the recipes run GPTQ first, so DL-QAT fine-tunes GPTQ's solution: at init the model *is*
  the GPTQ model); otherwise from RTN on the float weight. The paper starts from a plain RTN grid.
* The loss is distillation from the float model (KL on logits), not a downstream task loss: the target here is
  to recover the float model, and the calibration text has no labels of its own.
* Trainable share: ``alpha`` alone is ``1 / group_size`` of the quantized weights (1.6% at g64, 0.8% at g128,
  the paper's setting); the report gives the share measured.

Export merges everything: integers ``q``, scales ``alpha_g * s_g``, zero points ``z_g``: an ordinary blockwise
int weight, so the graph equals an RTN graph in kind and cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.errors import require_int
from qcompile.learn.end_to_end import EndToEndConfig, train_end_to_end
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle


@dataclass
class DLQATConfig(EndToEndConfig):
    lora_rank: int = 4
    magnitude_epochs: int = 1  # stage 1: alpha only
    epochs: int = 2  # stage 2: alpha + LoRA
    lr_adjust: float = 2e-4
    lr_magnitude: float = 5e-4

    def __post_init__(self):
        super().__post_init__()
        for f in ("lora_rank", "magnitude_epochs"):
            require_int(getattr(self, f), f"dlqat {f}")


Config = DLQATConfig


def apply(handle: ModelHandle, config: DLQATConfig) -> dict:
    def make(name, module, spec, init):
        return LearnedWeight(module.weight, spec, scales="fixed", init=init, lora_rank=config.lora_rank,
                             magnitude=True, name=name, seed=config.seed)

    stages = [(config.magnitude_epochs, {"magnitude"}), (config.epochs, None)]
    return train_end_to_end(handle, config, make, "dlqat", stages=[s for s in stages if s[0] > 0])
