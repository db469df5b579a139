# spec (issue 18, one H200, ~10 min): speculative decoding on models trained in the same call - a 350M target and a
# 25M draft Llama trained by pipeloom-train on the stdlib corpus (byte tokens), then plain / prompt lookup (its
# verification graphed, and eager) / draft-model greedy decoding of validation-split code through the engine
# (bench/spec_trained.py); the later runs reuse the two trained runs with other k and n-gram sizes. Part 2 (issue
# 19): the launcher's float8 head layout (-headm: the head module compiled, the loss eager) against -headc.
# First attempt (08:45 UTC) trained both models and then failed in decoding: the rotary kernel asked Triton for 3 warps
# (16 + 8 heads of 64), fixed with kernels.rotary.rotary_warps.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
quiet() { grep -v "it/s\]\|Warning\|warn(\|^\s*$" | tail -${1:-12}; }
S="python3 bench/spec_trained.py --target 350m --draft 25m --steps 2000 --draft-steps 1000 --tokens 256 --runs /tmp/spec"
timeout -s INT 330 $S --k 4 --out $OUT/spec_k4.json 2>&1 | tee $OUT/spec_k4.log | quiet 13
date -u
timeout -s INT 50 $S --k 8 --out $OUT/spec_k8.json 2>&1 | quiet 7
timeout -s INT 45 $S --k 8 --ngram 3,8 --out $OUT/spec_k8_n38.json 2>&1 | quiet 7
date -u
F="Warning\|warn(\|it/s\]"
timeout -s INT 150 python3 bench/gpu_train.py --size 1.3b --steps 10 --warmup 3 --variants baseline-compile,pipeloom-compile-blocks-headm-float8-tensorwise-f8head-fastacc,pipeloom-compile-blocks-headc-float8-tensorwise-f8head-fastacc 2>&1 | grep -v "$F" | tee $OUT/f8m.log | tail -8
date -u
