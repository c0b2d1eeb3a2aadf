#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU session: downloads into .whl/ (ignored by git) the wheels
# that the lent GPU machine lacks, for the peers of the benchmark, and this machine's setuptools
# (constraints.txt): the build reads pyproject.toml's SPDX license string, which setuptools
# before 77 refuses, and the GPU image's version has not been read. The device call then carries
# .whl (carry: [".whl"]) and runs benchmarks/gpu/run.sh in one call (its header says why one). The
# GPU machine is Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl inf-cl==1.2.1 memeff==0.3.1 setuptools==80.9.0
ls -l .whl
# The adapters of benchmarks/cases.py must compute our loss with these peers: checked here, on the
# CPU, under Triton's interpreter (benchmarks/gpu/check_peers.py).
"${PYTHON:-.venv/bin/python}" -m benchmarks.gpu.check_peers
