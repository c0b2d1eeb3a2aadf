"""Every test runs with uninitialized memory poisoned: under ``torch.use_deterministic_algorithms``
PyTorch fills each ``torch.empty`` with NaN, so a kernel that leaves part of an output unwritten
fails its comparison instead of passing on leftover memory. (Helpers: mmkd_test_support.py, which
also selects the Triton interpreter where there is no GPU, before mmkd_kernels is imported.)"""

import mmkd_test_support  # first: sets TRITON_INTERPRET before the kernels load
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """A case on a CUDA target is marked gpu, and skipped with its reason where it cannot run."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            if isinstance(value, mmkd_test_support.Target) and value.device == "cuda":
                item.add_marker(pytest.mark.gpu)
                cuda_reason = mmkd_test_support.cuda_skip_reason(value)
                if cuda_reason is not None:
                    item.add_marker(pytest.mark.skip(reason=cuda_reason))


def pytest_terminal_summary(terminalreporter):
    """Say how many table cases the Triton interpreter was spared (runs()): they run on a GPU."""
    left_out = len(mmkd_test_support.LEFT_OUT_OF_THE_INTERPRETER)
    if left_out:
        terminalreporter.write_line(
            f"triton-cpu: {left_out} table cases above the interpreter's size limit (N*M*D > "
            f"{mmkd_test_support.INTERPRETER_MAX_WORK}) were not collected; a GPU runs them as triton-cuda")


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all(), "this torch no longer poisons torch.empty: every NaN check below is void"
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def cuda_memory_released():
    """For a test that allocates gigabytes (mmkd_test_support.far_apart): once it is done and its
    tensors are gone, the CUDA caching allocator gives its free blocks back, because the GPU run's
    test workers (pytest-xdist) share one device."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
