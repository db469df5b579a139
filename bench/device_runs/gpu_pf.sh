# pf (issue 14, speed on one H200): decode 1.1B/7B batch 1 (overlap on/off), offline throughput vs HF generate_batch, then the compiled decode path
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"
F="Warning\|warn(\|^ *$"
# 1) the graphs path (CUDA graph over the eager decode forward): every part; SIGINT still prints the table
timeout -s INT 320 python3 bench/engine_speed.py --paths graphs --parts decode-1b,throughput,hf,decode-7b --hf-requests 32 --budget 250 2>&1 | grep -v "$F" | tee $OUT/engine_speed_graphs.log
# 2) the compiled path (torch.compile'd decode forward in the graph), 1.1B batch 1, with what time is left
timeout -s INT 170 python3 bench/engine_speed.py --paths compiled --parts decode-1b 2>&1 | grep -v "$F" | tee $OUT/engine_speed_compiled.log
