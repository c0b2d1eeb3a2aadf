#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), from the repository root, carrying .whl (made here by
# benchmarks/gpu/prepare.sh). One device call runs at most 10 minutes and the steps together take
# more, so the work is two or three calls. A machine is handed back 30 s after a call, so each call
# starts cold: carry the extension the first call built (below) and `build` finds it.
#
#   bash benchmarks/gpu/run.sh build test accuracy    # build _C with CUDA, the tests, the accuracy table
#   bash benchmarks/gpu/run.sh build bench            # the benchmark suite in bfloat16
#   bash benchmarks/gpu/run.sh build structure        # what `bench` had no time left for, if anything
#
# Steps, run in the order given, each under its own time limit cut to what is left of the call's
# MMKD_GPU_BUDGET_S (570 s: the device's 600, less the copies back; a step with under 30 s left
# is skipped and says so), so that the call always ends itself and the files come back:
#   build     mmkd_kernels._C with its CUDA kernels (skipped when the extension has them already);
#             the built .so goes into gpu-run.tgz (ext/): unpack it into mmkd_kernels/ here and name
#             it in the next call's carry, and that call skips the build
#   test      the library's tests whose targets are on CUDA (compiled Triton, native CUDA, bf16), the
#             Triton config paths and the sm_90a compile check; --maxfail=20 so that one call shows
#             every failure it can
#   accuracy  python -m benchmarks.accuracy --device cuda: every backend and dtype against float64
#   bench     the three parts below, in this order (the goals' numbers first); each part's table is
#             copied out as soon as it is written, and every Triton config's time per kernel and key
#             goes into the results (the JSON's "autotune", the table's last section:
#             benchmarks/autotune_log.py), to prune the configs
#   contrastive  the one-direction loss, N = 4K..256K, D = 384 and 768: ours, the peers memeff and
#                Inf-CL, then the other backends (270 s)
#   symmetric    the symmetric loss (150 s)
#   structure    structure pearson and kl at N = 4K..128K, D = 384 (120 s)
#
# Files back (the device tool returns at most 8): env.txt, build.log, pytest.log, accuracy.md, the
# benchmark tables (contrastive.md, symmetric.md, structure.md) and gpu-run.tgz with everything
# (JSON, PNG, logs, the extension). The bench parts' files share one name (the device and the
# date): copy each into benchmarks/results/ with its part's name added
# (cuda-<device>-<date>-contrastive.json, ...) and commit them.
set -uo pipefail
START=$SECONDS
BUDGET=${MMKD_GPU_BUDGET_S:-570}
OUT=${OUT:-/tmp/mmkd-gpu-out}
WORK=${MMKD_GPU_WORK:-/tmp/mmkd-gpu-work}
STEPS=${*:-build test accuracy}
STEPS=${STEPS//bench/contrastive symmetric structure}
DTYPE=${MMKD_BENCH_DTYPE:-bfloat16}
rm -rf "$WORK"  # a warm machine's last call must not pass its files off as this one's
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
trap 'tar czf "$OUT/gpu-run.tgz" -C "$WORK" . 2>/dev/null; cp "$WORK"/{env.txt,build.log,pytest.log} "$OUT"/ 2>/dev/null; ls -l "$OUT"' EXIT

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$WORK/env.txt" 2>&1
tail -n 1 "$WORK/env.txt"

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

# One part of the benchmark: bench_part NAME SECONDS ARGS... runs benchmarks.run with ARGS into
# $WORK/NAME for at most SECONDS (what was measured when it stops is still written) and copies its
# table to $OUT/NAME.md.
bench_part() {
  local name=$1 seconds=$2
  shift 2
  mkdir -p "$WORK/$name"
  # TRITON_PRINT_AUTOTUNING: the config each Triton kernel chose per shape, into the log.
  TRITON_PRINT_AUTOTUNING=1 run_step "$name" "$seconds" python3 -m benchmarks.run --device cuda --dtype "$DTYPE" --time-budget 12 \
    --out "$WORK/$name" "$@" > "$WORK/bench-$name.log" 2>&1
  local status=$?
  echo "$name bench exit $status ($(tail -n 1 "$WORK/bench-$name.log"))"
  cp "$WORK/$name"/*.md "$OUT/$name.md" 2>/dev/null && head -n 40 "$OUT/$name.md"
  return $status
}

has_cuda_kernels() {
  python3 -c "import sys; from mmkd_kernels import native; native.load(build=False); sys.exit(0 if native.has_cuda_kernels() else 1)" 2>/dev/null
}

failed=()
for step in $STEPS; do
  case "$step" in
    build)
      if has_cuda_kernels; then echo "build: _C already has its CUDA kernels"; continue; fi
      ( time MMKD_BUILD_CUDA=1 MAX_JOBS=16 run_step build 300 python3 setup.py -q build_ext --inplace ) \
        > "$WORK/build.log" 2>&1
      status=$?
      echo "build exit $status (tail of build.log:)"; tail -n 5 "$WORK/build.log"
      # Without its debug information, the extension fits the files that come back.
      mkdir -p "$WORK/ext" && cp mmkd_kernels/_C*.so "$WORK/ext/" 2>/dev/null && strip --strip-debug "$WORK"/ext/*.so
      [ "$status" -eq 0 ]
      ;;
    test)
      # pytest-xdist (in the GPU image) spreads the tests, and so Triton's compilations (one per
      # kernel variant, dtype and argument specialization, serial within a process), over 8 workers.
      parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      run_step test 420 python3 -m pytest -q $parallel --maxfail=20 -p no:cacheprovider tests --ignore=tests/train \
        --ignore=tests/test_cuda_sources.py -k "cuda or triton" 2>&1 | tee "$WORK/pytest.log" | tail -n 25
      ;;
    accuracy)
      # One config per Triton kernel (MMKD_TRITON_AUTOTUNE=0): N = 1000 is about accuracy, not speed.
      MMKD_TRITON_AUTOTUNE=0 run_step accuracy 120 python3 -m benchmarks.accuracy --device cuda \
        --out "$WORK/accuracy" > "$WORK/accuracy.log" 2>&1
      status=$?
      echo "accuracy exit $status"
      cp "$WORK/accuracy"/*.md "$OUT/accuracy.md" 2>/dev/null && cat "$OUT/accuracy.md"
      [ "$status" -eq 0 ]
      ;;
    contrastive)
      bench_part contrastive 270 --losses contrastive --dims 384,768 \
        --backends triton,memeff,inf-cl,reference,native,chunked,compile,mnrl
      ;;
    symmetric)
      bench_part symmetric 150 --losses contrastive-symmetric --dims 384,768 \
        --backends triton,memeff,reference,native,chunked,compile,mnrl
      ;;
    structure)
      bench_part structure 120 --losses structure-pearson,structure-kl --sizes 4096,32768,131072 \
        --backends triton-gram,triton,reference,native-gram,native,chunked-gram,chunked,compile
      ;;
    *) echo "unknown step '$step' (steps: build test accuracy bench contrastive symmetric structure)" >&2; exit 2 ;;
  esac || failed+=("$step")
done
# The call's exit status says whether every step passed; the steps' own lines above say which did not.
if [ ${#failed[@]} -gt 0 ]; then echo "steps that failed or ran out of time: ${failed[*]}"; exit 1; fi
exit 0
