"""Exported integers -> the layouts the kernels read (pure torch: packing needs no GPU and no Triton).

The input follows ``qcompile.quant.grid.QuantizedWeight`` (and the graph's ``DequantizeLinear`` initializers):
symmetric weights are signed integers in ``[-2^(b-1), 2^(b-1)-1]`` with no zero point, asymmetric ones unsigned
in ``[0, 2^b-1]`` with an integer zero point per group; ``w = s * (q - z)``; groups run along the input dimension K.
2- and 3-bit weights use the 4-bit container, as in the graph.

Two layouts:

* ``PackedWeight`` (weight-only GEMV/GEMM): int32 words ``[K / pack, N]``; word ``(r, n)`` holds the codes of
  ``k = pack*r + j`` for ``j < pack`` in bits ``[j*b, (j+1)*b)`` (pack = 8 for 4-bit, 4 for 8-bit). A code is
  unsigned: ``u = q + 2^(b-1)`` for symmetric weights (implicit zero point ``2^(b-1)``), ``u = q`` for asymmetric.
  Rows of words are contiguous along N, so a warp reading a tile row reads consecutive words (coalesced, 16-byte
  vectors), and one word brings ``pack`` K-steps of one output column: the decode GEMV streams each byte once.
* ``PackedIntWeight`` (W8A8/W4A4 int8 tensor-core GEMM): values ``v`` with ``w = s * (v - z)`` stored K-contiguous
  (``[N, K]`` int8), the operand order Hopper's 8-bit MMA wants; 4-bit values as nibbles ``v + 8`` in ``[N, K/2]``
  uint8, split in halves per chunk so that each half of a K-tile loads contiguously and feeds its own int8 dot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


def container_bits(bits: int) -> int:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    return 4 if bits <= 4 else 8


def _orient(qweight, scale, zero, layout: str):
    """-> q int32 [K, N], scale float32 [K/G, N], zero float32 [K/G, N] | None."""
    q = torch.as_tensor(qweight).detach().to("cpu", torch.int32)
    s = torch.as_tensor(scale).detach().to("cpu", torch.float32)
    z = None if zero is None else torch.as_tensor(zero).detach().to("cpu", torch.float32)
    if layout == "out_in":  # QuantizedWeight: [out, in], scale [out, groups]
        q = q.t()
        s = s.reshape(q.shape[1], -1).t()
        z = None if z is None else z.reshape(q.shape[1], -1).t()
    elif layout == "in_out":  # the graph: [in, out], scale [in/G, out] (per-channel: [out])
        n = q.shape[1]
        s = s.reshape(-1, n)
        z = None if z is None else z.reshape(-1, n)
    else:
        raise ValueError(f"layout must be 'out_in' (QuantizedWeight) or 'in_out' (graph), got {layout!r}")
    if q.dim() != 2:
        raise ValueError(f"qweight must be 2-D, got shape {tuple(q.shape)}")
    k, n = q.shape
    if s.shape[1] != n or k % s.shape[0]:
        raise ValueError(f"scale shape {tuple(s.shape)} does not fit a [{k}, {n}] weight in blocks along K")
    if z is not None and z.shape != s.shape:
        raise ValueError(f"zero shape {tuple(z.shape)} differs from scale shape {tuple(s.shape)}")
    return q.contiguous(), s.contiguous(), None if z is None else z.contiguous()


def _check_grid(q: torch.Tensor, zero: torch.Tensor | None, cbits: int, name: str) -> None:
    lo, hi = (-(2 ** (cbits - 1)), 2 ** (cbits - 1) - 1) if zero is None else (0, 2**cbits - 1)
    qmin, qmax = int(q.min()), int(q.max())
    if qmin < lo or qmax > hi:
        kind = "symmetric (signed)" if zero is None else "asymmetric (unsigned)"
        raise ValueError(f"{name}: integers span [{qmin}, {qmax}], outside the {kind} {cbits}-bit container "
                         f"[{lo}, {hi}]")
    if zero is not None:
        if not torch.equal(zero, zero.round()) or int(zero.min()) < 0 or int(zero.max()) > 2**cbits - 1:
            raise ValueError(f"{name}: zero points must be integers in [0, {2**cbits - 1}]")


@dataclass
class PackedWeight:
    """A linear weight in the weight-only kernel layout (see the module docstring).

    ``qweight`` int32 [K/pack, N]; ``scale`` [K/G, N] in the compute dtype; ``zero`` uint8 [K/G, N] (asymmetric)
    or None (symmetric: the implicit zero point 2^(bits-1)); ``bias`` [N] or None. ``bits`` is the container
    width, 4 or 8.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    bias: torch.Tensor | None = None
    # the same codes re-packed for the tensor-core GEMV (gemv_mma.MmaWeight), when opted in; dropped by ``to``
    mma: object | None = None

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> PackedWeight:
        """Move to ``device``; ``dtype`` changes the scales' and bias' float type (the activations' type)."""
        dt = dtype or self.scale.dtype
        return replace(
            self,
            qweight=self.qweight.to(device),
            scale=self.scale.to(device, dt),
            zero=None if self.zero is None else self.zero.to(device),
            bias=None if self.bias is None else self.bias.to(device, dt),
            mma=None,
        )

    @property
    def nbytes(self) -> int:
        n = self.qweight.numel() * 4 + self.scale.numel() * self.scale.element_size()
        return n + (0 if self.zero is None else self.zero.numel())


def pack_from_export(qweight, scale, zero=None, *, bits: int, group_size: int | None = None,
                     layout: str = "out_in", dtype: torch.dtype = torch.float16, bias=None,
                     name: str = "weight") -> PackedWeight:
    """Integers on the export grid -> ``PackedWeight``.

    ``layout="out_in"``: QuantizedWeight's orientation (qweight [out, in], scale/zero [out, groups]);
    ``layout="in_out"``: the graph's (qweight [in, out], scale/zero [in/G, out], per-channel scale [out]).
    ``zero=None`` means symmetric. ``group_size`` is checked against the scale's shape when given.
    """
    q, s, z = _orient(qweight, scale, zero, layout)
    k, n = q.shape
    g = k // s.shape[0]
    if group_size is not None and group_size != g:
        raise ValueError(f"{name}: group_size {group_size} does not match scales for {s.shape[0]} groups of K={k}")
    cb = container_bits(bits)
    _check_grid(q, z, cb, name)
    pack = 32 // cb
    if k % pack or g % pack:
        raise ValueError(f"{name}: the {cb}-bit kernels pack {pack} values per word along K; K={k} and the group "
                         f"size {g} must both be multiples of {pack}")
    u = (q + 2 ** (cb - 1) if z is None else q).view(k // pack, pack, n)
    words = torch.zeros(k // pack, n, dtype=torch.int64)
    for j in range(pack):
        words |= u[:, j, :].to(torch.int64) << (j * cb)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return PackedWeight(
        qweight=words.contiguous(),
        scale=s.to(dtype),
        zero=None if z is None else z.to(torch.uint8),
        bits=cb,
        group_size=g,
        in_features=k,
        out_features=n,
        bias=None if bias is None else torch.as_tensor(bias).detach().to("cpu", dtype).reshape(n),
    )


def concat_packed(weights: list[PackedWeight]) -> PackedWeight:
    """Several linears reading the same input as one (columns side by side): q|k|v or gate|up in one GEMV."""
    first = weights[0]
    for w in weights[1:]:
        if (w.bits, w.group_size, w.in_features, w.zero is None) != (first.bits, first.group_size,
                                                                      first.in_features, first.zero is None):
            raise ValueError("only weights with the same bits, group size, K and symmetry can be concatenated")
    biased = any(w.bias is not None for w in weights)
    bias = None
    if biased:
        bias = torch.cat([w.bias if w.bias is not None else torch.zeros(w.out_features, dtype=w.scale.dtype,
                                                                         device=w.scale.device) for w in weights])
    return PackedWeight(
        qweight=torch.cat([w.qweight for w in weights], 1).contiguous(),
        scale=torch.cat([w.scale for w in weights], 1).contiguous(),
        zero=None if first.zero is None else torch.cat([w.zero for w in weights], 1).contiguous(),
        bits=first.bits,
        group_size=first.group_size,
        in_features=first.in_features,
        out_features=sum(w.out_features for w in weights),
        bias=bias,
    )


def column_bands(pw: PackedWeight, band: int) -> PackedWeight:
    """``pw`` with its words stored in column bands, ``[N / band, K / pack, band]`` flattened to the same shape: the
    layout the GEMV kernel's ``BAND=band`` reads (each program of ``band`` columns then reads one contiguous run).
    Only the benchmarks use it (bench/triton_sweep.py); the runner keeps the row-major words."""
    rows, n = pw.qweight.shape
    if n % band:
        raise ValueError(f"column bands of {band} need N ({n}) to be a multiple of it")
    return replace(pw, qweight=pw.qweight.view(rows, n // band, band).transpose(0, 1).contiguous().view(rows, n))


# -- W8A8 / W4A4 ---------------------------------------------------------------------------------------------


@dataclass
class PackedIntWeight:
    """A weight for the int8 tensor-core GEMM: ``w[k, n] = scale[k // G, n] * (v[n, k] - zero[k // G, n])``.

    bits 8: ``qweight`` int8 [N, K]. bits 4: uint8 [N, K/2] of nibbles ``v + 8``; in each chunk of ``2*half``
    columns, byte ``j`` holds column ``j`` (low nibble) and ``j + half`` (high nibble). ``scale`` float32 [K/G, N];
    ``zero`` int32 [K/G, N] or None (symmetric).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    half: int = 0  # 4-bit chunk half-width (the kernel's K-tile is 2 * half)
    bias: torch.Tensor | None = None

    def to(self, device=None) -> PackedIntWeight:
        return replace(self, qweight=self.qweight.to(device), scale=self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device),
                       bias=None if self.bias is None else self.bias.to(device))


def pack_int_gemm(qweight, scale, zero=None, *, bits: int, layout: str = "out_in", bias=None,
                  name: str = "weight") -> PackedIntWeight:
    """Export integers -> ``PackedIntWeight``. Asymmetric codes are re-centred so they fit int8 (``v = u - 2^(b-1)``,
    ``z' = z - 2^(b-1)``); the product ``s * (v - z')`` is unchanged."""
    q, s, z = _orient(qweight, scale, zero, layout)
    k, n = q.shape
    g = k // s.shape[0]
    cb = container_bits(bits)
    _check_grid(q, z, cb, name)
    mid = 2 ** (cb - 1)
    v = q if z is None else q - mid
    zi = None if z is None else (z - mid).to(torch.int32)
    vt = v.t().contiguous()  # [N, K]
    half = 0
    if cb == 8:
        packed = vt.to(torch.int8)
    else:
        # each half feeds an int8 dot whose K must be >= 32 (the int8 MMA's depth)
        half = next((h for h in (64, 32) if k % (2 * h) == 0 and g % (2 * h) == 0), 0)
        if not half:
            raise ValueError(f"{name}: the W4A4 kernel needs K={k} and the group size {g} to be multiples of 64")
        codes = (vt + 8).view(n, k // (2 * half), 2, half)
        packed = (codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).reshape(n, k // 2).to(torch.uint8)
    return PackedIntWeight(qweight=packed.contiguous(), scale=s, zero=zi, bits=cb, group_size=g, in_features=k,
                           out_features=n, half=half,
                           bias=None if bias is None else torch.as_tensor(bias).detach().float().reshape(n))
