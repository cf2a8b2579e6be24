#!/usr/bin/env bash
# The GPU benchmark runs behind BENCHMARKS.md's H100 section, in stages that each fit in one
# 10-minute device call. Usage: benchmarks/gpu_run.sh STAGE OUTDIR   (STAGE: check | gmm | train | layers)
# `check` first on a new machine or jax: the GPU defaults that CPU tests only interpret (Pallas flash
# attention for packed documents, the fused FP8 kernel) run for real, checked, then in a training step.
# Expects a CUDA jax (the device image's python3); wheels for missing packages may sit in .whl/.
set -u -o pipefail
stage=$1; out=$2; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
run() {  # run NAME SECONDS ARGS...: one benchmark, its JSON lines to $out/NAME.jsonl, the log beside
  local name=$1 secs=$2; shift 2
  echo "== $name: $*"
  timeout "$secs" "$py" "$@" > "$out/$name.jsonl" 2> "$out/$name.log"
  local rc=$?; [ $rc -ne 0 ] && { echo "!! $name exit $rc"; grep -v "^ *@\|^  File\|^    " "$out/$name.log" | tail -4; }
  grep -v '"kind": "sweep"' "$out/$name.jsonl" | cut -c1-1200
  return $rc
}
case $stage in
  check)  # ~7 min: each kernel against its reference, then bench1b training steps that use them
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
    run flash_gpu 100 benchmarks/flash_gpu.py --seqs 2048,8192 --iters 5
    run fp8_gemm 100 benchmarks/fp8_gemm.py --tokens 2048 --iters 3 --warmup 1
    # packed documents; bench1b pins dot_product (cuDNN), auto sends packed rows to pallas_gpu
    train=(benchmarks/train_step.py --config bench1b --seq 2048 --peak_size 8192)
    run train_bench1b_packed_auto 120 "${train[@]}" --batch 8 --steps 5 --set attention_impl=auto
    # bf16, FP8 in the XLA form (the default fp8_kernel), FP8 in the fused kernel: batch 4 each
    run train_bench1b_bf16 90 "${train[@]}" --batch 4 --steps 3
    run train_bench1b_fp8_xla 90 "${train[@]}" --batch 4 --steps 3 --set fp8=True
    run train_bench1b_fp8_fused 90 "${train[@]}" --batch 4 --steps 3 --set fp8=True --set fp8_kernel=pallas
    ;;
  gmm)  # kernel checks + timings (add --sweep for the block-size grid: ~4 min)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
    run gmm_gpu 240 benchmarks/gmm_gpu.py --iters 10
    ;;
  train)  # the headline: bench1b training step after 200 router-training steps, then FP8 vs bf16 and decode
    # Packed rows with document masks take XLA's attention ([B, H, S, S] per layer: out of memory at
    # 8 x 2048); without them cuDNN flash attention runs (data.document_mask=False).
    base=(benchmarks/train_step.py --config bench1b --seq 2048 --peak_size 8192 --no_document_mask)
    run train_bench1b 170 "${base[@]}" --batch 8 --router_steps 200 --steps 10 ||
      run train_bench1b_remat_dots 150 "${base[@]}" --batch 8 --router_steps 200 --steps 10 --set remat_policy=dots
    for fp8 in False True; do  # the same batched (capacity) expert matmuls in both, so only FP8 differs
      run "train_bench1b_capacity_fp8_$fp8" 90 "${base[@]}" --batch 4 --steps 5 --set moe_impl=capacity --set fp8=$fp8
    done
    run decode 70 benchmarks/decode.py --iters 3
    ;;
  layers)  # the MoE layer per dispatch and MLA attention at bench1b's sizes
    run moe_layer 150 benchmarks/moe_layer.py --config bench1b --batch 8 --seq 2048 \
        --dispatch dense,capacity,ragged_dot,pallas --iters 10
    run attention 90 benchmarks/attention.py --config bench1b --batch 8 --seq 2048 --iters 10
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
