# call B: issue 16 serve (main f68f1c7), issue 19 float8 (tree f8 0146660), issue 14 engine graphs path (tree q2 d778167)
export OUT=${OUT:-/tmp/out}
IN=512 RATES=16,48 N=100 MAXT=25 timeout 175 bash bench/device_runs/gpu_serve.sh 2>&1 | grep -v "Warning\|warn"
pkill -f pipeloom.launch.serve; sleep 1
export PYTHONPATH=/tmp/p:/tmp/site PYTHONUNBUFFERED=1
cp -r .whl/trees/f8 /tmp/f8tree && ln -sfn /tmp/f8tree /tmp/p/pipeloom && (cd /tmp/f8tree && timeout 270 python3 bench/gpu_train.py --size 1.3b --steps 10 --warmup 3 --variants baseline-compile,pipeloom-compile-float8-rowwise,pipeloom-compile-float8-tensorwise 2>&1 | tr "\r" "\n" | grep -v "^train:\|Warning\|warn(" | tee $OUT/gpu_f8.log)
cp -r .whl/trees/q2 /tmp/q2tree && ln -sfn /tmp/q2tree /tmp/p/pipeloom && cd /tmp/q2tree && timeout -s INT 125 python3 bench/engine_speed.py --budget 60 --paths graphs --parts decode-7b,throughput --repeats 2 2>&1 | grep -v "Warning\|warn(\|^ *$" | tee $OUT/engine_speed.log
