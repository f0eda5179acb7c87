"""Rotate: QuaRot/SpinQuant rotations folded into the weights (R1, R2) or recorded for the graph (R3, R4).

Rotations leave the float model's function unchanged and spread outlier channels over all channels, so the
weights (and, later, activations and the KV cache) quantize with less error. Weights are rows ``W [out, in]``,
activations row vectors, ``y = x Wᵀ + b``. All folding is done in float64 and cast back once.

* **R1** (residual stream, ``Q`` orthogonal ``[hidden, hidden]``): the stream ``h`` becomes ``h Q``. Embeddings
  ``E <- E Q``; linears reading the stream (q/k/v, gate/up, lm_head) ``W <- W Q``, because
  ``RMSNorm(h Q) = RMSNorm(h) Q`` (an orthogonal Q keeps ``‖h‖``) and ``RMSNorm(h) Q (W Q)ᵀ = RMSNorm(h) Wᵀ``;
  linears writing it (o_proj, down_proj) ``W <- Qᵀ W`` and ``b <- b Q``, so their output is ``(x Wᵀ + b) Q``.
  This holds only for an RMSNorm without a scale, so the pass first folds every residual norm scale into its
  readers (canonicalize's folding) and unties lm_head from the embeddings, then checks every scale is 1.
  ``r1: hadamard`` (default) is ``H diag(±1)`` with seeded signs; ``orthogonal`` a seeded Haar-random matrix
  (any hidden size: the way out when the hidden size has no Hadamard construction).
* **R2** (per head, ``H [head_dim, head_dim]``, one seeded matrix per layer shared by all its heads): each KV
  head's values ``v_j <- v_j H``, i.e. ``W_v,j <- Hᵀ W_v,j`` and ``b_v,j <- b_v,j H``; attention output head h
  (a mix of values of KV head ``h // (heads / kv_heads)``) is then ``o_h H``, undone by ``W_o[:, h] <- W_o[:, h] H``
  since ``o_h H (W_o,h H)ᵀ = o_h W_o,hᵀ``. Queries and keys are untouched, so RoPE and Qwen3's q/k norms are too.
* **R4** (online, down_proj input, plain Hadamard ``H`` of the MLP size): the graph computes ``u H`` before
  down_proj and the pass folds ``W_down <- W_down H``: ``(u H)(W H)ᵀ = u H Hᵀ Wᵀ = u Wᵀ``. The torch model gets
  the same online step as a forward pre-hook on each down_proj (``handle.rotation_hooks``), so it remains the
  reference the graph is compared with, and calibration passes (GPTQ's input hooks, registered later) see the
  rotated input the rotated weight is applied to.
* **Ro** (optional, ``online_o``; online, o_proj input, plain Hadamard of heads x head_dim): as R4 for o_proj,
  QuaRot's rotation across heads before out_proj. Folded after R2 (which rotates o_proj's input columns head by
  head), so ``W_o <- (W_o R2-per-head) H``.
* **R3** (online, queries and keys after RoPE, plain Hadamard of head_dim): ``(q H)(k H)ᵀ = q kᵀ``, so the scores
  do not change and nothing is folded; it only matters once the K cache is quantized. The pass records it and
  :func:`qk_rotation_matrix` returns the matrix for the KV-quantization code; the torch model is not hooked
  (RoPE is applied inside HF's attention forward, and without KV quantization the hook would be the identity).

``handle.online_rotations`` holds what the graph must apply at run time (kind, size and the factorisation from
:mod:`qcompile.quant.hadamard`); :func:`online_rotation_matrix` rebuilds each matrix exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from qcompile.errors import RecipeError
from qcompile.models.handle import ModelHandle
from qcompile.passes import canonicalize
from qcompile.quant.hadamard import (
    apply_hadamard,
    describe_hadamard,
    hadamard_factors,
    hadamard_matrix,
    random_hadamard,
    random_orthogonal,
    random_signs,
)

KINDS = ("hadamard", "orthogonal")


@dataclass
class RotateConfig:
    r1: str | None = "hadamard"  # residual stream: "hadamard" (random-sign), "orthogonal" (Haar), or None
    r2: str | None = "hadamard"  # per-head v/o rotation, same choices
    seed: int = 0
    online_r3: bool = True  # record a Hadamard on q/k after RoPE for the graph (function-neutral)
    online_r4: bool = True  # Hadamard on the down_proj input: folded into down_proj, applied online
    # Hadamard across all heads on the o_proj input (QuaRot's online rotation before out_proj): folded into o_proj,
    # applied online; R2 alone mixes within each head only, so an outlier head stays an outlier for A4 quantizers
    online_o: bool = False

    def __post_init__(self):
        for name in ("r1", "r2"):
            if getattr(self, name) not in (*KINDS, None):
                raise RecipeError(f"rotate.{name} must be one of {', '.join(KINDS)} or null, "
                                  f"got {getattr(self, name)!r}")


Config = RotateConfig


class HadamardPreHook:
    """Forward pre-hook replacing a module's input x by ``x @ hadamard_matrix(size)`` (an online rotation)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, module, args):
        return (apply_hadamard(args[0], self.size), *args[1:])


def _subseed(seed: int, tag: str, index: int = 0) -> int:
    """Independent, reproducible seeds per rotation and layer."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}:{index}".encode()).digest()[:7], "little")


def _matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    return random_hadamard(n, seed) if kind == "hadamard" else random_orthogonal(n, seed)


CHUNK = 4096  # rows/columns per float64 block, so a 128k-row embedding is never copied to float64 whole


class _Rotation:
    """An orthogonal Q of order n applied as ``x -> x @ Q`` on the last dimension, in float64. A (random-sign)
    Hadamard goes through the fast transform, ``x H diag(s) = apply_hadamard(x) * s``: O(n (m + log n)) per row
    instead of O(n²), which is what makes folding a 128k-row embedding cheap."""

    def __init__(self, kind: str, n: int, seed: int | None):
        self.n = n
        if kind == "hadamard":
            self.dense, self.signs = None, (None if seed is None else random_signs(n, seed))
        else:
            self.dense, self.signs = random_orthogonal(n, seed), None

    @classmethod
    def from_matrix(cls, q: torch.Tensor) -> _Rotation:
        """An explicit orthogonal ``[n, n]`` matrix (e.g. a learned one), applied as a dense float64 product."""
        if q.dim() != 2 or q.shape[0] != q.shape[1]:
            raise ValueError(f"a rotation is a square matrix, got shape {tuple(q.shape)}")
        rot = cls.__new__(cls)
        rot.n, rot.dense, rot.signs = q.shape[0], q.detach().double(), None
        return rot

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.dense is not None:
            return x @ self.dense.to(x.device)
        y = apply_hadamard(x, self.n)
        return y if self.signs is None else y * self.signs.to(x.device)

    def fold_right(self, w: torch.Tensor) -> None:
        """w <- w Q in place, a block of rows at a time (rows are independent)."""
        for i in range(0, w.shape[0], CHUNK):
            w[i : i + CHUNK] = self(w[i : i + CHUNK]).to(w.dtype)

    def fold_left_transposed(self, w: torch.Tensor) -> None:
        """w <- Qᵀ w = (wᵀ Q)ᵀ in place, a block of columns at a time (columns are independent)."""
        for j in range(0, w.shape[1], CHUNK):
            w[:, j : j + CHUNK] = self(w[:, j : j + CHUNK].T).T.to(w.dtype)


def _online_spec(size: int, where: str) -> dict:
    m, s = hadamard_factors(size)
    return {"kind": "hadamard", "size": size, "base_order": m, "sylvester_order": s,
            "construction": describe_hadamard(size), "where": where}


def online_rotation_matrix(handle: ModelHandle, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """The orthonormal matrix of online rotation ``name`` ('r3', 'r4', 'ro') recorded in ``handle``; None if absent.
    The graph applies ``x @ matrix`` on the last dimension."""
    spec = handle.online_rotations.get(name)
    if spec is None:
        return None
    if spec["kind"] != "hadamard":
        raise RecipeError(f"online rotation {name} has unknown kind {spec['kind']!r}")
    return hadamard_matrix(spec["size"], dtype)


def qk_rotation_matrix(handle: ModelHandle, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """R3: the [head_dim, head_dim] matrix to apply to queries and keys after RoPE (``q @ H``, ``k @ H``) before
    the K cache is quantized; None when the model was not rotated with ``online_r3``."""
    return online_rotation_matrix(handle, "r3", dtype)


def _check_size(what: str, n: int, fix: str) -> None:
    try:
        hadamard_factors(n)
    except RecipeError as e:
        raise RecipeError(f"rotate: {what} = {n} has no supported Hadamard matrix ({e}); {fix}") from None


def _rotate_reader(lin: torch.nn.Linear, Q: _Rotation) -> None:
    """Input side: y = (x Q)(W Q)ᵀ + b = x Wᵀ + b; the bias is untouched."""
    Q.fold_right(lin.weight)


def _rotate_writer(lin: torch.nn.Linear, Q: _Rotation) -> None:
    """Output side: (x Wᵀ + b) Q = x (Qᵀ W)ᵀ + b Q."""
    Q.fold_left_transposed(lin.weight)
    if lin.bias is not None:
        lin.bias.copy_(Q(lin.bias).to(lin.bias.dtype))


def _rotate_value_heads(v: torch.nn.Linear, H: torch.Tensor, kv_heads: int, hd: int) -> None:
    """Each KV head's output v_j <- v_j H: W_v,j <- Hᵀ W_v,j, b_v,j <- b_v,j H."""
    H = H.to(v.weight.device)
    w = v.weight.double().view(kv_heads, hd, -1)
    v.weight.copy_(torch.einsum("de,kdi->kei", H, w).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(kv_heads, hd) @ H).reshape(-1).to(v.bias.dtype))


def _rotate_output_heads(o: torch.nn.Linear, H: torch.Tensor, heads: int, hd: int) -> None:
    """Each attention head's input columns W_o,h <- W_o,h H, undoing o_h -> o_h H."""
    H = H.to(o.weight.device)
    w = o.weight.double().view(o.weight.shape[0], heads, hd)
    o.weight.copy_((w @ H).reshape(o.weight.shape).to(o.weight.dtype))


@torch.no_grad()
def fold_residual_rotation(handle: ModelHandle, q: _Rotation | torch.Tensor) -> None:
    """Fold R1 = ``q`` (a :class:`_Rotation` or an orthogonal ``[hidden, hidden]`` matrix) into the model: the
    residual stream ``h`` becomes ``h q``. Embeddings ``E <- E q``, readers and lm_head ``W <- W q``, writers
    ``W <- qᵀ W``, ``b <- b q``; float64, cast back once. Only valid when every residual RMSNorm scale is 1 and
    lm_head is untied (``apply`` ensures it; ``spinquant`` runs after it)."""
    ad, model = handle.adapter, handle.model
    rot = q if isinstance(q, _Rotation) else _Rotation.from_matrix(q)
    rot.fold_right(ad.embed(model).weight)  # embedding rows are residual-stream vectors: E <- E Q
    for layer in ad.layers(model):
        for lin in ad.residual_readers(layer):
            _rotate_reader(lin, rot)
        for lin in ad.residual_writers(layer):
            _rotate_writer(lin, rot)
    _rotate_reader(ad.lm_head(model), rot)


@torch.no_grad()
def fold_head_rotation(handle: ModelHandle, layer: torch.nn.Module, h: torch.Tensor) -> None:
    """Fold R2 = ``h`` (orthogonal ``[head_dim, head_dim]``) into one decoder layer: every KV head's values
    ``v_j <- v_j h`` (v_proj rows and bias), undone on o_proj's input columns of every attention head."""
    geo = handle.adapter.geometry(handle.model)
    ad = handle.adapter
    _rotate_value_heads(ad.linear(layer, "v"), h.double(), geo.num_kv_heads, geo.head_dim)
    _rotate_output_heads(ad.linear(layer, "o"), h.double(), geo.num_heads, geo.head_dim)


# online rotations of a linear's input: name -> (the adapter's role of the linear, where, the graph pass's stat)
ONLINE_INPUT_ROTATIONS = {"r4": ("down", "down_proj input", "r4_rotations"),
                          "ro": ("o", "o_proj input", "o_rotations")}


def _fold_online_input_rotation(handle: ModelHandle, name: str, size: int) -> None:
    """A plain Hadamard ``H`` (the graph rebuilds it from its size alone) on the input of every linear of the
    role ``name`` stands for: folded ``W <- W H``, applied online by a pre-hook in torch and by the graph."""
    role, where, _ = ONLINE_INPUT_ROTATIONS[name]
    H = _Rotation("hadamard", size, seed=None)
    for layer in handle.adapter.layers(handle.model):
        lin = handle.adapter.linear(layer, role)
        H.fold_right(lin.weight)  # W <- W H
        handle.rotation_hooks.append(lin.register_forward_pre_hook(HadamardPreHook(size)))
    handle.online_rotations[name] = _online_spec(size, where)


@torch.no_grad()
def apply(handle: ModelHandle, config: RotateConfig) -> dict:
    if handle.quant_state:
        raise RecipeError("rotate must run before any quantization pass: it changes every weight")
    if handle.online_rotations or "rotate" in handle.applied_passes:
        raise RecipeError("rotate was already applied to this model; a recipe needs it once")
    ad, model = handle.adapter, handle.model
    geo = ad.geometry(model)
    layers = ad.layers(model)
    hidden = model.config.hidden_size
    mlp = ad.linear(layers[0], "down").in_features
    hd = geo.head_dim

    # refuse before touching a weight
    if config.r1 == "hadamard":
        _check_size("R1: hidden size", hidden, "use r1: orthogonal (a random orthogonal R1 works at any size)")
    if config.r2 == "hadamard":
        _check_size("R2: head_dim", hd, "use r2: orthogonal or r2: null")
    if config.online_r4:
        _check_size("R4: MLP size (down_proj input)", mlp, "set online_r4: false")
    if config.online_r3:
        _check_size("R3: head_dim", hd, "set online_r3: false")
    o_in = ad.linear(layers[0], "o").in_features
    if config.online_o:
        _check_size("o_proj input (heads x head_dim)", o_in, "set online_o: false")

    stats = {"r1": config.r1, "r2": config.r2, "online_r3": config.online_r3, "online_r4": config.online_r4,
             "online_o": config.online_o}
    if config.r1 is not None:
        norm_stats = canonicalize.apply(handle, canonicalize.CanonicalizeConfig(fuse_norms=True, untie_embeddings=True))
        stats["norms_fused"] = norm_stats["norms_fused"]
        not_one = [n for n in ad.residual_norms(model) if not torch.all(n.weight == 1)]
        if not_one or ad.ties_embeddings(model):
            raise RuntimeError("rotate: residual RMSNorm scales are not all folded (or lm_head is still tied)")

    if config.r1 is not None:
        fold_residual_rotation(handle, _Rotation(config.r1, hidden, _subseed(config.seed, "r1")))
        stats["r1_matrix"] = describe_hadamard(hidden) if config.r1 == "hadamard" else f"random orthogonal {hidden}"

    if config.r2 is not None:
        for i, layer in enumerate(layers):
            fold_head_rotation(handle, layer, _matrix(config.r2, hd, _subseed(config.seed, "r2", i)))
        stats["r2_matrix"] = describe_hadamard(hd) if config.r2 == "hadamard" else f"random orthogonal {hd}"

    if config.online_r4:
        _fold_online_input_rotation(handle, "r4", mlp)
    if config.online_o:  # after R2, which folds into o_proj's per-head input columns
        _fold_online_input_rotation(handle, "ro", o_in)
    if config.online_r3:
        handle.online_rotations["r3"] = _online_spec(hd, "queries and keys after RoPE")
    stats["online"] = sorted(handle.online_rotations)
    return stats
