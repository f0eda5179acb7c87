#!/bin/bash
# qcompile run --device cuda with and without --pdl on a small exported Llama (and on the CPU, ORT), on the device
# machine from the repository root with .whl carried: the streamed text of the runs, compared. Each GPU run twice,
# with a fresh kernel-tuning cache ($QCOMPILE_CACHE) first: the second run of each reads the first's picks from
# disk (qcompile/runtime/triton/_tune.py, TuningCache), and each run's wall time is printed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$(pwd):$(pwd)/tests PYTHONUNBUFFERED=1
export QCOMPILE_CACHE=/tmp/qcache; rm -rf $QCOMPILE_CACHE
python3 -c "
from pathlib import Path
from tiny_models import make_tiny_model
make_tiny_model('llama', Path('/tmp/tl'), hidden_size=256, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
"
qc() { python3 -c 'from qcompile.cli import main; raise SystemExit(main())' "$@"; }
qc export /tmp/tl -o /tmp/tx --recipe w4a16-g64-rtn > $OUT/export.log 2>&1; echo export rc=$?
for pass in 1 2; do
  for f in "" "--pdl"; do
    t0=$EPOCHREALTIME
    qc run /tmp/tx "hello there" --raw --max-new-tokens 16 --device cuda $f > $OUT/run$f.$pass.txt 2> $OUT/run$f.$pass.err
    rc=$?; echo "run $f pass $pass rc=$rc wall $(python3 -c "print(round($EPOCHREALTIME - $t0, 1))") s"
  done
  ls -la $QCOMPILE_CACHE/triton-tuning/ 2>&1 | tail -n +2
done
qc run /tmp/tx "hello there" --raw --max-new-tokens 16 > $OUT/run_cpu.txt 2>$OUT/run_cpu.err; echo "cpu rc=$?"
for f in $OUT/run*.txt; do echo "$f: $(head -c 300 $f)"; done
cmp $OUT/run.1.txt $OUT/run--pdl.1.txt && echo "pdl output identical"
cmp $OUT/run.1.txt $OUT/run.2.txt && cmp $OUT/run--pdl.1.txt $OUT/run--pdl.2.txt && echo "cached-pick runs identical"
tail -2 $OUT/run--pdl.1.err; cp -r $QCOMPILE_CACHE/triton-tuning $OUT/ 2>/dev/null
