python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch,triton,torchao;print(torch.__version__,triton.__version__,torchao.__version__)"
timeout 510 python3 bench/gpu_train.py --size 1.3b --steps 10 --warmup 3 --variants baseline-compile,pipeloom-compile,pipeloom-compile-float8-tensorwise,pipeloom-compile-float8-rowwise 2>&1 | tr "\r" "\n" | grep -v "^train:\|Warning\|warn(" | tee $OUT/gpu_f8.log
