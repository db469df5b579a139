# q8 (issue 18, one H200, ~3 min): pipeloom's int4 GEMV configs that skip shared memory (q7 found n8k1024w1s1 at
# 2.58 TB/s) against tinygemm, bf16 and int8 inside CUDA graphs; then batch-1 7B decode, 3 repeats: bf16, int4 with
# pipeloom's GEMV (the table's fastest config), int4 with tinygemm, int8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format=%h 2>/dev/null; date -u
timeout -s INT 90 python3 bench/quant_gemv.py --int8-configs n4k512w1s3 --int4-configs n8k1024w1s1,n16k1024w1s1,n4k1024w1s1,n8k2048w2s1,n8k512w1s1,n16k1024w2s3 --best-int4 $OUT/int4_best.txt 2>&1 | grep -v "$F" | grep -v "int8 aten\|gemlite" | tee $OUT/quant_gemv.log
export PIPELOOM_INT4_GEMV=$(sed -n 2p $OUT/int4_best.txt 2>/dev/null); [ -n "$PIPELOOM_INT4_GEMV" ] || export PIPELOOM_INT4_GEMV=n8k1024w1s1
echo "engine: int4 GEMV $PIPELOOM_INT4_GEMV"; date -u
timeout -s INT 170 python3 bench/engine_speed.py --paths graphs --parts decode-7b --quant none,int4:triton,int4:tinygemm,int8 --repeats 3 --budget 140 2>&1 | grep -v "$F" | grep -v "^|" | tee $OUT/engine_quant.log
date -u
