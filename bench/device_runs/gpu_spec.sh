# spec (issue 18, one H200, ~8 min; not yet run): speculative decoding on models trained in the same call - a 350M
# target and a 25M draft Llama trained by pipeloom-train on the stdlib corpus (byte tokens), then plain / prompt
# lookup / draft-model greedy decoding of validation-split code through the engine (bench/spec_trained.py)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format=%h 2>/dev/null; date -u
timeout -s INT 560 python3 bench/spec_trained.py --target 350m --draft 25m --steps 2000 --draft-steps 1000 --tokens 256 --runs /tmp/spec --out $OUT/spec.json 2>&1 | grep -v "it/s\]\|Warning\|warn(" | tail -30
date -u
