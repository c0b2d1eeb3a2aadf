"""The native extension: its C++ schemas are the shared ones, and a missing build says why."""

import pytest
import torch

import mmkd_kernels as mk
from mmkd_kernels import native, native_build, ops



def test_the_extension_is_built_here():
    """make test builds mmkd_kernels._C first; every native case of the shared tables needs it."""
    from mmkd_kernels import backends

    assert "native" in mk.available_backends(), backends.unavailable_reason("native")


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_schemas_match_the_python_contract(name):
    """csrc/bindings.cpp defines five ops in C++; native.py the gram ones; all seven as ops.SCHEMAS."""
    expected = torch._C.parse_schema(f"mmkd_native::{name}{ops.SCHEMAS[name]}")
    actual = getattr(torch.ops.mmkd_native, name).default._schema
    assert str(actual) == str(expected)


def test_cpu_kernels_are_registered_for_cpu():
    for name in ("contrastive_forward", "contrastive_backward", "contrastive_forward_with_grad",
                 "structure_tile_forward", "structure_tile_forward_with_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkd_native::{name}", "CPU"), name


def test_a_build_without_sources_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "CSRC", tmp_path / "missing")
    with pytest.raises(RuntimeError, match=r"mmkd_kernels._C is not built and its sources are not at .*missing"):
        native._jit_build()


def test_a_cuda_toolkit_needs_its_runtime_headers(monkeypatch, tmp_path):
    """MMKD_BUILD_CUDA=auto builds the CUDA kernels only where cuda_runtime.h is where torch's build
    looks: CUDA_HOME/include, or CUDA_INC_PATH."""
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    assert "no CUDA toolkit found" in native_build.cuda_toolkit_missing(None)
    assert "has no include/cuda_runtime.h" in native_build.cuda_toolkit_missing(str(tmp_path))
    headers = tmp_path / "targets" / "x86_64-linux" / "include"
    headers.mkdir(parents=True)
    (headers / "cuda_runtime.h").write_text("")
    assert native_build.cuda_toolkit_missing(str(tmp_path)) is not None
    monkeypatch.setenv("CUDA_INC_PATH", str(headers))
    assert native_build.cuda_toolkit_missing(str(tmp_path)) is None
    monkeypatch.delenv("CUDA_INC_PATH")
    (tmp_path / "include").symlink_to(headers)
    assert native_build.cuda_toolkit_missing(str(tmp_path)) is None


def test_unknown_kind_is_refused_by_the_kernel():
    s = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="kind must be 'mse', 'pearson' or 'kl', got 'cosine'"):
        torch.ops.mmkd_native.structure_tile_forward(s, s, "cosine", 1.0, True, 0, 5)
