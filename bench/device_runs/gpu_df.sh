# df (issue 14, decode fusion on one H200): batch-1 decode 1.1B and 7B, fused decode graphs against the unfused path in one run, with kernels per token
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"
F="Warning\|warn(\|^ *$"
# graphs: the decode graph over the fused forward (always_fuse); unfused: the same with fuse_decode off (the path before)
timeout -s INT 540 python3 bench/engine_speed.py --paths graphs,unfused --parts decode-1b,decode-7b 2>&1 | grep -v "$F" | tee $OUT/engine_speed_fusion.log
