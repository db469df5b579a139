# f8d (issue 19, one H200, ~8 min): float8 tensorwise at 1.3B with the float8 head compiled with the loss (-headc
# -f8head), fast accumulation in the backward GEMMs (-fastacc), Inductor's coordinate-descent tuning (-cdt), against
# baseline-compile in the same run; then the 300-step bf16 vs float8 (fast accumulation) loss curves
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format=%h 2>/dev/null; date -u
timeout -s INT 320 python3 bench/gpu_train.py --size 1.3b --steps 10 --warmup 3 --variants baseline-compile,pipeloom-compile-blocks-headc-float8-tensorwise-fastacc,pipeloom-compile-blocks-headc-float8-tensorwise-f8head-fastacc,pipeloom-compile-blocks-headc-float8-tensorwise-f8head-fastacc-cdt 2>&1 | grep -v "$F" | tee $OUT/f8d.log
date -u
timeout -s INT 240 python3 bench/gpu_train.py --curve 300 --curve-size 1.3b --curve-seq 1024 --curve-batch 8 --curve-float8 tensorwise --curve-fast-accum --out /tmp/f8curve 2>&1 | grep -v "$F" | grep -v "^step\|it/s\]" | tail -25
date -u
cp /tmp/f8curve/curve.json /tmp/f8curve/curve.png $OUT/ 2>/dev/null; ls $OUT
