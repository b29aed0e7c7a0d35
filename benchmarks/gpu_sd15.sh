#!/usr/bin/env bash
# The SD 1.5 and SDXL benchmarks for one GPU, in one call (about 8 minutes on an H100-class
# GPU): memory (bench_memory: parameters, saved for backward, peak allocated over load) at
# 512 px, batch 1 and 16, gradient checkpointing off and on, for this engine and the
# authors' scheme; SDXL's at 1024 px with checkpointing, batch 1 and 4 (the engine, fp16,
# the sdxl-wadi ranks); then the iteration time of both schemes on SD 1.5 (bench_iteration). Every result is a
# JSON file in ${OUT:-bench-out}; a step that fails or runs out of time leaves the others.
#   bash benchmarks/gpu_sd15.sh      (from the repository root, wadi installed)
set -u
out=$(realpath -m "${OUT:-bench-out}")
mkdir -p "$out"
cd "$(dirname "$0")"
step() {  # name, limit in seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" --json "$out/$name.json" 2>&1 | tail -n 12 || echo "($name failed or timed out)"
}
for batch in 1 16; do
    step "memory-b$batch" 75 python bench_memory.py --size sd15 --device cuda --batch "$batch"
    step "memory-b$batch-ckpt" 75 python bench_memory.py --size sd15 --device cuda --batch "$batch" --checkpointing
done
for batch in 1 4; do
    step "memory-sdxl-b$batch-ckpt" 120 python bench_memory.py --size sdxl --device cuda --schemes engine --batch "$batch" --checkpointing
done
step iteration-b1 60 python bench_iteration.py --full-sd15 --device cuda --batch 1 --rounds 5
step iteration-b16 90 python bench_iteration.py --full-sd15 --device cuda --batch 16 --rounds 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>/dev/null || true
