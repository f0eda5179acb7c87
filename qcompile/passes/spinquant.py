"""SpinQuant: learned rotations (arXiv 2405.16406), trained on calibration text and folded into the weights.

Runs after ``rotate`` (which folded a random Hadamard R1 into the residual stream and R2 into each layer's v/o,
and installed the online R3/R4) and before the quantizers. It learns, on top of what ``rotate`` folded:

* **R1'** - one orthogonal ``[hidden, hidden]`` matrix on the residual stream, identity at init;
* **R2'** - one orthogonal ``[head_dim, head_dim]`` matrix per layer on the values / o_proj input columns
  (shared by the layer's heads, as ``rotate``'s R2), identity at init; ``train_r2: false`` keeps them at I.

The model's total rotations are then ``H1 R1'`` and ``H2 R2'`` (``H`` the folded Hadamards). R3 and R4 stay the
fixed online Hadamards (SpinQuant learns only R1 and R2 too).

**Training.** The rotations act through parametrizations, so the float model is the same function at every step
(up to float rounding): readers (q/k/v, gate/up) compute with ``W R1'``, writers (o, down) with ``R1'ᵀ W`` (and
``b R1'``), v_proj's rows per KV head with ``R2'ᵀ`` (its bias with ``R2'``) and o_proj's columns per head with
``R2'``. The embedding output is multiplied by ``R1'`` and lm_head's input by ``R1'ᵀ`` instead of rotating their
``[vocab, hidden]`` weights (the same function, ``tokens x hidden²`` work instead of ``vocab x hidden²``; neither is
quantized during training). What is quantized while training, each optional (``None`` = off):

* every decoder linear's rotated weight, RTN on the ``w_bits``/``w_group_size``/``w_symmetric`` grid (min/max
  scales from the rotated weight, detached; straight-through rounding);
* every decoder linear's input, per token (or in groups of ``a_group_size``), after the online R4 on down_proj;
* keys (after RoPE and R3) and values, per token and head, through ``kv_quant``'s attention function.

Only R1' and R2' are trained (every model weight is frozen). **Loss**: ``kl`` (default): KL(float || quantized)
of the next-token distributions, the teacher being the same model with every fake quantizer off (the rotations
leave its function unchanged, so it is the float model); ``ce``: cross-entropy of the quantized model on the next
token of the calibration text (SpinQuant's loss). Calibration: WikiText-2 *validation* windows by default (the
``calib_*`` fields; never the test split), ``batch_size`` windows per step, shuffled per epoch (seeded).

**Optimiser**: Cayley SGD with momentum on the Stiefel manifold (Li, Li, Todorovic, ICLR 2020, which SpinQuant
uses): with the Euclidean gradient ``G`` and momentum ``M <- momentum M - G``, the skew-symmetric
``A = Â - Âᵀ``, ``Â = M Rᵀ - ½ R (Rᵀ M Rᵀ)``, the momentum is projected onto the tangent space (``M <- A R``) and
``R <- (I - α/2 A)⁻¹ (I + α/2 A) R`` with ``α = min(lr_t, 1 / ‖A‖₁)`` (``lr_t`` cosine-decayed over the steps
by default, as SpinQuant's runs). The Cayley transform of a skew matrix is orthogonal, and we solve it exactly in
float64 (the rotations are float64 parameters; forwards use a float32 copy), so R stays orthogonal to float64
precision: no fixed-point iteration and no periodic QR re-orthogonalisation as in the reference code.

**Fold**: the parametrizations are removed and R1', R2' folded exactly as ``rotate`` folds R1/R2 (its
``fold_residual_rotation`` / ``fold_head_rotation``, float64, cast back once). The exported graph has the same
nodes as without this pass: no run-time op is added.

What SpinQuant does differently (our readings): it trains on WikiText-2 *train* with cross-entropy (we default
to KL to the float model on validation text, ``loss: ce`` is available); it trains the full rotation from a
random Hadamard init, while we train a correction ``R'`` on top of the folded Hadamard (the same manifold, the
same function class: ``H R'`` is any orthogonal matrix); its weight quantizer during training searches a clip
ratio (``w_clip``) where we use plain min/max RTN; it runs 100 steps of 8 x 2048 tokens in bf16 with gradient
checkpointing; its Cayley step is a 5-step fixed-point iteration with a random QR retraction. Our defaults take
its lr 1.5, momentum 0 and cosine decay, over 3 epochs of the 128 x 2048 calibration windows at 4 per step (96
steps); they have not been tuned on a real model here. ``autocast`` runs our forwards in bfloat16 on CUDA
(rotated weights are computed in float32).

**Resume**: with ``state_dir`` the rotations and the optimiser are saved after every epoch
(``state_dir/spinquant/state-<digest>.pt``, one file per configuration, loaded with ``weights_only=True``); a run
with the same configuration continues after the last finished epoch and ends with the same rotations as an
uninterrupted one; other settings train into their own file beside it (``learn.epoch_state``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from qcompile.data import CalibrationConfig
from qcompile.errors import QCompileError, RecipeError, require_int, require_number
from qcompile.learn import epoch_state
from qcompile.learn.blockwise import fingerprint
from qcompile.learn.capture import on_device, resolve_device
from qcompile.learn.end_to_end import kl_loss
from qcompile.models.handle import ModelHandle
from qcompile.learn.blockwise import LR_SCHEDULES
from qcompile.passes import kv_quant, rotate
from qcompile.quant.activations import (
    TokenQuantSpec,
    fake_quantize_tokens,
    round_ste,
    runtime_quant_disabled,
    runtime_quant_enabled,
)
from qcompile.quant.grid import QuantSpec, compute_qparams

LOSSES = ("kl", "ce")


@dataclass
class SpinQuantConfig(CalibrationConfig):
    epochs: int = 3
    batch_size: int = 4
    lr: float = 1.5  # SpinQuant's; an upper bound on the Cayley step, which is also capped at 1 / ||A||_1
    momentum: float = 0.0  # SpinQuant's (its SGDG default); Li et al. use 0.9
    lr_schedule: str = "cosine"  # "cosine" (decays to 0 over all steps, as SpinQuant) or "constant"
    train_r2: bool = True
    # fake quantization while training (None = off); set them to what the recipe's quantizers do
    w_bits: int | None = 4
    w_group_size: int | None = 64
    w_symmetric: bool = False
    a_bits: int | None = 4
    a_group_size: int | None = None  # None: per token
    a_symmetric: bool = False
    kv_bits: int | None = 4
    kv_group_size: int | None = None  # None: per token and head
    kv_symmetric: bool = False
    loss: str = "kl"  # "kl" to the float model, or "ce" on the next token
    device: str | None = None
    autocast: bool = True  # bfloat16 forwards on CUDA
    tf32: bool = True
    state_dir: str | None = None
    seed: int = 0

    # --bits / --group-size / --sym set the training-time weight grid too (recipe.apply_overrides)
    WEIGHT_SHORTCUTS: ClassVar[dict] = {"bits": "w_bits", "group_size": "w_group_size", "symmetric": "w_symmetric"}

    def __post_init__(self):
        require_int(self.epochs, "spinquant epochs")
        require_int(self.batch_size, "spinquant batch_size", minimum=1)
        require_int(self.calib_samples, "spinquant calib_samples", minimum=1)
        require_int(self.calib_seq_len, "spinquant calib_seq_len", minimum=2)
        require_number(self.lr, "spinquant lr")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise RecipeError(f"spinquant momentum must be a number in [0, 1), got {self.momentum!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RecipeError(f"spinquant lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.loss not in LOSSES:
            raise RecipeError(f"spinquant loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self.weight_spec(), self.act_spec(), self.kv_spec()  # bits / group sizes refused here, with the field

    def weight_spec(self) -> QuantSpec | None:
        return None if self.w_bits is None else _spec(QuantSpec, "w", self.w_bits, self.w_symmetric, self.w_group_size)

    def act_spec(self) -> TokenQuantSpec | None:
        return None if self.a_bits is None else _spec(TokenQuantSpec, "a", self.a_bits, self.a_symmetric,
                                                      self.a_group_size)

    def kv_spec(self) -> TokenQuantSpec | None:
        return None if self.kv_bits is None else _spec(TokenQuantSpec, "kv", self.kv_bits, self.kv_symmetric,
                                                       self.kv_group_size)


def _spec(cls, prefix: str, bits, symmetric, group_size):
    try:
        return cls(bits, symmetric, group_size)
    except RecipeError as e:
        raise RecipeError(f"spinquant {prefix}_bits / {prefix}_group_size: {e}") from None


Config = SpinQuantConfig


# -- the optimiser ------------------------------------------------------------------------------------------


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum on the orthogonal group (square Stiefel manifold) through the Cayley transform.

    Parameters must be square orthogonal matrices; use float64 ones to keep them orthogonal to float64 precision
    (the step is computed in the parameter's dtype, and the Cayley transform is solved exactly).
    ``lr`` is an upper bound on the step ``α``, which is also capped at ``1 / ‖A‖₁`` (Li et al.).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, eps: float = 1e-8):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"bad CayleySGD settings lr={lr}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD trains square orthogonal matrices, got shape {tuple(p.shape)}")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                x, g = p.detach(), p.grad.to(p.dtype)
                m = group["momentum"] * state["momentum_buffer"] - g
                a_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
                a = a_hat - a_hat.T  # skew-symmetric: the step stays on the manifold
                alpha = min(group["lr"], 1.0 / (float(a.abs().sum(0).max()) + group["eps"]))
                eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
                new = torch.linalg.solve(eye - 0.5 * alpha * a, (eye + 0.5 * alpha * a) @ x)
                state["momentum_buffer"] = a @ x  # momentum projected onto the tangent space
                p.copy_(new)
        return loss


def orthogonality_error(r: torch.Tensor) -> float:
    """``max |RᵀR - I|`` in float64."""
    r = r.detach().double()
    return float((r.T @ r - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().max())


# -- the parametrizations --------------------------------------------------------------------------------------


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """RTN on ``spec``'s grid with min/max scales (detached) and straight-through rounding."""
    scale, zero = compute_qparams(w, spec, 1.0, name)
    out_f, in_f = w.shape
    wg = w.reshape(out_f, scale.shape[1], -1)
    q = round_ste(wg / scale.unsqueeze(-1))
    if zero is not None:
        q = (q + zero.unsqueeze(-1)).clamp(spec.qmin, spec.qmax) - zero.unsqueeze(-1)
    else:
        q = q.clamp(spec.qmin, spec.qmax)
    return (q * scale.unsqueeze(-1)).reshape(out_f, in_f)


class RotatedWeight(nn.Module):
    """A decoder linear's weight with the learned rotations applied, fake-quantized when ``spec`` is given:
    ``side`` "in" (residual reader): ``W R1``; "out" (writer): ``R1ᵀ W``; ``heads`` "v": each KV head's rows
    ``R2ᵀ W_j``; "o": each head's columns ``W_h R2``. Computed in float32 outside autocast."""

    def __init__(self, r1: nn.Parameter, side: str, r2: nn.Parameter | None = None, heads: str | None = None,
                 n_heads: int = 0, head_dim: int = 0, spec: QuantSpec | None = None, name: str = "weight"):
        super().__init__()
        self.r1, self.side, self.r2, self.heads = r1, side, r2, heads
        self.n_heads, self.head_dim, self.spec, self.name = n_heads, head_dim, spec, name

    def rotate(self, w: torch.Tensor) -> torch.Tensor:
        x = w.float()
        r1 = self.r1.float()
        x = x @ r1 if self.side == "in" else r1.T @ x
        if self.r2 is not None:
            r2 = self.r2.float()
            if self.heads == "v":
                x = torch.einsum("de,kdi->kei", r2, x.view(self.n_heads, self.head_dim, -1)).reshape(x.shape)
            else:
                x = (x.view(x.shape[0], self.n_heads, self.head_dim) @ r2).reshape(x.shape)
        return x

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with _no_autocast(w.device):
            x = self.rotate(w)
            if self.spec is not None and runtime_quant_enabled():
                x = fake_quantize_weight(x, self.spec, self.name)
        return x.to(w.dtype)


class RotatedBias(nn.Module):
    """A bias on the rotated side: a writer's ``b R1`` (``r`` = R1), or v_proj's per-head ``b_j R2``."""

    def __init__(self, r: nn.Parameter, n_heads: int = 1):
        super().__init__()
        self.r, self.n_heads = r, n_heads

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        with _no_autocast(b.device):
            r = self.r.float()
            return (b.float().view(self.n_heads, -1) @ r).reshape(b.shape).to(b.dtype)


class _Installed:
    """Everything the training installs on the model, removable in one call (also after an error)."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self.parametrized: list[tuple[nn.Module, str]] = []
        self.hooks: list = []
        self.kv_previous: str | None = None

    def parametrize(self, module: nn.Module, tensor: str, p: nn.Module) -> None:
        parametrize.register_parametrization(module, tensor, p)
        self.parametrized.append((module, tensor))

    def remove(self) -> None:
        for module, tensor in reversed(self.parametrized):
            if parametrize.is_parametrized(module, tensor):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
        self.parametrized.clear()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        if self.kv_previous is not None:
            kv_quant.uninstall(self.handle, self.kv_previous)
            self.kv_previous = None


def _act_hook(spec: TokenQuantSpec, name: str):
    def fn(module, args):
        return (fake_quantize_tokens(args[0], spec, f"input of {name}"), *args[1:])

    return fn


def _install(handle: ModelHandle, r1: nn.Parameter, r2s: list[nn.Parameter | None], config: SpinQuantConfig,
             device: torch.device) -> _Installed:
    ad, model = handle.adapter, handle.model
    geo = ad.geometry(model)
    names = {m: n for n, m in model.named_modules()}
    wspec, aspec, kvspec = config.weight_spec(), config.act_spec(), config.kv_spec()
    inst = _Installed(handle)
    try:
        for layer, r2 in zip(ad.layers(model), r2s):
            for role in ("q", "k", "v", "gate", "up", "o", "down"):
                lin = ad.linear(layer, role)
                side = "out" if role in ("o", "down") else "in"
                heads = role if (r2 is not None and role in ("v", "o")) else None
                n_heads = geo.num_kv_heads if role == "v" else geo.num_heads
                inst.parametrize(lin, "weight", RotatedWeight(r1, side, r2 if heads else None, heads, n_heads,
                                                              geo.head_dim, wspec, names[lin]))
                if lin.bias is not None and side == "out":
                    inst.parametrize(lin, "bias", RotatedBias(r1))
                elif lin.bias is not None and heads == "v":
                    inst.parametrize(lin, "bias", RotatedBias(r2, geo.num_kv_heads))
                if aspec is not None:
                    inst.hooks.append(lin.register_forward_pre_hook(_act_hook(aspec, names[lin])))

        def embed_out(module, args, out):  # E R1: the stream starts rotated
            with _no_autocast(out.device):
                return (out.float() @ r1.float()).to(out.dtype)

        def head_in(module, args):  # lm_head's W R1 on its (rotated) input: x R1ᵀ then W
            x = args[0]
            with _no_autocast(x.device):
                return ((x.float() @ r1.float().T).to(x.dtype), *args[1:])

        inst.hooks.append(ad.embed(model).register_forward_hook(embed_out))
        inst.hooks.append(ad.lm_head(model).register_forward_pre_hook(head_in))
        if kvspec is not None:
            r3 = rotate.qk_rotation_matrix(handle)
            state = kv_quant.KVQuantState(kvspec, 0, None if r3 is None else r3.to(torch.float32))
            inst.kv_previous = kv_quant.install(handle, state)
    except BaseException:
        inst.remove()
        raise
    return inst


# -- the pass -----------------------------------------------------------------------------------------------


def _check_preconditions(handle: ModelHandle, config: SpinQuantConfig) -> None:
    ad, model = handle.adapter, handle.model
    if "rotate" not in handle.applied_passes:
        raise RecipeError("spinquant learns rotations on top of rotate's: put a rotate pass (with r1) before it")
    if config.train_r2 and "ro" in handle.online_rotations:
        # a learned R2' folds into o_proj's per-head input columns, which the online Hadamard already mixed
        raise RecipeError("spinquant train_r2 cannot follow rotate's online_o; set spinquant.train_r2: false or "
                          "rotate.online_o: false")
    if handle.quant_state or handle.act_quant or handle.kv_quant is not None:
        raise RecipeError("spinquant must run before every quantization pass (rtn/gptq/learned, act_quant, "
                          "kv_quant): it changes every weight and the inputs they see")
    if not all(torch.all(n.weight == 1) for n in ad.residual_norms(model)) or ad.ties_embeddings(model):
        raise RecipeError("spinquant needs every residual RMSNorm scale folded and lm_head untied: rotate does both "
                          "when r1 is set (or run canonicalize with fuse_norms and untie_embeddings before it)")
    geo = ad.geometry(model)
    wspec, aspec, kvspec = config.weight_spec(), config.act_spec(), config.kv_spec()
    for name, _, m in handle.linears():
        if wspec is not None:
            wspec.groups(m.in_features, name)
        if aspec is not None:
            aspec.group(m.in_features, f"spinquant: input of {name}")
    if kvspec is not None:
        kvspec.group(geo.head_dim, "spinquant: KV cache (head_dim)")


def _describe(spec) -> str | None:
    return None if spec is None else spec.describe()


def apply(handle: ModelHandle, config: SpinQuantConfig) -> dict:
    _check_preconditions(handle, config)
    t0 = time.perf_counter()
    ad, model = handle.adapter, handle.model
    geo = ad.geometry(model)
    n_layers, hidden = len(ad.layers(model)), model.config.hidden_size
    ids = config.load(handle.tokenizer)
    device = resolve_device(config.device, model)
    key = fingerprint(handle, config, "spinquant")
    state_path = (epoch_state.state_path(Path(config.state_dir) / "spinquant", "state", key) if config.state_dir
                  else None)
    use_autocast = config.autocast and device.type == "cuda"
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    inst = None
    try:
        with on_device(model, device):
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = config.tf32
                torch.cuda.reset_peak_memory_stats(device)
            r1 = nn.Parameter(torch.eye(hidden, dtype=torch.float64, device=device))
            r2s = [nn.Parameter(torch.eye(geo.head_dim, dtype=torch.float64, device=device)) if config.train_r2
                   else None for _ in range(n_layers)]
            trainable = [r1] + [r for r in r2s if r is not None]
            opt = CayleySGD(trainable, lr=config.lr, momentum=config.momentum)
            start_epoch, history = 0, []
            saved = epoch_state.resume(state_path, key, device, trainable, opt)
            if saved is not None:
                start_epoch, history = int(saved["epoch"]), list(saved["history"])

            inst = _install(handle, r1, r2s, config, device)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
            batches = [ids[i : i + config.batch_size] for i in range(0, ids.shape[0], config.batch_size)]

            def batch_loss(batch: torch.Tensor) -> torch.Tensor:
                batch = batch.to(device)
                with autocast:
                    if config.loss == "kl":
                        with torch.no_grad(), runtime_quant_disabled():
                            t_logits = model(input_ids=batch, use_cache=False).logits
                    s_logits = model(input_ids=batch, use_cache=False).logits
                if config.loss == "kl":
                    return kl_loss(s_logits, t_logits)
                return F.cross_entropy(s_logits[:, :-1].float().reshape(-1, s_logits.shape[-1]),
                                       batch[:, 1:].reshape(-1))

            @torch.no_grad()
            def evaluate() -> float:
                return sum(float(batch_loss(b)) for b in batches) / len(batches)

            loss_before = evaluate()
            gen = torch.Generator().manual_seed(config.seed)
            for _ in range(start_epoch):  # the same shuffles as an uninterrupted run
                torch.randperm(len(batches), generator=gen)
            total = config.epochs * len(batches)
            step = start_epoch * len(batches)
            bar = tqdm(total=total, desc="spinquant", unit="step", leave=False, initial=step)
            for epoch in range(start_epoch, config.epochs):
                running = 0.0
                for bi in torch.randperm(len(batches), generator=gen).tolist():
                    lr = config.lr * (0.5 * (1 + math.cos(math.pi * step / total))
                                      if config.lr_schedule == "cosine" else 1.0)
                    for group in opt.param_groups:
                        group["lr"] = max(lr, 1e-12)
                    loss = batch_loss(batches[bi])
                    if not torch.isfinite(loss):
                        raise QCompileError(f"spinquant training diverged (loss {float(loss)}); lower lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    running += float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
                history.append(running / len(batches))
                if state_path is not None:
                    epoch_state.save(state_path, key, epoch + 1, trainable, opt, history=history)
            bar.close()
            loss_after = evaluate()
            inst.remove()
            inst = None
            with torch.no_grad():
                rotate.fold_residual_rotation(handle, r1.detach())
                for layer, r2 in zip(ad.layers(model), r2s):
                    if r2 is not None:
                        rotate.fold_head_rotation(handle, layer, r2.detach())
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    finally:
        if inst is not None:
            inst.remove()
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    eye = torch.eye(hidden, dtype=torch.float64)
    r2_errors = [orthogonality_error(r) for r in r2s if r is not None]
    return {
        "loss": config.loss,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "loss_per_epoch": history,
        "epochs": config.epochs,
        "steps": config.epochs * len(batches),
        "samples": int(ids.shape[0]),
        "tokens": int(ids.numel()),
        "trained": ["r1"] + (["r2"] if config.train_r2 else []),
        "trainable_params": sum(p.numel() for p in trainable),
        "r1_orthogonality_error": orthogonality_error(r1),
        "r2_orthogonality_error": max(r2_errors) if r2_errors else None,
        "r1_change": float((r1.detach().double().cpu() - eye).norm() / eye.norm()),
        "fake_quant": {"weights": _describe(config.weight_spec()), "activations": _describe(config.act_spec()),
                       "kv_cache": _describe(config.kv_spec())},
        "device": str(device),
        "peak_gpu_memory_gb": peak,
        "wall_seconds": time.perf_counter() - t0,
    }
