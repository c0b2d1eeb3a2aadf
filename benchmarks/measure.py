"""How things are measured: time, peak extra memory, accuracy, and the machine's ceilings.

Time is the median of warm runs, the inputs rotated between a few fresh random sets so that no
run finds its inputs in cache from the previous one. CPU: ``time.perf_counter`` around each run.
CUDA: ``triton.testing.do_bench`` (median; it flushes L2 between runs), or CUDA events.

Peak extra memory is what one call adds on top of its inputs:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the call (the inputs).
- CPU: resident memory. ``/proc/self/clear_refs`` (5) resets the high-water mark VmHWM to the
  current VmRSS; the peak extra is VmHWM after the call minus VmRSS before it. This needs freed
  memory to leave the process: the worker processes (``isolate.py``) run with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so every tensor buffer is its own mapping,
  returned on free, and never hidden in a reused heap.

That setting is for the memory run only. Under it every large allocation is a fresh mapping whose
pages fault in on first touch, a cost an ordinary process stops paying once glibc has raised its
threshold: chunked kl at N = 8192 took 1.66 s timed under it and 1.08 s timed as below (native,
which allocates its buffers once per call, 626 and 577 ms; the -kl-mmap-timing file of
2026-11-25 in benchmarks/results against the same day's run). The timed CPU runs
therefore switch glibc to the state it reaches once a process has freed a block of 32 MiB or more,
as every training step does (``heap_reuse``), and back for the next memory run. That state favours
the backends that allocate most: it trims its heap only past 64 MiB, where a process whose largest
freed block was smaller trims sooner (ad hoc, the symmetric loss at N = 2048 took 50 ms in chunked
in a plain process and 35 ms in the benchmark; native 39 ms and 38 ms).

After a timed phase glibc's heap holds free blocks that can serve the next memory run. PeakMemory
returns their pages first (malloc_trim), so a peak that reuses them still counts them; but a block
freed in that run stays resident while the run maps new ones, so such a peak can read high:
native kl at N = 16384 read 105 MiB in a fresh worker and 129 MiB after a timed phase. Without the
trim it read 63 MiB, too low, as the runs before this fix did (the files of 2d05353).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import statistics
import time
from dataclasses import dataclass
from itertools import cycle
from typing import Callable

import torch

MIB = 2.0**20
CPU_MEMORY_METHOD = (
    "CPU resident set: VmHWM after the call minus VmRSS before it (/proc/self/clear_refs reset), "
    "in a fresh worker process per loss x backend with MALLOC_MMAP_THRESHOLD_=131072"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Context manager: ``.extra_mib`` is the peak memory the block added over its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_mib = float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            # Blocks freed into glibc's heap by a warm-up or timed run stay resident, and a peak that
            # reused them would not show: returned first, they fault in again and are counted.
            libc = _glibc()
            if libc is not None:
                libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.extra_mib = max(peak - self._base, 0) / MIB
        return False


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


# --------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    repeats: int
    all_ms: list[float]
    peak_extra_mib: float
    spent_s: float = 0.0  # wall time of the whole timing, every run included (do_bench's too)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc's mallopt parameters (malloc.h), and the values of a process that has run for a while:
# glibc raises its mmap threshold to the largest block freed, up to 32 MiB on 64-bit, and keeps the
# trim threshold at twice it.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_WARM_MMAP_THRESHOLD = 32 << 20
_WORKER_MMAP_THRESHOLD = 128 << 10  # isolate.WORKER_ENV; glibc leaves the trim threshold at 128 KiB then


@functools.cache
def _glibc():
    """The C library, where it is glibc (it has mallopt and malloc_trim); else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def heap_reuse():
    """Inside: glibc's malloc reuses freed blocks of up to 32 MiB from its heap, as it does once a
    process has freed a block that large. After: new blocks of 128 KiB or more get their own
    mapping again (the worker's setting, which the memory run needs), and the free heap is
    returned to the system. Free blocks left in the heap can still serve later requests;
    PeakMemory returns them again before it reads the resident set."""
    libc = _glibc()
    if libc is None:  # not glibc: nothing was changed for the memory run either
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _WARM_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _WARM_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _WORKER_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _WORKER_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def time_cpu(step: Callable[[], object], device: torch.device, *, min_time: float, min_repeats: int,
             max_repeats: int) -> Timing:
    """Median of timed runs of ``step`` (already warm). One run gives the peak extra memory; then,
    with glibc reusing its heap (``heap_reuse``) and one untimed run to fill it, the timed runs go
    on until ``min_time`` seconds are spent, within [min_repeats, max_repeats]."""
    with PeakMemory(device) as memory:
        step()
    times = []
    with heap_reuse():
        step()
        while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_time):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    all_ms = [t * 1e3 for t in times]
    return Timing(statistics.median(all_ms), len(times), all_ms, memory.extra_mib)


def time_cuda(step: Callable[[], object], device: torch.device, *, min_time: float, min_repeats: int,
              max_repeats: int) -> Timing:
    """``triton.testing.do_bench``'s runs and their median (CUDA events when triton is missing); memory
    from one run."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        estimate_ms = (time.perf_counter() - start) * 1e3
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench repeats for ``rep`` ms by its own estimate of a run, which includes its L2 flush:
        # one run more than min_repeats of this one's length, so that a slow case still gets them.
        rep = max(min_time * 1e3, (min_repeats + 1) * estimate_ms, 1.0)
        times = sorted(float(t) for t in do_bench(step, warmup=25, rep=int(rep), return_mode="all"))
        # A fast kernel runs thousands of times: the JSON keeps max_repeats of them, evenly over the
        # sorted runs (the fastest and the slowest among them).
        kept = [times[round(i * (len(times) - 1) / (max_repeats - 1))] for i in range(max_repeats)] \
            if len(times) > max_repeats > 1 else times
        return Timing(statistics.median(times), len(times), kept, memory.extra_mib)
    times = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_time * 1e3):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(begin.elapsed_time(end))
    return Timing(statistics.median(times), len(times), times, memory.extra_mib)


def measure_case(fn: Callable, inputs: list, device: torch.device, *, min_time: float, min_repeats: int,
                 max_repeats: int, modes=("fwd", "fwd_bwd"), warm_up=("fwd", "fwd_bwd")) -> dict[str, Timing]:
    """Forward (under no_grad: the loss value alone) and forward + backward (the student's gradient)
    of ``fn`` over the rotating ``inputs`` [(student, teacher), ...]. The modes in ``warm_up`` get
    one untimed run first (compilation, thread pools, lazy initialization); a mode already run at
    another size in this process needs none, which saves a long run at the largest sizes."""
    sets = cycle(inputs)

    def fwd():
        with torch.no_grad():
            return fn(*next(sets))

    def fwd_bwd():
        student, teacher = next(sets)
        return torch.autograd.grad(fn(student, teacher), student)

    steps = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    timer = time_cuda if device.type == "cuda" else time_cpu
    results = {}
    for mode in modes:
        if mode in warm_up:
            steps[mode]()
            _sync(device)
        start = time.perf_counter()
        results[mode] = timer(steps[mode], device, min_time=min_time, min_repeats=min_repeats,
                              max_repeats=max_repeats)
        results[mode].spent_s = time.perf_counter() - start
    return results


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out has a NaN or Inf)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def errors(fn: Callable, student: torch.Tensor, teacher: torch.Tensor, ref_loss: torch.Tensor,
           ref_grad: torch.Tensor) -> dict[str, float]:
    """Relative errors of the loss and of the student's gradient against the float64 truth."""
    value = fn(student, teacher)
    (grad,) = torch.autograd.grad(value, student)
    return {"rel_err_loss": rel_err(value, ref_loss), "rel_err_grad": rel_err(grad, ref_grad)}


# --------------------------------------------------------------------------------------------------
# Ceilings, measured in the same run as the losses
# --------------------------------------------------------------------------------------------------


def _best_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` warm runs: a ceiling is what the machine can do, not its median."""
    step()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of torch.mm of (m×k)·(k×n) in ``dtype``."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2.0 * m * k * n / seconds


def copy_bandwidth(n_bytes: int, device: torch.device, repeats: int) -> float:
    """Bytes/s of a large copy (read + write counted)."""
    src = torch.empty(n_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, repeats)
    return 2.0 * src.numel() * 4 / seconds


def ceilings(device: torch.device, sizes: list[int], dims: list[int], block_rows: Callable[[int], int],
             quick: bool = False) -> dict:
    """The matmul and bandwidth ceilings of this device, measured now.

    CPU: a large square fp32 mm, and the row-block shapes the chunked backend uses ((block × D) ·
    (D × N) for every N and D of the run). CUDA: large square bf16 and fp32 mm (TF32 as PyTorch's
    default leaves it: off). Both: a large copy for bandwidth.
    """
    repeats = 1 if quick else 5
    if device.type == "cuda":
        side = 1024 if quick else 8192
        result = {
            "matmul_fp32_flops": matmul_flops(side, side, side, torch.float32, device, repeats),
            "matmul_bf16_flops": matmul_flops(side, side, side, torch.bfloat16, device, repeats),
            "matmul_square_side": side,
            "copy_bytes_per_s": copy_bandwidth((64 if quick else 2048) * 2**20, device, repeats),
        }
    else:
        side = 512 if quick else 2048
        result = {
            "matmul_fp32_flops": matmul_flops(side, side, side, torch.float32, device, repeats),
            "matmul_square_side": side,
            "copy_bytes_per_s": copy_bandwidth((16 if quick else 512) * 2**20, device, repeats),
        }
    result["matmul_block_fp32_flops"] = {
        f"{n}x{d}": {"block": block_rows(n),
                     "flops": matmul_flops(block_rows(n), d, n, torch.float32, device, repeats)}
        for d in dims for n in sizes
    }
    return result


def peak_flops(ceiling: dict, n: int, d: int, dtype: torch.dtype, device: torch.device) -> float:
    """The matmul ceiling a loss at (N, D) is held to: the best of the square mm of the inputs'
    dtype class and (fp32) the chunked backend's row-block mm at this N and D."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return ceiling["matmul_bf16_flops"]
    block = ceiling.get("matmul_block_fp32_flops", {}).get(f"{n}x{d}", {}).get("flops", 0.0)
    return max(ceiling["matmul_fp32_flops"], block)
