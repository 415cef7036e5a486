#!/usr/bin/env bash
# The GPU check: one run on a lent GPU machine (no network; a python3 with torch, triton, numpy,
# pytest, pytest-xdist, pytest-timeout). Run from the repository root:
#
#     OUT=/some/empty/dir bash scripts/gpu_check.sh
#
# Stages, in order, each under its own time limit, each run whatever the earlier ones did (their
# exit codes go to $OUT/summary.txt and the end of the log):
#   1. versions   nvidia-smi, python, torch, CUDA, cuDNN, triton, the GPU, what serves CUDA
#   2. tests      pytest on the test files with CUDA cases: tests/test_cuda.py (default and
#                 Triton routes vs torch.nn and float64, NaN guard, converted CNN),
#                 tests/test_kernels_triton.py (the compiled kernels), tests/test_router.py
#   3. profile    per call on each route (torch.nn, default, Triton): wall and host time,
#                 kernels launched, the operators taking the host's time
#                 (benchmarks/gpu_route_profile.py)
#   4. bandwidth  eval on large inputs: GB/s of ours (Triton) vs torch's (cuDNN) vs a copy
#                 (benchmarks/gpu_eval_bandwidth.py)
#   5. bench      `batchnorm bench --device cuda` with BATCHNORM_KERNELS=triton (ours = the
#                 Triton kernels) vs torch.nn (cuDNN), train (forward + backward) and eval, in
#                 slices by priority until its time is up: ResNet-50's BN shapes at batch 32 and
#                 large (N, C) shapes in float32 and bfloat16; bfloat16 channels_last; batch 64;
#                 the fused ReLU / residual modes; float32 channels_last
# The package is used from src/ (PYTHONPATH), its C++ CPU kernels not built (BATCHNORM_BUILD=0:
# CPU tensors take torch's kernels, which is all a GPU check needs).
#
# Files in $OUT (8): log.txt (everything printed), summary.txt (each stage's exit code and
# seconds), junit.xml (pytest), profile.txt, bandwidth.json, bench.txt (the bench tables),
# bench.json (every bench slice's rows and ResNet-50 totals), versions.txt.
# The limits: tests 120 s, profile 40 s, bandwidth 45 s, bench 160 s, all within TOTAL_LIMIT (350 s)
# from the start; a full run takes about 4.5 minutes, most of it the bench, which starts its
# slices while time is left and skips the rest (each slice's rows are in bench.txt as measured,
# and in bench.json when it completed).
#
# Without CUDA it says so and exits 2 at once; GPU_CHECK_DRY_RUN=1 runs instead what a CPU can:
# tests/test_cuda.py (its CPU tests), the bench's and the bandwidth script's --self-check.
# Overrides: PYTHON (default python3); GPU_CHECK_STAGES (default "tests profile bandwidth bench": a rerun
# can take one, e.g. GPU_CHECK_STAGES=tests); GPU_CHECK_PYTEST_ARGS (more pytest arguments, e.g.
# "-k triton"); GPU_CHECK_BENCH_SECONDS (the bench's limit, default 160); GPU_CHECK_WORKERS
# (pytest-xdist workers, default 8: Triton compiles in each, 16 cores).
# Exit code: 0 when every stage passed, else the first failing stage's (124: its time ran out).
set -uo pipefail

TOTAL_LIMIT=350
TESTS_LIMIT=120
BANDWIDTH_LIMIT=45
PROFILE_LIMIT=40
BENCH_LIMIT="${GPU_CHECK_BENCH_SECONDS:-160}"
STAGES="${GPU_CHECK_STAGES:-tests profile bandwidth bench}"  # after versions, always first
read -r -a PYTEST_EXTRA <<< "${GPU_CHECK_PYTEST_ARGS:-}"
SLICE_MINIMUM=25  # a bench slice is not started with less time than this left
PY="${PYTHON:-python3}"
WORKERS="${GPU_CHECK_WORKERS:-8}"
RESNET50_CHW="64x112x112 64x56x56 256x56x56 128x56x56 128x28x28 512x28x28 256x28x28 256x14x14
1024x14x14 512x14x14 512x7x7 2048x7x7"
LARGE_NC="256x4096,4096x1024,65536x256"  # BatchNorm1d on (N, C): an MLP's, a point cloud's

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
if [ -z "${OUT:-}" ]; then
    echo "gpu_check: set OUT to the folder for the results" >&2
    exit 2
fi
mkdir -p "$OUT"
work="$(mktemp -d)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BATCHNORM_BUILD=0
export BATCHNORM_CACHE_DIR="$work/cache" PYTHONDONTWRITEBYTECODE=1
if [ ! -w "${HOME:-/nonexistent}" ]; then  # Triton's compile cache lives under ~/.triton
    export TRITON_CACHE_DIR="$work/triton"
fi
start=$SECONDS
final_rc=0

record() {  # record NAME RC STARTED: one line of the summary
    local line
    line="$(printf '%-10s rc=%-4s %4ss' "$1" "$2" "$((SECONDS - $3))")"
    echo "=== $line"
    echo "$line" >> "$OUT/summary.txt"
    if [ "$2" -ne 0 ] && [ "$final_rc" -eq 0 ]; then final_rc=$2; fi
}

limited() {  # limited SECONDS CMD...: SIGINT at the limit (pytest writes its report), KILL 10 s on
    local limit=$1
    shift
    timeout -s INT -k 10 "$limit" "$@"
}

left() {  # seconds left of TOTAL_LIMIT, at most $1 (at least 1: timeout's limit)
    local rest=$((TOTAL_LIMIT - (SECONDS - start)))
    rest=$((rest < $1 ? rest : $1))
    echo $((rest < 1 ? 1 : rest))
}

versions() {
    local t0=$SECONDS
    echo "=== versions $(date -u +%FT%TZ)"
    {
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        limited 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
        limited 10 nvidia-smi
        limited 20 "$PY" - <<'EOF'
import importlib.metadata as metadata
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cuda available", torch.cuda.is_available())
for name in ("triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
from batchnorm import kernels
x = torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")
print("batchnorm: C++ CPU kernels", kernels.native_cpu(), "| serves", x.device, kernels.backend_name(x))
EOF
    } 2>&1 | tee "$OUT/versions.txt"
    record versions $? "$t0"
}

tests() {
    local t0=$SECONDS args files
    files=(tests/test_cuda.py tests/test_kernels_triton.py tests/test_router.py)
    [ "$dry_run" = 1 ] && files=(tests/test_cuda.py)  # the Triton interpreter would take minutes
    args=(-p no:cacheprovider -q --durations=15 --junitxml="$OUT/junit.xml")
    if "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ] && [ "$dry_run" = 0 ]; then
        args+=(-n "$WORKERS")
    fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        args+=(--timeout=100)  # one hung test fails with its traceback, the rest go on
    fi
    args+=("${PYTEST_EXTRA[@]}")
    echo "=== tests: $PY -m pytest ${args[*]} ${files[*]}"
    limited "$(left "$TESTS_LIMIT")" "$PY" -m pytest "${args[@]}" "${files[@]}"
    record tests $? "$t0"
}

script_stage() {  # script_stage NAME LIMIT SCRIPT OUTFILE: a benchmarks/ script (--self-check dry)
    local t0=$SECONDS extra=()
    [ "$dry_run" = 1 ] && extra=(--self-check)
    echo "=== $1"
    limited "$(left "$2")" "$PY" "benchmarks/$3" --out "$OUT/$4" "${extra[@]}"
    record "$1" $? "$t0"
}

profile() { script_stage profile "$PROFILE_LIMIT" gpu_route_profile.py profile.txt; }

bandwidth() { script_stage bandwidth "$BANDWIDTH_LIMIT" gpu_eval_bandwidth.py bandwidth.json; }

shapes_at() {  # shapes_at N: ResNet-50's BN shapes at batch N, comma-separated
    local chw out=""
    for chw in $RESNET50_CHW; do out="$out,$1x$chw"; done
    echo "${out#,}"
}

bench_slice() {  # bench_slice NAME ARGS...: one bench run into $work/bench_NAME.json
    local name=$1 rest rc
    shift
    rest=$((bench_deadline - SECONDS))
    if [ "$rest" -lt "$SLICE_MINIMUM" ]; then
        echo "# bench slice $name not started: ${rest}s left" | tee -a "$OUT/bench.txt"
        echo "$name skipped" >> "$work/slices"
        return
    fi
    local env=(BATCHNORM_KERNELS=triton) common=(--device cuda --rounds 1
        --providers ours,ours-kernels,torch --out "$work/bench_$name.json")
    if [ "$dry_run" = 1 ]; then
        env=()
        common=(--device cuda --self-check --rounds 1 --providers ours,ours-kernels,torch
                --out "$work/bench_$name.json")
        set -- "$@" --shapes 2x3x5x7,6x10  # tiny: the interpreter
    fi
    echo "# bench slice $name: ${common[*]} $* (${rest}s left)" | tee -a "$OUT/bench.txt"
    limited "$rest" env "${env[@]}" "$PY" -m batchnorm.cli bench "${common[@]}" "$@" 2>&1 \
        | tee -a "$OUT/bench.txt"
    rc=$?
    echo "$name $rc $*" >> "$work/slices"
    [ "$rc" -eq 0 ] || bench_rc=$rc
}

bench() {
    local t0=$SECONDS
    bench_rc=0
    bench_deadline=$((SECONDS + $(left "$BENCH_LIMIT")))
    echo "=== bench"
    local train_eval=(--modes train-fwd-bwd,eval-fwd)
    bench_slice resnet50-b32-nchw-fp32 --shapes "$(shapes_at 32),$LARGE_NC" --dtypes float32 \
        --layouts contiguous "${train_eval[@]}"
    bench_slice resnet50-b32-nchw-bf16 --shapes "$(shapes_at 32),$LARGE_NC" --dtypes bfloat16 \
        --layouts contiguous "${train_eval[@]}"
    bench_slice resnet50-b32-nhwc-bf16 --shapes "$(shapes_at 32)" --dtypes bfloat16 \
        --layouts channels_last "${train_eval[@]}"
    bench_slice resnet50-b64-nchw --shapes "$(shapes_at 64)" --dtypes float32,bfloat16 \
        --layouts contiguous "${train_eval[@]}"
    bench_slice fused-b32 --shapes 32x256x56x56,32x1024x14x14,32x2048x7x7 \
        --dtypes float32,bfloat16 --layouts contiguous,channels_last \
        --modes relu-fwd-bwd,add-relu-fwd-bwd
    bench_slice resnet50-b32-nhwc-fp32 --shapes "$(shapes_at 32)" --dtypes float32 \
        --layouts channels_last "${train_eval[@]}"
    "$PY" - "$work" "$OUT/bench.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), sys.argv[2]
slices = []
for line in (work / "slices").read_text().splitlines() if (work / "slices").exists() else []:
    name, status, *args = line.split(" ")
    path = work / f"bench_{name}.json"
    result = json.loads(path.read_text()) if path.exists() else None
    slices.append({"name": name, "rc": status, "args": args, "result": result})
json.dump({"slices": slices}, open(out, "w"), indent=1)
print(f"# bench: {len(slices)} slices, {sum(s['result'] is not None for s in slices)} with "
      f"results, written to {out}")
EOF
    record bench "$bench_rc" "$t0"
}

main() {
    echo "=== gpu_check in $root, OUT=$OUT, $(date -u +%FT%TZ)"
    dry_run=0
    versions
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
            echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): this" \
                 "script is for the GPU machine. GPU_CHECK_DRY_RUN=1 runs its CPU-runnable parts."
            record no-cuda 2 "$SECONDS"
            return 2
        fi
        echo "gpu_check: no CUDA device: dry run (GPU_CHECK_DRY_RUN=1) of the CPU-runnable parts"
        dry_run=1
    fi
    local stage
    for stage in $STAGES; do
        case "$stage" in
            tests | profile | bandwidth | bench) "$stage" ;;
            *) echo "gpu_check: unknown stage $stage (GPU_CHECK_STAGES: tests profile bandwidth" \
                    "bench)"
               record "$stage" 2 "$SECONDS" ;;
        esac
    done
    echo "=== summary ($((SECONDS - start))s in all)"
    cat "$OUT/summary.txt"
    return "$final_rc"
}

main 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
rm -rf "$work"
exit "$rc"
