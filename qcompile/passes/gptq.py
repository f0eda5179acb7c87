"""GPTQ: second-order weight rounding with error feedback (Frantar et al. 2022, arXiv 2210.17323).

For each linear ``W`` [out, in] with calibration inputs ``X`` [in, n], GPTQ minimises ``||(W - Q) X||^2`` column
by column: it rounds column ``j`` to the grid and spreads the rounding error over the not-yet-quantized columns
through the inverse Hessian ``H^-1``, ``H = 2 X X^T / n``. What this module does, following the reference
implementation (github.com/IST-DASLab/gptq) unless said otherwise:

* **Hessians.** Accumulated in float32 by forward pre-hooks on the target linears while the *float* layer runs on
  all calibration samples; ``H = 2/n * sum x x^T`` over all tokens (model weights may be fp16/bf16; inputs are
  cast). Linears reading the same tensor (q/k/v, gate/up) share one accumulator.
* **Sequential scheme.** Layers are processed in order with :class:`qcompile.learn.LayerwiseRunner`; layer
  ``i + 1`` is calibrated on the outputs of the already *quantized* layer ``i``. With ``true_sequential`` the
  linears of a layer are quantized in four steps - q/k/v, then o, then gate/up, then down - and each step's
  Hessians are collected with the earlier steps already quantized (so o sees the quantized attention, down the
  quantized gate/up). Without it all seven Hessians come from one run of the float layer. Each collection run
  stops as soon as the last linear of the step has seen its input.
* **Numerics.** Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and a zero weight column; dampening adds
  ``damp * mean(diag(H))`` to the diagonal (raised tenfold, up to 4 times, if the Cholesky factorisation still
  fails; the stats list such linears); ``U = chol(H^-1)^T`` (upper); lazy batch updates in blocks of
  ``block_size`` columns; rounding error ``(w - q) / U_jj`` fed back with row ``j`` of ``U``.
* **Groups.** Groups run along the input dimension (``grid.py``). Without ``act_order`` a group's scale/zero is
  computed from the *error-updated* weights when GPTQ reaches the group's first column. Departure from the
  reference: the reference reads the group from the block-lagged matrix, which for groups smaller than the
  block misses the updates of earlier columns in the same block; here the block size is aligned to the groups
  (rounded down to a multiple of the group size, or to a divisor of it when groups are larger than blocks) so
  a group's parameters always see every update made so far.
* **act_order.** Columns are processed in decreasing ``diag(H)`` order, with *static groups*: every group's
  scale/zero is computed up front from the original (dead-zeroed) weight in natural column order, so the stored
  tensor keeps plain contiguous groups along the input dimension and needs no ``g_idx`` (the ONNX graph has
  none). The quantized integers are permuted back to natural order.
* **mse_clip.** Per-group clip ratios from :func:`qcompile.quant.grid.search_clip` (norm 2.4, the reference's
  ``mse=True`` search). With static groups (act_order, per-channel) the search runs on the original weight, like
  the scales. With groups computed on the fly, ``mse_clip_source`` chooses: "updated" (default, the reference's
  behaviour) searches each group's ratio on the error-updated weights its scale is computed from; "original"
  searches all ratios up front on the original weight and applies them to the updated weights. Measured on
  SmolLM2-135M, W3 asym g64, 16x512 calibration tokens: "updated" gave WikiText-2 ppl 38.2 and mean relative
  layer error 0.0104, "original" 42.2 and 0.0107.
* **Exactness.** The integers, scales and zeros are stored as a :class:`QuantizedWeight` whose ``dequantize()``
  equals, bit for bit, the weight GPTQ computed with (checked for every linear); ``handle.set_quantized`` puts
  it into the module, so later layers are calibrated against exactly what the exported graph computes.
* **lm_head.** Supported (when ``quantize_lm_head``): after the last layer, the final norm's output on the
  calibration samples gives its Hessian; it is quantized last with ``lm_head_spec()``. A tied lm_head is untied
  first (``set_quantized`` does it), so the embeddings stay float.
* **Device.** ``device`` None = the model's device if it is an accelerator, else CUDA when available, else CPU.
  The model is moved there for the pass and moved back afterwards; calibration activations stay on that device
  unless ``offload_activations`` (then on CPU, each mini-batch of ``batch_size`` windows moved in when used).
* **Stats.** Per linear the relative output error ``||(W - Q) X||^2 / ||W X||^2`` on its calibration inputs,
  computed exactly from its Hessian as ``tr(dW H dW^T) / tr(W H W^T)`` (no extra forward); the pass returns
  their mean, the worst, per-role means, all of them, the samples/tokens used and the wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qcompile.data import CalibrationConfig
from qcompile.errors import RecipeError, require_int
from qcompile.learn.capture import LayerwiseRunner, on_device, resolve_device
from qcompile.models.adapters import LINEAR_ROLES
from qcompile.models.handle import ModelHandle
from qcompile.quant.grid import QuantizedWeight, QuantSpec, compute_qparams, dequantize, search_clip
from qcompile.quant.targets import WeightQuantConfig, targets

# true-sequential order inside one decoder layer: each step is calibrated with the earlier steps quantized
SEQUENTIAL_STEPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
MAX_DAMP_RETRIES = 4


@dataclass
class GPTQConfig(WeightQuantConfig, CalibrationConfig):
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    block_size: int = 128  # lazy-batch block (aligned to the group size, see the module docstring)
    act_order: bool = False  # decreasing diag(H) order, static groups
    true_sequential: bool = True
    device: str | None = None  # None: model's accelerator, else CUDA if available, else CPU
    batch_size: int = 1  # calibration windows per forward
    offload_activations: bool = False  # keep cached layer inputs on CPU
    mse_clip_source: str = "updated"  # with mse_clip and dynamic groups: "updated" or "original" weights
    refit_scales: bool = False  # after rounding, least-squares scales for the chosen integers (see refit_scales)

    def __post_init__(self):
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise RecipeError(f"gptq damp must be a number in (0, 1), got {self.damp!r}")
        for field_name in ("block_size", "batch_size"):
            require_int(getattr(self, field_name), f"gptq {field_name}", minimum=1)
        if self.mse_clip_source not in ("updated", "original"):
            raise RecipeError(f"gptq mse_clip_source must be 'updated' or 'original', got {self.mse_clip_source!r}")


Config = GPTQConfig


# -- Hessians ------------------------------------------------------------------------------------------------
class HessianAccumulator:
    """``H = 2/n * sum_t x_t x_t^T`` over every token ``x_t`` a linear reads, in float32."""

    def __init__(self, columns: int, device: torch.device | str):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def hook(self):
        """A forward pre-hook that feeds the module's input to this accumulator."""

        def fn(module, args):
            self.add(args[0])

        return fn

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration input reached this linear")
        return self.sum * (2.0 / self.tokens)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W_hat) X||^2 / ||W X||^2`` for ``hessian`` proportional to ``X X^T``."""
    w = w.detach().to(hessian.device, torch.float32)
    dw = w - w_hat.detach().to(hessian.device, torch.float32)
    num = ((dw @ hessian) * dw).sum(dtype=torch.float64)
    den = ((w @ hessian) * w).sum(dtype=torch.float64)
    return float(num / den) if den > 0 else float(num > 0)


# -- the algorithm on one weight ----------------------------------------------------------------------------
@dataclass
class GPTQResult:
    qweight: QuantizedWeight  # on CPU, what export writes
    dequantized: torch.Tensor  # float32 [out, in] on the compute device: the weight GPTQ rounded to
    rel_error: float
    damp: float  # dampening actually used (fraction of mean diag)


def _aligned_block_size(block_size: int, group_size: int, columns: int, static_groups: bool) -> int:
    """A block size whose boundaries include every group boundary (see the module docstring)."""
    if static_groups or group_size >= columns:
        return block_size
    if group_size <= block_size:
        return block_size // group_size * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp*mean(diag H) I)^-1``, dampening more if H is not positive definite."""
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(MAX_DAMP_RETRIES + 1):
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp
        if attempt < MAX_DAMP_RETRIES:
            damp *= 10
    raise RuntimeError(f"the Hessian is not positive definite even with dampening {damp}")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse_clip: bool = False,
    clip_source: str = "updated",
    refit: bool = False,
    name: str = "weight",
) -> GPTQResult:
    """GPTQ on one ``[out, in]`` weight given its ``[in, in]`` Hessian; computes on the Hessian's device.

    ``clip_source`` (with ``mse_clip``, groups computed on the fly): search each group's clip ratio on the
    "updated" weights when the group's parameters are computed (the reference's ``mse=True``), or on the
    "original" weight up front. Static groups always use the original weight.
    """
    if clip_source not in ("original", "updated"):
        raise ValueError(f"clip_source must be 'original' or 'updated', got {clip_source!r}")
    device = hessian.device
    w_orig = weight.detach().to(device, torch.float32)
    w = w_orig.clone()
    h = hessian.detach().to(device, torch.float32).clone()
    rows, columns = w.shape
    ngroups = spec.groups(columns, name)
    gsize = columns // ngroups

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static = act_order or ngroups == 1
    clip = search_clip(w, spec, name=name) if mse_clip and (static or clip_source == "original") else None
    clip_each_group = mse_clip and clip is None
    if static:
        scale, zero = compute_qparams(w, spec, 1.0 if clip is None else clip, name)
    else:
        scale = torch.zeros(rows, ngroups, dtype=torch.float32, device=device)
        zero = None if spec.symmetric else torch.zeros_like(scale)
    group_spec = QuantSpec(spec.bits, spec.symmetric, gsize)

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        group_of = (perm // gsize).tolist()  # group (natural order) of the j-th processed column
    else:
        perm = None
        group_of = [j // gsize for j in range(columns)]

    u, damp_used = _inverse_hessian_factor(h, damp)
    del h
    bsize = _aligned_block_size(block_size, gsize, columns, static)
    q_float = torch.zeros_like(w)
    q_int = torch.zeros_like(w)
    qmin, qmax = spec.qmin, spec.qmax

    for i1 in range(0, columns, bsize):
        i2 = min(i1 + bsize, columns)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            g = group_of[j]
            if not static and j % gsize == 0:
                # first column of a group: parameters from the weights as updated so far
                if i + gsize <= count:
                    src = w1[:, i : i + gsize]
                else:  # groups larger than blocks start at a block start, where w is fully updated
                    assert i == 0
                    src = w[:, j : j + gsize]
                if clip_each_group:
                    gclip = search_clip(src, group_spec, name=name)
                else:
                    gclip = 1.0 if clip is None else clip[:, g : g + 1]
                s, z = compute_qparams(src, group_spec, gclip, name)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            col = w1[:, i]
            s = scale[:, g]
            q = torch.round(col / s)
            if zero is not None:
                z = zero[:, g]
                q = (q + z).clamp_(qmin, qmax)
                dq = (q - z) * s  # exactly grid.dequantize
            else:
                q = q.clamp_(qmin, qmax)
                dq = q * s
            q_int[:, j] = q
            q_float[:, j] = dq
            e = (col - dq) / u1[i, i]
            w1[:, i:].sub_(e.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])

    if perm is not None:
        inv = torch.argsort(perm)
        q_float, q_int = q_float[:, inv], q_int[:, inv]
    if refit:
        scale = refit_scales(w_orig, q_int, scale, zero, hessian.to(device, torch.float32))
        q_float = dequantize(q_int, scale, zero)
    qw = QuantizedWeight(q_int.to(torch.int16), scale, zero, spec)
    if not torch.equal(qw.dequantize(), q_float.cpu()):  # would mean the stored grid differs from GPTQ's
        raise RuntimeError(f"GPTQ internal error: the stored quantized weight of {name} does not reproduce it")
    return GPTQResult(qw, q_float, relative_error(w_orig, q_float, hessian.to(device, torch.float32)), damp_used)


@torch.no_grad()
def refit_scales(
    weight: torch.Tensor, qint: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, hessian: torch.Tensor,
    ridge: float = 1e-6, chunk_rows: int = 4096,
) -> torch.Tensor:
    """Per-row least-squares group scales for fixed integers: ``min_s ||(W - s * (q - z)) X||^2``.

    With the integers (and integer zero points) fixed, the layer output error is a quadratic in the row's group
    scales, ``s^T M s - 2 b^T s + c`` with ``M[g, g'] = c_g H[g, g'] c_g'^T`` and ``b[g] = c_g H[g, :] w^T``
    (``c_g`` = the row's codes ``q - z`` in group ``g``), solved exactly per row. GPTQ chose the integers with
    scales fixed before the error feedback; re-solving the scales with the full Hessian (cross-group terms
    included) can only lower the calibration error. A row keeps its old scales where the solve is not finite,
    gives a non-positive scale, or does not lower the error. Returns float32 ``[out, groups]`` on the Hessian's device.
    """
    rows, columns = weight.shape
    ng = scale.shape[1]
    gs = columns // ng
    h = hessian.float()
    hg = h.reshape(ng, gs, columns)
    out = scale.to(h.device, torch.float32).clone()
    for r0 in range(0, rows, chunk_rows):  # bounded memory for wide layers (lm_head)
        r1 = min(r0 + chunk_rows, rows)
        w = weight[r0:r1].to(h.device, torch.float32)
        codes = qint[r0:r1].to(h.device, torch.float32)
        if zero is not None:
            codes = codes - zero[r0:r1].to(h.device, torch.float32).repeat_interleave(gs, dim=1)
        cg = codes.reshape(r1 - r0, ng, gs)
        partial = torch.einsum("rgi,gij->rgj", cg, hg)  # partial[r, g, j] = sum_{i in g} codes[r, i] H[i, j]
        m = torch.einsum("rgkj,rkj->rgk", partial.reshape(r1 - r0, ng, ng, gs), cg)
        b = torch.einsum("rgj,rj->rg", partial, w)
        del partial
        diag_mean = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
        m = m + (ridge * diag_mean)[:, None, None] * torch.eye(ng, device=m.device)
        new = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1)
        old = out[r0:r1]

        def loss(s):  # the quadratic without its constant term
            return torch.einsum("rg,rgk,rk->r", s, m, s) - 2 * (b * s).sum(-1)

        ok = torch.isfinite(new).all(-1) & (new > 0).all(-1) & (loss(new) < loss(old))
        out[r0:r1] = torch.where(ok.unsqueeze(-1), new, old)
    return out


# -- the pass -----------------------------------------------------------------------------------------------
class HessianCollector:
    """Forward pre-hooks accumulating the Hessian of each of ``modules``; linears that read the very same input
    tensor (q/k/v, gate/up) share one accumulator, so each ``X X^T`` is computed once."""

    def __init__(self, modules: list[nn.Module], device):
        self.device = device
        self.modules = modules
        self.accs: dict[int, HessianAccumulator] = {}
        self._owner: dict[int, int] = {}  # module id -> id of the module whose accumulator it uses
        self._last_input: dict[int, torch.Tensor] = {}
        self._handles = []

    def _hook(self, module: nn.Module):
        mid = id(module)

        def fn(mod, args):
            x = args[0]
            if mid not in self._owner:  # first call: share with a module that read this same tensor
                owner = next((o for o, t in self._last_input.items() if t is x), None)
                if owner is None:
                    self.accs[mid] = HessianAccumulator(module.in_features, self.device)
                    self._owner[mid] = mid
                else:
                    self._owner[mid] = self._owner[owner]
            owner = self._owner[mid]
            if owner == mid:
                self.accs[mid].add(x)
            elif self._last_input.get(owner) is not x:
                raise RuntimeError("linears that shared an input on the first batch no longer do")
            self._last_input[mid] = x

        return fn

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(m)) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for hd in self._handles:
            hd.remove()
        self._last_input.clear()

    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return self.accs[self._owner[id(module)]]


def apply(handle: ModelHandle, config: GPTQConfig) -> dict:
    config.validate(handle)  # a group size that cannot divide a target fails before any work
    todo = targets(handle, config)
    if not todo:
        return {"quantized_linears": 0}
    t0 = time.perf_counter()
    wanted = {id(module): (name, role, spec) for name, role, module, spec in todo}
    ids = config.load(handle.tokenizer)
    device = resolve_device(config.device, handle.model)
    ad, model = handle.adapter, handle.model
    errors: dict[str, float] = {}
    damp_raised: list[str] = []

    def quantize(module: nn.Module, acc: HessianAccumulator) -> None:
        name, _, spec = wanted[id(module)]
        res = gptq_quantize(
            module.weight, acc.hessian(), spec, damp=config.damp, block_size=config.block_size,
            act_order=config.act_order, mse_clip=config.mse_clip, clip_source=config.mse_clip_source,
            refit=config.refit_scales, name=name,
        )
        handle.set_quantized(name, res.qweight)
        errors[name] = res.rel_error
        if res.damp != config.damp:
            damp_raised.append(name)

    steps = SEQUENTIAL_STEPS if config.true_sequential else (LINEAR_ROLES,)
    with on_device(model, device):
        runner = LayerwiseRunner(
            handle, ids, batch_size=config.batch_size, cache_device="cpu" if config.offload_activations else None
        )
        bar = tqdm(runner.layers(), total=len(ad.layers(model)), desc="gptq", unit="layer", leave=False)
        for step in bar:
            for roles in steps:
                mods = [m for m in (ad.linear(step.layer, r) for r in roles) if id(m) in wanted]
                if not mods:
                    continue
                with HessianCollector(mods, device) as collector:
                    step.run(stop_after=mods)
                for m in mods:
                    quantize(m, collector.accumulator(m))
                del collector
            bar.set_postfix(rel_err_sum=f"{sum(errors.values()):.4g}")
        head = ad.lm_head(model)
        if id(head) in wanted:
            acc = HessianAccumulator(head.in_features, device)
            for x in runner.final_norm_outputs():
                acc.add(x)
            quantize(head, acc)

    samples, tokens = runner.num_samples, runner.num_tokens
    del runner  # cached activations
    by_role: dict[str, list[float]] = {}
    for name, role, _, _ in todo:
        by_role.setdefault(role, []).append(errors[name])
    worst = max(errors, key=errors.get)
    return {
        "quantized_linears": len(errors),
        "samples": samples,
        "tokens": tokens,
        "mean_rel_error": sum(errors.values()) / len(errors),
        "max_rel_error": {"linear": worst, "value": errors[worst]},
        "rel_error_by_role": {r: sum(v) / len(v) for r, v in by_role.items()},
        "rel_errors": errors,
        "damp_raised": damp_raised,
        "device": str(device),
        "wall_seconds": time.perf_counter() - t0,
    }
