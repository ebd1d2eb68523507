#!/usr/bin/env bash
# Everything GPU-specific in one short run (CUDA correctness, bf16 autocast, torch.compile,
# step-time ratios). Usage on a GPU machine: bash benchmarks/gpu_check.sh; results are
# appended to $OUT/gpu_results.md (or benchmarks/gpu_results.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}/gpu_results.md"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out"
python -m pytest -q tests/test_gpu.py tests/test_runtime.py 2>&1 | tail -5 | tee -a "$out"
common=(--device cuda --size 224 --batch 128 --repeats 15 --warmup 3 --out "$out"
        --variants bp bp+state fa sf kp pfa-compact pfa pfa-product pfa-x1 pfa-population)
python benchmarks/step_time.py --models resnet18 "${common[@]}"
python benchmarks/step_time.py --models resnet18 --amp bf16 --channels-last "${common[@]}"
python benchmarks/step_time.py --models resnet50 vit_small convnext_tiny --variants bp fa kp pfa-compact pfa \
    --device cuda --size 224 --batch 64 --repeats 10 --warmup 2 --amp bf16 --out "$out"
