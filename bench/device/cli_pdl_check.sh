#!/bin/bash
# qcompile run --device cuda with and without --pdl on a small exported Llama (and on the CPU, ORT), on the device
# machine from the repository root with .whl carried: the streamed text of the three runs, compared.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$(pwd):$(pwd)/tests PYTHONUNBUFFERED=1
python3 -c "
from pathlib import Path
from tiny_models import make_tiny_model
make_tiny_model('llama', Path('/tmp/tl'), hidden_size=256, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
"
python3 -c 'from qcompile.cli import main; raise SystemExit(main())' export /tmp/tl -o /tmp/tx --recipe w4a16-g64-rtn > $OUT/export.log 2>&1; echo export rc=$?
for f in "" "--pdl"; do python3 -c 'from qcompile.cli import main; raise SystemExit(main())' run /tmp/tx "hello there" --raw --max-new-tokens 16 --device cuda $f > $OUT/run$f.txt 2> $OUT/run$f.err; echo "run $f rc=$?"; done
python3 -c 'from qcompile.cli import main; raise SystemExit(main())' run /tmp/tx "hello there" --raw --max-new-tokens 16 > $OUT/run_cpu.txt 2>$OUT/run_cpu.err; echo "cpu rc=$?"
for f in $OUT/run*.txt; do echo "$f: $(cat $f | head -c 300)"; done; cmp $OUT/run.txt $OUT/run--pdl.txt && echo "pdl output identical"; tail -2 $OUT/run--pdl.err
