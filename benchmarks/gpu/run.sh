#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), from the repository root, carrying .whl (made here by
# benchmarks/gpu/prepare.sh). One device call runs at most 10 minutes, and the steps together take
# more, so the work is two calls back to back (the machine stays warm, and keeps the build, for a
# few seconds only: a cold start rebuilds, which `build` does when the extension lacks CUDA):
#
#   bash benchmarks/gpu/run.sh build test     # build _C with CUDA, then the tests on the GPU (≤ 8 min)
#   bash benchmarks/gpu/run.sh build bench    # the benchmark suite in bfloat16 (≤ 9 min)
#
# Steps:
#   build  mmkd_kernels._C with its CUDA kernels (skipped when already built with them)
#   test   the library's tests whose targets are on CUDA (compiled Triton, native CUDA, bf16), the
#          Triton config paths and the sm_90a compile check; --maxfail=20 so that one call shows
#          every failure it can
#   bench  in bfloat16 (the goals' dtype), in three parts, each with its own time limit and its
#          table copied out as soon as it is written, the goals' numbers first: the one-direction
#          contrastive loss (N = 4K..256K, D = 384 and 768; ours, then the peers memeff and Inf-CL,
#          then the other backends), the symmetric one, then structure at N = 4K..128K, D = 384.
#          Every Triton config's time per kernel and key goes into the results (the JSON's
#          "autotune", the table's last section: benchmarks/autotune_log.py), to prune the configs
#
# Files back (the device tool returns at most 8): env.txt, build.log, pytest.log, the benchmark
# tables (contrastive.md, symmetric.md, structure.md) and gpu-run.tgz with everything (JSON, PNG,
# logs). The three parts' files share one name (the device and the date): copy each into
# benchmarks/results/ with its part's name added (cuda-<device>-<date>-contrastive.json, ...) and
# commit them.
set -uo pipefail
OUT=${OUT:-/tmp/mmkd-gpu-out}
WORK=/tmp/mmkd-gpu-work
STEPS=${*:-build test}
DTYPE=${MMKD_BENCH_DTYPE:-bfloat16}
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

# One part of the benchmark: bench_part NAME SECONDS ARGS... runs benchmarks.run with ARGS into
# $WORK/NAME under `timeout SECONDS` (what was measured when it stops is still written) and copies
# its table to $OUT/NAME.md.
bench_part() {
  local name=$1 seconds=$2
  shift 2
  mkdir -p "$WORK/$name"
  timeout "$seconds" python3 -m benchmarks.run --device cuda --dtype "$DTYPE" --time-budget 12 --out "$WORK/$name" \
    "$@" > "$WORK/bench-$name.log" 2>&1
  echo "$name bench exit $?"
  cp "$WORK/$name"/*.md "$OUT/$name.md" 2>/dev/null && head -n 40 "$OUT/$name.md"
}

has_cuda_kernels() {
  python3 -c "import sys; from mmkd_kernels import native; native.load(build=False); sys.exit(0 if native.has_cuda_kernels() else 1)" 2>/dev/null
}

for step in $STEPS; do
  case "$step" in
    build)
      if has_cuda_kernels; then echo "build: _C already has its CUDA kernels"; continue; fi
      ( time MMKD_BUILD_CUDA=1 MAX_JOBS=16 timeout 240 python3 setup.py -q build_ext --inplace ) > "$WORK/build.log" 2>&1
      echo "build exit $? (tail of build.log:)"; tail -n 5 "$WORK/build.log"
      ;;
    test)
      # pytest-xdist (in the GPU image) spreads the tests, and so Triton's compilations (one per
      # kernel variant, dtype and argument specialization, serial within a process), over 8 workers.
      parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      timeout 420 python3 -m pytest -q $parallel --maxfail=20 -p no:cacheprovider tests --ignore=tests/train \
        --ignore=tests/test_cuda_sources.py -k "cuda or triton" 2>&1 | tee "$WORK/pytest.log" | tail -n 25
      ;;
    bench)
      # TRITON_PRINT_AUTOTUNING: the config each Triton kernel chose per shape, for the next tuning.
      # 270 + 150 + 120 s: the call's 10 minutes, less the start and the copies.
      export TRITON_PRINT_AUTOTUNING=1
      bench_part contrastive 270 --losses contrastive --dims 384,768 \
        --backends triton,memeff,inf-cl,reference,native,chunked,compile,mnrl
      bench_part symmetric 150 --losses contrastive-symmetric --dims 384,768 \
        --backends triton,memeff,reference,native,chunked,compile,mnrl
      bench_part structure 120 --losses structure-pearson,structure-kl --sizes 4096,32768,131072 \
        --backends triton-gram,triton,reference,native-gram,native,chunked-gram,chunked,compile
      ;;
    *) echo "unknown step '$step' (steps: build test bench)" >&2; exit 2 ;;
  esac
done
