"""Gluon, compiled on the GPU or run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``).

Triton's interpreter runs ``@triton.jit`` kernels with numpy, but it has no Gluon front end: ``gluon.jit`` always
compiles. Gluon's language is Triton's plus where each value lives (layouts, shared memory), sm_90's asynchronous
operations and inline PTX, and a layout never changes what a tensor holds, only which thread holds it. So under
the interpreter this module hands the kernel modules ``gluon`` / ``gl`` / ``hopper`` objects that run the same
kernel source through the interpreter's own ``InterpretedFunction``:

* each ``gl`` operation with a Triton twin calls it with the layout dropped (``gl.arange(0, n, layout=L)`` is
  ``tl.arange(0, n)``, ``gl.convert_layout`` returns its input, layouts are inert records);
* shared memory is a numpy array; a TMA copy is a descriptor load or store issued at once (so mbarriers, fences and
  waits have nothing to do); ``warpgroup_mma`` is the product of its operands (int8 exactly, into the int32
  accumulator);
* ``gl.inline_asm_elementwise`` looks its PTX up in a registry (``emulates``) where the kernel module that wrote
  it registered a numpy emulation of those instructions. An emulation sees logical tensors, so it relies on which
  lane holds which element: the lane is the operands' last dimension (32), one mma per index of the others, as
  the kernels' layouts place them (``mma_m16n8k32_u8_s8`` and ``mma_m16n8k16_f16_f32`` follow the PTX ISA's
  fragment definitions).

What the interpreter cannot show: speed, register pressure, whether a layout is legal (beyond the lanes check
below), asynchrony inside a program (TMA copies and wgmma complete when issued, so a wrong mbarrier phase, byte
count, ``num_outstanding`` or a missing fence passes here), and anything between programs running at once (they
run one after another, so a kernel whose programs wait on each other, as ``gemv_chain_staged``'s do, cannot run
here). Inline PTX is checked for where its lanes are: every operand that went through ``gl.convert_layout`` must
hold one value a thread along its last dimension, across one warp's 32 lanes, as the emulations read them.
Compiled, this module is the plain Gluon import. Under the interpreter it leans on Triton 3.6's interpreter
(``InterpretedFunction``, its tensor handles and storage types), the version pyproject.toml pins.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Callable

from qcompile.runtime.triton._env import interpreting, require_triton

triton = require_triton()

# PTX text -> numpy emulation (args: the asm's operand tensors; returns what inline_asm_elementwise would)
_ASM: dict[str, Callable] = {}


def emulates(asm: str):
    """Register ``fn`` as the interpreter's emulation of the inline PTX ``asm`` (no effect when compiling)."""
    asm = getattr(asm, "value", asm)

    def register(fn):
        _ASM[asm] = fn
        return fn

    return register


def as_numpy(t):
    """An interpreter tensor's values (numpy)."""
    return t.handle.data


def from_numpy(a, dtype, shape=None):
    """A numpy array (reshaped to ``shape``) as an interpreter tensor of ``dtype`` (a ``tl`` dtype; integers wrap to
    its width as the GPU's registers do: numpy's integer casts wrap)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle, _get_np_dtype

    a = np.asarray(a)
    a = np.ascontiguousarray(a.astype(_get_np_dtype(dtype)).reshape(a.shape if shape is None else shape))
    return tl.tensor(TensorHandle(a, dtype), tl.block_type(dtype, list(a.shape)))



# ---- warp-level mma.sync, as the PTX ISA defines its fragments ("Matrix Fragments for mma.m16n8k32" and
# "... mma.m16n8k16"). An inline-asm operand is one register a lane; the kernels that use these lay their operands
# out with the lane as the last dimension (32) and one mma per index of the leading ones (a warp, or a warp's row
# block). Lane = 4 g + t.

def lane_registers(regs):
    """Operand tensors (broadcast together) -> int64 arrays [M, 32] of their 32-bit registers (a float by its bits,
    as an ``r`` constraint passes it), and the shape."""
    import numpy as np

    arrays = np.broadcast_arrays(*[np.asarray(r) for r in regs])
    if arrays[0].shape[-1] != 32:
        raise ValueError(f"an mma operand's last dimension is the warp's 32 lanes, got shape {arrays[0].shape}")
    return [a.reshape(-1, 32).view(np.uint32).astype(np.int64) if a.dtype.itemsize == 4
            else a.reshape(-1, 32).astype(np.int64) & 0xFFFFFFFF for a in arrays], arrays[0].shape


def _gt():
    import numpy as np

    lane = np.arange(32)
    return lane // 4, lane % 4


def _c_fragment(d, c):
    """D [M, 16, 8] -> registers c0..c3 (row g + 8 (i // 2), column 2 t + i % 2) [M, 32], plus C's if given."""
    g, t = _gt()
    out = [d[:, g + 8 * (i // 2), 2 * t + i % 2] for i in range(4)]
    return out if c is None else [o + ci for o, ci in zip(out, c)]


def mma_m16n8k32_u8_s8(a, b, c=None):
    """``mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32`` on [M, 32] int64 registers: A four of four u8
    (register i, byte j: row g + 8 (i % 2), column 4 t + j + 16 (i // 2)), B two of four s8 (register i, byte j:
    row 4 t + j + 16 i, column g), C / D four int32 (exact here in int64: the caller wraps)."""
    import numpy as np

    g, t = _gt()
    A = np.zeros((a[0].shape[0], 16, 32), np.int64)
    B = np.zeros((a[0].shape[0], 32, 8), np.int64)
    for i in range(4):
        for j in range(4):
            A[:, g + 8 * (i % 2), 4 * t + j + 16 * (i // 2)] = (a[i] >> (8 * j)) & 0xFF
    for i in range(2):
        for j in range(4):
            v = (b[i] >> (8 * j)) & 0xFF
            B[:, 4 * t + j + 16 * i, g] = v - ((v >> 7) << 8)
    return _c_fragment(A @ B, c)


def halves(reg):
    """32-bit registers (int64 arrays) -> their two f16 (low, high) as float32."""
    import numpy as np

    return [((reg >> s) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32) for s in (0, 16)]


def pack_halves(lo, hi):
    """Two arrays rounded to f16 -> the 32-bit registers holding them (int64)."""
    import numpy as np

    bits = [np.asarray(v, np.float32).astype(np.float16).view(np.uint16).astype(np.int64) for v in (lo, hi)]
    return bits[0] | (bits[1] << 16)


def mma_m16n8k16_f16_f32(a, b, c=None):
    """``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` on [M, 32] registers: A four of two f16 (register i,
    half h: row g + 8 (i % 2), column 2 t + h + 8 (i // 2)), B two (register i, half h: row 2 t + h + 8 i, column
    g), C / D four fp32. The f16 products are exact in fp32; they are summed here in float64 and rounded once (the
    tensor core's order of fp32 additions is its own: results agree to fp32 rounding, not bit for bit)."""
    import numpy as np

    g, t = _gt()
    A = np.zeros((a[0].shape[0], 16, 16), np.float64)
    B = np.zeros((a[0].shape[0], 16, 8), np.float64)
    for i in range(4):
        for h, v in enumerate(halves(a[i])):
            A[:, g + 8 * (i % 2), 2 * t + h + 8 * (i // 2)] = v
    for i in range(2):
        for h, v in enumerate(halves(b[i])):
            B[:, 2 * t + h + 8 * i, g] = v
    d = _c_fragment(A @ B, None)
    return [x.astype(np.float32) for x in (d if c is None else [x + ci.astype(np.float64) for x, ci in zip(d, c)])]


if not interpreting():
    from triton.experimental import gluon  # noqa: F401
    from triton.experimental.gluon import language as gl  # noqa: F401
    from triton.experimental.gluon.language.nvidia import hopper as _hopper_language
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _HopperDescriptor

    # sm_90's asynchronous operations (TMA copies, mbarriers, wgmma) and its host-side tensor descriptor
    hopper = types.SimpleNamespace(
        fence_async_shared=_hopper_language.fence_async_shared, mbarrier=_hopper_language.mbarrier,
        tma=_hopper_language.tma, warpgroup_mma=_hopper_language.warpgroup_mma,
        warpgroup_mma_wait=_hopper_language.warpgroup_mma_wait, TensorDescriptor=_HopperDescriptor)
else:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    _TL = "_qcompile_interpreter_tl"  # the interpreter patches the tl it finds in a kernel's globals
    _PATCH_LOCK = threading.Lock()

    class _Layout:
        """A layout or shared-memory layout: where values live, which the interpreter does not model."""

        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

        @classmethod
        def get_default_for(cls, *args, **kwargs):
            return cls(*args, **kwargs)

    class _Shape(list):
        """A tensor's shape as Gluon code uses it, as the compiler's constexpr handling allows: Python ints
        (``v.shape[2].bit_length()``), joined with lists (``v.shape[:-1] + [2, 2]``). A list, not a tuple:
        ``tl.block_type`` takes lists or Triton's own tuples."""

        def __getitem__(self, i):
            got = super().__getitem__(i)
            return _Shape(got) if isinstance(i, slice) else got

        def __add__(self, other):
            return _Shape(list(self) + list(other))

        def __radd__(self, other):
            return _Shape(list(other) + list(self))

        def __eq__(self, other):  # equal to the same sizes in any sequence (a tuple, Triton's tuple, a list)
            try:
                return list(self) == [int(getattr(v, "value", v)) for v in other]
            except TypeError:
                return False

        def __ne__(self, other):
            return not self == other

        __hash__ = None

    @contextlib.contextmanager
    def _gluon_values():
        """While a Gluon kernel runs: tensors created hold ``_Shape``s (a data descriptor on ``tl.tensor`` takes
        the assignment in its constructor), and tensor descriptors answer ``.layout`` (their shared-memory layout,
        inert here). Restored afterwards, so Triton kernels see what they always do."""

        def get(self):
            return self.__dict__["shape"]

        def put(self, value):
            self.__dict__["shape"] = _Shape(int(getattr(v, "value", v)) for v in value)

        with _PATCH_LOCK:  # one Gluon launch at a time (the interpreter's grid index is global anyway)
            patched = ((tl.tensor, "shape", property(get, put)),
                       (tl.core.tensor_descriptor_base, "layout", property(lambda self: _Layout())))
            saved = [(cls, name, cls.__dict__.get(name)) for cls, name, _ in patched]
            for cls, name, value in patched:
                setattr(cls, name, value)
            try:
                yield
            finally:
                for cls, name, value in saved:
                    if value is None:
                        delattr(cls, name)
                    else:
                        setattr(cls, name, value)

    class _InterpretedGluon(InterpretedFunction):
        def run(self, *args, **kwargs):
            with _gluon_values():
                return super().run(*args, **kwargs)

        def rewrite(self):
            fn = super().rewrite()
            # the interpreter passes parameters annotated ``tl.constexpr`` as Python values; ours say ``gl.``
            fn.__annotations__ = {k: ("tl.constexpr" if str(v).strip() == "gl.constexpr" else v)
                                  for k, v in fn.__annotations__.items()}
            return fn

    def _jit(fn=None, **kwargs):
        def wrap(f):
            f.__globals__.setdefault(_TL, tl)
            return _InterpretedGluon(f, **{k: v for k, v in kwargs.items() if k in ("do_not_specialize", "noinline",
                                                                                     "debug", "repr")})

        return wrap(fn) if fn is not None else wrap

    gluon = types.SimpleNamespace(jit=_jit)

    def _arange(start, end, layout=None):
        return tl.arange(start, end)

    def _zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    def _full(shape, value, dtype, layout=None):
        return tl.full(shape, value, dtype)

    def _same(name):
        def op(*args, **kwargs):
            return getattr(tl, name)(*args, **kwargs)

        op.__name__ = name
        return op

    def _convert_layout(value, layout=None, assert_trivial=False):
        """The same values, tagged with the layout (``_inline_asm_elementwise`` checks where its operands' lanes
        are)."""
        out = tl.tensor(value.handle, value.type)
        out._qcompile_layout = layout
        return out

    def _dims(layout):
        """(size per thread, threads per warp, warps) of each dimension of a Blocked layout or a slice of one;
        None for layouts this check does not read."""
        if isinstance(layout, gl.BlockedLayout):
            a = list(layout.args) + [layout.kwargs.get(k) for k in ("size_per_thread", "threads_per_warp",
                                                                     "warps_per_cta")][len(layout.args):]
            return [tuple(int(getattr(v, "value", v)) for v in d) for d in zip(a[0], a[1], a[2])]
        if isinstance(layout, gl.SliceLayout):
            dim = int(getattr(layout.args[0], "value", layout.args[0]))
            parent = _dims(layout.args[1])
            return None if parent is None else parent[:dim] + parent[dim + 1:]
        return None

    def _check_lanes(args):
        """The emulations read lane l of a warp at index l of the operands' last dimension: each operand whose
        layout is known (a ``convert_layout``'s result) must hold one value a thread there, across the 32 lanes of
        one warp; at least one operand must say so."""
        known = [a for a in args if getattr(a, "_qcompile_layout", None) is not None]
        if not known:
            raise ValueError("inline PTX under the interpreter: no operand's layout is known; pass at least one "
                             "through gl.convert_layout so that its lanes can be checked")
        for a in known:
            dims = _dims(a._qcompile_layout)
            if dims is not None and dims[-1] != (1, 32, 1):
                raise ValueError(f"inline PTX under the interpreter: an operand's last dimension has (size per "
                                 f"thread, threads per warp, warps) {dims[-1]}, not (1, 32, 1): its emulation would "
                                 "read the wrong lanes")

    def thread_barrier():
        """Programs run one at a time, each as one thread: nothing to wait for."""

    def _inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
        asm = getattr(asm, "value", asm)
        if asm not in _ASM:
            raise NotImplementedError(f"no interpreter emulation is registered for this inline PTX:\n{asm}")
        if int(getattr(pack, "value", pack)) != 1:
            raise NotImplementedError(f"inline PTX under the interpreter: pack={pack} (the emulations take one "
                                      "element a register)")
        if args:
            _check_lanes(args)
        out = _ASM[asm](*args)
        want = len(dtype) if isinstance(dtype, (tuple, list)) else 1
        got = len(out) if isinstance(out, tuple) else (0 if out is None else 1)
        if got != want and not (want == 1 and got == 0 and not args):  # the launch controls return nothing
            raise ValueError(f"the emulation of this inline PTX returned {got} values, its dtype asks {want}")
        return out

    gl = types.ModuleType("qcompile_gluon_interpreted")
    for _name in ("int1", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                  "bfloat16", "float32", "float64", "constexpr", "pointer_type", "dtype", "tensor"):
        setattr(gl, _name, getattr(tl, _name))
    gl.arange, gl.zeros, gl.full = _arange, _zeros, _full
    for _name in ("load", "store", "reshape", "atomic_add", "atomic_xchg", "atomic_cas", "permute", "join", "split",
                  "expand_dims", "broadcast", "sum", "max", "min", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "fma",
                  "floor", "ceil", "minimum", "maximum", "cdiv", "where",
                  "static_range", "static_assert", "program_id", "num_programs", "cast", "abs"):
        setattr(gl, _name, _same(_name))
    for _name in ("BlockedLayout", "SliceLayout", "NVMMASharedLayout", "SwizzledSharedLayout",
                  "NVMMADistributedLayout", "DotOperandLayout"):
        setattr(gl, _name, type(_name, (_Layout,), {}))
    gl.convert_layout = _convert_layout
    gl.thread_barrier = thread_barrier
    gl.inline_asm_elementwise = _inline_asm_elementwise

    class _SharedMemory:
        """A shared-memory buffer (or a view of one: ``index``, ``permute``) as a numpy array."""

        def __init__(self, array, dtype):
            self.array, self.dtype = array, dtype

        @property
        def shape(self):
            return _Shape(self.array.shape)

        def index(self, i):
            return _SharedMemory(self.array[int(getattr(i, "value", i))], self.dtype)

        def permute(self, order):
            return _SharedMemory(self.array.transpose([int(getattr(o, "value", o)) for o in order]), self.dtype)

        def store(self, value):
            data = as_numpy(value)
            if data.shape != self.array.shape or data.dtype != self.array.dtype:
                raise ValueError(f"shared memory of {self.array.dtype} {self.array.shape} stored from "
                                 f"{data.dtype} {data.shape}")
            self.array[...] = data

        def load(self, layout=None):
            return from_numpy(self.array.copy(), self.dtype)

    def _allocate_shared_memory(element_ty, shape, layout, value=None):
        import numpy as np
        from triton.runtime.interpreter import _get_np_dtype

        # the interpreter's own storage types (bfloat16 as its uint16 bits)
        smem = _SharedMemory(np.zeros([int(getattr(d, "value", d)) for d in shape], _get_np_dtype(element_ty)),
                             element_ty)
        if value is not None:
            smem.store(value)
        return smem

    gl.allocate_shared_memory = _allocate_shared_memory

    def _nothing(*args, **kwargs):
        """Barriers, fences and waits: the interpreter runs every copy and mma when it is issued."""

    def _operand(v):
        import numpy as np

        a = v.array if isinstance(v, _SharedMemory) else as_numpy(v)
        if v.dtype == tl.bfloat16:  # the interpreter keeps bfloat16 as its 16 bits
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)

    def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
        """acc = a @ b (+ acc): int8 operands exactly (wrapped to the int32 accumulator), floats in fp32."""
        prod = _operand(a) @ _operand(b)
        if use_acc:
            prod = prod + _operand(acc)
        return from_numpy(prod, acc.dtype)

    def _warpgroup_mma_wait(num_outstanding=0, deps=None):
        return deps[0] if len(deps) == 1 else tuple(deps)

    def _tma_load(desc, coord, barrier, result, pred=True):
        if pred:
            result.store(desc.load(coord))

    def _tma_store(desc, coord, src):
        desc.store(coord, src.load())

    class _HostDescriptor:
        """``gluon.nvidia.hopper.TensorDescriptor``: the interpreter's own (Triton's) descriptor; the layout is
        inert."""

        @staticmethod
        def from_tensor(tensor, block_shape, layout):
            from triton.tools.tensor_descriptor import TensorDescriptor

            return TensorDescriptor.from_tensor(tensor, list(block_shape))

    hopper = types.SimpleNamespace(
        fence_async_shared=_nothing, warpgroup_mma=_warpgroup_mma, warpgroup_mma_wait=_warpgroup_mma_wait,
        mbarrier=types.SimpleNamespace(init=_nothing, expect=_nothing, wait=_nothing, arrive=_nothing,
                                       invalidate=_nothing, MBarrierLayout=_Layout),
        tma=types.SimpleNamespace(async_copy_global_to_shared=_tma_load, async_copy_shared_to_global=_tma_store,
                                  store_wait=_nothing),
        TensorDescriptor=_HostDescriptor)


# Programmatic dependent launch from Gluon (Triton's ``gdc_wait`` / ``gdc_launch_dependents`` are not callable
# there): one definition for every Gluon kernel, with its interpreter emulation (launches run one after another)
_GDC_WAIT = gl.constexpr("griddepcontrol.wait; // dummy $0")
_GDC_LAUNCH_DEPENDENTS = gl.constexpr("griddepcontrol.launch_dependents; // dummy $0")


@emulates(_GDC_WAIT)
@emulates(_GDC_LAUNCH_DEPENDENTS)
def _gdc_emulated():
    """Nothing to order: the interpreter finishes each launch before the next starts."""


@gluon.jit
def _gdc_wait():
    """``griddepcontrol.wait``: returns when the grid this one depends on has finished and its writes are visible."""
    gl.inline_asm_elementwise(_GDC_WAIT, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    """``griddepcontrol.launch_dependents``: the next launch's programs may start."""
    gl.inline_asm_elementwise(_GDC_LAUNCH_DEPENDENTS, "=r", [], dtype=gl.int32, is_pure=False, pack=1)
