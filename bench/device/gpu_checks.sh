#!/bin/bash
# GPU checks of the Triton runtime (issue 7), started detached on the device beside bench/device/pipeline.sh
# (after run.sh start has assembled the GGUF and copied the package to /root/repo): the Triton test suite on the
# GPU, then the SmolLM2 greedy-token check of bench/triton_e2e.py on a weight-only export (RTN int4 g64, no
# calibration) and on a W4A8 export (rotation + GPTQ, activation QDQ). Results in /root/res/gpu_checks.
#   bash bench/device/gpu_checks.sh   (from the repository root; it copies tests/ next to the package)
R=/root/repo; M=/root/m/smollm2.gguf; O=/root/res/gpu_checks
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 QCOMPILE_DATA_DIR=/root/data QCOMPILE_CACHE=/root/cache
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
mkdir -p $O && cp -r tests $R/ && cd $R
( taskset -c 12-15 python3 -m pytest -q -p no:cacheprovider tests/runtime/triton > $O/tests.log 2>&1
  echo "rc=$?" >> $O/tests.log ) &
for r in w4a16-g64-rtn w4a8; do
  taskset -c 8-11 python3 -c "from qcompile.cli import main; main()" export $M -o /root/smol-$r --recipe $r --device cuda \
    > $O/export_$r.log 2>&1
  taskset -c 8-11 python3 bench/triton_e2e.py --skip-synthetic --smollm2 /root/smol-$r --out $O/e2e_smollm2_$r.json \
    > $O/e2e_$r.log 2>&1
done
wait
touch $O/done
