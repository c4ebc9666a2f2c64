#!/usr/bin/env bash
# The GPU check, one command for a device session:
#
#     bash tests/gpu_check.sh             # run every step below
#     bash tests/gpu_check.sh --dry-run   # print the plan (each step's limit and command), run nothing
#
# It leaves two files, whatever happens (a device run hands back at most 8), in $OUT when it is
# set, else in runs/gpu_check: summary.txt (every step's status and seconds, the runs' figures
# against the targets) and gpu_check_logs.tar.gz (every step's whole log, the runs'
# final_model.json and metrics.jsonl). The archive is rewritten after each step, so a check cut
# short still hands back the logs so far. The exit status is 1 when any step failed, and the
# summary's last line names them. PYTHON picks the interpreter (default python3).
#
# The time budget, on paper. A device session has 15 minutes and starting the machine takes one
# or two, so the steps' limits add up to at most 9 minutes (540 s). A step past its limit is
# stopped, and counts as failed.
#
#   step               limit  what
#   machine             15 s  GPU, driver, CuPy and PyTorch versions
#   gpu_tests           95 s  the gpu-marked tests, ALBOR_DEVICE=cuda (fails if CuPy cannot use the GPU)
#   kernel_tests        45 s  the rest of tests/test_kernels.py: NVRTC, nvcc, the emulator
#   train_cold          75 s  `python train.py --rows 500` with an empty CuPy kernel cache: a first run
#   train_warm          35 s  the same command again: every later run; the same checkpoint bytes
#   train_tf32          30 s  the same with --dtype tf32
#   train_bf16          30 s  the same with --dtype bf16
#   train_fp16          30 s  the same with --dtype fp16
#   train_reference     35 s  the same with ALBOR_KERNELS=0: CuPy's reference code, not kernels.cu
#   bench               75 s  `python bench.py --batch-size 32 --seq-len 512`: albor vs PyTorch eager
#   attention           55 s  `python bench.py --attention`: reference, kernels.cu and PyTorch SDPA
#   sum                520 s  of the steps' limits
#   slack               20 s  up to 5 s to kill a step past its limit, the figures, the archive
#   budget             540 s
#
# The tokenizer: train.py caches the one it trains in checkpoints/tokenizers/. Carry that
# folder to the device (it is git-ignored) so the runs do not spend their time training one; if
# the device's Python has another standard library the cache key differs and train_cold trains
# it once (its log says how long).
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
PYTHON=${PYTHON:-python3}
DEST=${OUT:-runs/gpu_check}     # the two files that come back
LOGS=runs/gpu_check/logs        # what goes into the archive
SUMMARY=$DEST/summary.txt
ARCHIVE=$DEST/gpu_check_logs.tar.gz
FAILED=()                       # the names of the failed steps
PLANNED=0                       # the sum of the steps' limits
LAST_RC=0
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

archive() { tar -czf "$ARCHIVE" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"; }

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, its output in $LOGS/NAME.log;
# one line in the summary (status, seconds, command) and the log's last lines under it.
step() {
    local name=$1 limit=$2
    shift 2
    PLANNED=$((PLANNED + limit))
    local command="$*"
    if [ "$DRY_RUN" = 1 ]; then
        printf '%-16s %4d s   %s\n' "$name" "$limit" "$command"
        return 0
    fi
    local t0
    t0=$(date +%s%N)
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    LAST_RC=$?
    local ms=$((($(date +%s%N) - t0) / 1000000)) status=ok
    if [ "$LAST_RC" -eq 124 ] || [ "$LAST_RC" -eq 137 ]; then
        status="TIMED OUT after $limit s"
    elif [ "$LAST_RC" -ne 0 ]; then
        status="FAILED (exit $LAST_RC)"
    fi
    [ "$LAST_RC" -ne 0 ] && FAILED+=("$name")
    [ "${#command}" -gt 90 ] && command="${command:0:87}..."
    note "$(printf '%-16s %-24s %4d.%d s   %s' "$name" "$status" $((ms / 1000)) $((ms % 1000 / 100)) "$command")"
    # the log's last 3 lines; a progress bar's redraws (carriage returns) count as lines
    tr '\r' '\n' < "$LOGS/$name.log" | grep -v '^ *$' | tail -n 3 | sed 's/^/      | /' >> "$SUMMARY"
    archive
}

# figures NAME FOLDER: the run's own figures (its final_model.json) and its checkpoint's hash into
# the summary; final_model.json, metrics.jsonl and the hash into the logs. Fails without them.
figures() {
    [ "$DRY_RUN" = 1 ] && return 0
    python3 - "$1" "$2" "$LOGS" <<'EOF' | tee -a "$SUMMARY"
import hashlib, json, shutil, sys
from pathlib import Path
name, folder, logs = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
try:
    final = json.loads((folder / "final_model.json").read_text())
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
except (OSError, ValueError) as error:
    print(f"      {name}: FAILED, no figures: {error}")
    sys.exit(1)
t = final.get("timing", {})
phases = ", ".join(f"{k.replace('_seconds', '')} {v:.3f}" for k, v in sorted(t.items())
                   if k.endswith("_seconds") and k not in ("train_seconds", "wall_seconds"))
print(f"      {name}: steps {final.get('steps')}, loss {final.get('final_loss')}, "
      f"val {final.get('val_loss')}, train {t.get('train_seconds', float('nan')):.2f} s, "
      f"wall in train.py {t.get('wall_seconds', float('nan')):.2f} s, "
      f"{t.get('tokens_per_second') or 0:,.0f} tokens/s")
print(f"      {name}: phases (s): {phases}")
print(f"      {name}: model.safetensors sha256 {digest[:16]}")
metrics = folder / "metrics.jsonl"
scaled = [json.loads(line) for line in (metrics.read_text().splitlines() if metrics.exists() else [])
          if '"loss_scale"' in line]
if scaled:  # fp16: how the loss scaler went
    print(f"      {name}: loss scale {scaled[0]['loss_scale']:g} -> {scaled[-1]['loss_scale']:g}, "
          f"{sum(bool(r.get('skipped')) for r in scaled)} of {len(scaled)} steps skipped (overflow)")
(logs / f"{name}.sha256").write_text(digest)
for kept in ("final_model.json", "metrics.jsonl"):
    if (folder / kept).exists():
        shutil.copy(folder / kept, logs / f"{name}.{kept}")
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("$1:figures")
}

# train_run NAME LIMIT [ENV=VALUE ...] -- [train.py flags ...]: the model card's run into its own
# folder next to train.py's default one (checkpoints/albor-base-50m), so that it uses the
# tokenizer cache checkpoints/tokenizers/ as a plain `python train.py --rows 500` does.
train_run() {
    local name=$1 limit=$2
    shift 2
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local run=("$PYTHON" train.py --rows 500 --out "checkpoints/gpu_$name" "$@")
    [ "${#envs[@]}" -gt 0 ] && run=(env "${envs[@]}" "${run[@]}")
    [ "$DRY_RUN" = 1 ] || rm -rf "checkpoints/gpu_$name"
    step "$name" "$limit" "${run[@]}"
    [ "$LAST_RC" -eq 0 ] && figures "$name" "checkpoints/gpu_$name"
    return 0
}

if [ "$DRY_RUN" = 0 ]; then
    rm -rf "$LOGS" runs/gpu_check/cupy_cache
    mkdir -p "$LOGS" "$DEST"
    : > "$SUMMARY"
    note "albor GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
fi

# 1. the machine
step machine 15 "$PYTHON" - <<'EOF'
import subprocess
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                     capture_output=True, text=True).stdout.strip())
import cupy, numpy
print("cupy", cupy.__version__, "numpy", numpy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch: not installed")
EOF

# 2. the tests: the gpu-marked ones, then the kernel tests that are not (both on CuPy)
step gpu_tests 95 env ALBOR_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu
step kernel_tests 45 env ALBOR_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_kernels.py

# 3. the model card's run: the same command twice, then the dtypes and the reference path. The
# tests above filled CuPy's default kernel cache; the runs get their own, empty at first, so
# that train_cold pays what a first run on a fresh machine pays.
export CUPY_CACHE_DIR=$PWD/runs/gpu_check/cupy_cache
train_run train_cold 75 --
train_run train_warm 35 --
if [ -f "$LOGS/train_cold.sha256" ] && [ -f "$LOGS/train_warm.sha256" ]; then
    if cmp -s "$LOGS/train_cold.sha256" "$LOGS/train_warm.sha256"; then
        note "      determinism: the two fp32 runs wrote the same model.safetensors bytes"
    else
        note "      determinism: FAILED, the two fp32 runs wrote different model.safetensors"
        FAILED+=("determinism")
    fi
fi
for dtype in tf32 bf16 fp16; do
    train_run "train_$dtype" 30 -- --dtype "$dtype"
done
train_run train_reference 35 ALBOR_KERNELS=0 --
[ "$DRY_RUN" = 1 ] || note "      targets (H200): --rows 500 under 10 s including start-up (train_warm's seconds:
      the whole command) and under 3 s of training (its 'train' figure)"

# 4. the benchmark against PyTorch eager on the same GPU
step bench 75 "$PYTHON" bench.py --batch-size 32 --seq-len 512 --repeats 5
if [ "$DRY_RUN" = 0 ]; then
    grep -E "PyTorch|  step |tokens/s|MFU" "$LOGS/bench.log" | head -n 20 | sed 's/^/      | /' >> "$SUMMARY"
    note "      target: albor's step time within 1.5x of PyTorch eager's"
fi

# 5. attention alone: reference code, kernels.cu and PyTorch's SDPA over B x T
step attention 55 "$PYTHON" bench.py --attention --repeats 5
[ "$DRY_RUN" = 1 ] || grep -E "PyTorch|agreement|^ +[0-9B]+ +[0-9T]+ " "$LOGS/attention.log" \
    | head -n 30 | sed 's/^/      | /' >> "$SUMMARY"

if [ "$DRY_RUN" = 1 ]; then
    echo "the steps' limits add up to $PLANNED s"
    exit 0
fi
archive
if [ "${#FAILED[@]}" -gt 0 ]; then
    note "done in $(($(date +%s) - START)) s (the steps' limits: $PLANNED s); FAILED: ${FAILED[*]}"
    exit 1
fi
note "done in $(($(date +%s) - START)) s (the steps' limits: $PLANNED s); every step ok"
