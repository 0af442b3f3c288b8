#!/usr/bin/env bash
# All the GPU work of one device session (run from the repository root on the GPU machine).
# Usage: bash benchmarks/gpu_session.sh PART    (PART: tests | bench1 | bench2)
# Writes logs and JSON under $OUT (or ./gpu-out). NCCL's NVLink multicast stays off (the machine sets it).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
case "$1" in
tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
    python3 -c "import torch, lightning, torchmetrics, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$OUT/gpus.txt"
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -15
    SSLPROBE_TEST_ACCELERATOR=gpu python3 -m pytest -q -p no:cacheprovider tests/distributed 2>&1 | tee "$OUT/test_ddp_gpu.log" | tail -15
    ;;
bench1)
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3
    CONFIGS=none,floor-1,floor-8,module-0,module-1,module-8,plain-1,plain-8,lars-1,lars-8,sweep-8,sweep-16
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs $CONFIGS --json "$OUT/r50.json" 2>&1 | tee "$OUT/r50.log" | grep -v "^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --configs $CONFIGS --json "$OUT/r18.json" 2>&1 | tee "$OUT/r18.log" | grep -v "^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip"
    ;;
bench2)
    python3 benchmarks/overhead.py --device cuda --backbone resnet50 --devices 2 --rounds 3 --configs none,floor-1,floor-8,module-0,module-1,module-8,sweep-16 --json "$OUT/r50_ddp.json" 2>&1 | tee "$OUT/r50_ddp.log" | grep -v "^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs none,floor-1,floor-8,module-0,module-1,module-8,sweep-16 --json "$OUT/r50_same_machine.json" 2>&1 | tee "$OUT/r50_1gpu.log" | grep -v "^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip"
    ;;
esac
