"""SDE: Singular-value Diagonal Expansion (CQE+, arXiv 2407.15508), trained block by block, with CLL.

CQE+ "expands the diagonal" of LSI's learnable singular values so the weights can be refined with less
disruption of their distribution. The method section was not reachable; our reading (BRIEF.md):
``W' = U (diag(s) + D) V^T`` with ``D`` learnable and zero at init, holding the main diagonal and ``svd_band``
off-diagonals on each side (``svd_band = 0`` is LSI), optionally a dense ``svd_corner`` block over the largest
singular values, plus the regulariser ``penalty * sum ||W' - W||^2 / ||W||^2`` over the block's linears that
keeps the weight distribution close to the original (LSI's known weakness is drifting towards the calibration
text). Entries are learned in units of ``sqrt(s_i s_j)``. Clipping is learned as in LWC.

CLL (Cross-layer Learning) "improves overall quantization outcomes by distributing errors more evenly across
layers". Two readings, both here, both measured (docs/BENCHMARKS.md, "Learned passes"):

* across a few blocks: the block-wise engine's ``cll_window`` (each block's output also followed through the next
  ``k`` float blocks; the recipes use 1, the "two-layer-ahead" loss);
* across the whole network (``e2e_epochs`` > 0): after the block-wise training, the same parameters of every
  block (the expansion ``D`` and the learned clipping, exactly as the block-wise stage left them:
  ``handle.learned_params``) train together against the float model's output distribution (KL on the logits,
  :mod:`qcompile.learn.end_to_end`) for ``e2e_epochs`` more epochs, with the same regulariser. A block-wise
  loss balances each block's error against the next few; this one lets every block trade error against every
  other, measured where it counts. The block-wise stage is its starting point, not replaced by it. The stage
  rebuilds each parametrization on the float weight (recomputing the SVD), so it starts code for code at the
  block-wise result when both run on the same device (the report's ``start_code_changes``; a warning otherwise).
  It trains the blocks' linears only (a quantized lm_head keeps the block-wise stage's RTN), and it refuses to
  follow another weight pass (gptq, rtn): the block-wise parameters would then adjust that pass's weights.
  The config's default is 0 (block-wise only); the four CQE+ recipes run 3 epochs (SmolLM2-135M on one H100:
  W4 24.27 (torch) -> 23.02 (ORT) ppl from the same block-wise model; W3 27.68 and W2 53.27 through ORT, against
  31.54 and 106.05 block-wise on an H200; W4A4KV4 30.8 through ORT).

Everything folds into integers and scales; the graph equals an RTN graph in kind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qcompile.errors import QCompileError, RecipeError, require_int, require_number
from qcompile.learn.blockwise import BlockwiseConfig, fingerprint, train_blocks
from qcompile.learn.end_to_end import EndToEndConfig, train_end_to_end
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle


@dataclass
class SDEConfig(BlockwiseConfig):
    svd_band: int = 2  # off-diagonals on each side of the singular-value diagonal
    svd_corner: int = 0
    penalty: float = 1.0
    # CLL across the whole network (module docstring): epochs of end-to-end training after the block-wise stage
    # (0: none), with its own learning rates (it fine-tunes parameters that are already trained)
    e2e_epochs: int = 0
    e2e_lr_clip: float = 0.01
    e2e_lr_adjust: float = 0.001
    e2e_grad_checkpoint: bool = False  # the stage's grad_checkpoint (EndToEndConfig): less memory, same result

    def __post_init__(self):
        super().__post_init__()
        for f in ("svd_band", "svd_corner", "e2e_epochs"):
            require_int(getattr(self, f), f"sde {f}")
        for f in ("e2e_lr_clip", "e2e_lr_adjust"):
            require_number(getattr(self, f), f"sde {f}")

    def end_to_end(self) -> EndToEndConfig:
        """The end-to-end stage's configuration: this one's quantization, calibration text, batch size, device and
        seed, with the ``e2e_*`` epochs and learning rates."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(EndToEndConfig)
                  if hasattr(self, f.name) and f.init}
        # lm_head (RTN in the block-wise stage, nothing trained) keeps its quantization; the stage trains the blocks
        return EndToEndConfig(**{**shared, "epochs": self.e2e_epochs, "lr_clip": self.e2e_lr_clip,
                                 "lr_adjust": self.e2e_lr_adjust, "grad_checkpoint": self.e2e_grad_checkpoint,
                                 "quantize_lm_head": False})


Config = SDEConfig


def apply(handle: ModelHandle, config: SDEConfig) -> dict:
    def make(name, module, spec):
        return LearnedWeight(module.weight, spec, scales="learned", svd_band=config.svd_band,
                             svd_corner=config.svd_corner, name=name)

    if config.e2e_epochs and any(name in handle.quant_state for name, _, _ in handle.linears()):
        # the block-wise parameters would describe an adjustment of that pass's weights, and the stage rebuilds them
        # on the float originals
        raise RecipeError("sde e2e_epochs continues parameters trained on the float weights; it cannot follow "
                          "another weight pass (gptq, rtn, ...) in the recipe")
    stats = train_blocks(handle, config, make, "sde", keep_learned=bool(config.e2e_epochs))
    if not config.e2e_epochs or not stats.get("quantized_linears"):
        return stats
    blockwise_key = fingerprint(handle, config, "sde")

    def resume(name, module, spec, init):
        """The block-wise stage's parametrization of ``name``, rebuilt on its float weight (the engine's base)."""
        p = make(name, module, spec)
        saved = handle.learned_params.get(name)
        if saved is None:
            raise QCompileError(f"sde: the end-to-end stage needs the block-wise parameters of {name}, which its "
                                "saved training state lacks (written before they were kept); delete the state_dir")
        p.load_trained_state(saved)
        return p

    try:
        stats["end_to_end"] = train_end_to_end(handle, config.end_to_end(), resume, "sde_e2e", from_float=True,
                                               weight_penalty=config.penalty, state_key=blockwise_key)
    finally:  # kept for the stage only: afterwards they describe no weight on the handle
        for name, _, _ in handle.linears(include_lm_head=True):
            handle.learned_params.pop(name, None)
    return stats
