"""Profile target for Nsight Compute: decode attention at 32k over int8 and int4 KV caches (the shapes of
bench/triton_sweep.py's attention_focus) in a forced configuration, by default the tuner's H100 pick of the fifth
session (GP=4, one warp, 32-token blocks, 132 splits, 8-warp combine over 32 columns, PDL). Two warm-up calls, then
two profiled calls per width (so skip 2 per width with ncu's -s, or filter with --launch-skip-before-match):
    ncu --clock-control none --set full -k regex:"decode|combine" python3 bench/device/ncu_attention.py"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triton_kernels import attention_setup  # noqa: E402

from qcompile.runtime.triton.kv_attention import decode_attention  # noqa: E402

PICK = dict(BLOCK_S=32, SPLITS=132, num_warps=1, num_stages=2, GP=4, COMBINE_WARPS=8, COMBINE_DC=32, PDL=True)
config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else PICK
q, lens, prefix, caches = attention_setup(32768)
for bits in (8, 4):
    for _ in range(4):
        decode_attention(q, caches[bits][0], lens, prefix, config=config)
    torch.cuda.synchronize()
    print("kv", bits, "done", config, flush=True)
