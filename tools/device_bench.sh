#!/usr/bin/env bash
# The one prepared GPU check: the training step's throughput on one H200 at the 3.5B shape
# (4096 tokens, micro-batch 1, depth 24 without + 8 with gradient, bf16), JSON and logs under $OUT,
# within about 8 minutes (RDHPC_BENCH_BUDGET_S, default 480: each stage is cut to what is left).
#
#   make device-wheels                    # here, once: DeepSpeed and what it needs into .whl/ (about 5 MiB)
#   device run: command "bash tools/device_bench.sh", carry [".whl"], timeout_s 560
#   RDHPC_BENCH_SHAPE=debug PYTHON=.venv/bin/python bash tools/device_bench.sh   # the same on a CPU, ~1 min
#
# Stages, most important first:
#   attention  tools/bench_attention.py: causal fwd+bwd per SDPA kernel at 55 heads x 4096 x 96
#   main       tools/bench_train.py, one process: the paper's recipe (plain PyTorch, fp32 weights under
#              bf16 autocast, eager) and the engine path users run (DeepSpeed ZeRO 1, bf16 weights, fused
#              AdamW step) with the switches chosen on the CPU ($FAST below); the issue's goal is judged here
#   parts      plain PyTorch with the core iteration compiled, and the engine path without compilation,
#              in bf16 and in the paper's precision (train.precision=bf16-autocast: float32 weights and
#              state under bf16 autocast): where the gain comes from, and what the paper's precision costs
# Then a table of every path (tools/bench_summary.py), printed last.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
SHAPE=${RDHPC_BENCH_SHAPE:-huginn-3.5b}
BUDGET=${RDHPC_BENCH_BUDGET_S:-480}
export PYTHONUNBUFFERED=1
started=$SECONDS

# DeepSpeed travels as wheels (the GPU machine has PyTorch but no DeepSpeed and no network)
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "[device] no deepspeed here and no .whl/: run 'make device-wheels' and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$SHAPE" = huginn-3.5b ]; then
    SIZE=(--shape huginn-3.5b --seq-len 4096 --micro-batch 1 --depth 24,8 --steps 5 --warmup 2 --precision bf16)
    ATTENTION=(--heads 55 --seq-len 4096 --head-dim 96 --repeats 10)
    COMPILER=${RDHPC_BENCH_COMPILE_BACKEND:-inductor}
else  # a quick rehearsal of the same stages (CPU: graph capture only, no code generation)
    SIZE=(--shape "$SHAPE" --seq-len 64 --micro-batch 1 --depth 3,2 --steps 2 --warmup 1 --precision bf16)
    ATTENTION=(--heads 4 --seq-len 64 --head-dim 16 --repeats 3)
    COMPILER=${RDHPC_BENCH_COMPILE_BACKEND:-aot_eager}
fi
# the engine path's switches (NOTES.md, "Training throughput"); sdpa_backend stays auto
FAST="train.compile=core model.loss_chunk_size=1024 model.no_grad_mode=inference_mode model.hoist_injection=true train.bf16_immediate_grad_update=true"
UNCOMPILED="model.loss_chunk_size=1024 model.no_grad_mode=inference_mode model.hoist_injection=true train.bf16_immediate_grad_update=true"
AUTOCAST="train.precision=bf16-autocast model.loss_chunk_size=1024 model.no_grad_mode=inference_mode model.hoist_injection=true"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv 2>&1 \
        || echo "no nvidia-smi"
    "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', \
torch.version.hip, 'deepspeed', deepspeed.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() {  # NAME SECONDS COMMAND...: run with a time limit cut to the budget left; log to $OUT/NAME.log
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - (SECONDS - started)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "[device] $name: skipped, ${left} s of the budget left"
        return
    fi
    echo "[device] $name: at most ${limit} s"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -E '^\[(bench|attention)\]|Error|error:' "$OUT/$name.log" | tail -n 20
    echo "[device] $name: exit $rc after $((SECONDS - t0)) s"
}

stage attention 60 "$PY" tools/bench_attention.py "${ATTENTION[@]}" --json "$OUT/attention.json"
stage main 300 "$PY" tools/bench_train.py "${SIZE[@]}" --set "train.compile_backend=$COMPILER" \
    --plain eager --engine "fast: $FAST" --json "$OUT/main.json"
stage parts 300 "$PY" tools/bench_train.py "${SIZE[@]}" --set "train.compile_backend=$COMPILER" \
    --plain core --engine "uncompiled: $UNCOMPILED" --engine "autocast: $AUTOCAST" --json "$OUT/parts.json"

"$PY" tools/bench_summary.py "$OUT/main.json" "$OUT/parts.json" "$OUT/attention.json" | tee "$OUT/summary.txt"
echo "[device] done in $((SECONDS - started)) s; files in $OUT"
