"""The Triton kernels compile for an H100 (sm_90a), here, without a GPU.

The interpreter (the other Triton tests on a CPU) checks the kernels' numbers but not that the GPU
compiler accepts them. ``benchmarks/triton_sm90.py`` lowers every kernel, in every variant the
launchers use, to PTX and runs Triton's bundled ``ptxas`` on it; here each kernel's first
autotune config in bfloat16 and float32, in a process of its own (this one interprets Triton).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    run = subprocess.run([sys.executable, "-m", "benchmarks.triton_sm90", "--first-config",
                          "--dtypes", "bfloat16,float32", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    reports = list(out.glob("triton-sm90-*.json"))
    assert reports, f"no report written:\n{run.stderr[-3000:]}"
    return run.returncode, json.loads(reports[0].read_text())["rows"]


def test_every_kernel_and_variant_compiles(compiled):
    returncode, rows = compiled
    failed = [(r["kernel"], r["variant"], r["dtype"], r["status"]) for r in rows if r["status"] != "ok"]
    assert not failed, failed
    assert returncode == 0
    kernels = {r["kernel"] for r in rows}
    assert {"contrastive._lse_kernel", "contrastive._lse_grad_kernel", "contrastive._grad_kernel",
            "structure._rows_kernel", "structure._grad_kernel"} <= kernels
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in kernels for d in ("bfloat16", "float32")}
    # The int64 indices of tensors past 2^31 elements (tiles.needs_int64_offsets) compile too.
    assert {r["kernel"] for r in rows if r["variant"]["INT64_OFFSETS"]} == kernels


def test_half_precision_dots_use_hopper_tensor_cores(compiled):
    _, rows = compiled
    assert all(r["wgmma"] for r in rows if r["dtype"] == "bfloat16"), "a bfloat16 dot did not become wgmma"
    assert not any(r["wgmma"] for r in rows if r["dtype"] == "float32"), "a float32 dot left exact FMA"


def test_bfloat16_first_configs_fit_without_spilling(compiled):
    """Each kernel's first config is the one a short run is most likely to keep: it must neither
    spill registers nor overflow an H100 block's shared memory."""
    _, rows = compiled
    for r in rows:
        assert r["fits"], (r["kernel"], r["variant"], r["dtype"], r["shared_bytes"])
        if r["dtype"] == "bfloat16":
            assert r["spill_stores"] == r["spill_loads"] == 0, (r["kernel"], r["variant"], r["registers"])
