#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), from the repository root, in one call of at most 10 minutes:
#   bash benchmarks/gpu/run.sh            with .whl carried (benchmarks/gpu/prepare.sh made it)
# Builds mmkd_kernels._C with its CUDA kernels, runs the library's tests on the GPU (compiled Triton,
# native CUDA, bf16), then the benchmark suite, writing everything under $OUT (the device tool brings
# it back): nvidia-smi.txt, build.log, pytest.log, bench.log (with the autotuner's choices), and the benchmark's <device>-<date>.{json,md,png}.
# Copy the benchmark files into benchmarks/results/ and commit them.
set -uo pipefail
OUT=${OUT:-/tmp/mmkd-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee "$OUT/versions.txt"

# The extension, CUDA kernels included (16 cores there).
( time MMKD_BUILD_CUDA=1 MAX_JOBS=16 python3 setup.py -q build_ext --inplace ) > "$OUT/build.log" 2>&1
echo "build exit $? (tail of build.log:)"; tail -n 5 "$OUT/build.log"

# The library's tests on the GPU: every backend at full sizes, bf16 included (about 3 minutes).
# --maxfail, not -x: one GPU run should show every failure it can, not the first.
timeout 240 python3 -m pytest -q --maxfail=20 tests --ignore=tests/train -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -n 15

# The benchmark suite: contrastive at N = 4K..256K, structure at N = 4K..128K, every backend and peer.
# TRITON_PRINT_AUTOTUNING: the config each Triton kernel chose per shape, for the next tuning.
TRITON_PRINT_AUTOTUNING=1 timeout 300 python3 -m benchmarks.run --device cuda --time-budget 20 --out "$OUT" 2>&1 \
  | tee "$OUT/bench.log" | tail -n 40
ls -l "$OUT"
