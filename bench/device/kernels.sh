#!/bin/bash
# Kernel-only GPU work (issue 7) in one device call that needs no model: what the fourth session of 2026-12-05 ran
# (GPU tests of the decode attention, the tuner's attention picks, the runner end to end on a random 1B Llama), then
# the GEMV sweep with the PDL variant. Run from the repository root, carrying .whl (the device lacks onnx-ir):
#   bash bench/device/kernels.sh            # each step capped; logs and JSON in $OUT
# Budget about 9.5 minutes on a fresh machine (compiling is most of it; the caps sum to 570 s, so use timeout_s 600);
# the first three steps took 368 s there. A sweep cut by its cap leaves its log, not its JSON.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(pwd) PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p $O; S=$(date +%s)
step() {  # step NAME CAP command...
  local name=$1 cap=$2; shift 2
  timeout $cap "$@" > $O/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - S )) s"; grep -v "generation_config" $O/$name.log | tail -4
}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
step kvtest 170 python3 -m pytest -q -m cuda tests/runtime/triton/test_kv_attention.py \
  tests/runtime/triton/test_wq_matmul.py::test_gemv_pdl_chain_under_cuda_graph
step kernels_att 150 python3 bench/triton_kernels.py --skip gemv,gemm --out $O/kernels_att.json
step e2e 100 python3 bench/triton_e2e.py --new-tokens 128 --repeats 2 --out $O/e2e.json
step sweep_gemv 150 python3 bench/triton_sweep.py --skip attention,gemm --out $O/sweep_gemv.json
