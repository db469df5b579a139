# q6 (issues 18 and 19, one H200, ~8 min): the 7B decode GEMVs inside CUDA graphs with GemLite's int4 kernels (its own
# choice and each named kernel) against tinygemm, pipeloom's GEMVs and bf16; then float8 training at 1.3B with the
# final norm, head and loss compiled (-headc) and with a float8 head (-f8head), a kernel profile of the float8 step
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/gemlite/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,triton,gemlite;print(torch.__version__,triton.__version__,gemlite.__version__)"; git log -1 --format=%h 2>/dev/null; date -u
# 1. GEMVs (~2 min with GemLite's autotuning)
timeout -s INT 200 python3 bench/quant_gemv.py --int8-configs n4k512w1s3 --int4-configs n16k1024w2s3 --gemlite-kinds GEMV_REVSPLITK,GEMV,GEMV_SPLITK --head 2>&1 | grep -v "$F" | tee $OUT/quant_gemv.log
date -u
# 2. float8 at 1.3B (~5 min)
timeout -s INT 330 python3 bench/gpu_train.py --size 1.3b --steps 10 --warmup 3 --variants baseline-compile,pipeloom-compile-blocks-float8-tensorwise,pipeloom-compile-blocks-headc-float8-tensorwise,pipeloom-compile-blocks-headc-float8-tensorwise-f8head --profile pipeloom-compile-blocks-headc-float8-tensorwise 2>&1 | grep -v "$F" | tee $OUT/float8.log
date -u
