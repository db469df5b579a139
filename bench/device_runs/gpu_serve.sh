# issue 16 on one GPU: pipeloom-serve (llama-1b, random weights) under Poisson load, chunked-prefill vs prefill-first
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/serve/*.whl || exit
mkdir -p /tmp/p && ln -sfn $PWD /tmp/p/pipeloom && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
MODEL=${MODEL:-llama-1b}; RATES=${RATES:-16,64}; N=${N:-150}; IN=${IN:-1024}; OUTL=${OUTL:-128}; OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
for P in chunked-prefill prefill-first; do
  python3 -m pipeloom.launch.serve model=$MODEL inference.policy=$P server.port=8000 server.max_requests=1024 \
     server.max_queued_tokens=1000000 $EXTRA > $OUT/server-$P.log 2>&1 &
  SPID=$!
  for i in $(seq 1 240); do kill -0 $SPID 2>/dev/null || { echo "server died"; tail -20 $OUT/server-$P.log; exit 1; };  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null && break; sleep 1; done
  echo "== $P (server up after ${i}s)"
  timeout 200 python3 bench/serve_load.py --url http://127.0.0.1:8000 --num-prompts $N --rates $RATES \
     --input-len $IN --output-len $OUTL --range-ratio 0.9 --max-time ${MAXT:-60} --slo-itl 0.1 --json $OUT/load-$P.json 2>&1 | tee $OUT/load-$P.log
  kill $SPID; wait $SPID 2>/dev/null
  tail -5 $OUT/server-$P.log
done
