"""Every test runs with uninitialized memory poisoned: under ``torch.use_deterministic_algorithms``
PyTorch fills each ``torch.empty`` with NaN, so a kernel that leaves part of an output unwritten
fails its comparison instead of passing on leftover memory. (Helpers: mmkd_test_support.py, which
also selects the Triton interpreter where there is no GPU, before mmkd_kernels is imported.)"""

import mmkd_test_support  # noqa: F401  (first: sets TRITON_INTERPRET before the kernels load)
import pytest
import torch


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
