#!/usr/bin/env bash
# All the GPU work of one device session (run from the repository root on the GPU machine).
# Usage: bash benchmarks/gpu_session.sh PART    (PART: tests | bench1 | bench2 | one-gpu | two-gpus | graphs | trust |
#                                               memory | refit | layers | vit)
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
one-gpu)
    # Everything on one GPU (GPU 0): CUDA tests, matmul layouts, kernel profiles, ResNet-50 and ResNet-18 overhead.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -2
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bank_matmul.py | tee "$OUT/bank_matmul.txt"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/profile_kernels.py --backbone resnet50 --configs floor-1,module-1,lars-1,probe-1,sweep-16 --top 25 2>&1 | grep -v "$FILTER" > "$OUT/prof_r50.txt"
    grep "##" "$OUT/prof_r50.txt"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs none,floor-1,floor-8,module-0,module-1,module-8,whole-8,lars-8,probe-1,probe-8,sweep-16 --json "$OUT/r50.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50.txt"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --configs none,floor-1,floor-8,module-1,module-8,whole-8,probe-8,sweep-16 --json "$OUT/r18.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r18.txt"
    ;;
two-gpus)
    # DDP on 2 GPUs: the distributed tests on NCCL, then overhead under DDP and on one GPU of the same machine.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    SSLPROBE_TEST_ACCELERATOR=gpu python3 -m pytest -q -p no:cacheprovider tests/distributed 2>&1 | tee "$OUT/test_ddp_gpu.log" | tail -3
    python3 benchmarks/overhead.py --device cuda --backbone resnet50 --devices 2 --rounds 3 --configs none,floor-1,floor-8,module-0,module-1,module-8,sweep-16 --json "$OUT/r50_ddp.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50_ddp.txt"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs none,floor-1,floor-8,module-1,module-8,sweep-16 --json "$OUT/r50_1gpu.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50_1gpu.txt"
    ;;
graphs)
    # The probe step as a CUDA graph (third session): CUDA tests, then ResNet-18 and ResNet-50 overhead with graphs
    # (module-N, the default) and without (eager-N), beside the hand-written floor.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -25
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --configs none,floor-1,floor-8,module-1,module-8,eager-1,eager-8,probe-8,sweep-16 --json "$OUT/r18.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r18.txt"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs none,floor-1,floor-8,module-0,module-1,module-8,eager-8,probe-1,probe-8,sweep-16 --json "$OUT/r50.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50.txt"
    ;;
trust)
    # Fourth session (exact evaluation statistics in FeatureNorm, per-loader metrics, ignore_index counts): the CUDA
    # tests, then what the probes cost now on ResNet-18 (host-bound) and ResNet-50, beside the hand-written floor.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -25
    CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --configs none,floor-1,floor-8,module-1,module-8,probe-8,sweep-16 --json "$OUT/r18.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r18.txt"
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs none,floor-1,floor-8,module-1,module-8,probe-1,probe-8,sweep-16 --json "$OUT/r50.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50.txt"
    ;;
memory)
    # Issue 24: peak memory per configuration (each in its own process), then the step time with the shared pool.
    # A copy of the previous code under bench_old/src (if present) is measured too, in the same session.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -3
    CUDA_VISIBLE_DEVICES=0 timeout 260 python3 benchmarks/memory.py --configs none,floor-8,eager-8,module-8,sweep-16,knn --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.txt"
    if [ -d bench_old/src ]; then
        CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD/bench_old/src:$PWD timeout 160 python3 benchmarks/memory.py --configs none,module-8,knn --json "$OUT/memory_old.json" 2>&1 | tee "$OUT/memory_old.txt"
    fi
    ;;
refit)
    # Issue 18: one refit at D=2048, C=1000 on the GPU, and what RefitProbe costs per step on ResNet-50.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/refit_time.py --device cuda 2>&1 | tee "$OUT/refit_time.txt"
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs none,module-1,refit-1,module-8,refit-9 --json "$OUT/r50_refit.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50_refit.txt"
    ;;
layers)
    # Issue 20: four probes on the four ResNet-50 stages (Layer hooks) against four probes on the one embedding.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 2 --steps 40 --configs none,module-4,layers-4 --json "$OUT/r50_layers.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/r50_layers.txt"
    ;;
vit)
    # Issue 21: an attentive probe on ViT-B/16's tokens (224px, batch 64, bf16-mixed, 1000 classes) beside the
    # hand-written floors (under the step's autocast, and in fp32), and a LinearProbe on the CLS token. First a check
    # that overhead.ViTTokens's CLS token is what torchvision's VisionTransformer.forward classifies.
    FILTER="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 - <<'EOF' 2>&1 | tee "$OUT/vit_tokens_check.txt"
import sys
import torch
import torchvision
sys.path.insert(0, "benchmarks")
import overhead
torch.manual_seed(0)
vit = torchvision.models.vit_b_16(num_classes=1000).cuda()
torch.nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision starts the head at zero: make the check bite
images = torch.randn(2, 3, 224, 224, device="cuda")
with torch.no_grad():
    out = overhead.ViTTokens(vit)(images)
    gap = (vit.heads(out["embedding"]) - vit(images)).abs().max().item()
print("torchvision", torchvision.__version__, "tokens", tuple(out["tokens"].shape), "cls", tuple(out["embedding"].shape),
      "max |heads(cls) - vit(x)|", gap)
assert out["tokens"].shape == (2, 197, 768) and gap < 1e-4, gap
EOF
    CUDA_VISIBLE_DEVICES=0 timeout 400 python3 benchmarks/overhead.py --device cuda --backbone vit_b_16 --rounds 5 --steps 100 --configs none,attn-floor,attn-floor32,attn-1,attn32-1,cls-1 --json "$OUT/vit_b_16.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/vit_b_16.txt"
    for precision in 32-true bf16-mixed; do
        timeout 120 python3 benchmarks/fidelity.py --only linear,sweep,attentive --precision $precision 2>&1 | grep -v "$FILTER\|AMP\|max_epochs" | tee "$OUT/fidelity_$precision.txt" | tail -4
    done
    ;;
esac
