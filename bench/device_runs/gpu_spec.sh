# spec (issue 18, one H200, ~8 min): speculative decoding on models trained in the same call - a 350M target and a
# 25M draft Llama trained by pipeloom-train on the stdlib corpus (byte tokens), then plain / prompt lookup (its
# verification graphed, and eager) / draft-model greedy decoding of validation-split code through the engine
# (bench/spec_trained.py); the later runs reuse the two trained runs with other k and n-gram sizes
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format=%h 2>/dev/null; date -u
quiet() { grep -v "it/s\]\|Warning\|warn(" | tail -${1:-12}; }
S="python3 bench/spec_trained.py --target 350m --draft 25m --steps 2000 --draft-steps 1000 --tokens 256 --runs /tmp/spec"
timeout -s INT 450 $S --k 4 --out $OUT/spec_k4.json 2>&1 | quiet 16
date -u
timeout -s INT 60 $S --k 8 --out $OUT/spec_k8.json 2>&1 | quiet 8
timeout -s INT 50 $S --k 8 --ngram 3,8 --out $OUT/spec_k8_n38.json 2>&1 | quiet 8
date -u
