"""LSI: Learnable Singular-value Increment (CQE, arXiv 2406.16299), trained block by block.

``W = U diag(s) V^T`` once (float64 SVD); the block-wise engine learns an increment of the singular values
(zero at init) together with LWC's clipping, and rounds ``U diag(s + ds) V^T`` with the learned clipping. With
group-wise scales a diagonal increment alone is weak, so the paper adds a small dense learnable block over the
largest singular values: ``svd_corner`` (0 = diagonal only).

Readings of what the paper leaves open (see :mod:`qcompile.learn.weights`): increments are learned in units of
the singular value they change (``ds_i = s_i d_i``), so one learning rate suits every layer; LSI is trained with
LWC but without OmniQuant's LET (equivalent transformations), which our exported graph has no place for in a
weight-only recipe. Everything folds into the integers and scales: the graph equals an RTN graph in kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.learn.blockwise import BlockwiseConfig, train_blocks
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle


@dataclass
class LSIConfig(BlockwiseConfig):
    svd_corner: int = 0  # width of the dense block over the largest singular values (paper: 100-600 at 7B)


Config = LSIConfig


def apply(handle: ModelHandle, config: LSIConfig) -> dict:
    def make(name, module, spec):
        return LearnedWeight(module.weight, spec, scales="learned", svd_band=0, svd_corner=config.svd_corner,
                             name=name)

    return train_blocks(handle, config, make, "lsi")
