"""Fixed-size microbenchmarks under pytest-benchmark: one test per loss × backend, CPU, fwd+bwd.

    pytest benchmarks/ --benchmark-only

Not part of ``make test`` (the project's testpaths is ``tests/``). Each test times one forward +
backward of the student's gradient at N = 2048, D = 384 (float32, teacher frozen), the inputs
rotated between fresh random sets, after a warm-up round (torch.compile compiles there). Tests are
grouped by loss and size, so pytest-benchmark's table compares the backends of one loss.
For the full picture (sizes, memory, FLOP/s, accuracy) run ``python -m benchmarks.run``.
"""

from itertools import cycle

import pytest
import torch

from benchmarks import cases

N, D = 2048, 384
DEVICE = torch.device("cpu")
ROUNDS = 5

CASES = [(loss, backend) for loss in cases.LOSSES for backend in cases.default_backends(loss, DEVICE)]


@pytest.mark.parametrize(("loss", "backend"), CASES, ids=[f"{loss}-{backend}" for loss, backend in CASES])
def test_fwd_bwd(benchmark, loss, backend):
    fn = cases.loss_fn(loss, backend)
    sets = cycle([cases.make_inputs(N, D, seed=seed) for seed in range(3)])

    def step():
        student, teacher = next(sets)
        value = fn(student, teacher)
        (grad,) = torch.autograd.grad(value, student)
        return value.detach(), grad

    benchmark.group = f"{loss} N={N} D={D} fwd+bwd"
    benchmark.extra_info.update(loss=loss, backend=backend, n=N, d=D, threads=torch.get_num_threads(),
                                flops=cases.counts(loss, backend, N, D, 4).flops_fwd_bwd)
    value, grad = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    # A benchmark of a wrong answer is worthless: the loss must be a finite number with a gradient.
    assert torch.isfinite(value) and torch.isfinite(grad).all()
