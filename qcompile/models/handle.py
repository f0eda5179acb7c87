"""The model as the pipeline carries it: the torch module, its tokenizer, its family adapter, and the quantized
state the passes have produced so far."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qcompile.models.adapters import FamilyAdapter
from qcompile.quant.grid import QuantizedWeight


@dataclass
class ModelHandle:
    model: nn.Module
    tokenizer: object
    adapter: FamilyAdapter
    source: str
    source_sha256: str | None = None
    # qualified linear name -> its quantized weight; the module's float weight holds the dequantized values,
    # so running ``model`` is running the fake-quant model that the exported graph computes.
    quant_state: dict[str, QuantizedWeight] = field(default_factory=dict)
    applied_passes: list[str] = field(default_factory=list)
    # rotations the graph must apply at run time (set by the rotate pass), e.g. {"r4": {"kind": "hadamard",
    # "size": 1536, ...}}: enough to rebuild the exact matrix with qcompile.quant.hadamard.hadamard_matrix.
    online_rotations: dict = field(default_factory=dict)
    # torch hooks that make ``model`` compute those online rotations (so it stays the graph's reference)
    rotation_hooks: list = field(default_factory=list)
    # run-time quantization the graph must do (act_quant / kv_quant passes): linear name -> its input's
    # TokenQuantSpec, and the KV cache's (``KVQuantState``) or None
    act_quant: dict = field(default_factory=dict)
    kv_quant: object | None = None
    quant_hooks: list = field(default_factory=list)
    # each quantized linear's float weight from before its first quantization (CPU): the teacher of the
    # end-to-end training passes (bisup, dlqat), which may run after GPTQ has replaced the module's weights
    float_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # each linear's trained parameters (by parameter name, CPU) from a block-wise pass that keeps them for its
    # end-to-end stage (sde with ``e2e_epochs``), until that stage has run
    learned_params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def linears(self, include_lm_head: bool = False) -> list[tuple[str, str, nn.Linear]]:
        return self.adapter.linear_names(self.model, include_lm_head=include_lm_head)

    def untie_embeddings(self) -> bool:
        """Give lm_head its own weight (a copy of the embeddings). Returns True if they were tied."""
        if not self.adapter.ties_embeddings(self.model):
            return False
        head = self.adapter.lm_head(self.model)
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.model.config.tie_word_embeddings = False
        # transformers >= 5 reads this mapping when re-tying; keep it from re-linking the two tensors.
        if hasattr(self.model, "_tied_weights_keys") and isinstance(self.model._tied_weights_keys, dict):
            self.model._tied_weights_keys = {}
        return True

    def set_quantized(self, name: str, qw: QuantizedWeight) -> None:
        """Record ``qw`` for linear ``name`` and make the module compute with its dequantized weight."""
        module = self.model.get_submodule(name)
        if module is self.adapter.lm_head(self.model):
            self.untie_embeddings()
        if name not in self.float_weights:
            self.float_weights[name] = module.weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            module.weight.copy_(qw.dequantize().to(module.weight.dtype))
        self.quant_state[name] = qw
