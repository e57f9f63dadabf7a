#!/usr/bin/env bash
# The GPU check of pyevo's CUDA kernels, in one command, on a fresh GPU machine with a copy of the
# working tree (experiments/device/README.md says how it is run and where its figures go):
#
#   bash experiments/device/run.sh          # on the GPU machine; logs and results under $OUT
#   bash experiments/device/run.sh --cpu    # a rehearsal on a machine without a GPU (.venv)
#
# Steps (each one's failure is recorded and shown; later steps still run):
#   a. environment and build: the image's python3 (it holds the CUDA torch), the wheels in .whl/,
#      if carried, installed into a folder on PYTHONPATH to add what it lacks (diffusers, deap,
#      nvidia-cutlass's headers), then pyevo._C built with CUDA for the visible GPU (on a Hopper,
#      as sm_90a with fused_conv2d's CUTLASS kernels when the headers are there);
#   b. the CUDA tests (tests/test_ops.py, test_fused_conv.py, test_population_ops.py, test_ops_fuzz.py,
#      test_runtime.py; -k cuda);
#   c. compute-sanitizer memcheck of pyevo's kernels in the tests marked `sanitizer` (no caching
#      allocator, so an access past a tensor's end is past an allocation's end);
#   d. the microbenchmarks (python -m pyevo.bench), JSON written after every case, and from them
#      a kernel-choice table for this GPU (kernel_choices.json: what fused_conv2d and
#      shared_attention run under impl="auto" once committed as pyevo/assets/kernel_choices.json);
#      then teacher vs a half-MACs student of the DDPM-CIFAR10 config, eager / graph / lean runtime
#      (experiments/device/runtime_latency.py);
#   e. a short python -m pyevo.search --device cuda on the digits teacher (small stage settings),
#      whose report gives teacher vs student latency on the GPU, then the same search with
#      --device cpu on the same machine: seconds per stage (distill, retrain on the GPU) beside it;
#   f. a summary table, printed last and written to $OUT/summary.md.
# Step limits add up to 585 s; in the H100 run the steps took far less than their limits.
# Files in $OUT (8 at most come back): build.log tests.log sanitizer.log bench.json
# kernel_choices.json search.log search_report.json summary.md. Everything else stays in $WORK
# (bench.log too: bench.json holds its figures, summary.md its table and, if it failed, its end).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
OUT=${OUT:-$(mktemp -d /tmp/pyevo_out.XXXXXX)}
WORK=${WORK:-$(mktemp -d /tmp/pyevo_device.XXXXXX)}
mkdir -p "$OUT" "$WORK"
STEPS=$WORK/steps.tsv
: > "$STEPS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$SECONDS

# step NAME SECONDS LOG COMMAND...: runs COMMAND with a time limit, output to LOG, and records
# NAME, exit status and duration.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local begin=$SECONDS
  echo "== $name (limit ${limit}s) -> $log"
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" >> "$STEPS"
  echo "   $name: exit $rc in $((SECONDS - begin)) s"
  return $rc
}

# ---- a. environment and build
BUILD_LOG=$OUT/build.log
: > "$BUILD_LOG"
if [[ $MODE == cpu ]]; then
  PY=${PYTHON:-.venv/bin/python}
  DEVICE=cpu
  {
    echo "rehearsal on the CPU with $PY (no venv, no CUDA build)"
    "$PY" -c "import torch, pyevo; print('torch', torch.__version__, 'build', pyevo.build_info())"
  } >> "$BUILD_LOG" 2>&1
  printf 'build\t%s\t0\n' "$?" >> "$STEPS"
else
  DEVICE=cuda
  SITE=$WORK/site
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  build() {
    set -e
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    # The image's python3 is itself a venv, so a --system-site-packages venv on it would not see
    # its torch: the carried wheels go to a --target folder on PYTHONPATH instead.
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    fi
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
      torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    # TORCH_CUDA_ARCH_LIST unset: setup.py builds for the visible GPU's compute capability.
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 MAX_JOBS=$(nproc) \
      python3 setup.py -q build_ext --inplace
    python3 -c "import torch, pyevo; info = pyevo.build_info(); print('build_info', info); \
      assert info['cuda'], 'built without CUDA'"
    python3 -c "import pyevo; print('fused_conv2d CUTLASS kernels:', pyevo.build_info()['cutlass_sm90'], \
      '(needs the nvidia-cutlass wheel in .whl/ and a 9.0 GPU)')"
  }
  step build 150 "$BUILD_LOG" bash -c "$(declare -f build); SITE='$SITE'; build"
  PY=python3
fi

# The tests that import diffusers and deap (the supernet, the search) run only where they import.
TEST_FILES="tests/test_ops.py tests/test_fused_conv.py"
if "$PY" -c "import diffusers, deap" > /dev/null 2>&1; then
  TEST_FILES="tests/test_ops.py tests/test_fused_conv.py tests/test_population_ops.py tests/test_ops_fuzz.py tests/test_runtime.py"
else
  echo "diffusers or deap missing: tests/test_population_ops.py and the search are skipped" \
    "(carry wheels in .whl/: experiments/device/README.md)" | tee -a "$BUILD_LOG"
fi

# ---- b. CUDA tests
# shellcheck disable=SC2086
# The fuzz tests draw fresh cases on every device run (the "device" profile, tests/conftest.py).
step tests 100 "$OUT/tests.log" env HYPOTHESIS_PROFILE=device "$PY" -m pytest $TEST_FILES -k cuda -q -rfEs \
  -p no:cacheprovider

# ---- c. compute-sanitizer memcheck on the sanitizer subset
if [[ $MODE == gpu ]] && command -v compute-sanitizer > /dev/null; then
  # shellcheck disable=SC2086
  # Only pyevo's kernels are instrumented (their names hold "pyevo"): the references' cuDNN and
  # SDPA kernels run at full speed.
  step sanitizer 60 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --kernel-name kns=pyevo --error-exitcode 99 --print-limit 30 \
    "$PY" -m pytest $TEST_FILES -m sanitizer -q -p no:cacheprovider
else
  echo "compute-sanitizer: not run (no GPU or no compute-sanitizer)" > "$OUT/sanitizer.log"
  printf 'sanitizer\tskipped\t0\n' >> "$STEPS"
fi

# ---- d. microbenchmarks
# The kernel-choice table is rewritten with the JSON after every case (on the CPU: no entries).
if [[ $MODE == gpu ]]; then
  step bench 100 "$WORK/bench.log" "$PY" -m pyevo.bench --json "$OUT/bench.json" \
    --kernel-choices "$OUT/kernel_choices.json"
else
  step bench 120 "$WORK/bench.log" "$PY" -m pyevo.bench --quick --device cpu --json "$OUT/bench.json" \
    --kernel-choices "$OUT/kernel_choices.json"
fi

# ---- d2. teacher vs a half-MACs student of the DDPM-CIFAR10 config under each runtime (issue 15's targets)
if [[ $TEST_FILES == *population* ]]; then
  if [[ $MODE == gpu ]]; then RUNTIME=(--device cuda --dtype float16 --batch 64); else
    RUNTIME=(--device cpu --dtype float32 --batch 4 --repeats 5); fi
  # Its log and JSON stay in $WORK (8 files come back at most); the summary carries its table.
  step runtime 45 "$WORK/runtime.log" "$PY" experiments/device/runtime_latency.py "${RUNTIME[@]}" \
    --json "$WORK/runtime.json"
else
  echo "runtime: not run (diffusers or deap missing)" > "$WORK/runtime.log"
  printf 'runtime\tskipped\t0\n' >> "$STEPS"
fi

# ---- e. a short search on the digits teacher, latency measured on the device
if [[ $TEST_FILES == *population* ]]; then
  # On the GPU at the deployment dtype float16; the CPU rehearsal times float32 at batch 8
  # (float16 convolutions take a slow path on CPUs).
  if [[ $MODE == gpu ]]; then LATENCY=(--dtype float16 --batch 64); else LATENCY=(--dtype float32 --batch 8); fi
  # A 30-step supernet cannot meet MAC/parameter caps; lift them where the config has them.
  CAPS=()
  for key in max_macs max_params; do
    if "$PY" -c "import sys; from pyevo.config import SearchConfig; sys.exit(0 if hasattr(SearchConfig(), '$key') else 1)" 2> /dev/null; then
      CAPS+=(--set "search.$key=1")
    fi
  done
  SEARCH=(--quiet --set distill.steps=30 --set distill.batch_size=32 --set search.population=8
    --set search.generations=2 --set search.heldout_size=64 --set retrain.steps=30
    --set evaluate.num_samples=64 --set evaluate.ddim_steps=10 --set latency.repeats=5
    --set latency.cache= "${CAPS[@]}")
  step search 70 "$OUT/search.log" "$PY" -m pyevo.search --device "$DEVICE" "${LATENCY[@]}" \
    --out "$WORK/search" "${SEARCH[@]}"
  [[ -f $WORK/search/report.json ]] && cp "$WORK/search/report.json" "$OUT/search_report.json"
  if [[ $MODE == gpu ]]; then
    # The same stages on this machine's CPU: the stage seconds side by side (its report stays in
    # $WORK; the summary reads it there).
    step search_cpu 60 "$OUT/search.log" "$PY" -m pyevo.search --device cpu --dtype float32 --batch 8 \
      --out "$WORK/search_cpu" "${SEARCH[@]}"
  fi
else
  echo "search: not run (diffusers or deap missing)" > "$OUT/search.log"
  printf 'search\tskipped\t0\n' >> "$STEPS"
fi

# ---- f. summary, printed last
echo
"$PY" experiments/device/summarize.py --out "$OUT" --steps "$STEPS" --total "$((SECONDS - START))" \
  --cpu-report "$WORK/search_cpu/report.json" --runtime "$WORK/runtime.json" \
  --bench-log "$WORK/bench.log" \
  || echo "summary failed (exit $?); logs are in $OUT"
