python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
F="Warning\|warn\|^ *$\|Configuration class"
# 1. batch-1 7B decode: bf16, int8 / int4 (dequantize fused into the matmul by Inductor, gpt-fast style), torchao fp8 W8A8 (PerRow); prompt lookup on bf16
timeout 350 python3 bench/quant_gpu.py --model llama-7b --variants bf16,int8-torch,int4-torch,fp8-torchao --spec-variants bf16 --tokens 128 --repeats 2 --warmup 1 --out $OUT/quant7b.json 2>&1 | grep -v "$F" | tee $OUT/quant.log
# 2. fp8 KV cache vs bf16 at 8k context through the engine (pool size, decode ms/token), prompt lookup through the engine
timeout 170 python3 bench/kv_fp8_gpu.py --model llama-7b --context 8192 --tokens 128 --speculative --out $OUT/kv7b.json 2>&1 | grep -v "$F" | tee $OUT/kv.log
