"""Every kernel variant compiles for sm_90 (H100) on this machine, GPU or not (Triton bundles ptxas).

Opt-in (``QCOMPILE_TRITON_AOT=1``; about a minute for the tiny test shapes, ``=all`` for every production variant,
15-20 minutes on 2 cores): the interpreter runs the kernels' semantics but never lowers them, so dot-shape,
layout and shared-memory errors only show up here or on the GPU. Runs in a subprocess because this folder's
conftest turns the interpreter on for CPU machines.
"""

import os
import subprocess
import sys

import pytest

MODE = os.environ.get("QCOMPILE_TRITON_AOT", "")


@pytest.mark.skipif(not MODE, reason="set QCOMPILE_TRITON_AOT=1 (tiny shapes) or =all (every variant)")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    args = [] if MODE == "all" else ["--small"]
    proc = subprocess.run([sys.executable, "-m", "qcompile.runtime.triton.aot_check", *args], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 failure(s)" in proc.stdout
