python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,torchao;print(torch.__version__,torchao.__version__)"; date -u
timeout 320 python3 bench/gpu_train.py --size 1.3b --steps 10 --warmup 3 --variants baseline-compile,pipeloom-compile-blocks-float8-tensorwise,pipeloom-compile-blocks,pipeloom-compile-blocks-float8-rowwise-min2048 2>&1 | tr "\r" "\n" | grep -v "^train:\|Warning\|warn(" | tee $OUT/gpu_f8.log
date -u
timeout 200 python3 bench/gpu_train.py --curve 300 --curve-size 1.3b --curve-seq 1024 --curve-batch 8 --curve-float8 tensorwise --out /tmp/f8curve 2>&1 | tr "\r" "\n" | grep -v "^train:\|Warning\|warn(" | tail -40 | tee $OUT/curve.log
cp /tmp/f8curve/curve.json /tmp/f8curve/curve.png $OUT/ 2>/dev/null; for d in bf16 float8-tensorwise; do cp /tmp/f8curve/$d/metrics.jsonl $OUT/metrics-$d.jsonl 2>/dev/null; done; date -u
