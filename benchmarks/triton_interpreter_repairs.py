"""Triton's interpreter, mended for the tests and the accuracy table: three small repairs,
nothing else. The library never imports this; only code that runs the kernels under
``TRITON_INTERPRET=1`` on purpose calls ``install()``.

bfloat16. Triton's interpreter (3.6 at least) keeps a bfloat16 tensor as its uint16 bit patterns,
since numpy has no bfloat16. Two of its operations treat those bits wrongly:

- ``tl.dot`` feeds them to ``np.matmul`` as integers, so a bfloat16 dot returns values around 1e10
  (triton-lang/triton#11584; the fix, #11585, was declined: "we just don't support it yet");
- a float32 → bfloat16 cast (``x.to(tl.bfloat16)``) truncates, where the GPU rounds to nearest even.

``install()`` wraps both: a dot's bfloat16 operands are widened to float32 first (exact: every
bfloat16 is a float32, and their products are exact in float32, as on the tensor cores, which then
accumulate in float32), and the cast rounds to nearest even through torch. Everything else the
kernels do with bfloat16 is a load, a store or a cast to float32, which the interpreter gets right.
With it, the tests and ``benchmarks/accuracy.py`` run the Triton kernels' bfloat16 paths on the
CPU; before, bfloat16 was left to a GPU run (DESIGN §4).

numpy 2.4. The interpreter holds a scalar argument as a one-element array and takes its
``__index__`` (``range(0, n, BLOCK)`` in a kernel) with ``int(array)``, which numpy 2.4 turned
from a deprecation into a TypeError (fixed upstream after 3.6: triton-lang/triton#9172). The
repair takes ``.item()`` instead, so the kernels run under any numpy.

``tests/test_triton_interpreter.py`` checks the repairs and that each bug is what this module
assumes.
"""

import functools

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


def bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32 values, exactly (the high half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bits(values: np.ndarray) -> np.ndarray:
    """float32 values → bfloat16 bit patterns (uint16), rounded to nearest even as a GPU does."""
    as_bf16 = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return as_bf16.view(torch.int16).numpy().view(np.uint16)


def _widen(handle: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if handle.dtype != tl.bfloat16:
        return handle
    return interpreter.TensorHandle(bits_to_float32(handle.data), tl.float32)


def applies() -> bool:
    """Whether this interpreter stores bfloat16 as uint16 bits, the layout the repairs assume."""
    return interpreter._get_np_dtype(tl.bfloat16) == np.dtype(np.uint16)


def install() -> None:
    """Wrap the interpreter's dot and cast (once; a no-op where bfloat16 is stored otherwise), and
    its scalars' ``__index__``. The originals stay reachable as each wrapper's ``__wrapped__``."""
    _install_scalar_index()
    builder = interpreter.InterpreterBuilder
    if not applies() or getattr(builder, "_mmkd_bfloat16", False):
        return
    dot, cast = builder.create_dot, builder.cast_impl

    @functools.wraps(dot)
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    @functools.wraps(cast)
    def cast_impl(self, src, dst_type):
        if src.dtype == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(float32_to_bits(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._mmkd_bfloat16 = True


def scalar_index(tensor) -> int:
    """A kernel scalar's ``__index__``: its one element, under any numpy."""
    return int(tensor.handle.data.item())


def _install_scalar_index() -> None:
    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_mmkd_index", False):
        return

    @functools.wraps(patch)
    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", scalar_index)

    patch_lang_tensor._mmkd_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
