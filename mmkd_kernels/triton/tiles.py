"""What every Triton kernel here shares: the similarity tile, the gradient chunks, int32 or int64
indices, autotuning, and the host-side normalization (inverse norms in, the normalization's backward
as an N×D epilogue out)."""

import functools
import os

import torch
import triton
import triton.language as tl
from triton import knobs

from .. import switches
from ..normalization import normalize_backward, normalize_forward
from ..reference import EPS


def configs(block_sizes: list[tuple], names: tuple[str, ...]) -> list[triton.Config]:
    """triton.Configs from rows (*block sizes in the order of ``names``, num_warps, num_stages)."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in block_sizes]


def autotuned(half_configs: list, float32_configs: list, interpreter_config: triton.Config, key: list, input_arg: str,
              reset_to_zero: tuple[str, ...] = ()):
    """``triton.autotune`` keyed on the names in ``key`` that the kernel has (and, as Triton adds,
    the pointer dtypes), timed once per key and cached on disk, over ``half_configs`` when
    ``input_arg`` is float16/bfloat16 (tensor-core dots) and ``float32_configs`` when float32
    (exact FMA dots, which need more registers per output, so smaller D steps). Under
    ``TRITON_INTERPRET=1`` (CI on a CPU) the one ``interpreter_config`` instead, because autotuning
    times configs on a device the interpreter lacks, and because the interpreter runs fewer, larger
    blocks fastest (64 against 32: about 15x).
    ``MMKD_TRITON_AUTOTUNE=0`` keeps each list's first config and times nothing (the tests on a GPU,
    which see hundreds of shapes, each a new key). Decided when the kernel is defined, as
    ``triton.jit`` decides between compiling and interpreting.
    ``benchmarks/triton_sm90.py`` compiles every config for an H100 and reports its registers,
    spills and shared memory; the returned autotuner keeps both lists as ``configs_by_dtype``.
    ``reset_to_zero`` names the buffers a kernel adds into (atomics): the autotuner runs every config
    on the call's own arguments, so it must zero them before each timing run and before the real one."""
    float32_ids = {id(c) for c in float32_configs}

    def for_dtype(all_configs, named_args, **_):
        want_float32 = named_args[input_arg].dtype == torch.float32
        return [c for c in all_configs if (id(c) in float32_ids) == want_float32]

    def wrap(kernel):
        zeroed = list(reset_to_zero) or None
        if knobs.runtime.interpret:
            return triton.autotune([interpreter_config], key=[], reset_to_zero=zeroed)(kernel)
        tune = os.environ.get("MMKD_TRITON_AUTOTUNE", "1") != "0"
        half, float32 = (half_configs, float32_configs) if tune else (half_configs[:1], float32_configs[:1])
        names = [name for name in key if name in kernel.arg_names]
        tuner = triton.autotune(half + float32, key=names, cache_results=tune, reset_to_zero=zeroed,
                                prune_configs_by=dict(early_config_prune=for_dtype),
                                do_bench=None if tune else _untimed)(kernel)
        tuner.configs_by_dtype = dict(half=half_configs, float32=float32_configs)
        return tuner

    return wrap


def _untimed(kernel_call, quantiles=None):
    """The autotuner's timer when MMKD_TRITON_AUTOTUNE=0: one config per dtype is left, so there is
    nothing to choose and nothing is run to time it."""
    return [0.0, 0.0, 0.0] if quantiles else 0.0


def span_grid(rows: int, d: int, splits: int = 1):
    """The launch grid of a gradient kernel: (blocks of BLOCK_A rows, spans of CHUNKS × BLOCK_DO of D,
    splits of the streamed columns)."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_A"]), triton.cdiv(d, meta["BLOCK_DO"] * meta["CHUNKS"]),
                         splits)


COLUMN_SPLITS_VARIABLE = "MMKD_TRITON_COLUMN_SPLITS"
# A split streams at least this many columns. By estimate, not yet measured on a GPU
# (benchmarks/gpu/splits.py will): merging the splits takes about 40 small PyTorch operations, a
# few µs each; a program of 64 rows streaming 4096 columns at D = 768 is about 8e8 FLOP, some
# 130 µs of one H100 multiprocessor, so that a split pays for its share of the merge. (A square
# N = 4096 problem, which the merge might cost as much as it saves, never splits.) Its partial
# output, a row's statistics and D accumulators, is then 1/4096 of its work.
MIN_SPLIT_COLUMNS = 4096
# Splits are cut at multiples of this, the widest BLOCK_B, so that every tile but the last is whole.
_SPLIT_ALIGN = 128
# The usual configs: 64-row blocks; spans of D of 384 columns in half precision (three chunks of
# 128) and of 64 in float32 (one chunk, exact dots take more registers).
_ESTIMATED_BLOCK_ROWS = 64
_ESTIMATED_SPAN = {True: 384, False: 64}


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits_that_fill(n_b: int, rows: int, device: torch.device, d: int | None, half: bool) -> int:
    """column_split's choice where the environment sets none: about two programs per multiprocessor
    where they fill at most half of them, each split MIN_SPLIT_COLUMNS long at least; else one."""
    if device.type != "cuda" or rows == 0:
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    programs = triton.cdiv(rows, _ESTIMATED_BLOCK_ROWS) * (triton.cdiv(d, _ESTIMATED_SPAN[half]) if d else 1)
    return 1 if 2 * programs > sms else min(triton.cdiv(2 * sms, programs), n_b // MIN_SPLIT_COLUMNS)


def column_split(n_b: int, rows: int, device: torch.device, d: int | None = None,
                 half: bool = True) -> tuple[int, int]:
    """(columns per split, splits) of the n_b columns that a kernel streams for each block of its
    ``rows``, and with ``d`` for each span of D too (a gradient kernel's grid; ``half``: the
    inputs' dtype is float16/bfloat16, whose configs take wider spans than float32's).

    A program streams every column for its block of rows: a few rows against many columns (a rank's
    local rows against every rank's gathered teacher rows) would leave most of an H100's 132
    multiprocessors idle. Where a kernel's programs (estimated for the usual configs) fill at most
    half of them, the columns are split, flash-decoding style, into about two programs per
    multiprocessor, each split at least MIN_SPLIT_COLUMNS long; the launchers merge the splits'
    partial outputs. A row's result then depends, in its last bits, on the split count, so on the
    batch's row count and the GPU's multiprocessors. ``MMKD_TRITON_COLUMN_SPLITS`` sets the number
    instead (1: never split; the tests under the interpreter, and the benchmarks' comparison). On a
    CPU (the interpreter), one split."""
    splits = switches.positive_int(COLUMN_SPLITS_VARIABLE,
                                   "splits of the streamed columns; unset: chosen to fill the GPU")
    if splits is None:
        splits = _splits_that_fill(n_b, rows, device, d, half)
    if splits <= 1 or n_b == 0:
        return n_b, 1
    columns = triton.cdiv(n_b, splits)
    if columns >= _SPLIT_ALIGN:
        columns = triton.cdiv(columns, _SPLIT_ALIGN) * _SPLIT_ALIGN
    return columns, triton.cdiv(n_b, columns)


def size_key(n: int) -> int:
    """The autotune key of a streamed length: its power of two, so that a trainer whose token count
    changes every step tunes once per octave, not once per step."""
    return triton.next_power_of_2(max(int(n), 1))


def check_dtypes(*tensors: torch.Tensor) -> None:
    """The kernels accumulate in float32: a float64 input would be silently rounded, so refuse it."""
    for x in tensors:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"mmkd_triton ops take float32, float16 or bfloat16 inputs, got {x.dtype}")


def common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b in their promoted dtype, as the other backends compute two inputs of different
    dtypes (a copy of the narrower one only when they differ): one ``tl.dot`` takes one dtype."""
    check_dtypes(a, b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


# Triton computes an address's offset (index × stride) in int32: past 2^31 elements it wraps, and the
# load reads another tensor's memory or faults (the interpreter crashed on a 65-row view with a row
# stride of 2^25). Where a tensor reaches that far, the kernels take their indices in int64 instead;
# a constexpr, so that the usual sizes keep int32 address math.
INT32_OFFSETS_END = 2**31


def needs_int64_offsets(*tensors: torch.Tensor) -> bool:
    """Whether the offset of the last element, Σ (size − 1)·stride, of any of these tensors (the
    inputs as they are given, views too, and the outputs) reaches 2^31."""
    return any(x.numel() > 0 and sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
               >= INT32_OFFSETS_END for x in tensors)


def precision(x: torch.Tensor) -> str:
    """Exact float32 dots for float32 inputs (DESIGN §4: TF32 only where the tolerance allows)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def inverse_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """1 / max(‖x_i‖, eps) in float32 (ones when not normalizing): the kernels scale by these
    instead of reading a normalized copy."""
    if not normalize:
        return torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min_(EPS).reciprocal_()


def input_grad(d_hat: torch.Tensor, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """dx (float32) from dx̂ (float32): the normalization's backward as an N×D epilogue. x̂ is
    formed by division, as the other backends do, so that a 1-wide row's zero gradient stays zero."""
    if not normalize:
        return d_hat
    x_hat, norms = normalize_forward(x.float(), True)
    return normalize_backward(d_hat, x_hat, norms)


@triton.jit
def as_index(offs, INT64_OFFSETS: tl.constexpr):
    """offs as the index that an address multiplies by a stride: int64 where a tensor reaches 2^31
    elements (``needs_int64_offsets``), as it is otherwise."""
    if INT64_OFFSETS:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def similarity_tile(A, B, offs_a, offs_b, mask_a, mask_b, d, stride_a, stride_ad, stride_b, stride_bd,
                    inv_a, inv_b, scale, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """z[a, b] = scale · ⟨A_a, B_b⟩ · inv_a[a] · inv_b[b] for one (BLOCK_A × BLOCK_B) tile, float32,
    looping over D in BLOCK_D chunks (any D: the last chunk is masked)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    rows_a = as_index(offs_a, INT64_OFFSETS)
    rows_b = as_index(offs_b, INT64_OFFSETS)
    for d0 in range(0, d, BLOCK_D):
        offs_d = as_index(d0 + tl.arange(0, BLOCK_D), INT64_OFFSETS)
        mask_d = offs_d < d
        a = tl.load(A + rows_a[:, None] * stride_a + offs_d[None, :] * stride_ad,
                    mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(B + rows_b[:, None] * stride_b + offs_d[None, :] * stride_bd,
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    # inv_a·inv_b first: a commutative product, so that the tile read by rows (q, k) and by
    # columns (k, q) rounds alike and softmax − target is exactly 0 where it should be.
    return acc * (inv_a[:, None] * inv_b[None, :]) * scale


@triton.jit
def column_tile(A, B, INV_B, offs_a, mask_a, inv_a, b0, n_b, d, stride_a, stride_ad, stride_b, stride_bd, scale,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                INT64_OFFSETS: tl.constexpr):
    """The columns b0 .. b0 + BLOCK_B of a row block's z: (offs_b, mask_b, inv_b, z), the loop step
    every contrastive kernel takes over the columns."""
    offs_b = b0 + tl.arange(0, BLOCK_B)
    mask_b = offs_b < n_b
    inv_b = tl.load(INV_B + offs_b, mask=mask_b, other=0.0)
    z = similarity_tile(A, B, offs_a, offs_b, mask_a, mask_b, d, stride_a, stride_ad, stride_b, stride_bd,
                        inv_a, inv_b, scale, BLOCK_A, BLOCK_B, BLOCK_D, PRECISION, INT64_OFFSETS)
    return offs_b, mask_b, inv_b, z


@triton.jit
def accumulate_chunk(acc, weights, B, offs_b, mask_b, offs_do, d, stride_b, stride_bd, PRECISION: tl.constexpr,
                     INT64_OFFSETS: tl.constexpr):
    """acc + weights @ B[offs_b, offs_do] (masked past the rows and past D): one BLOCK_DO-wide
    chunk of a gradient accumulated as (weights of a tile) · (rows of an input).

    The weights enter the dot in the input's dtype, but for float16, whose range ends at 6e-8:
    late in distillation a softmax's weights off the target are about e^{−scale} (1e-9 at scale
    20), and rounded to float16 they vanished (the gradient was 0.75 off at the accuracy table's
    aligned pairs). There the dot takes TF32 (float32's range, float16's 10-bit mantissa).
    bfloat16 has float32's range."""
    b = tl.load(B + as_index(offs_b, INT64_OFFSETS)[:, None] * stride_b
                + as_index(offs_do, INT64_OFFSETS)[None, :] * stride_bd,
                mask=mask_b[:, None] & (offs_do < d)[None, :], other=0.0)
    if b.dtype == tl.float16:
        return acc + tl.dot(weights, b.to(tl.float32), input_precision="tf32")
    return acc + tl.dot(weights.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def store_chunk(OUT, acc, offs, mask, offs_do, d, INT64_OFFSETS: tl.constexpr):
    """OUT[offs, offs_do] = acc for a contiguous (rows, d) float32 output, masked past both."""
    tl.store(OUT + as_index(offs, INT64_OFFSETS)[:, None] * d + offs_do[None, :], acc,
             mask=mask[:, None] & (offs_do < d)[None, :])


@triton.jit
def accumulate_chunks(acc0, acc1, acc2, weights, B, offs_b, mask_b, offs_do0, d, stride_b, stride_bd,
                      BLOCK_DO: tl.constexpr, CHUNKS: tl.constexpr, PRECISION: tl.constexpr,
                      INT64_OFFSETS: tl.constexpr):
    """A program's span of D as CHUNKS (1 to 3) accumulators of BLOCK_DO columns from offs_do0, each
    + weights @ B[offs_b, its chunk]; the ones past CHUNKS are returned untouched. Three chunks of
    128 columns hold D = 384 in one program's registers (BLOCK_A × 768 floats would not fit), so
    the tile behind ``weights`` is computed once per span, not once per chunk."""
    acc0 = accumulate_chunk(acc0, weights, B, offs_b, mask_b, offs_do0, d, stride_b, stride_bd, PRECISION,
                            INT64_OFFSETS)
    if CHUNKS > 1:
        acc1 = accumulate_chunk(acc1, weights, B, offs_b, mask_b, offs_do0 + BLOCK_DO, d, stride_b, stride_bd,
                                PRECISION, INT64_OFFSETS)
    if CHUNKS > 2:
        acc2 = accumulate_chunk(acc2, weights, B, offs_b, mask_b, offs_do0 + 2 * BLOCK_DO, d, stride_b, stride_bd,
                                PRECISION, INT64_OFFSETS)
    return acc0, acc1, acc2


@triton.jit
def store_chunks(OUT, acc0, acc1, acc2, offs, mask, offs_do0, d, BLOCK_DO: tl.constexpr, CHUNKS: tl.constexpr,
                 INT64_OFFSETS: tl.constexpr):
    """``store_chunk`` of each of the CHUNKS accumulators of ``accumulate_chunks``."""
    store_chunk(OUT, acc0, offs, mask, offs_do0, d, INT64_OFFSETS)
    if CHUNKS > 1:
        store_chunk(OUT, acc1, offs, mask, offs_do0 + BLOCK_DO, d, INT64_OFFSETS)
    if CHUNKS > 2:
        store_chunk(OUT, acc2, offs, mask, offs_do0 + 2 * BLOCK_DO, d, INT64_OFFSETS)
