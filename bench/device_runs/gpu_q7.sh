# q7 (issue 18, one H200, ~3 min): pipeloom's int4 GEMV after its codes' tile became (rows, words) - shared-memory
# copies that keep rows whole, so a thread's 16-byte reads no longer fall in one bank (ncu: L1 83% busy, 8-way conflicts
# before) - every config against tinygemm and bf16 inside CUDA graphs; then batch-1 7B decode through the engine:
# bf16, int4 with pipeloom's GEMV (the table's fastest config), int4 with tinygemm
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format=%h 2>/dev/null; date -u
timeout -s INT 100 python3 bench/quant_gemv.py --int8-configs n4k512w1s3 --best-int4 $OUT/int4_best.txt 2>&1 | grep -v "$F" | grep -v "int8 aten" | tee $OUT/quant_gemv.log
export PIPELOOM_INT4_GEMV=$(sed -n 2p $OUT/int4_best.txt 2>/dev/null); [ -n "$PIPELOOM_INT4_GEMV" ] || export PIPELOOM_INT4_GEMV=n8k1024w1s3
echo "engine: int4 GEMV $PIPELOOM_INT4_GEMV"; date -u
timeout -s INT 200 python3 bench/engine_speed.py --paths graphs --parts decode-7b --quant none,int4:triton,int4:tinygemm --repeats 2 --budget 150 2>&1 | grep -v "$F" | tee $OUT/engine_quant.log
date -u
