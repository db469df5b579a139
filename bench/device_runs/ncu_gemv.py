# ncu driver: the 7B gate_up GEMV (22016 x 4096, batch 1, bf16) through the int8 GEMV, int4 GEMV configs, tinygemm.
"""Each kernel runs three times, so ``ncu -k regex:"gemv|int4pack"`` profiles every launch (CUDA only)::

    ncu --clock-control none -k regex:"gemv|int4pack" --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section SchedulerStats python3 bench/device_runs/ncu_gemv.py [INT4 CONFIGS...]

The run of 2026-12-02 05:53 (bench/RESULTS.md) profiled the int4 configs ``n16k1024w2s3 n8k1024w1s3``, the
second since removed from ``kernels/int4_gemv.py``; without arguments this profiles the default and the fastest
config with shared-memory stages.
"""

import sys

import torch
from pipeloom.inference.quant.formats import quantize_int4, quantize_int8
from pipeloom.kernels import int4_tinygemm
from pipeloom.kernels.int4_gemv import int4_gemv, scales_offsets
from pipeloom.kernels.int8_gemv import int8_gemv

n, k = 22016, 4096
w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
x = torch.randn(1, k, device="cuda").bfloat16()
q8, s8 = quantize_int8(w)
q4, s4, z4 = quantize_int4(w, 128)
pairs = scales_offsets(s4, z4)
tw, tsz = int4_tinygemm.pack(q4, s4, z4, 128)
for _ in range(3):
    int8_gemv(x, q8, s8, config="n4k512w1s3")
torch.cuda.synchronize()
for cfg in sys.argv[1:] or ("n8k2048w2s1", "n16k1024w2s3"):
    for _ in range(3):
        int4_gemv(x, q4, pairs, 128, config=cfg)
    torch.cuda.synchronize()
for _ in range(3):
    int4_tinygemm.int4_matmul_tinygemm(x, tw, tsz, 128)
torch.cuda.synchronize()
print("done")
