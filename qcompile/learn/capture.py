"""Run a causal LM decoder layer by layer on calibration windows.

Every calibrated pass (GPTQ now, learned rounding / scale search later) needs the same loop: the inputs of
decoder layer ``i`` for all calibration samples, a way to run the layer on them while hooks collect statistics,
and, once the pass has changed the layer, the layer's outputs as the inputs of layer ``i + 1``.

How (independent of the transformers version):

* **Capture.** A forward pre-hook (``with_kwargs=True``) on layer 0 records the hidden states and *every* other
  argument the model passes to its layers (attention mask, position ids, rotary cos/sin, cache position, ...),
  then raises to stop the forward. Replaying exactly those arguments means we never build masks or rotary
  embeddings ourselves, so the call signature of a decoder layer may change between transformers releases.
  The model runs with ``use_cache=False``; a replayed ``use_cache`` is forced to False and a cache object is
  replaced by None, so replays never grow a KV cache.
* **Mini-batches.** Samples are processed ``batch_size`` windows at a time (the last batch may be smaller). Each
  batch keeps its own kwargs; identical ones (same shapes and values, the usual case) share one stored copy, so a
  materialised ``[b, 1, L, L]`` mask is kept once, not once per batch.
* **Memory.** Hidden states live on ``cache_device`` (default: the compute device, i.e. the model's; "cpu"
  offloads them and moves each batch in just before it is used). Captured kwargs stay on the compute device.
* **Sequential scheme.** :meth:`LayerwiseRunner.layers` yields one :class:`LayerStep` per decoder layer. In the
  body the pass runs the layer (``step.run``) with its own hooks, changes weights, and when the body ends the
  runner re-runs the (now modified) layer to produce the next layer's inputs - GPTQ's scheme, where layer
  ``i + 1`` is calibrated on the outputs of the *quantized* layer ``i``. A pass that wants other inputs for the
  next layer (e.g. float outputs) calls ``step.set_outputs``.

The model is never moved here; :func:`on_device` moves it for the duration of a pass when asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from qcompile.models.handle import ModelHandle


class _StopForward(Exception):
    """Raised from a hook to end a forward early."""


def map_tensors(obj, fn):
    """Apply ``fn`` to every tensor inside nested tuples/lists/dicts; other objects are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    """Structural equality of captured arguments (tensors compared by dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and a.device == b.device and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # objects whose == is not a plain bool
        return False


def _sanitize_kwargs(kwargs: dict) -> dict:
    """Replayable kwargs: no KV cache, no cache object, ``hidden_states`` removed (passed separately)."""
    out = {}
    for k, v in kwargs.items():
        if k == "hidden_states":
            continue
        if k == "use_cache":
            v = False
        elif k in ("past_key_values", "past_key_value") or type(v).__name__.endswith("Cache"):
            v = None
        out[k] = v
    return out


def _layer_output(out) -> torch.Tensor:
    """Hidden states out of a decoder layer: a tensor (transformers 5) or the first item of a tuple (4.x)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "hidden_states"):
        return out.hidden_states
    raise TypeError(f"cannot read hidden states from a decoder layer output of type {type(out).__name__}")


@dataclass
class LayerBatch:
    """One mini-batch of a layer's inputs: ``hidden`` [b, L, d] on the cache device, plus replayed arguments."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def on_device(model: nn.Module, device: str | torch.device | None):
    """Move ``model`` to ``device`` for the ``with`` block and back afterwards (no-op if None or already there)."""
    original = next(model.parameters()).device
    target = torch.device(device) if device is not None else original
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target == original:
        yield original
        return
    model.to(target)
    try:
        yield target
    finally:
        model.to(original)


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """``device`` if given; else the model's device if it is an accelerator; else CUDA when available; else the
    model's device (CPU)."""
    if device is not None:
        return torch.device(device)
    current = next(model.parameters()).device
    if current.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return current


class LayerwiseRunner:
    """Inputs of the decoder layers of ``handle.model`` on ``input_ids`` ([n, L] token windows), layer by layer.

    The model must already be on the device it should compute on (see :func:`on_device`).
    """

    def __init__(
        self,
        handle: ModelHandle,
        input_ids: torch.Tensor,
        *,
        batch_size: int = 1,
        cache_device: str | torch.device | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1:
            raise ValueError("input_ids must be a non-empty [n, seq_len] tensor")
        self.handle = handle
        self.model = handle.model
        self.adapter = handle.adapter
        self.device = handle.device
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        self.batch_size = batch_size
        self.num_samples = int(input_ids.shape[0])
        self.seq_len = int(input_ids.shape[1])
        self.batches: list[LayerBatch] = self._capture(input_ids)
        self.layer_index = 0  # index of the layer whose inputs ``batches`` hold

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.seq_len

    # -- capture ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor) -> list[LayerBatch]:
        layer0 = self.adapter.layers(self.model)[0]
        captured: dict = {}

        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                captured["hidden"], captured["args"] = args[0], tuple(args[1:])
            else:
                captured["hidden"], captured["args"] = kwargs["hidden_states"], ()
            captured["kwargs"] = _sanitize_kwargs(kwargs)
            raise _StopForward

        pool: list[tuple] = []  # distinct (args, kwargs) seen so far; batches share identical ones
        batches = []
        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for start in range(0, input_ids.shape[0], self.batch_size):
                ids = input_ids[start : start + self.batch_size].to(self.device)
                captured.clear()
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                if "hidden" not in captured:
                    raise RuntimeError("the model's forward never reached decoder layer 0")
                args, kwargs = captured["args"], captured["kwargs"]
                for p_args, p_kwargs in pool:
                    if _same(args, p_args) and _same(kwargs, p_kwargs):
                        args, kwargs = p_args, p_kwargs
                        break
                else:
                    pool.append((args, kwargs))
                hidden = captured["hidden"].detach().to(self.cache_device)
                batches.append(LayerBatch(hidden, args, kwargs))
        finally:
            handle.remove()
        return batches

    # -- running ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        layer: nn.Module,
        *,
        keep_outputs: bool = False,
        replace_inputs: bool = False,
        stop_after: Iterable[nn.Module] | None = None,
    ) -> list[torch.Tensor] | None:
        """Run ``layer`` on every cached batch.

        ``keep_outputs``: return the outputs (on the cache device), one tensor per batch.
        ``replace_inputs``: overwrite the cached inputs with the outputs batch by batch (the next layer's inputs).
        ``stop_after``: modules of the layer; each batch's forward ends as soon as all of them have been called
        (their forward pre-hooks, including the caller's, have run; the modules themselves are skipped for the
        last one). Use it to collect the inputs of early linears without computing the rest of the layer.
        Incompatible with ``keep_outputs``/``replace_inputs``.
        """
        stops = list({id(m): m for m in (stop_after or [])}.values())
        if stops and (keep_outputs or replace_inputs):
            raise ValueError("stop_after cannot be combined with keep_outputs/replace_inputs")
        seen: set[int] = set()
        handles = []

        def make_hook(m):
            def hook(module, args):
                seen.add(id(m))
                if len(seen) == len(stops):
                    raise _StopForward

            return hook

        for m in stops:
            handles.append(m.register_forward_pre_hook(make_hook(m)))
        outputs = [] if keep_outputs else None
        try:
            for b in self.batches:
                seen.clear()
                hidden = b.hidden.to(self.device, non_blocking=True)
                try:
                    out = _layer_output(layer(hidden, *b.args, **b.kwargs))
                except _StopForward:
                    continue
                out = out.detach().to(self.cache_device)
                if keep_outputs:
                    outputs.append(out)
                if replace_inputs:
                    b.hidden = out
        finally:
            for h in handles:
                h.remove()
        return outputs

    def layers(self) -> Iterator[LayerStep]:
        """Yield a :class:`LayerStep` per decoder layer; after each step's body the cached inputs advance to the
        next layer: the step's ``set_outputs`` if called, else the outputs of the (possibly modified) layer."""
        names = {m: n for n, m in self.model.named_modules()}
        for i, layer in enumerate(self.adapter.layers(self.model)):
            self.layer_index = i
            step = LayerStep(self, i, layer, names.get(layer, f"layer{i}"))
            yield step
            if step._outputs is not None:
                for b, out in zip(self.batches, step._outputs):
                    b.hidden = out.detach().to(self.cache_device)
            else:
                self.run(layer, replace_inputs=True)
            self.layer_index = i + 1

    def hidden_states(self) -> list[torch.Tensor]:
        """The cached inputs of the current layer (after the last layer: the decoder's output before the final
        norm), one tensor per batch."""
        return [b.hidden for b in self.batches]

    @torch.no_grad()
    def final_norm_outputs(self) -> Iterator[torch.Tensor]:
        """After all layers: the final norm's output batch by batch on the compute device (what lm_head reads)."""
        if self.layer_index != len(self.adapter.layers(self.model)):
            raise RuntimeError("final_norm_outputs() needs all decoder layers to have run")
        norm = self.adapter.final_norm(self.model)
        for b in self.batches:
            yield norm(b.hidden.to(self.device))


@dataclass
class LayerStep:
    """One decoder layer inside :meth:`LayerwiseRunner.layers`."""

    runner: LayerwiseRunner
    index: int
    layer: nn.Module
    name: str
    _outputs: list[torch.Tensor] | None = None

    def run(self, *, keep_outputs: bool = False, stop_after: Iterable[nn.Module] | None = None):
        """Run this layer on all cached inputs (see :meth:`LayerwiseRunner.run`)."""
        return self.runner.run(self.layer, keep_outputs=keep_outputs, stop_after=stop_after)

    def set_outputs(self, outputs: list[torch.Tensor]) -> None:
        """Use ``outputs`` (one tensor per batch) as the next layer's inputs instead of re-running this layer."""
        if len(outputs) != len(self.runner.batches):
            raise ValueError(f"expected {len(self.runner.batches)} output batches, got {len(outputs)}")
        self._outputs = list(outputs)

    @property
    def batches(self) -> list[LayerBatch]:
        return self.runner.batches
