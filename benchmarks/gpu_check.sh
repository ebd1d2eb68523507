#!/usr/bin/env bash
# Everything GPU-specific in one short run (CUDA correctness, bf16 autocast, torch.compile,
# step-time ratios, eager vs compiled). Usage on a GPU machine: bash benchmarks/gpu_check.sh;
# results are appended to $OUT/gpu_results.md (or benchmarks/gpu_results.md).
# About 9 minutes on one H100/H200: every compiled row is capped by `timeout` (a row cut off
# leaves a line saying so instead of its table), the repeats are few where compiling dominates.
set -uo pipefail
cd "$(dirname "$0")/.."
# the lent GPU machines have torch, torchvision and timm under `python3` but no pfa_fx
# install (and nothing can be fetched there): import it from this checkout
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks}/gpu_results.md"
start=$SECONDS
"$py" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" | tee -a "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out"
"$py" -m pytest -q -n0 tests/test_gpu.py tests/test_runtime.py 2>&1 | tail -5 | tee -a "$out"
# counter-based draws: the same bits on CPU and CUDA (generator and converted feedback)
"$py" -m pytest -q -n0 tests/test_counter_rng.py tests/test_counter_draws.py -k cuda 2>&1 | tail -3 | tee -a "$out"

# run LIMIT_S ARGS...: one step_time.py row, cut off after LIMIT_S seconds
run() {
    local limit=$1
    shift
    timeout "$limit" "$py" benchmarks/step_time.py --device cuda --out "$out" "$@" ||
        echo "step_time.py $* stopped (exit $?; limit ${limit} s) after $((SECONDS - start)) s in all" | tee -a "$out"
}

# eager, every PFA form: ~1 min
common=(--size 224 --batch 128 --repeats 10 --warmup 3
        --variants bp bp+state fa sf kp pfa-compact pfa pfa-product pfa-x1 pfa-population)
run 120 --models resnet18 "${common[@]}"
run 120 --models resnet18 --amp bf16 --channels-last "${common[@]}"

# eager vs compiled (default and reduce-overhead), batch 64 bf16: ratios to BP of the same
# mode, × eager, launch-bound check per mode; one model per row so that each row's table
# survives a cut-off in the next (~4.5 min)
compiled=(--size 224 --batch 64 --amp bf16 --variants bp fa pfa-compact --compare-compiled
          --compile-mode default reduce-overhead --warmup 2 --repeats 6)
run 100 --models resnet50 "${compiled[@]}"
run 80 --models vit_small "${compiled[@]}"
run 100 --models convnext_tiny "${compiled[@]}"

# batch 256 ResNet-50 bf16, eager and compiled (default): is the gap a fixed per-op cost
# (shrinks with the batch) or proportional work (stays)? (~1.5 min)
run 100 --models resnet50 --size 224 --batch 256 --amp bf16 --channels-last --variants bp fa kp pfa-compact \
    --compare-compiled --compile-mode default --warmup 2 --repeats 5
# store_feedback=False: FA and PFA with fixed feedback redrawn per backward (a CPU draw and a
# copy to the GPU per op) against stored and BP, interleaved (~1 min)
timeout 120 "$py" benchmarks/feedback_storage.py --device cuda --part time --models resnet18 --size 224 \
    --batch 128 --rules fa pfa --warmup 2 --repeats 6 --out "$out" ||
    echo "feedback_storage.py stopped (exit $?; limit 120 s) after $((SECONDS - start)) s in all" | tee -a "$out"
# FSDP2 on a converted model (capture="modules"), one rank under nccl: the CUDA path of the
# example (per-block fully_shard, sharded feedback, DCP save) and its per-rank memory (~30 s)
timeout 120 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 examples/fsdp_finetune.py --model vit \
    --rule pfa --synthetic --steps 5 --width 256 --save "$(mktemp -d)/ckpt" 2>&1 | tail -8 | tee -a "$out" ||
    echo "fsdp_finetune.py stopped (exit $?; limit 120 s) after $((SECONDS - start)) s in all" | tee -a "$out"
echo "gpu_check.sh: $((SECONDS - start)) s" | tee -a "$out"
