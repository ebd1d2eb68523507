#!/usr/bin/env bash
# Everything GPU-specific in one short run (CUDA correctness, bf16 autocast, torch.compile,
# step-time ratios). Usage on a GPU machine: bash benchmarks/gpu_check.sh; results are
# appended to $OUT/gpu_results.md (or benchmarks/gpu_results.md).
set -uo pipefail
cd "$(dirname "$0")/.."
# the lent GPU machines have torch, torchvision and timm under `python3` but no pfa_fx
# install (and nothing can be fetched there): import it from this checkout
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks}/gpu_results.md"
"$py" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" | tee -a "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out"
"$py" -m pytest -q tests/test_gpu.py tests/test_runtime.py 2>&1 | tail -5 | tee -a "$out"
common=(--device cuda --size 224 --batch 128 --repeats 15 --warmup 3 --out "$out"
        --variants bp bp+state fa sf kp pfa-compact pfa pfa-product pfa-x1 pfa-population)
"$py" benchmarks/step_time.py --models resnet18 "${common[@]}"
"$py" benchmarks/step_time.py --models resnet18 --amp bf16 --channels-last "${common[@]}"
"$py" benchmarks/step_time.py --models resnet50 vit_small convnext_tiny --variants bp fa kp pfa-compact pfa \
    --device cuda --size 224 --batch 64 --repeats 10 --warmup 2 --amp bf16 --out "$out"
