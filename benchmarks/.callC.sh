export PYTHONPATH=$PWD/src:$PWD PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | grep -E "^E |passed|failed" | head -20
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/profile_step.py lars-8 --backbone resnet18 --steps 30 2>&1 | grep -v "^\s*$" | grep -vE "GPU avail|TPU|LOCAL_RANK|Tip|USDT" | head -75 > $OUT/profile_lars8.txt
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/profile_step.py module-8 --backbone resnet18 --steps 30 2>&1 | grep -v "^\s*$" | grep -vE "GPU avail|TPU|LOCAL_RANK|Tip|USDT" | head -75 > $OUT/profile_module8.txt
head -3 $OUT/profile_lars8.txt $OUT/profile_module8.txt
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 5 --configs none,floor-1,floor-8,module-0,module-1,module-8,lars-1,lars-8,sweep-16 --json $OUT/r18b.json 2>&1 | grep -A 20 "^# "
