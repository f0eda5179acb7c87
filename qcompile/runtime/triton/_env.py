"""Where the kernels run: compiled on CUDA, or under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors.

The interpreter executes the same kernel source with numpy, program by program; the tests use it to check every
kernel against its torch reference on machines without a GPU. Autotuning is skipped there (timing an
interpreter means nothing), so each kernel wrapper also has a fixed small configuration.
"""

from __future__ import annotations

import os

from qcompile.errors import QCompileError

TRITON_PIN = "3.6"  # the version the GPU machine has and the kernels were written against


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """Autotune on GPU unless ``QCOMPILE_TRITON_AUTOTUNE=0`` (then each kernel's first pruned config is used)."""
    return not interpreting() and os.environ.get("QCOMPILE_TRITON_AUTOTUNE", "1") != "0"


def require_triton():
    """Import triton or raise one clear error saying how to get it; under the interpreter, apply the numpy fix."""
    try:
        import triton
    except ImportError as e:
        raise QCompileError(f"the CUDA runtime needs Triton (pip install triton=={TRITON_PIN}.0): {e}") from e
    if interpreting():
        _fix_interpreter_index()
    return triton


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars (program ids, loaded scalars) as 1-element 1-D numpy arrays and turns
    them into loop bounds with ``int(array)``, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted"). Wrap its tensor patcher so ``__index__`` reads the single element instead. Test harness only: the
    compiled path never runs this code."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_qcompile_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._qcompile_fixed = True
    interpreter._patch_lang_tensor = patched


def check_device(device) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QCompileError(f"--device cuda needs an NVIDIA GPU, but torch {torch.__version__} sees no CUDA "
                                "device (run on ORT with --device cpu)")
        return
    if device.type == "cpu" and interpreting():
        return
    raise QCompileError(f"the Triton runtime runs on cuda (or on cpu under TRITON_INTERPRET=1), not {device}")
