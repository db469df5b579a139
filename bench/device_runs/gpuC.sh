# call C: throughput after a full warm-up, overlap alternating, HF generate_batch baseline in the same run (main, merged)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
timeout -s INT 280 python3 bench/engine_speed.py --budget 200 --paths graphs --parts throughput,hf --hf-requests 32 2>&1 | grep -v "Warning\|warn(\|^ *$" | tee $OUT/engine_speed.log
