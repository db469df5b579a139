# call A: issue 16 serve load (main f68f1c7) then issue 14 engine speed (tree q2 d778167 = pf + q2)
export OUT=${OUT:-/tmp/out}
RATES=16,48 N=120 MAXT=30 bash bench/device_runs/gpu_serve.sh 2>&1 | grep -v "Warning\|warn" | grep -v "^|.*(ms)" 
cp -r .whl/trees/q2 /tmp/q2tree && ln -sfn /tmp/q2tree /tmp/p/pipeloom && cd /tmp/q2tree && export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import pipeloom,sys; print(pipeloom.__file__)"
timeout -s INT 300 python3 bench/engine_speed.py --budget 230 --parts decode-1b,decode-7b,throughput,hf --repeats 2 2>&1 | grep -v "Warning\|warn(\|^ *$" | tee $OUT/engine_speed.log
