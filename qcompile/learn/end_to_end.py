"""The end-to-end learning engine: the whole quantized model in the loop, distilled from the float model.

Shared by the quantization-aware fine-tuning passes (``bisup``, ``dlqat``). Unlike the block-wise engine, the
loss is taken at the model's output, so the parameters of every layer are trained together against the error
that has accumulated through all the layers before it (BiSup's "vertical" error accumulation):

* **Teacher**: a copy of the model with each target linear's float weight restored (``handle.float_weights``,
  recorded before its first quantization, e.g. by GPTQ) and every run-time quantizer off.
* **Student**: the model itself. Each target linear gets a :class:`~qcompile.learn.weights.LearnedWeight`
  (``torch.nn.utils.parametrize``) initialised from the linear's current state: if an earlier pass quantized it
  with the same spec (GPTQ), the parametrization starts from exactly those integers and scales (its float
  weight is GPTQ's dequantized one, so rounding it on GPTQ's grid gives GPTQ's integers back); otherwise from
  RTN (min/max, or MSE-searched when ``mse_clip``). Run-time quantizers (activations, KV cache) stay on, with
  straight-through rounding.
* **Loss**: ``KL(p_teacher || p_student)`` per token, averaged, on the calibration windows (``batch_size``
  windows per AdamW step, shuffled, seeded), plus any regulariser the pass adds. ``autocast`` runs the
  forwards in bfloat16 on CUDA (rounding decisions on the weights stay float32).
* **Base weight**: by default each parametrization's base ``W`` is the linear's current weight (an earlier
  pass's dequantized one). With ``from_float`` it is the float original (``handle.float_weights``): a pass whose
  block-wise stage trained parameters on the float weights continues them here (sde's end-to-end stage, which
  loads ``handle.learned_params`` into its parametrizations, so training starts from the block-wise result).
  ``start_code_changes`` in the report counts the integer codes where that start differs from the handle's
  quantized state (0 when the hand-over is exact).
* **Penalty**: ``weight_penalty * sum ||W' - W||^2 / ||W||^2`` over every target linear (SDE's regulariser),
  added to the KL when > 0.
* **Extras**: a pass may add parameters outside the linears (BiSup's activation clipping and smoothing) as
  :class:`Extra` objects; they are installed before training and folded into the model afterwards.
* **Resume**: with ``state_dir`` the trainable state and the optimiser are saved after every epoch
  (``state_dir/<pass>/e2e_state-<digest>.pt``, one file per configuration, loaded with ``weights_only=True``); a
  run with the same configuration continues from the last finished epoch; other settings train into their own
  file beside it (``learn.epoch_state``).
* **Export**: every parametrization becomes an ordinary :class:`QuantizedWeight` on the handle; the graph is
  the same kind as an RTN graph.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from qcompile.data import CalibrationConfig
from qcompile.errors import QCompileError, require_int, require_number
from qcompile.learn import epoch_state
from qcompile.learn.blockwise import fingerprint
from qcompile.learn.capture import on_device, resolve_device
from qcompile.learn.extras import Extra
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle
from qcompile.quant.activations import runtime_quant_disabled
from qcompile.quant.grid import QuantizedWeight, QuantSpec, search_clip
from qcompile.quant.targets import WeightQuantConfig, targets


@dataclass
class EndToEndConfig(WeightQuantConfig, CalibrationConfig):
    epochs: int = 2
    batch_size: int = 4
    lr_clip: float = 1e-2
    lr_adjust: float = 1e-3  # low-rank terms
    lr_magnitude: float = 1e-3
    weight_decay: float = 0.0
    device: str | None = None
    autocast: bool = True  # bfloat16 forwards on CUDA
    # recompute each decoder layer's activations in backward instead of keeping them (transformers' gradient
    # checkpointing): less memory for about one more forward per step; the trained result is the same
    grad_checkpoint: bool = False
    tf32: bool = True
    state_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        require_int(self.epochs, "epochs")
        require_int(self.batch_size, "batch_size", minimum=1)
        for f in ("lr_clip", "lr_adjust", "lr_magnitude"):
            require_number(getattr(self, f), f)

    def learning_rates(self) -> dict[str, float]:
        return {"clip": self.lr_clip, "adjust": self.lr_adjust, "magnitude": self.lr_magnitude}


MakeParam = Callable[[str, nn.Linear, QuantSpec, QuantizedWeight | None], LearnedWeight]


def init_quantized(handle: ModelHandle, name: str, module: nn.Linear, spec: QuantSpec,
                   mse_clip: bool) -> QuantizedWeight:
    """Where a fixed grid starts: the linear's current quantized state if it has this spec, else RTN."""
    qw = handle.quant_state.get(name)
    if qw is not None and qw.spec == spec:
        return qw
    w = module.weight.detach()
    return QuantizedWeight.from_float(w, spec, search_clip(w, spec, name=name) if mse_clip else 1.0, name)


def build_teacher(handle: ModelHandle, names: list[str], device) -> nn.Module:
    """A frozen copy of the model whose target linears hold their float weights again."""
    teacher = copy.deepcopy(handle.model)
    with torch.no_grad():
        for name in names:
            if name in handle.float_weights:
                teacher.get_submodule(name).weight.copy_(handle.float_weights[name])
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


KL_CHUNK_TOKENS = 1024


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum()


class _ChunkedKL(torch.autograd.Function):
    """Mean KL(teacher || student) over the rows of [tokens, vocabulary] logits, a chunk of rows at a time in both
    directions: the gradient with respect to the student's logits is ``(softmax(s) - softmax(t)) / tokens`` per
    row, written chunk by chunk into one buffer (nothing of the forward is kept but its inputs)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk_tokens: int):
        n = student_logits.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for i in range(0, n, chunk_tokens):
            total += _kl_sum(student_logits[i : i + chunk_tokens], teacher_logits[i : i + chunk_tokens])
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.chunk_tokens = chunk_tokens
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        s, t = ctx.saved_tensors
        scale = grad_out.float() / s.shape[0]
        grad = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk_tokens):
            rows = slice(i, i + ctx.chunk_tokens)
            grad[rows] = ((F.softmax(s[rows].float(), -1) - F.softmax(t[rows].float(), -1)) * scale).to(grad.dtype)
        return grad, None, None


def set_grad_checkpointing(handle: ModelHandle, on: bool, method: str) -> None:
    """Gradient checkpointing of each decoder layer through transformers' own switch on the layer
    (``GradientCheckpointingLayer``: active in training mode), with non-reentrant ``torch.utils.checkpoint``.

    Set on the adapter's layers rather than through ``model.gradient_checkpointing_enable``, which in transformers
    5 also hooks the embedding to make its output require grad and leaves that hook behind when disabled. Refused
    where training mode would turn on dropout and so change what is trained."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = handle.model
    layers = handle.adapter.layers(model)
    if on:
        if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
            raise QCompileError(f"{method}: grad_checkpoint: {type(model).__name__}'s decoder layers do not "
                                "support gradient checkpointing")
        dropout = getattr(model.config, "attention_dropout", 0.0) or max(
            (m.p for m in model.modules() if isinstance(m, nn.Dropout)), default=0.0)
        if dropout:
            raise QCompileError(f"{method}: grad_checkpoint needs training mode, which would turn on this model's "
                                f"dropout ({dropout}); train without it")
    for layer in layers:
        if isinstance(layer, GradientCheckpointingLayer):
            layer.gradient_checkpointing = on
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            chunk_tokens: int = KL_CHUNK_TOKENS) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32, ``chunk_tokens`` tokens at a time.

    Only one chunk's float32 softmaxes are alive at once, forward and backward (:class:`_ChunkedKL`): over a whole
    batch they are several tensors of tokens x vocabulary floats each (1.6 GB apiece at 8192 tokens x 49152, the
    SmolLM2 recipes' batch).
    """
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab).detach()
    return _ChunkedKL.apply(s, t, chunk_tokens)


def train_end_to_end(
    handle: ModelHandle, config: EndToEndConfig, make_param: MakeParam, method: str, extras: list[Extra] = (),
    stages: list[tuple[int, set[str]]] | None = None, from_float: bool = False, weight_penalty: float = 0.0,
    state_key: str = "",
) -> dict:
    """Train the parametrizations ``make_param`` gives each target linear (and ``extras``) end to end.

    ``stages``: (epochs, parameter kinds trained) in order, e.g. DL-QAT's ``[(1, {"magnitude"}), (2, {...})]``;
    default: all kinds for ``config.epochs``. ``from_float``: the parametrizations' base is the float original of
    each linear (module docstring); ``weight_penalty``: SDE's regulariser's weight; ``state_key``: what else the
    saved state depends on (sde: its block-wise stage's fingerprint, since that stage is where this one starts).
    """
    config.validate(handle)
    todo = targets(handle, config)
    if not todo:
        return {"quantized_linears": 0}
    t0 = time.perf_counter()
    model = handle.model
    ids = config.load(handle.tokenizer)
    device = resolve_device(config.device, model)
    stages = stages or [(config.epochs, None)]
    total_epochs = sum(e for e, _ in stages)
    # more epochs = resume and extend; checkpointing changes memory, not the result
    key = fingerprint(handle, config, method + state_key, ignore=("epochs", "grad_checkpoint"))
    state_path = (epoch_state.state_path(Path(config.state_dir) / method, "e2e_state", key) if config.state_dir
                  else None)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    use_autocast = config.autocast and device.type == "cuda"
    params: dict[str, LearnedWeight] = {}
    modules = {name: m for name, _, m, _ in todo}
    installed: list[Extra] = []
    finished: set[str] = set()  # linears whose trained weight is set on the handle
    try:
        with on_device(model, device):
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = config.tf32
                torch.cuda.reset_peak_memory_stats(device)
            # every linear quantized so far computes in float in the teacher, trained here or not (e.g. lm_head)
            teacher = build_teacher(handle, list(handle.float_weights), device)
            start_changes, start_codes = 0, 0
            for name, _, m, spec in todo:
                init = init_quantized(handle, name, m, spec, config.mse_clip)
                if from_float and name in handle.float_weights:
                    with torch.no_grad():
                        m.weight.copy_(handle.float_weights[name].to(m.weight.device, m.weight.dtype))
                params[name] = make_param(name, m, spec, init).to(device)
                if from_float and name in handle.quant_state:
                    with torch.no_grad():
                        start = params[name].export(m.weight.detach())
                    start_changes += int((start.qweight != handle.quant_state[name].qweight).sum())
                    start_codes += start.qweight.numel()
            if start_changes:  # e.g. SVD factors recomputed on another device than the block-wise stage's
                warnings.warn(f"{method}: the start differs from the quantized model in {start_changes} of "
                              f"{start_codes} codes", stacklevel=2)
            for ex in extras:  # before the weights are parametrized: extras may parametrize norms, set hooks
                ex.install(device)
                installed.append(ex)
            for name, m in modules.items():
                parametrize.register_parametrization(m, "weight", params[name])

            kinds: dict[str, list] = {}
            lrs = dict(config.learning_rates())
            for p in params.values():
                for kind, ps in p.param_groups().items():
                    kinds.setdefault(kind, []).extend(ps)
            for ex in extras:
                for kind, ps in ex.param_groups().items():
                    kinds.setdefault(kind, []).extend(ps)
                lrs.update(ex.learning_rates())
            opt = torch.optim.AdamW([{"params": ps, "lr": lrs[k], "kind": k} for k, ps in kinds.items()],
                                    weight_decay=config.weight_decay)
            trainable = [p for ps in kinds.values() for p in ps]
            n_trained = sum(p.numel() for p in trainable)
            if config.grad_checkpoint:
                set_grad_checkpointing(handle, True, method)

            saved = epoch_state.resume(state_path, key, device, trainable, opt)
            start_epoch = 0 if saved is None else int(saved["epoch"])

            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast
                        else contextlib.nullcontext())
            batches = [ids[i : i + config.batch_size] for i in range(0, ids.shape[0], config.batch_size)]

            def losses(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                batch = batch.to(device)
                with autocast:
                    with torch.no_grad(), runtime_quant_disabled():
                        t_logits = teacher(input_ids=batch, use_cache=False).logits
                    s_logits = model(input_ids=batch, use_cache=False).logits
                kl = kl_loss(s_logits, t_logits)
                pen = sum((ex.penalty() for ex in extras), torch.zeros((), device=device))
                if weight_penalty:
                    pen = pen + weight_penalty * sum(p.penalty(modules[n].parametrizations.weight.original)
                                                     for n, p in params.items())
                return kl + pen, kl

            @torch.no_grad()
            def evaluate() -> float:
                return sum(float(losses(b)[1]) for b in batches) / len(batches)

            kl_before = evaluate()
            gen = torch.Generator().manual_seed(config.seed)
            for _ in range(start_epoch):  # the same shuffles as an uninterrupted run
                torch.randperm(len(batches), generator=gen)
            epoch_index, history = 0, []
            bar = tqdm(total=total_epochs * len(batches), desc=method, unit="step", leave=False,
                       initial=start_epoch * len(batches))
            for n_epochs, active in stages:
                for group in opt.param_groups:
                    group["lr_active"] = active is None or group["kind"] in active
                for _ in range(n_epochs):
                    epoch_index += 1
                    if epoch_index <= start_epoch:
                        continue
                    running = 0.0
                    for bi in torch.randperm(len(batches), generator=gen).tolist():
                        if config.grad_checkpoint:  # transformers checkpoints a layer only in training mode
                            model.train()  # (through backward's recompute too)
                        loss, kl = losses(batches[bi])
                        if not torch.isfinite(loss):
                            raise QCompileError(f"{method} training diverged (loss {float(loss)}); lower the learning "
                                                "rates")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        for group in opt.param_groups:  # a stage trains only some kinds
                            if not group["lr_active"]:
                                for p in group["params"]:
                                    p.grad = None
                        opt.step()
                        if config.grad_checkpoint:
                            model.eval()
                        for ex in extras:
                            ex.project()
                        running += float(kl.detach())
                        bar.update(1)
                        bar.set_postfix(kl=f"{float(kl.detach()):.4g}")
                    history.append(running / len(batches))
                    if state_path is not None:
                        epoch_state.save(state_path, key, epoch_index, trainable, opt)
            bar.close()
            kl_after = evaluate()
            exported = {}
            with torch.no_grad():
                for name, m in modules.items():
                    exported[name] = params[name].export(m.parametrizations.weight.original.detach())
            for name, m in modules.items():
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            for name, qw in exported.items():
                handle.set_quantized(name, qw)
                finished.add(name)
            extra_stats = {}
            for ex in installed:
                extra_stats.update(ex.finalize(handle))
            installed.clear()
            teacher = None  # free its memory before the stats (the closures above are done with it)
    except torch.OutOfMemoryError as e:
        teacher = None
        hint = ("set grad_checkpoint: true (sde: e2e_grad_checkpoint), " if not config.grad_checkpoint else "")
        raise QCompileError(f"{method}: out of {device.type.upper()} memory in end-to-end training "
                            f"({hint}lower batch_size, or calib_seq_len)") from e
    finally:
        for name, m in modules.items():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            if from_float and name in handle.quant_state and name not in finished:  # failed midway: the modules
                with torch.no_grad():  # compute their quantized state again, not the float originals swapped in
                    m.weight.copy_(handle.quant_state[name].dequantize().to(m.weight.device, m.weight.dtype))
        for ex in installed:
            ex.uninstall()
        if config.grad_checkpoint:
            set_grad_checkpointing(handle, False, method)
        model.eval()
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    quantized_params = sum(m.weight.numel() for m in modules.values())
    total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "method": method,
        "quantized_linears": len(todo),
        "samples": int(ids.shape[0]),
        "tokens": int(ids.numel()),
        "epochs": total_epochs,
        "trainable_params": n_trained,
        "trainable_share_of_quantized": n_trained / quantized_params,
        "trainable_share_of_model": n_trained / total_params,
        **({"start_code_changes": start_changes, "start_codes": start_codes} if from_float else {}),
        "kl_before": kl_before,
        "kl_after": kl_after,
        "kl_per_epoch": history,
        **extra_stats,
        "device": str(device),
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "wall_seconds": time.perf_counter() - t0,
    }
