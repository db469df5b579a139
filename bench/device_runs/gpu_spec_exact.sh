# spec_exact (issue 18, one H200, ~3 min): gpu_spec.sh's 09:06 run gave tokens that part from plain greedy's in
# bfloat16 (every speculative way, verification graphed or eager); the same decodes with UNTRAINED 350M/25M models
# in float32 and in bfloat16 tell numerics (a verification forward of k + 1 rows rounds differently from a decode
# step, so a near-tie flips) from a bug (which float32 would show as well)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
quiet() { grep -v "it/s\]\|Warning\|warn(\|^\s*$\|^continuation" | tail -${1:-12}; }
S="python3 bench/spec_trained.py --untrained --target 350m --draft 25m --tokens 256 --k 8 --prompts 3"
for dt in float32 bfloat16; do
  timeout -s INT 130 $S --dtype $dt --out $OUT/exact_$dt.json 2>&1 | quiet 8
done
date -u
