#!/usr/bin/env bash
# The whole GPU verification in one command, for a lent GPU machine (DESIGN.md, "Device").
#
#   scripts/gpu_check.sh                 # from anywhere; runs in the repository root
#   OUT=/somewhere scripts/gpu_check.sh  # default OUT=./gpu-out
#
# Steps, in this order; each logs to its own file, a failing step does not stop the later
# ones:
#   env         nvidia-smi, versions (python, torch, CUDA, triton, nvcc, compute-sanitizer);
#               fails only where python or torch does not import (no GPU is a note here: the
#               steps that need one fail without it)
#   build       pip install --no-build-isolation --no-deps . (a wheel, into $PYTHON's
#               environment) for the device's own architecture (TORCH_CUDA_ARCH_LIST: its
#               compute capability, 9.0 where none is visible), MAX_JOBS = every core, then
#               `python -m fastseg info`. Every step runs with PYTHONSAFEPATH=1, so Python
#               imports the installed fastseg, never the source tree's (which has no build).
#   test-cuda   pytest -m cuda tests/: every op's tests with CUDA tensors, on each GPU backend
#               (cuda, triton) - tests/test_softmax_cross_entropy.py, test_upsample_add.py,
#               test_deconv_add.py, test_fcn_decoder.py, test_crop_concat_conv2d.py (one not
#               there yet is named in the log)
#   triton-gpu  the tests selected by -k triton, not marked cuda (those ran in test-cuda), with
#               TRITON_INTERPRET unset, so Triton compiles for the GPU instead of interpreting
#   bench       one `fastseg bench --device cuda --quick` per op suite, each with its share of
#               the step's time: cross_entropy -> $OUT/bench (results.json/.md; its PNG goes
#               into logs.tar.gz), upsample_add (the FCN decoder) -> $OUT/bench/upsample_add
#               (results.json/.md; no PNG), crop_concat_conv (the U-Net decoder) ->
#               $OUT/bench/crop_concat_conv (results.json; its results.md goes into
#               logs.tar.gz and its targets are printed at the end; no PNG). Within 8 files:
#               draw any of them with `fastseg bench --from-json`. The U-Net suite runs without
#               compile-max-autotune here (minutes of autotuning per problem; see
#               GPU_CHECK_CCC_PROVIDERS)
#   bench-models  `fastseg bench --ops models` on the issue's problems (FCN-8s VGG16 512x512
#               batch 8, U-Net valid 572 batch 4, U-Net same 512 batch 8; training steps in
#               bf16 autocast; fastseg vs eager vs torch.compile, as many runs as its time
#               allows) -> $OUT/bench/models (results.json; results.md into logs.tar.gz)
#   train-gpu   `fastseg demo --quick` and a bf16 / channels_last `fastseg train` on the GPU
#               (issue 6's engine end to end; logs and pictures in logs.tar.gz)
#   sanitizer   under compute-sanitizer --tool memcheck (skipped if absent), each op test file
#               in its own process with its share of the step's time, CUDA tests on small
#               shapes only (see OP_TESTS); a file cut short by its share is PARTIAL
#   test-all    the rest of tests/ with CUDA available: all but triton_interpret and the
#               CUDA-marked tests (those ran in test-cuda)
#
# The whole run stays under GPU_CHECK_BUDGET_S (default 460 s, i.e. under 8 minutes): each
# step runs under `timeout` for min(its cap, the time left less what the later steps need at
# least), and the benchmark is told to start no new run after its share (--max-time).
# At the end it prints a summary (also $OUT/summary.txt) and exits 1 if any step failed.
#
# What is left in $OUT (at most 8 files, as the device tool brings back):
#   summary.txt       one line per step: status, exit code, seconds, log
#   gpu_check.log     every step's log one after the other (each cut to its last 3000 lines)
#   logs.tar.gz       the full logs/<step>.log files and pytest's junit XML
#   bench/results.json, bench/results.md                                  (cross-entropy)
#   bench/upsample_add/results.json                                       (FCN decoder)
#   bench/crop_concat_conv/results.json                                   (U-Net decoder)
#   bench/models/results.json                                             (whole models)
# (logs.tar.gz also holds bench/cross_entropy.png and the results.md of the FCN decoder, the
# U-Net decoder and the models.)
# (GPU_CHECK_KEEP_LOGS=1 keeps the logs/ folder as well.)
#
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (a subset, e.g.
# "env build bench"), GPU_CHECK_BENCH_QUICK (default 1: each suite's --quick problems; 0: the
# full GPU problems, as far as the step's time goes - for a run of "env build bench" alone),
# GPU_CHECK_CCC_PROVIDERS (the crop_concat_conv suite's --providers; default every one but
# compile-max-autotune, fastseg-triton-views included: the Triton backward kernels vs cuDNN on views; empty: the suite's defaults, compile-max-autotune included),
# GPU_CHECK_BENCH_ARGS (extra `fastseg bench` arguments for every suite, e.g. --dtypes bf16),
# GPU_CHECK_SANITIZER_TESTS (pytest arguments under memcheck, run in one process instead of
# OP_TESTS, e.g. -m "cuda and not slow" tests/), FASTSEG_GIT_COMMIT (the commit
# measured, recorded in the JSON: the machine's copy of the tree may have no .git),
# GPU_CHECK_MODELS_ARGS (the models suite's selection; default the three training problems
# in bf16 with the fastseg, eager and compile providers), TORCH_CUDA_ARCH_LIST (default: the
# GPU's compute capability, from nvidia-smi). `make test-compat` runs the env and build steps
# with the GPU machine's torch 2.11 / Python 3.12 on a machine without a GPU.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

export OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export LOGS=$OUT/logs
mkdir -p "$LOGS" "$OUT/bench"

export PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
        | head -1 | tr -d ' ')
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTSEG_BUILD_CUDA=${FASTSEG_BUILD_CUDA:-1}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
# What tests/test_build.py must find in this build.
export FASTSEG_EXPECT_EXTENSION=${FASTSEG_EXPECT_EXTENSION:-1}
export FASTSEG_EXPECT_CUDA_KERNELS=${FASTSEG_EXPECT_CUDA_KERNELS:-1}
unset TRITON_INTERPRET FASTSEG_BACKEND
if [ -z "${FASTSEG_GIT_COMMIT:-}" ]; then
    FASTSEG_GIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)
fi
export FASTSEG_GIT_COMMIT
export GPU_CHECK_BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}
export GPU_CHECK_BENCH_QUICK=${GPU_CHECK_BENCH_QUICK:-1}
export GPU_CHECK_MODELS_ARGS=${GPU_CHECK_MODELS_ARGS-"--shapes fcn8s-train,unet-valid-train,unet-same-train --dtypes bfloat16 --providers eager,fastseg,compile --no-plot"}
export GPU_CHECK_SANITIZER_TESTS=${GPU_CHECK_SANITIZER_TESTS:-}
export GPU_CHECK_CCC_PROVIDERS=${GPU_CHECK_CCC_PROVIDERS-fastseg-cuda,fastseg-triton,fastseg-triton-views,reference,eager,compile,eager-cat-only,conv-only}
# crop_concat_conv2d's Triton kernels run their shipped configs here: autotuning compiles and
# times every candidate config per problem (minutes over the test matrix and the benchmark);
# FASTSEG_TRITON_CCC_AUTOTUNE=1 turns it on for a run of "env build bench" alone.
export FASTSEG_TRITON_CCC_AUTOTUNE=${FASTSEG_TRITON_CCC_AUTOTUNE:-0}
# Each op's test file (test-cuda says which are missing) and the tests of it to run under
# memcheck (pytest -m | -k): the CUDA tests on small shapes - every odd-shape / offset case
# (matches_eager), empty batches, the strided x layouts; the whole layout matrix and the dtype
# sweep ran in test-cuda. (test_fcn_decoder.py: its few end-to-end 500x500 tests.
# test_crop_concat_conv2d.py: its fused GPU backends' tests - the reference backend's, which
# only run PyTorch's own kernels, are left out.)
export OP_TESTS="
tests/test_softmax_cross_entropy.py|cuda and not slow|
tests/test_upsample_add.py|cuda and not slow|(matches_eager and ac0) or empty_batch or layouts[strided
tests/test_deconv_add.py|cuda and not slow|matches_eager or empty_batch or non_contiguous or layouts[strided
tests/test_fcn_decoder.py|cuda and not slow|
tests/test_crop_concat_conv2d.py|cuda and not slow|not reference
"

BUDGET=${GPU_CHECK_BUDGET_S:-460}
START=$(date +%s)

# Exit codes a step uses besides 0 / failure.
export RC_SKIP=200      # not applicable here (a tool is missing): not a failure
export RC_NOTESTS=201   # pytest collected nothing for the selection: not a failure
export RC_PARTIAL=202   # ran clean, but part of it was cut by its time share: not a failure

# ------------------------------------------------------------------------------------------
# The steps. Each runs in its own bash under `timeout`, so everything it uses is exported.
# ------------------------------------------------------------------------------------------

pytest_args() {
    # Common pytest flags; a per-test timeout when pytest-timeout is there.
    local junit=$1
    local args="-q -ra -p no:cacheprovider --junitxml=$junit"
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        args="$args --timeout=${GPU_CHECK_TEST_TIMEOUT:-120}"
    fi
    echo "$args"
}

run_pytest() {
    # run_pytest JUNIT PYTEST-ARGS...: maps "no tests collected" (5) to RC_NOTESTS.
    local junit=$1
    shift
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed for $PY"
        return 1
    fi
    echo "+ $PY -m pytest $(pytest_args "$junit") $*"
    eval "\"$PY\" -m pytest $(pytest_args "$junit") $*"
    local rc=$?
    [ "$rc" -eq 5 ] && return "$RC_NOTESTS"
    return "$rc"
}

require_gpu() {
    # The steps that need a GPU fail without one (they would otherwise skip every test).
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && return 0
    echo "!! torch sees no CUDA device: this step needs the GPU"
    return 1
}

step_env() {
    local rc=0
    echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  commit: ${FASTSEG_GIT_COMMIT:-unknown}"
    echo "== nvidia-smi"
    nvidia-smi || echo "(nvidia-smi failed: no GPU visible)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.limit,temperature.gpu --format=csv || true
    echo "== python and packages ($PY)"
    "$PY" - <<'EOF' || rc=1
import platform, sys
print("python", sys.version.replace("\n", " "), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB", "L2", getattr(p, "L2_cache_size", "?"))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
for name in ("numpy", "pytest", "pytest_timeout", "xdist", "matplotlib", "tqdm", "setuptools", "ninja"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
if not torch.cuda.is_available():
    print("NOTE: torch sees no CUDA device (the steps that need one will fail)")
EOF
    echo "== nvcc"; command -v nvcc && nvcc --version || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
    echo "== compute-sanitizer"; command -v compute-sanitizer && compute-sanitizer --version || echo "compute-sanitizer not on PATH"
    echo "== gcc"; gcc --version 2>/dev/null | head -1
    echo "== machine"; nproc; free -g 2>/dev/null; df -h "$ROOT" 2>/dev/null; uname -a
    return "$rc"
}

step_build() {
    echo "+ TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FASTSEG_BUILD_CUDA=$FASTSEG_BUILD_CUDA MAX_JOBS=$MAX_JOBS"
    echo "+ $PY -m pip install --no-build-isolation --no-deps -v ."
    "$PY" -m pip install --no-build-isolation --no-deps -v . || return 1
    echo "+ $PY -m fastseg info"
    "$PY" -m fastseg info || return 1
}

step_test_cuda() {
    require_gpu || return 1
    local f
    for f in $(echo "$OP_TESTS" | cut -d'|' -f1); do
        [ -f "$f" ] || echo "note: $f is not in this tree (yet): its CUDA tests do not run"
    done
    # crop_concat_conv2d's file last: its Triton kernels JIT-compile per specialization (the
    # slowest part); were the step cut short, the other ops' tests have run by then.
    local ordered
    ordered=$(ls tests/test_*.py | grep -v test_crop_concat_conv2d.py; ls tests/test_crop_concat_conv2d.py 2>/dev/null)
    # shellcheck disable=SC2086
    run_pytest "$LOGS/junit-test-cuda.xml" -m cuda $ordered
}

step_triton_gpu() {
    require_gpu || return 1
    # The Triton tests with Triton JIT-compiling for this GPU instead of interpreting: every
    # test whose name, parameters or module name triton (-k triton), TRITON_INTERPRET unset.
    # (Tests that need the interpreter skip themselves here; the CUDA-marked tests of each op,
    # which run its Triton backend on CUDA tensors, ran in test-cuda.)
    # (-m "not cuda": the cuda-triton parameters of the op tests ran in test-cuda.)
    run_pytest "$LOGS/junit-triton-gpu.xml" -k triton -m "\"not cuda\"" tests/
}

bench_cmd() {
    # The console script pip installed beside this python, else the one on PATH, else main().
    local exe
    exe="$(dirname "$(command -v "$PY")")/fastseg"
    [ -x "$exe" ] || exe=$(command -v fastseg || true)
    if [ -n "$exe" ] && "$exe" bench --help >/dev/null 2>&1; then
        BENCH=("$exe" bench)
    else
        echo "(the fastseg command is not usable; calling fastseg.bench.main directly)"
        BENCH=("$PY" -c "import sys; from fastseg.bench import main; sys.exit(main(sys.argv[1:]))")
    fi
}

step_bench() {
    require_gpu || return 1
    # One run per op suite, each with its share of what is left of the step's time (--max-time
    # only stops new runs from starting: each run holds back ~35 s for the one in flight, the
    # startup and the reports).
    local limit=${STEP_TIMEOUT:-180} t0 left share max rc=0 rc_one quick="" i n op out extra
    local weights=(2 3 3) ops=(cross_entropy upsample_add crop_concat_conv)
    local outs=("$OUT/bench" "$OUT/bench/upsample_add" "$OUT/bench/crop_concat_conv")
    local extras=("" "--no-plot" "--no-plot")
    t0=$(date +%s)
    [ "$GPU_CHECK_BENCH_QUICK" = "1" ] && quick="--quick"
    if [ "$GPU_CHECK_BENCH_QUICK" = "1" ] && [ -n "$GPU_CHECK_CCC_PROVIDERS" ]; then
        extras[2]="--no-plot --providers $GPU_CHECK_CCC_PROVIDERS"
    fi
    bench_cmd
    n=${#ops[@]}
    for i in "${!ops[@]}"; do
        op=${ops[$i]}; out=${outs[$i]}; extra=${extras[$i]}
        left=$(( limit - ($(date +%s) - t0) ))
        local w_left=0 j
        for j in "${!ops[@]}"; do [ "$j" -ge "$i" ] && w_left=$(( w_left + weights[j] )); done
        share=$(( (left - 35 * (n - i)) * weights[i] / w_left ))
        [ "$share" -lt 15 ] && [ "$left" -ge 50 ] && share=15
        if [ "$share" -lt 15 ]; then
            echo "!! ${left}s left of the step: the $op suite does not run"
            rc=1
            continue
        fi
        max=$(( share + 30 ))
        echo "+ [${share}s] ${BENCH[*]} --device cuda --ops $op $quick $extra --out $out --max-time $share $GPU_CHECK_BENCH_ARGS"
        # The extra arguments are meant to split into words.
        # shellcheck disable=SC2086
        timeout --kill-after=5 "$max" "${BENCH[@]}" --device cuda --ops "$op" $quick $extra \
            --out "$out" --max-time "$share" $GPU_CHECK_BENCH_ARGS
        rc_one=$?
        case $rc_one in
            124|137) echo "!! the $op run overran its share and was stopped"; rc_one=1 ;;
        esac
        [ "$rc" -eq 0 ] && rc=$rc_one
    done
    return "$rc"
}

step_bench_models() {
    require_gpu || return 1
    # The issue's whole-model training steps (not --quick: those are toy sizes); --max-time
    # stops new runs ~35 s before the step's end (a compile run is the slowest part).
    local limit=${STEP_TIMEOUT:-150} share rc
    share=$(( limit - 35 ))
    [ "$share" -lt 15 ] && share=15
    bench_cmd
    echo "+ [${share}s] ${BENCH[*]} --device cuda --ops models $GPU_CHECK_MODELS_ARGS --out $OUT/bench/models --max-time $share"
    # shellcheck disable=SC2086
    timeout --kill-after=5 "$(( limit - 5 ))" "${BENCH[@]}" --device cuda --ops models \
        $GPU_CHECK_MODELS_ARGS --out "$OUT/bench/models" --max-time "$share"
    rc=$?
    case $rc in
        124|137) echo "!! the models run overran the step and was stopped"; rc=1 ;;
    esac
    return "$rc"
}

sanitize_pytest() {
    # sanitize_pytest JUNIT "PYTEST ARGS": pytest under memcheck, the arguments one string
    # (quotes in it are honoured); exit 86 = memory errors found.
    local junit=$1 args=$2
    eval "compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 86 \
        --target-processes all \"$PY\" -m pytest $(pytest_args "$junit") -x $args"
}

step_sanitizer() {
    require_gpu || return 1
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "compute-sanitizer is not on PATH: skipped"
        return "$RC_SKIP"
    fi
    # Exact-size cudaMalloc per tensor, so an access past a tensor's end is out of bounds for
    # memcheck instead of landing in the caching allocator's slack.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    local rc
    if [ -n "$GPU_CHECK_SANITIZER_TESTS" ]; then
        echo "+ compute-sanitizer --tool memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) pytest $GPU_CHECK_SANITIZER_TESTS"
        sanitize_pytest "$LOGS/junit-sanitizer.xml" "$GPU_CHECK_SANITIZER_TESTS"
        rc=$?
        [ "$rc" -eq 5 ] && return "$RC_NOTESTS"
        [ "$rc" -eq 86 ] && echo "!! compute-sanitizer reported memory errors (see above)"
        return "$rc"
    fi
    # One process per op test file, each with an equal share of the time left (what one
    # leaves goes to the next), so that every op is checked even when one is slow.
    local limit=${STEP_TIMEOUT:-120} t0 files=() marks=() keys=() i n left share status
    local worst=0 ran=0 partial=0 line file mark key
    t0=$(date +%s)
    while IFS='|' read -r file mark key; do
        [ -z "$file" ] && continue
        if [ ! -f "$file" ]; then
            echo "[sanitizer] $file: not in this tree (yet), skipped"
            continue
        fi
        files+=("$file"); marks+=("$mark"); keys+=("$key")
    done <<< "$OP_TESTS"
    n=${#files[@]}
    [ "$n" -eq 0 ] && return "$RC_NOTESTS"
    for i in "${!files[@]}"; do
        left=$(( limit - ($(date +%s) - t0) - 8 ))
        share=$(( left / (n - i) ))
        if [ "$share" -lt 15 ]; then
            echo "[sanitizer] ${files[$i]}: NOTIME (${left}s left)"
            partial=1
            continue
        fi
        line="-m \"${marks[$i]}\""
        [ -n "${keys[$i]}" ] && line="$line -k \"${keys[$i]}\""
        echo "+ [${share}s] compute-sanitizer --tool memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) pytest $line ${files[$i]}"
        timeout --kill-after=5 "$share" bash -c 'sanitize_pytest "$1" "$2"' _ \
            "$LOGS/junit-sanitizer-$i.xml" "-v $line ${files[$i]}"
        rc=$?
        case $rc in
            0) status=PASS; ran=1 ;;
            5) status=NOTESTS ;;
            124|137) status="PARTIAL (cut at its ${share}s share: the tests above ran clean)"
               partial=1; ran=1 ;;
            86) status="MEMORY ERRORS (see above)"; worst=1 ;;
            *) status="FAIL (exit $rc)"; worst=1 ;;
        esac
        echo "[sanitizer] ${files[$i]}: $status"
    done
    [ "$worst" -ne 0 ] && return 1
    [ "$ran" -eq 0 ] && return "$RC_NOTESTS"
    [ "$partial" -ne 0 ] && return "$RC_PARTIAL"
    return 0
}

step_train_gpu() {
    require_gpu || return 1
    # `fastseg demo --quick` on the GPU: both networks train a few steps (fused ops, AMP-free),
    # validate with overlap-tile inference and time fused vs eager steps; then the same U-Net
    # trains two steps in bf16 autocast with channels_last. (Needs Pillow and scipy, which the
    # data pipeline uses: skipped where the machine lacks them.)
    if ! "$PY" -c "import PIL, scipy, tqdm, matplotlib" 2>/dev/null; then
        echo "Pillow / scipy / tqdm / matplotlib missing for $PY: skipped"
        return "$RC_SKIP"
    fi
    echo "+ $PY -m fastseg demo --quick --device cuda --out $LOGS/demo --no-progress"
    "$PY" -m fastseg demo --quick --device cuda --out "$LOGS/demo" --no-progress || return 1
    echo "+ $PY -m fastseg train (unet, bf16, channels_last, 2 steps)"
    "$PY" -m fastseg train --model unet --base-channels 8 --depth 3 --synthetic-size 128 \
        --crop 68 --steps 2 --amp bf16 --channels-last --device cuda --no-progress \
        --out "$LOGS/train-bf16"
}

step_test_all() {
    local extra=""
    if "$PY" -c "import xdist" 2>/dev/null; then
        extra="-n ${GPU_CHECK_XDIST_WORKERS:-8}"
    fi
    # shellcheck disable=SC2086
    run_pytest "$LOGS/junit-test-all.xml" $extra -m "\"not triton_interpret and not cuda\"" tests/
}

export -f require_gpu pytest_args run_pytest step_env step_build step_test_cuda step_triton_gpu bench_cmd \
    step_bench step_bench_models step_train_gpu sanitize_pytest step_sanitizer step_test_all

# name, function, cap (s), least time it needs (s): the later steps' least times are held
# back from each step's timeout so that every step gets its turn within the budget.
STEP_TABLE="
env        step_env         30   10
build      step_build       240  60
test-cuda  step_test_cuda   180  40
triton-gpu step_triton_gpu  60   20
bench      step_bench       210  80
bench-models step_bench_models 150 50
train-gpu  step_train_gpu   60   15
sanitizer  step_sanitizer   120  30
test-all   step_test_all    120  30
"
WANTED=${GPU_CHECK_STEPS:-env build test-cuda triton-gpu bench bench-models train-gpu sanitizer test-all}

names=(); funcs=(); caps=(); mins=()
while read -r name func cap min; do
    [ -z "$name" ] && continue
    case " $WANTED " in *" $name "*) ;; *) continue ;; esac
    names+=("$name"); funcs+=("$func"); caps+=("$cap"); mins+=("$min")
done <<< "$STEP_TABLE"

statuses=(); rcs=(); secs=()
failed=0
for i in "${!names[@]}"; do
    name=${names[$i]}
    log="$LOGS/$name.log"
    now=$(date +%s)
    left=$(( BUDGET - (now - START) ))
    reserve=0
    for j in "${!names[@]}"; do
        [ "$j" -gt "$i" ] && reserve=$(( reserve + mins[j] ))
    done
    limit=$(( left - reserve - 12 ))   # 12 s: timeout's kill grace and the wrap-up
    [ "$limit" -gt "${caps[$i]}" ] && limit=${caps[$i]}
    if [ "$limit" -lt 10 ]; then
        echo "[$name] NOTIME: ${left}s left of the ${BUDGET}s budget" | tee "$log"
        statuses+=("NOTIME"); rcs+=("-"); secs+=(0); failed=1
        continue
    fi
    echo "[$name] running (timeout ${limit}s) -> $log"
    t0=$(date +%s)
    STEP_TIMEOUT=$limit timeout --kill-after=10 "$limit" bash -c "${funcs[$i]}" > "$log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=PASS ;;
        "$RC_SKIP") status=SKIP ;;
        "$RC_NOTESTS") status=NOTESTS ;;
        "$RC_PARTIAL") status=PARTIAL ;;
        124|137) status=TIMEOUT; failed=1; echo "!! timed out after ${limit}s" >> "$log" ;;
        *) status=FAIL; failed=1 ;;
    esac
    echo "[$name] $status (exit $rc, ${dt}s)"
    statuses+=("$status"); rcs+=("$rc"); secs+=("$dt")
done

# ------------------------------------------------------------------------------------------
# Summary, combined log, archive.
# ------------------------------------------------------------------------------------------

total=$(( $(date +%s) - START ))
{
    echo "gpu_check: commit ${FASTSEG_GIT_COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%M:%SZ), ${total}s of ${BUDGET}s"
    printf '%-11s %-8s %5s %6s  %s\n' step status exit secs log
    for i in "${!statuses[@]}"; do
        printf '%-11s %-8s %5s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${rcs[$i]}" \
            "${secs[$i]}" "logs/${names[$i]}.log"
    done
    if [ "$failed" -ne 0 ]; then echo "RESULT: FAILED"; else echo "RESULT: PASSED"; fi
} > "$OUT/summary.txt"

{
    cat "$OUT/summary.txt"
    for i in "${!statuses[@]}"; do
        echo
        echo "=================== ${names[$i]}: ${statuses[$i]} (exit ${rcs[$i]}, ${secs[$i]}s) ==================="
        tail -n 3000 "$LOGS/${names[$i]}.log"
    done
} > "$OUT/gpu_check.log"

# At most 8 files in $OUT: the cross-entropy chart and the markdown of the FCN decoder, the
# U-Net decoder and the models suites (their records are in their results.json, their tables
# printed below and in gpu_check.log) travel in logs.tar.gz.
MD_COPIES=$(mktemp -d 2>/dev/null || { mkdir -p "/tmp/gpu_check_md.$$" && echo "/tmp/gpu_check_md.$$"; })
for suite in upsample_add crop_concat_conv models; do
    cp "$OUT/bench/$suite/results.md" "$MD_COPIES/$suite.md" 2>/dev/null
done
for f in bench/cross_entropy.png bench/upsample_add/results.md bench/crop_concat_conv/results.md \
        bench/crop_concat_conv/crop_concat_conv.png bench/models/results.md bench/models/models.png; do
    if [ -f "$OUT/$f" ]; then
        mkdir -p "$LOGS/$(dirname "$f")" && mv "$OUT/$f" "$LOGS/$f"
    fi
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null || true
if [ "${GPU_CHECK_KEEP_LOGS:-0}" != "1" ] && [ -s "$OUT/logs.tar.gz" ]; then
    rm -rf "$LOGS"
fi

# The end of the output is what a remote caller sees: failures' last lines, then the summary.
for i in "${!statuses[@]}"; do
    case ${statuses[$i]} in
        FAIL|TIMEOUT)
            echo
            echo "----- last lines of ${names[$i]} (${statuses[$i]}) -----"
            awk -v s="=================== ${names[$i]}:" 'index($0, s) == 1 {p = 1; n = 0; next}
                /^=================== / {p = 0} p {buf[n++ % 40] = $0}
                END {for (k = (n > 40 ? n - 40 : 0); k < n; k++) print buf[k % 40]}' \
                "$OUT/gpu_check.log"
            ;;
    esac
done
for md in "$OUT/bench/results.md" "$MD_COPIES/upsample_add.md" "$MD_COPIES/crop_concat_conv.md" \
        "$MD_COPIES/models.md"; do
    [ -f "$md" ] || continue
    echo
    case $md in
        "$MD_COPIES"/*) label="bench/$(basename "$md" .md)/results.md, in logs.tar.gz" ;;
        *) label=${md#"$OUT"/} ;;
    esac
    case $md in
        */models.md)
            echo "----- bench: models, speedup and peak memory vs eager (from $label) -----"
            awk '/^### models: speedup/ {p = 1} /^### / && !/^### models: speedup/ {p = 0} p' "$md" | head -30
            continue ;;
    esac
    echo "----- bench: full step (from $label) -----"
    awk '/^### full step/ {p = 1} /^### / && !/^### full step/ {p = 0} p' "$md" | head -40
    case $md in
        */crop_concat_conv.md)
            echo "----- bench: U-Net decoder targets -----"
            awk '/^### targets/ {p = 1} /^### / && !/^### targets/ {p = 0} p' "$md" | head -30 ;;
    esac
done
rm -rf "$MD_COPIES"
echo
cat "$OUT/summary.txt"
echo "outputs in $OUT: $(cd "$OUT" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
[ "$failed" -eq 0 ]
