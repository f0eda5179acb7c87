"""qcompile's GPU runtime: Triton kernels and a runner that executes an exported folder on CUDA.

The same integers, scales and zero points that the ONNX graph carries (``DequantizeLinear`` initializers) are
what these kernels read, repacked once at load time: one artifact, two runtimes.

Modules (each kernel module has its pure-torch reference in ``reference``):

* ``packing``      export integers -> kernel layouts (pure torch, no Triton);
* ``reference``    pure-torch reference of every kernel (what the tests compare against);
* ``wq_matmul``    weight-only int4/int8 split-K GEMV (decode) and tiled GEMM (prefill);
* ``gemv_chain``   a chain of dependent square int4 GEMVs in one persistent launch (a benchmark kernel so far);
* ``gemv_chain_staged``  the same chain with slices staged in shared memory by TMA (Gluon; an experiment);
* ``gemv_digits``  an exact int4 GEMV on the int8 tensor cores, activations as int8 digit planes (Gluon; chains);
* ``w8a8``         per-token activation quantization and int8 tensor-core GEMM (W8A8, W4A4);
* ``hadamard``     online Walsh-Hadamard transform, 2^k and m*2^k orders;
* ``act_quant``    per-token fake quantization of activations (the graph's quantizer, bit for bit);
* ``kv_attention`` RoPE + quantized KV-cache store, split-K decode attention with a float prefix;
* ``rewrites``     the graph's run-time rewrites (online Hadamard, activation / KV quantization) read back;
* ``runner``       ``TritonCausalLM``: an exported folder on the GPU, static KV cache, CUDA-graph decode.

The Gluon kernels (``gemv_digits``, ``gemv_mma``, ``w8a8``'s wgmma GEMM) import Gluon through ``_gluon``, which under
``TRITON_INTERPRET=1`` runs them with Triton's interpreter (except ``gemv_chain_staged``, whose programs wait on each
other). Triton is imported only by the kernel modules, so ``import qcompile`` (and the ORT runtime) never needs it.
"""

from qcompile.runtime.triton._env import interpreting, require_triton

__all__ = ["interpreting", "require_triton"]
