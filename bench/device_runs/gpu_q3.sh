python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
F="Warning\|warn\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
# batch-1 7B decode: bf16 (+ prompt lookup), int8 / int4 (dequantize fused into the M=1 matmul by Inductor), torchao fp8
timeout 545 python3 bench/quant_gpu.py --model llama-7b --variants bf16,int8-torch,int4-torch,fp8-torchao --spec-variants bf16 --tokens 128 --repeats 2 --warmup 1 --out $OUT/quant7b.json 2>&1 | grep -v "$F" | tee $OUT/quant.log
date -u
