python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
F="Warning\|warn(\|^ *$\|Configuration class"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; date -u
# 1. main: the quantized GEMVs of a 7B decode step inside CUDA graphs (issue 18)
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
timeout -s INT 120 python3 bench/quant_gemv.py 2>&1 | grep -v "$F" | tee $OUT/quant_gemv.log
date -u
# 2. branch df at bb8a8be: fused decode graphs vs the unfused path, batch-1 1.1B and 7B, then offline throughput (issue 14)
mkdir -p /tmp/q && ln -sfn $PWD/.whl/trees/df /tmp/q/pipeloom && export PYTHONPATH=/tmp/q:/tmp/site
cd .whl/trees/df && timeout -s INT 400 python3 bench/engine_speed.py --paths graphs,unfused --parts decode-1b,decode-7b,throughput --budget 300 2>&1 | grep -v "$F" | tee $OUT/engine_speed_fusion.log
date -u
