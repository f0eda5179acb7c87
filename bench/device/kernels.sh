#!/bin/bash
# Kernel-only GPU work (issue 7) in one device call that needs no model: GPU tests of the decode attention, the
# GEMV launch variants and the runner with PDL GEMVs; the GEMV sweep (PDL, PREFETCH); the runner end to end on a
# random 1B Llama (plain and PDL GEMVs); the attention around the tuner's pick at 32k. Run from the repository
# root, carrying .whl (the device lacks onnx-ir):
#   bash bench/device/kernels.sh            # each step capped; logs and JSON in $OUT
#   STEPS="gputest e2e" bash bench/device/kernels.sh   # only those steps (default: the first four)
#   STEPS=w8a8 bash bench/device/kernels.sh             # the W8A8 GEMM step (GPU tests, sweep, tuner's picks)
#   STEPS="step_tests step_bench step_e2e" bash bench/device/kernels.sh   # the decode step's argmax, RMSNorm digit
#                                                       # planes and 2-warp digit GEMV (thirtieth session; ~410 s)
#   STEPS=step_runner bash bench/device/kernels.sh      # the runner's GPU tests of those (a second call, ~300 s)
#   STEPS=gluon_tests bash bench/device/kernels.sh      # the Gluon kernels' tests compiled (thirty-first session:
#                                                       # the same tests run them under the interpreter on CPUs)
# Budget about 9.5 minutes on a fresh machine (compiling is most of it; the caps sum to 560 s, so use timeout_s
# 600). A step cut by its cap leaves its log, and its JSON as far as it got where the script saves as it goes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$(pwd) PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p $O; S=$(date +%s)
step() {  # step NAME CAP command...
  local name=$1 cap=$2; shift 2
  [[ " ${STEPS:-gputest sweep_gemv e2e focus} " == *" $name "* ]] || return 0  # w8a8: only when named
  timeout $cap "$@" > $O/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - S )) s"; grep -v "generation_config" $O/$name.log | tail -4
}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
T=tests/runtime/triton
# (not all of test_wq_matmul.py: its every-config tests compile each GEMV/GEMM candidate, over 160 s when fresh)
step gputest 160 python3 -m pytest -q -m cuda $T/test_kv_attention.py \
  "$T/test_wq_matmul.py::test_gemv_pdl_chain_under_cuda_graph" "$T/test_wq_matmul.py::test_gemv_prefetch_empty_split" \
  "$T/test_runner.py::test_gpu_pdl_decode_step_in_the_captured_step" "$T/test_runner.py::test_gpu_cuda_graph_decode_equals_eager"
step sweep_gemv 90 python3 bench/triton_sweep.py --skip attention,attention_focus,gemm,gemm_focus --out $O/sweep_gemv.json
step e2e 200 python3 bench/triton_e2e.py --new-tokens 128 --repeats 2 --out $O/e2e.json
step focus 110 python3 bench/triton_sweep.py --skip gemv,attention,gemm,gemm_focus --contexts 32768 --out $O/focus.json
# the W8A8 GEMM: its GPU tests (the Gluon wgmma kernel against the Triton one), every candidate at M = 1024 / 2048,
# the tuner's picks
# (the wgmma test without -m cuda: its small shapes, unmarked since they run on CPUs too, are the partial-tile ones)
step w8a8 330 bash -c "python3 -m pytest -q $T/test_w8a8.py::test_wgmma_gemm_is_the_tma_kernel_bit_for_bit && \
  python3 -m pytest -q -m cuda $T/test_w8a8.py -k '8-None or two_to_the_31' \
  $T/test_wq_matmul.py::test_gemm_output_past_two_to_the_31_elements && \
  python3 bench/triton_sweep.py --skip gemv,attention,attention_focus,gemm --out $O/gemm_focus.json && \
  python3 bench/triton_kernels.py --skip gemv,attention --out $O/kernels_gemm.json"
# the decode step's small kernels (thirtieth session, not yet run on a GPU): the argmax against torch's, the RMSNorm's
# contiguous digit-plane stores, the digit GEMV at 2 warps for K = 2048 (single launches, then in the runner with the
# hidden-2048 model); the kernel bench's step section and decode shapes; the e2e decode step with its kernel profile
# (no -m cuda: the argmax and RMSNorm tests without the marker run compiled on a GPU too)
step step_tests 120 python3 -m pytest -q $T/test_argmax.py $T/test_norm.py $T/test_gemv_digits.py -k \
  "argmax or planes or single"
step step_runner 300 python3 -m pytest -q -m cuda $T/test_runner.py -k "digit_gemv_decode or greedy or cuda_graph"
step step_bench 120 python3 bench/triton_kernels.py --skip gemm,attention --gemv-bits 4 --digit-gemv --decode-shapes \
  --out $O/kernels_step.json
step step_e2e 170 python3 bench/triton_e2e.py --new-tokens 64 --repeats 1 --variants pdl,pdl_digits --profile \
  --out $O/e2e_step.json
# the Gluon kernels' tests, which since the thirty-first session also run on CPUs under the interpreter (_gluon):
# compiled here, every shape (the single digit GEMV and the chain at both sizes, every gemv_mma candidate, the wgmma
# GEMM against the Triton one), the layout test kernel; and the argmax with the step's tail
# folded in, alone and in the runner's captured and greedy steps (the runner's digit decode is step_runner's)
# (the changed code first: the argmax's tail and the runner's steps, then the test kernel, then the moved tests)
step gluon_tests 300 python3 -m pytest -q $T/test_argmax.py $T/test_runner.py $T/test_gluon.py \
  $T/test_gemv_digits.py $T/test_gemv_mma.py "$T/test_w8a8.py::test_wgmma_gemm_is_the_tma_kernel_bit_for_bit" \
  -k "not sm90_code and not digit_gemv_decode and (gluon or digit or mma or wgmma or argmax or cuda_graph or greedy)"
# the smallest GPU check of this session's changed code (for a short device budget): the argmax with the step's tail,
# the runner's captured and greedy steps that use it, the Gluon layout test kernel, the single digit GEMVs
step tail_tests 200 python3 -m pytest -q $T/test_argmax.py $T/test_runner.py $T/test_gluon.py $T/test_gemv_digits.py \
  -k "argmax or cuda_graph or greedy_steps or gluon or single_gemv"
