# spec (issue 18, one H200, ~9 min): speculative decoding on models trained in the same call - a 350M target and a
# 25M draft Llama trained by pipeloom-train on the stdlib corpus (byte tokens), then plain / prompt lookup (its
# verification graphed, and eager) / draft-model greedy decoding of three validation-split files through the engine
# (bench/spec_trained.py); the later runs reuse the two trained runs with other k and n-gram sizes.
# History: 08:45 UTC trained both models, then failed in decoding (the rotary kernel asked Triton for 3 warps; fixed
# with kernels.rotary.rotary_warps). 08:51 UTC ran (one prompt, one repeat) with a part 2 timing the launcher's -headm
# float8 layout; its plain rows paid SDPA's first call in the timed request (warm-up prompt too short), so the
# warm-up is now a request of the same length, and the rows are medians over repeats of three prompts. 09:06 UTC: the
# run recorded in RESULTS (sixth session). Since then the table has a split-K verification row and each row's graph
# replay time (the step's device time alone): the next run of this script measures them. k=16 replaces the 3-8-gram
# run: on the true text of the 12 most repetitive validation files, lookup proposes 3.0-3.1 tokens per step at k=16
# against 2.7 at k=8 and 2.3 at k=4 (1-3-grams), and larger n-grams propose fewer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
quiet() { grep -v "it/s\]\|Warning\|warn(\|^\s*$" | tail -${1:-12}; }
S="python3 bench/spec_trained.py --target 350m --draft 25m --steps 2000 --draft-steps 1000 --tokens 256 --runs /tmp/spec"
timeout -s INT 380 $S --k 8 --repeats 3 --out $OUT/spec_k8.json 2>&1 | tee $OUT/spec_k8.log | quiet 15
date -u
timeout -s INT 90 $S --k 16 --repeats 2 --out $OUT/spec_k16.json 2>&1 | quiet 10
timeout -s INT 90 $S --k 4 --repeats 2 --out $OUT/spec_k4.json 2>&1 | quiet 10
date -u
