"""What hooks a model's modules carry, to check that a pass leaves none behind."""

import torch


def module_hooks(model: torch.nn.Module) -> dict[str, tuple]:
    """The hooks on each module that has any: forward, forward-pre, backward, backward-pre, by their ids."""
    out = {}
    for name, m in model.named_modules():
        ids = tuple(tuple(d) for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                       m._backward_pre_hooks))
        if any(ids):
            out[name] = ids
    return out
