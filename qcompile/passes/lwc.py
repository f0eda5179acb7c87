"""LWC: learned weight clipping per group (OmniQuant, arXiv 2308.13137), trained block by block.

Each group's clipping range is ``[sigmoid(b) min(W), sigmoid(a) max(W)]`` with ``a``, ``b`` learned (init 4,
OmniQuant's); scale and zero point follow from it as in RTN. Trained with the block-wise engine
(:mod:`qcompile.learn.blockwise`, which also offers CLL through ``cll_window``). The baseline of the CQE+
ablation: LSI and SDE add singular-value adjustments on top of exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.learn.blockwise import BlockwiseConfig, train_blocks
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle


@dataclass
class LWCConfig(BlockwiseConfig):
    pass


Config = LWCConfig


def apply(handle: ModelHandle, config: LWCConfig) -> dict:
    def make(name, module, spec):
        return LearnedWeight(module.weight, spec, scales="learned", name=name)

    return train_blocks(handle, config, make, "lwc")
