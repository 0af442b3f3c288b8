#!/usr/bin/env bash
# Issue 17 + 24 (fifth session): the CUDA tests, then the probes' cost with the one-step refactor ("after") beside the
# code before it ("before", a copy of its src/ under bench_old/src, carried), and peak memory.
# Usage: bash benchmarks/gpu_house.sh PART   (PART: r50 | r18 | mixed | costs | final)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore CUDA_VISIBLE_DEVICES=0
F="^\[rank\|Initializing\|GPU avail\|TPU\|LOCAL_RANK\|Tip\|USDT"
NEW=$PWD/src:$PWD
OLD=$PWD/bench_old/src:$PWD
case "$1" in
r50)
    PYTHONPATH=$NEW timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -15
    C=none,floor-1,floor-8,module-1,module-8,probe-8,sweep-16
    PYTHONPATH=$NEW timeout 150 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs $C --json "$OUT/r50_after.json" 2>&1 | grep -v "$F"
    PYTHONPATH=$OLD timeout 150 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs $C --json "$OUT/r50_before.json" 2>&1 | grep -v "$F"
    PYTHONPATH=$NEW timeout 100 python3 benchmarks/memory.py --configs none,floor-8,eager-8,module-8 --json "$OUT/memory_after.json" 2>&1 | grep -v "$F"
    ;;
r18)
    C=none,floor-1,floor-8,module-1,module-8,probe-8,sweep-16
    for round in 1 2; do
        PYTHONPATH=$NEW timeout 100 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --steps 100 --configs $C --json "$OUT/r18_after_$round.json" 2>&1 | grep -v "$F"
        PYTHONPATH=$OLD timeout 100 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --steps 100 --configs $C --json "$OUT/r18_before_$round.json" 2>&1 | grep -v "$F"
    done
    ;;
mixed)
    # Issues 21 and 24: the CUDA tests (graph replays under bf16-mixed and 16-mixed), peak memory with the gradient
    # buffers dropped before a capture, and the attentive probe on ViT-B/16 tokens under the step's autocast.
    PYTHONPATH=$NEW timeout 240 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -15
    PYTHONPATH=$NEW timeout 150 python3 benchmarks/memory.py --configs none,floor-8,eager-8,module-8,sweep-16 --json "$OUT/memory.json" 2>&1 | grep -v "$F"
    PYTHONPATH=$NEW timeout 300 python3 benchmarks/overhead.py --device cuda --backbone vit_b_16 --rounds 3 --steps 100 --configs none,attn-floor,attn-floor32,attn-1,attn32-1,cls-1 --json "$OUT/vit_b_16.json" 2>&1 | grep -v "$F"
    ;;
costs)
    # Where the remaining memory and the ViT linear probe's time go: the memory breakdown by pool and stream, the
    # kernels of the probe steps on ViT-B/16, and the ViT overhead with more rounds.
    PYTHONPATH=$NEW timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tail -3
    PYTHONPATH=$NEW timeout 120 python3 benchmarks/memory.py --configs none,eager-8,module-8 --breakdown 2>&1 | grep -v "$F"
    PYTHONPATH=$NEW timeout 150 python3 benchmarks/profile_kernels.py --backbone vit_b_16 --configs module-1,cls-1,attn-floor,attn-1 --top 30 2>&1 | grep -v "$F"
    PYTHONPATH=$NEW timeout 250 python3 benchmarks/overhead.py --device cuda --backbone vit_b_16 --rounds 5 --steps 100 --configs none,module-1,cls-1,attn-floor,attn-1 --json "$OUT/vit_b_16_costs.json" 2>&1 | grep -v "$F"
    ;;
final)
    # The closing run of the session: the CUDA tests, one health computation of each kind, and the probes' cost on
    # ResNet-50 and ResNet-18 with everything of this session in place.
    PYTHONPATH=$NEW timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_cuda.py 2>&1 | tail -3
    PYTHONPATH=$NEW timeout 150 python3 benchmarks/health_time.py --device cuda 2>&1 | grep -v "$F"
    C=none,floor-1,floor-8,module-1,module-8,probe-8,sweep-16
    PYTHONPATH=$NEW timeout 150 python3 benchmarks/overhead.py --device cuda --backbone resnet50 --rounds 3 --configs $C --json "$OUT/r50_final.json" 2>&1 | grep -v "$F"
    PYTHONPATH=$NEW timeout 120 python3 benchmarks/overhead.py --device cuda --backbone resnet18 --rounds 3 --steps 100 --configs $C --json "$OUT/r18_final.json" 2>&1 | grep -v "$F"
    ;;
esac
