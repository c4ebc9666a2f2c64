#!/usr/bin/env bash
# The GPU check, one command for a device session (about 10 minutes on one H200):
#
#     bash tests/gpu_check.sh
#
# In order of importance, each step under its own time limit and all of them under one overall
# budget (GPU_CHECK_SECONDS, default 540 s; a step that no longer fits is reported as skipped):
#   1. the machine: GPU, driver, CuPy, PyTorch;
#   2. the test suite's gpu-marked tests (ALBOR_DEVICE=cuda: fails if CuPy cannot use the GPU);
#   3. `python train.py --rows 500`, the model card's run, twice with the same command (cold:
#      first NVRTC compile of kernels.cu and CuPy's own kernels, maybe the tokenizer; warm:
#      what a user sees on the second run), checking that both write the same checkpoint bytes;
#      then the same run with --dtype tf32, bf16 and fp16, and with ALBOR_KERNELS=0 (the CuPy
#      reference path) for comparison;
#   4. `python bench.py --batch-size 32 --seq-len 512`: albor-base-50m against PyTorch eager
#      on the same GPU (bench.py puts its PyTorch twin on the GPU albor runs on);
#   5. `python bench.py --attention --repeats 5`: causal GQA attention forward + backward
#      (albor-base-50m's heads) at B=4..32, T=128..2048 through the CuPy reference code,
#      kernels.cu and PyTorch's SDPA on the same GPU, after checking that the three agree;
#   6. the whole test suite, on the GPU, with what time is left.
# Logs and a summary (summary.txt: every step's status and seconds, the runs' figures against
# the targets) go to $OUT/gpu_check when OUT is set, else runs/gpu_check.
#
# The tokenizer: train.py caches the one it trains in checkpoints/tokenizers/. Carry that
# folder to the device (it is git-ignored) so the runs do not spend minutes training one; if
# the device's Python has another standard library the cache key differs and the cold run
# trains it once (its log says how long).
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-runs}/gpu_check"
mkdir -p "$LOG"
SUMMARY="$LOG/summary.txt"
rm -f "$LOG"/*.sha256
LAST_RC=1
BUDGET="${GPU_CHECK_SECONDS:-540}"
START=$(date +%s)
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_SECONDS COMMAND...: run it with its output in $LOG/NAME.log, unless the
# budget has less than 20 s left; the limit is cut to what is left.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    LAST_RC=1
    if [ "$left" -lt 20 ]; then
        note "$(printf '%-22s skipped: out of time' "$name")"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    LAST_RC=$rc
    t1=$(date +%s.%N)
    local seconds
    seconds=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
    local status="ok"
    [ "$rc" -ne 0 ] && status="FAILED (exit $rc)"
    [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit} s"
    local command="$*"
    [ "${#command}" -gt 90 ] && command="${command:0:87}..."
    note "$(printf '%-22s %-28s %7s s   %s' "$name" "$status" "$seconds" "$command")"
    tail -n 3 "$LOG/$name.log" | sed 's/^/      | /' | tee -a "$SUMMARY"
    return 0
}

# figures NAME FOLDER: the run's own timing (final_model.json) and its checkpoint's hash
figures() {
    python3 - "$1" "$2" <<'EOF' | tee -a "$SUMMARY"
import hashlib, json, os, sys
name, folder = sys.argv[1], sys.argv[2]
try:
    final = json.load(open(os.path.join(folder, "final_model.json")))
except OSError as e:
    print(f"      {name}: no final_model.json ({e.strerror})")
    sys.exit()
t = final.get("timing", {})
digest = hashlib.sha256(open(os.path.join(folder, "model.safetensors"), "rb").read()).hexdigest()
phases = ", ".join(f"{k.replace('_seconds', '')} {v:.3f}" for k, v in sorted(t.items())
                   if k.endswith("_seconds") and k not in ("train_seconds", "wall_seconds"))
print(f"      {name}: steps {final.get('steps')}, loss {final.get('final_loss')}, "
      f"val {final.get('val_loss')}, train {t.get('train_seconds', float('nan')):.2f} s, "
      f"wall in train.py {t.get('wall_seconds', float('nan')):.2f} s, "
      f"{t.get('tokens_per_second') or 0:,.0f} tokens/s")
print(f"      {name}: phases (s): {phases}")
print(f"      {name}: model.safetensors sha256 {digest[:16]}")
open(os.path.join(os.environ.get("LOG", "."), f"{name}.sha256"), "w").write(digest)
for kept in ("final_model.json", "metrics.jsonl"):
    if os.path.exists(os.path.join(folder, kept)):
        os.system(f"cp {os.path.join(folder, kept)} {os.environ.get('LOG', '.')}/{name}.{kept}")
EOF
}
export LOG

note "albor GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s, logs in $LOG"
note "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. the machine
step machine 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    python3 -c "import cupy, numpy; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__,
    \"CUDA runtime\", cupy.cuda.runtime.runtimeGetVersion())";
    python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available())"'
cat "$LOG/machine.log" | sed 's/^/      | /' >> "$SUMMARY"

# 2. the gpu-marked tests
step gpu_tests 300 env ALBOR_DEVICE=cuda python3 -m pytest -q -m gpu -p no:cacheprovider

# 3. the model card's run: same command twice, then the dtypes and the reference path. Each run
# writes its own folder next to train.py's default one (checkpoints/albor-base-50m), so the
# tokenizer cache checkpoints/tokenizers/ is the one a plain `python train.py --rows 500` uses.
train_run() {  # train_run NAME LIMIT [ENV=VALUE ...] -- [train.py flags ...]
    local name=$1 limit=$2
    shift 2
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    rm -rf "checkpoints/gpu_$name"
    step "$name" "$limit" env ${envs[@]+"${envs[@]}"} python3 train.py --rows 500 --out "checkpoints/gpu_$name" "$@"
    [ "$LAST_RC" -eq 0 ] && figures "$name" "checkpoints/gpu_$name"
    return 0
}
train_run train_cold 240 --
train_run train_warm 120 --
if [ -f "$LOG/train_cold.sha256" ] && [ -f "$LOG/train_warm.sha256" ]; then
    if cmp -s "$LOG/train_cold.sha256" "$LOG/train_warm.sha256"; then
        note "      determinism: the two fp32 runs wrote the same model.safetensors bytes"
    else
        note "      determinism: FAILED, the two fp32 runs wrote different model.safetensors"
    fi
fi
for dtype in tf32 bf16 fp16; do
    train_run "train_$dtype" 120 -- --dtype "$dtype"
done
train_run train_reference 180 ALBOR_KERNELS=0 --
note "      targets (H200): --rows 500 under 10 s including start-up (the seconds on train_warm's"
note "      line: the whole command) and under 3 s of training (its 'train' figure)"

# 4. the benchmark against PyTorch eager on the same GPU
step bench 300 python3 bench.py --batch-size 32 --seq-len 512
[ -f "$LOG/bench.log" ] && grep -E "PyTorch|  step |tokens/s|MFU|targets" "$LOG/bench.log" | head -n 20 \
    | sed 's/^/      | /' >> "$SUMMARY"
note "      target: albor's step time within 1.5x of PyTorch eager's"

# 5. attention alone: reference code, kernels.cu and PyTorch's SDPA over B x T
step attention 150 python3 bench.py --attention --repeats 5
[ -f "$LOG/attention.log" ] && grep -E "PyTorch|agreement|^ +[0-9B]+ +[0-9T]+ " "$LOG/attention.log" \
    | head -n 30 | sed 's/^/      | /' >> "$SUMMARY"

# 6. the whole suite on the GPU
step full_suite 480 python3 -m pytest -q -p no:cacheprovider

note "done in $(( $(date +%s) - START )) s"
