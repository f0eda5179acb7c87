"""SDE: Singular-value Diagonal Expansion (CQE+, arXiv 2407.15508), trained block by block, with CLL.

CQE+ "expands the diagonal" of LSI's learnable singular values so the weights can be refined with less
disruption of their distribution. The method section was not reachable; our reading (BRIEF.md):
``W' = U (diag(s) + D) V^T`` with ``D`` learnable and zero at init, holding the main diagonal and ``svd_band``
off-diagonals on each side (``svd_band = 0`` is LSI), optionally a dense ``svd_corner`` block over the largest
singular values, plus the regulariser ``penalty * sum ||W' - W||^2 / ||W||^2`` over the block's linears that
keeps the weight distribution close to the original (LSI's known weakness is drifting towards the calibration
text). Entries are learned in units of ``sqrt(s_i s_j)``. Clipping is learned as in LWC.

CLL (Cross-layer Learning) is the block-wise engine's ``cll_window``: the CQE+ recipes train with a window of 1
(the "two-layer-ahead" loss). Everything folds into integers and scales; the graph equals an RTN graph in kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.errors import require_int
from qcompile.learn.blockwise import BlockwiseConfig, train_blocks
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle


@dataclass
class SDEConfig(BlockwiseConfig):
    svd_band: int = 2  # off-diagonals on each side of the singular-value diagonal
    svd_corner: int = 0
    penalty: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for f in ("svd_band", "svd_corner"):
            require_int(getattr(self, f), f"sde {f}")


Config = SDEConfig


def apply(handle: ModelHandle, config: SDEConfig) -> dict:
    def make(name, module, spec):
        return LearnedWeight(module.weight, spec, scales="learned", svd_band=config.svd_band,
                             svd_corner=config.svd_corner, name=name)

    return train_blocks(handle, config, make, "sde")
