#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), from the repository root, carrying .whl (made here by
# benchmarks/gpu/prepare.sh). A session is lent 15 minutes of device time, the machine's start
# included, and no machine starts with under 4 minutes left: that is ONE call of at most 600 s.
# So one call runs everything, most wanted first, each step cut to what is left:
#
#   MMKD_GIT_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu/run.sh   # timeout_s=600
#       = build goals test accuracy splits bench; the commit goes into the results (no .git travels)
#
# Steps, in the order given, each under its own time limit cut to what is left of the call's
# MMKD_GPU_BUDGET_S (570 s: the device's 600, less the copies back; a step with under 30 s left
# is skipped and says so), so that the call always ends itself and the files come back:
#   build     mmkd_kernels._C with its CUDA kernels, IN THE BACKGROUND (nice, 8 jobs) from the start
#             of the call; the first step that runs the extension (every step but goals) waits for
#             it. Skipped when the extension has its CUDA kernels already. The built .so, without
#             its debug information, comes back in ext.tgz
#   goals     the issues' goal cells first: contrastive at N = M = 65536, D = 768 (triton, memeff,
#             inf-cl), then symmetric (triton, memeff) under a limit of its own, structure pearson
#             at N = 32768, D = 384 (triton-gram, reference, then triton-gram in 2x and 4x larger
#             float64 blocks); each with its accuracy at N = 4096 and the bf16 mm rate of the run;
#             then each goal of issue 4 judged from them (benchmarks/gpu/goals.py), into goals.md
#   test      the library's tests whose targets are on CUDA (compiled Triton, native CUDA, bf16), the
#             Triton config paths and the sm_90a compile check; -v so that a cut run still shows
#             each test's verdict, --maxfail=20, and a per-test timeout where pytest-timeout is there
#   accuracy  python -m benchmarks.accuracy --device cuda: every backend and dtype against float64
#   splits    python -m benchmarks.gpu.splits: Triton with its columns split as the launchers choose
#             against one split, for a rank's few rows against 64K gathered rows (40 s); its table
#             is appended to goals.md
#   bench     the three sweeps below, in this order, with what is left; each part's table is copied
#             out as soon as it is written, and every Triton config's time per kernel and key goes
#             into the results (the JSON's "autotune", the table's last section:
#             benchmarks/autotune_log.py), to prune the configs
#   contrastive  the one-direction loss, N = 4K..256K, D = 384 and 768: ours, the peers memeff and
#                Inf-CL, then the other backends (270 s)
#   symmetric    the symmetric loss (150 s)
#   structure    structure pearson and kl at N = 4K..128K, D = 384 (120 s)
#
# Files back (the device tool returns at most 8): pytest.log, accuracy.md, goals.md and the sweeps'
# tables (contrastive.md, symmetric.md, structure.md), ext.tgz (the extension), and gpu-run.tgz with
# everything else (env.txt, JSON, PNG, logs). gpu-run.tgz is packed again after every step, so that a
# call killed at its limit still brings back what its finished steps wrote. Each benchmark's files
# are named <device>-<date>-<part> (nvidia-h100-80gb-hbm3-2026-12-08-goals-contrastive.json, ...):
# commit them into benchmarks/results/ under those names.
set -uo pipefail
START=$SECONDS
BUDGET=${MMKD_GPU_BUDGET_S:-570}
OUT=${OUT:-/tmp/mmkd-gpu-out}
WORK=${MMKD_GPU_WORK:-/tmp/mmkd-gpu-work}
STEPS=${*:-build goals test accuracy splits bench}
STEPS=${STEPS//bench/contrastive symmetric structure}
DTYPE=${MMKD_BENCH_DTYPE:-bfloat16}
rm -rf "$WORK"  # a warm machine's last call must not pass its files off as this one's
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# pack: everything of $WORK but the extension into $OUT/gpu-run.tgz (built beside, then moved in, so
# that a kill while packing leaves the last whole archive), and the tests' log beside it.
pack() {
  tar czf "$WORK.tgz" -C "$WORK" --exclude=./ext . 2>/dev/null && mv -f "$WORK.tgz" "$OUT/gpu-run.tgz"
  if [ -f "$WORK/pytest.log" ]; then cp "$WORK/pytest.log" "$OUT/"; fi
}
trap 'pack; ls -l "$OUT"' EXIT

for step in $STEPS; do
  case "$step" in
    build|goals|test|accuracy|splits|contrastive|symmetric|structure) ;;
    *) echo "unknown step '$step' (steps: build goals test accuracy splits bench contrastive symmetric structure)" >&2
       exit 2 ;;
  esac
done

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# limit WANT: the seconds a step may take, WANT or what is left of the budget (less 15 s for the
# copies back) if that is less; 0 when under 30 s are left.
limit() {
  local left=$((BUDGET - (SECONDS - START) - 15))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# run_step NAME WANT COMMAND...: COMMAND under `timeout` (SIGKILL 10 s after SIGTERM) for limit WANT
# seconds; says when there was no time left for it. Its exit status is the command's.
run_step() {
  local name=$1 seconds
  seconds=$(limit "$2")
  shift 2
  if [ "$seconds" -eq 0 ]; then echo "$name: skipped, the call's budget is spent"; return 124; fi
  echo "$name: up to $seconds s"
  timeout -k 10 "$seconds" "$@"
}

# bench_run NAME SECONDS ARGS...: benchmarks.run with ARGS into $WORK/NAME for at most SECONDS (what
# was measured when it stops is still written); its table is appended to $OUT/${TABLE:-NAME}.md.
bench_run() {
  local name=$1 seconds=$2
  shift 2
  mkdir -p "$WORK/$name"
  # TRITON_PRINT_AUTOTUNING: the config each Triton kernel chose per shape, into the log.
  TRITON_PRINT_AUTOTUNING=1 run_step "$name" "$seconds" python3 -m benchmarks.run --device cuda --dtype "$DTYPE" --time-budget 12 \
    --out "$WORK/$name" --suffix "-$name" "$@" > "$WORK/bench-$name.log" 2>&1
  local status=$?
  echo "$name bench exit $status ($(tail -n 1 "$WORK/bench-$name.log"))"
  if ls "$WORK/$name"/*.md >/dev/null 2>&1; then
    cat "$WORK/$name"/*.md >> "$OUT/${TABLE:-$name}.md" && head -n 40 "$WORK/$name"/*.md
  fi
  return $status
}

has_cuda_kernels() {
  python3 -c "import sys; from mmkd_kernels import native; native.load(build=False); sys.exit(0 if native.has_cuda_kernels() else 1)" 2>/dev/null
}

# The build runs beside `goals` (GPU work, one core): nice and 8 of the 16 cores, so that the
# benchmark's host side is not starved. wait_build reports it once, before the first step that
# runs the extension.
BUILD_PID=
build_status=0
# torch takes CUDA_HOME, when unset, from nvcc's place on the PATH without following links: an
# nvcc linked into /usr/local/bin gives /usr/local, which has no CUDA headers. The toolkit is
# where the link points.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
{ echo "git commit: ${MMKD_GIT_COMMIT:-unknown (pass MMKD_GIT_COMMIT)}"; echo "CUDA_HOME: ${CUDA_HOME:-unset}"
  nvcc --version 2>&1 | tail -n 2; nvidia-smi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$WORK/env.txt" 2>&1
tail -n 1 "$WORK/env.txt"
build() {
  if has_cuda_kernels; then echo "build: _C already has its CUDA kernels"; return 0; fi
  ( time MMKD_BUILD_CUDA=1 MAX_JOBS=8 run_step build 300 nice -n 19 python3 setup.py -q build_ext --inplace ) 2>&1
  local status=$?
  # Without its debug information, the extension fits the files that come back.
  mkdir -p "$WORK/ext" && cp mmkd_kernels/_C*.so "$WORK/ext/" 2>/dev/null && strip --strip-debug "$WORK"/ext/*.so \
    && tar czf "$OUT/ext.tgz" -C "$WORK" ext
  return $status
}
wait_build() {
  [ -n "$BUILD_PID" ] || return 0
  wait "$BUILD_PID"
  build_status=$?
  BUILD_PID=
  echo "build exit $build_status (tail of build.log:)"; tail -n 5 "$WORK/build.log"
  [ "$build_status" -eq 0 ] || failed+=(build)
}

failed=()
for step in $STEPS; do
  case "$step" in
    build) build > "$WORK/build.log" 2>&1 & BUILD_PID=$! ; echo "build: started in the background" ;;
    goals)
      TABLE=goals bench_run goals-contrastive 120 --losses contrastive --sizes 65536 --dims 768 \
        --backends triton,memeff,inf-cl --error-n 4096
      status=$?
      # Its own limit, so that a slow first series cannot take the symmetric goal's time.
      TABLE=goals bench_run goals-symmetric 80 --losses contrastive-symmetric --sizes 65536 --dims 768 \
        --backends triton,memeff --error-n 4096 || status=1
      TABLE=goals bench_run goals-structure 90 --losses structure-pearson --sizes 32768 --dims 384 \
        --backends triton-gram,reference --error-n 4096 || status=1
      # The gram algorithm again in 2x and 4x larger float64 blocks: a few dozen launches per block,
      # so fewer launches for more memory (mmkd_kernels/gram.py); these numbers choose the default.
      for elements in 2097152 4194304; do
        MMKD_GRAM_BLOCK_ELEMENTS=$elements TABLE=goals bench_run "goals-structure-$elements" 45 \
          --losses structure-pearson --sizes 32768 --dims 384 --backends triton-gram --error-n 4096 || status=1
      done
      # Issue 4's goals judged from those runs (benchmarks/gpu/goals.py), under their tables.
      if ls "$WORK"/goals-*/*.json >/dev/null 2>&1; then
        python3 -m benchmarks.gpu.goals "$WORK"/goals-*/*.json > "$WORK/goals-verdict.md" || status=1
        tee -a "$OUT/goals.md" < "$WORK/goals-verdict.md"
      fi
      [ "$status" -eq 0 ]
      ;;
    test)
      wait_build
      # pytest-xdist (in the GPU image) spreads the tests, and so Triton's compilations (one per
      # kernel variant, dtype and argument specialization, serial within a process), over 8 workers;
      # pytest-timeout (also there) stops a test that hangs instead of the whole step.
      parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
      # chunked-cuda (plain PyTorch on the GPU) is left out: the call's minutes go to the kernels.
      # installed_backends: the check that the extension has its CUDA kernels (else native-cuda skips).
      run_step test 240 python3 -m pytest -v $parallel $per_test --maxfail=20 -p no:cacheprovider tests --ignore=tests/train \
        --ignore=tests/test_cuda_sources.py -k "(cuda or triton or installed_backends) and not chunked-cuda" > "$WORK/pytest.log" 2>&1
      status=$?
      grep -E "^test: |FAILED|ERROR|passed|failed" "$WORK/pytest.log" | tail -n 25
      [ "$status" -eq 0 ]
      ;;
    accuracy)
      wait_build
      # One config per Triton kernel (MMKD_TRITON_AUTOTUNE=0): N = 1000 is about accuracy, not speed.
      MMKD_TRITON_AUTOTUNE=0 run_step accuracy 90 python3 -m benchmarks.accuracy --device cuda \
        --out "$WORK/accuracy" > "$WORK/accuracy.log" 2>&1
      status=$?
      echo "accuracy exit $status"
      cp "$WORK/accuracy"/*.md "$OUT/accuracy.md" 2>/dev/null && cat "$OUT/accuracy.md"
      [ "$status" -eq 0 ]
      ;;
    splits)
      # Triton only: no need to wait for the extension.
      run_step splits 40 python3 -m benchmarks.gpu.splits --out "$WORK/splits" > "$WORK/splits.log" 2>&1
      status=$?
      echo "splits exit $status ($(tail -n 1 "$WORK/splits.log"))"
      if ls "$WORK/splits"/*.md >/dev/null 2>&1; then cat "$WORK/splits"/*.md | tee -a "$OUT/goals.md"; fi
      [ "$status" -eq 0 ]
      ;;
    contrastive)
      wait_build
      bench_run contrastive 270 --losses contrastive --dims 384,768 \
        --backends triton,memeff,inf-cl,reference,native,chunked,compile,mnrl
      ;;
    symmetric)
      wait_build
      bench_run symmetric 150 --losses contrastive-symmetric --dims 384,768 \
        --backends triton,memeff,reference,native,chunked,compile,mnrl
      ;;
    structure)
      wait_build
      bench_run structure 120 --losses structure-pearson,structure-kl --sizes 4096,32768,131072 \
        --backends triton-gram,triton,reference,native-gram,native,chunked-gram,chunked,compile
      ;;
  esac || failed+=("$step")
  pack
done
wait_build
# The call's exit status says whether every step passed; the steps' own lines above say which did not.
if [ ${#failed[@]} -gt 0 ]; then echo "steps that failed or ran out of time: ${failed[*]}"; exit 1; fi
exit 0
