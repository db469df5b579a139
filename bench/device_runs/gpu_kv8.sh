python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; date -u
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
# 1. the split-K decode kernel alone, one 7B layer at 8k context, bf16 vs fp8 cache, batch 1 and 16, in CUDA graphs (~30 s)
timeout -s INT 75 python3 bench/kv_fp8_gpu.py --parts kernel --model llama-7b --context 8192 --batches 1,16 --out $OUT/kv8_kernel.json 2>&1 | grep -v "$F" | tee $OUT/kv8_kernel.log
date -u
# 2. engine decode of the 7B at 8k context, bf16 then fp8 cache (pool size, ms/token, greedy agreement; ~100 s)
timeout -s INT 140 python3 bench/kv_fp8_gpu.py --parts engine --model llama-7b --context 8192 --tokens 128 --out $OUT/kv8_engine.json 2>&1 | grep -v "$F" | tee $OUT/kv8_engine.log
date -u
# 3. the fp8 KV kernel tests compiled for the GPU instead of interpreted, if pytest is there (~30 s)
python3 -c "import pytest" 2>/dev/null && timeout -s INT 35 python3 -m pytest -q -x -p no:cacheprovider tests/test_kv_fp8.py -k "test_triton and not auto" 2>&1 | tail -6 | tee $OUT/kv8_tests.log
# 4. tilings of the decode kernel at batch 1 (block_n, warps, stages, splits), both caches (~40 s; may be cut)
timeout -s INT 50 python3 bench/kv_fp8_gpu.py --parts sweep --model llama-7b --context 8192 --batches 1 --calls 10 --repeats 5 2>&1 | grep -v "$F" | tee $OUT/kv8_sweep.log
# 5. what this Triton compiles the kernels to: instructions per key step, load widths, registers, spills (~15 s)
timeout -s INT 20 python3 bench/kernel_sass.py 2>&1 | grep -v "$F" | tee $OUT/kv8_sass.log
date -u
