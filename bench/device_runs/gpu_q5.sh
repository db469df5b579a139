# q5 (issue 18, one H200, ~6.5 min): the 7B decode GEMVs inside CUDA graphs (bf16 cuBLAS, the best int8 config, every int4 GEMV config of kernels/int4_gemv.py, tinygemm; the output head's GEMV too), then batch-1 7B decode through the engine's CUDA graphs: bf16, int4 with pipeloom's GEMV (the table's fastest config), int4 with tinygemm, int4 + quantized head (the table's faster int4 kernel), int8, int8 + quantized head
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; git log -1 --format=%h 2>/dev/null; date -u
# 1. GEMVs (~1-1.5 min): each variant checked against its own dequantized float32 matmul, then timed; writes the fastest int8 config and int4 choice
timeout -s INT 110 python3 bench/quant_gemv.py --int8-configs n4k512w1s3 --head --best-int8 $OUT/int8_best.txt --best-int4 $OUT/int4_best.txt 2>&1 | grep -v "$F" | tee $OUT/quant_gemv.log
export PIPELOOM_INT8_GEMV=$(cat $OUT/int8_best.txt 2>/dev/null || echo n4k512w1s3)
export PIPELOOM_INT4_GEMV=$(sed -n 2p $OUT/int4_best.txt 2>/dev/null); [ -n "$PIPELOOM_INT4_GEMV" ] || export PIPELOOM_INT4_GEMV=n8k1024w1s3
[ "$(sed -n 1p $OUT/int4_best.txt 2>/dev/null)" = tinygemm ] && export PIPELOOM_INT4_KERNEL=tinygemm || export PIPELOOM_INT4_KERNEL=triton
echo "engine: int8 GEMV $PIPELOOM_INT8_GEMV, int4 GEMV $PIPELOOM_INT4_GEMV, int4 kernel for int4 / int4+head: $PIPELOOM_INT4_KERNEL"; date -u
# 2. batch-1 7B decode (~4.5 min), per-token slope of a 32- and a 288-token generation, overlap on/off alternating; variants in order of need, none started after --budget
timeout -s INT 270 python3 bench/engine_speed.py --paths graphs --parts decode-7b --quant none,int4:triton,int4:tinygemm,int4+head,int8,int8+head --repeats 2 --budget 210 2>&1 | grep -v "$F" | tee $OUT/engine_quant.log
date -u
