# q4 (issue 18, one H200, ~8 min): the quantized GEMVs of a 7B decode step inside CUDA graphs (bf16 cuBLAS, each int8 GEMV config, torch's int8 kernel, int4 Triton, int4 tinygemm), then batch-1 7B decode through the engine's CUDA graphs for bf16 / int8 / int4 in one process
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; git log -1 --format=%h 2>/dev/null; date -u
# 1. GEMVs (~1-2 min): each variant checked against its own dequantized float32 matmul, then timed; writes the fastest int8 config
timeout -s INT 150 python3 bench/quant_gemv.py --best-int8 $OUT/int8_best.txt 2>&1 | grep -v "$F" | tee $OUT/quant_gemv.log
export PIPELOOM_INT8_GEMV=$(cat $OUT/int8_best.txt 2>/dev/null || echo n4k512w1s3); echo "int8 GEMV config for the engine: $PIPELOOM_INT8_GEMV"; date -u
# 2. batch-1 7B decode (~3-5 min), per-token slope of a 32- and a 288-token generation, overlap on/off alternating; int4:triton only if the budget is left
timeout -s INT 330 python3 bench/engine_speed.py --paths graphs --parts decode-7b --quant none,int8,int4,int4:triton --repeats 2 --budget 240 2>&1 | grep -v "$F" | tee $OUT/engine_quant.log
date -u
