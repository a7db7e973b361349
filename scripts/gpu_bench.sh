#!/usr/bin/env bash
# One device call: correctness of the CUDA build against the fixtures, then every benchmark of
# `train_bench` (Burn, CUDA) and `bench_peft_baseline.py` (PyTorch + PEFT) on the same card,
# each measurement in its own process with GPU memory sampled from outside.
#
# Expects, relative to the repository root (built on the CPU machine, see docs/benchmarks.md):
#   .gpu/peft         stripped `peft` binary built with --features cuda
#   .gpu/train_bench  stripped `train_bench` example built with --features cuda
#   .gpu/peft-*.whl   the PEFT wheel (`pip download --no-deps peft`)
#   .gpu/ops_test     (for `matmul-test` and `blocks-test`) peft-ops' test binary (tests/ops/)
#                     built with --features cuda; each item runs its module (`matmul::`, `blocks::`)
#   .gpu/train_bench_prev (for `ours-prev`) an earlier train_bench, for an A/B in one call
# Writes to $OUT (default ./gpu-out) results.jsonl, check-f32.jsonl, check-bf16.jsonl,
# nvidia-smi.txt and logs.tgz (every process's stdout, stderr and memory samples); the device
# tool brings back at most 8 files, so intermediate files stay in $WORK.
#
# Environment: PRESET (llama-7b), DTYPE (bf16), BATCH (4), SEQ (512), STEPS (10),
# WHAT (a space-separated subset of: matmul-test blocks-test check ours ours-prev ours-burn
# decode-ours base decode-base scale dp-check host-bound ours-sync ours-nokernels ours-exclusive
# ours-flush ours-ownstream; `ours-burn` is `ours` for adaption prompt with PEFT_CUBLAS=0,
# Burn's own CUDA matmul; `ours-sync` the same with PEFT_CUBLAS_SYNC=1, cuBLAS ordered on the host;
# `ours-nokernels` with PEFT_KERNELS=0, Burn's operations instead of kernels.cu;
# `ours-exclusive` and `ours-flush` with PEFT_LAUNCH=exclusive or queued-flush;
# `ours-ownstream` with PEFT_CUBLAS_STREAM=own),
# METHODS (the methods `ours` and `base` train, default "adaption-prompt lora prefix"),
# SCALE_DEVICES (device counts for `scale`, default "1 2 4" capped at the GPUs present),
# SCALE_METHODS (methods for `scale`, default adaption-prompt),
# CHECK_MODELS (fixture models checked, default all three).
set -uo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast stays off (the device tool's KINDS.md says why).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# cuBLAS and CUPTI are loaded at run time (crates/peft-ops/src/cublas.rs): the CUDA toolkit's
# folders.
for lib in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    /usr/local/cuda/extras/CUPTI/lib64; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
OUT=${OUT:-gpu-out}
WORK=${WORK:-/tmp/gpu-bench-work}
mkdir -p "$OUT" "$WORK/logs"
for packed in .gpu/*.xz; do
    [ -e "$packed" ] && xz -dkf "$packed" && chmod +x "${packed%.xz}"
done
PRESET=${PRESET:-llama-7b}
DTYPE=${DTYPE:-bf16}
BATCH=${BATCH:-4}
SEQ=${SEQ:-512}
STEPS=${STEPS:-10}
WHAT=${WHAT:-check ours decode-ours base decode-base}
METHODS=${METHODS:-adaption-prompt lora prefix}
RESULTS="$OUT/results.jsonl"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    >> "$OUT/nvidia-smi.txt" 2>&1
if ls .gpu/peft-*.whl > /dev/null 2>&1; then
    python3 -m pip install --quiet --no-deps --target "$WORK/pylib" .gpu/peft-*.whl \
        > "$WORK/logs/pip.log" 2>&1
    export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi

# Runs a command with GPU memory sampled every 50 ms; appends its JSON lines to results.jsonl with
# the peak of `memory.used` (MiB, the fullest card, minus what the first card used before it started).
measure() {
    local name=$1
    shift
    local before
    before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 \
        > "$WORK/logs/$name.mem" 2>/dev/null &
    local sampler=$!
    local started=$SECONDS
    timeout 300 "$@" > "$WORK/logs/$name.out" 2> "$WORK/logs/$name.err"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    local peak
    peak=$(sort -n "$WORK/logs/$name.mem" | tail -1)
    grep '^{' "$WORK/logs/$name.out" | python3 -c '
import json, sys
peak, before, rc, wall = sys.argv[1:5]
lines = [json.loads(l) for l in sys.stdin]
if not lines:
    lines = [{"bench": sys.argv[5], "error": "no result", "rc": int(rc)}]
for d in lines:
    d["gpu_memory_used_peak_mib"] = int(peak or 0) - int(before or 0)
    d["process_wall_s"] = int(wall)
    print(json.dumps(d))
' "$peak" "$before" "$rc" "$((SECONDS - started))" "$name" >> "$RESULTS"
    tail -1 "$RESULTS"
}

for what in $WHAT; do
    case $what in
    matmul-test | blocks-test)
        # matmul: the cuBLAS products and their gradients against an f64 host reference;
        # blocks: the RMSNorm, SwiGLU, softmax and rotary nodes (kernels.cu) against the chains.
        timeout 120 .gpu/ops_test "${what%-test}::" --nocapture --test-threads 1 > "$OUT/$what.txt" 2>&1
        echo "$what: rc=$? $(grep -c 'max |error|' "$OUT/$what.txt") comparisons"
        ;;
    ours-prev)
        # A/B: the same adaption-prompt step with an earlier build, .gpu/train_bench_prev.
        measure prev-train-adaption-prompt .gpu/train_bench_prev --preset "$PRESET" \
            --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" train adaption-prompt
        ;;
    host-bound)
        # The host's share: the same adaption-prompt step at batch 1 x 16 tokens, where the GPU
        # has almost nothing to do, with the build's default ordering (`events`, named when
        # cuBLAS was ordered by events; now it shares CubeCL's stream), ordered on the host
        # (PEFT_CUBLAS_SYNC=1), and with Burn's matmul (PEFT_CUBLAS=0).
        # HOST_MODES picks among them, no-kernels (PEFT_KERNELS=0), exclusive and queued-flush
        # (PEFT_LAUNCH).
        for mode in ${HOST_MODES:-events host-sync burn-matmul}; do
            case $mode in
            events) env=() ;;
            host-sync) env=(PEFT_CUBLAS_SYNC=1) ;;
            burn-matmul) env=(PEFT_CUBLAS=0) ;;
            no-kernels) env=(PEFT_KERNELS=0) ;;
            exclusive) env=(PEFT_LAUNCH=exclusive) ;;
            queued-flush) env=(PEFT_LAUNCH=queued-flush) ;;
            esac
            measure "host-bound-$mode" env "${env[@]}" .gpu/train_bench --preset "$PRESET" \
                --dtype "$DTYPE" --batch 1 --seq 16 --steps "$STEPS" train adaption-prompt
        done
        ;;
    ours-sync | ours-burn | ours-nokernels | ours-exclusive | ours-flush | ours-ownstream)
        # A/B: the adaption-prompt step with the cuBLAS products ordered on the host
        # (PEFT_CUBLAS_SYNC=1), with Burn's own matmul (PEFT_CUBLAS=0), or with Burn's
        # operations instead of the hand-written kernels (PEFT_KERNELS=0), or with the cuBLAS
        # products and kernels handed to CubeCL's device thread in a blocking round trip
        # (PEFT_LAUNCH=exclusive) or queued with a flush after each (PEFT_LAUNCH=queued-flush),
        # or with cuBLAS on a stream of its own, ordered by events (PEFT_CUBLAS_STREAM=own).
        case $what in
        ours-sync) env=(PEFT_CUBLAS_SYNC=1) ;;
        ours-burn) env=(PEFT_CUBLAS=0) ;;
        ours-nokernels) env=(PEFT_KERNELS=0) ;;
        ours-exclusive) env=(PEFT_LAUNCH=exclusive) ;;
        ours-flush) env=(PEFT_LAUNCH=queued-flush) ;;
        ours-ownstream) env=(PEFT_CUBLAS_STREAM=own) ;;
        esac
        measure "$what-train-adaption-prompt" env "${env[@]}" .gpu/train_bench --preset "$PRESET" \
            --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" train adaption-prompt
        ;;
    check)
        python3 scripts/check_logits.py --peft .gpu/peft --out "$WORK/check" --dtype f32 \
            --models ${CHECK_MODELS:-tiny-mha tiny-gqa tiny-headdim} \
            > "$OUT/check-f32.jsonl" 2> "$WORK/logs/check.err"
        echo "check f32: rc=$? $(grep -c '"ok": true' "$OUT/check-f32.jsonl") cases ok"
        python3 scripts/check_logits.py --peft .gpu/peft --out "$WORK/check-bf16" --dtype bf16 \
            --models ${CHECK_MODELS:-tiny-mha tiny-gqa tiny-headdim} \
            > "$OUT/check-bf16.jsonl" 2>> "$WORK/logs/check.err"
        echo "check bf16: rc=$? $(grep -c '"ok": true' "$OUT/check-bf16.jsonl") cases ok"
        ;;
    ours)
        for method in $METHODS; do
            measure "ours-train-$method" .gpu/train_bench --preset "$PRESET" --dtype "$DTYPE" \
                --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" train "$method"
        done
        measure ours-forward .gpu/train_bench --preset "$PRESET" --dtype "$DTYPE" \
            --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" forward
        ;;
    base)
        for method in $METHODS; do
            measure "peft-train-$method" python3 scripts/bench_peft_baseline.py --preset "$PRESET" \
                --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" train "$method"
        done
        measure torch-forward python3 scripts/bench_peft_baseline.py --preset "$PRESET" \
            --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" forward
        ;;
    decode-ours)
        measure ours-decode .gpu/train_bench --preset "$PRESET" --dtype "$DTYPE" decode
        ;;
    scale)
        # Data-parallel scaling: the same per-GPU batch on 1, 2, 4 GPUs of this host.
        gpus=$(nvidia-smi -L | grep -c '^GPU')
        for method in ${SCALE_METHODS:-adaption-prompt}; do
            for n in ${SCALE_DEVICES:-1 2 4}; do
                [ "$n" -le "$gpus" ] || continue
                measure "ours-scale-$method-$n" .gpu/train_bench --preset "$PRESET" \
                    --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" \
                    --devices "$n" train "$method"
            done
        done
        ;;
    dp-check)
        # Data-parallel correctness on the GPUs: stories260k, 8 examples per step, 6 steps, as
        # 1 GPU × batch 8 (twice: the run-to-run floor), 2 GPUs × 4 and 4 GPUs × 2; the adapters
        # are compared with the first run's in $OUT/dp-check.jsonl.
        gpus=$(nvidia-smi -L | grep -c '^GPU')
        runs="1x8 1x8again"
        [ "$gpus" -ge 2 ] && runs="$runs 2x4"
        [ "$gpus" -ge 4 ] && runs="$runs 4x2"
        for run in $runs; do
            n=${run%%x*}
            rest=${run#*x}
            batch=${rest%again}
            devices=$(seq -s, -f 'cuda:%g' 0 $((n - 1)))
            .gpu/peft train --model models/stories260k --data data/alpaca_demo_small.json \
                --output "$WORK/dp-$run" --devices "$devices" --batch-size "$batch" \
                --grad-accum 1 --max-steps 6 --lr 1e-2 --val-size 20 --quiet \
                > "$WORK/logs/dp-$run.out" 2> "$WORK/logs/dp-$run.err"
            echo "dp-check $run: rc=$?"
        done
        python3 - "$WORK" $runs > "$OUT/dp-check.jsonl" <<'PY'
import glob, json, sys
from safetensors.numpy import load_file
work, runs = sys.argv[1], sys.argv[2:]
def adapter(run):
    return load_file(glob.glob(f"{work}/dp-{run}/adapter/*.safetensors")[0])
ref = adapter(runs[0])
for run in runs[1:]:
    try:
        other = adapter(run)
    except Exception as e:
        print(json.dumps({"run": run, "error": str(e)}))
        continue
    worst_abs = max(float(abs(other[k] - ref[k]).max()) for k in ref)
    scale = max(float(abs(ref[k]).max()) for k in ref)
    print(json.dumps({"run": run, "vs": runs[0], "max_abs_diff": worst_abs, "max_abs_value": scale}))
PY
        cat "$OUT/dp-check.jsonl"
        ;;
    decode-base)
        measure hf-decode python3 scripts/bench_peft_baseline.py --preset "$PRESET" \
            --dtype "$DTYPE" decode
        ;;
    esac
done
tar czf "$OUT/logs.tgz" -C "$WORK" logs
