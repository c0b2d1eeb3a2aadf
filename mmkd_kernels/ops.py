"""torch.library registrations: each fused backend's kernels as custom ops with autograd and fake.

Every hand-written backend exposes the same seven ops in its own namespace (``mmkd_chunked`` here;
``mmkd_triton`` and ``mmkd_native`` define theirs with these schemas), and this module gives all of
them one autograd formula and one fake (shape) function, so ``torch.compile`` traces through any
backend without graph breaks and ``torch.library.opcheck`` can check each op.

Outputs are per-row losses in the accumulation dtype (float32, or float64 for float64 inputs);
the reduction to a scalar happens in ``functional.py``, outside the ops. An input that needs no
gradient gets an empty (0,) tensor from the backward ops.
"""

import torch

from . import chunked
from .reference import accumulation_dtype

SCHEMAS = {
    "contrastive_forward": (
        "(Tensor q, Tensor k, Tensor targets, float scale, bool normalize, bool symmetric)"
        " -> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)"
    ),
    "contrastive_backward": (
        "(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, Tensor targets, Tensor row_lse,"
        " Tensor col_lse, float scale, bool normalize, bool symmetric, bool need_q, bool need_k)"
        " -> (Tensor dq, Tensor dk)"
    ),
    "contrastive_forward_with_grad": (
        "(Tensor q, Tensor k, Tensor targets, float scale, bool normalize, bool need_q, bool need_k)"
        " -> (Tensor loss_sum, Tensor dq, Tensor dk)"
    ),
    "structure_tile_forward": (
        "(Tensor s, Tensor t, str kind, float scale, bool normalize, int row_start, int row_count)"
        " -> Tensor"
    ),
    "structure_tile_backward": (
        "(Tensor grad, Tensor row_loss, Tensor s, Tensor t, str kind, float scale, bool normalize,"
        " int row_start, int row_count, bool need_s, bool need_t) -> (Tensor ds, Tensor dt)"
    ),
    "structure_gram_forward": "(Tensor s, Tensor t, str kind, bool normalize) -> Tensor",
    "structure_gram_backward": (
        "(Tensor grad, Tensor row_loss, Tensor s, Tensor t, str kind, bool normalize,"
        " bool need_s, bool need_t) -> (Tensor ds, Tensor dt)"
    ),
}


# --------------------------------------------------------------------------------------------------
# Fake (meta) functions: output shapes and dtypes only.
# --------------------------------------------------------------------------------------------------


def _fake_contrastive_forward(q, k, targets, scale, normalize, symmetric):
    acc = accumulation_dtype(q, k)
    n, m = q.shape[0], k.shape[0]
    return (
        q.new_empty(n, dtype=acc),
        q.new_empty(n if symmetric else 0, dtype=acc),
        q.new_empty(n, dtype=acc),
        q.new_empty(m if symmetric else 0, dtype=acc),
    )


def _grad_like(x, needed):
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty(0)


def _fake_contrastive_backward(grad_row, grad_col, q, k, targets, row_lse, col_lse, scale, normalize,
                               symmetric, need_q, need_k):
    return _grad_like(q, need_q), _grad_like(k, need_k)


def _fake_contrastive_forward_with_grad(q, k, targets, scale, normalize, need_q, need_k):
    acc = accumulation_dtype(q, k)
    dq = q.new_empty(q.shape, dtype=acc) if need_q else q.new_empty(0, dtype=acc)
    dk = k.new_empty(k.shape, dtype=acc) if need_k else k.new_empty(0, dtype=acc)
    return q.new_empty((), dtype=acc), dq, dk


def _fake_structure_tile_forward(s, t, kind, scale, normalize, row_start, row_count):
    return s.new_empty(row_count, dtype=accumulation_dtype(s, t))


def _fake_structure_tile_backward(grad, row_loss, s, t, kind, scale, normalize, row_start, row_count,
                                  need_s, need_t):
    return _grad_like(s, need_s), _grad_like(t, need_t)


def _fake_structure_gram_forward(s, t, kind, normalize):
    return s.new_empty(s.shape[0], dtype=accumulation_dtype(s, t))


def _fake_structure_gram_backward(grad, row_loss, s, t, kind, normalize, need_s, need_t):
    return _grad_like(s, need_s), _grad_like(t, need_t)


FAKES = {
    "contrastive_forward": _fake_contrastive_forward,
    "contrastive_backward": _fake_contrastive_backward,
    "contrastive_forward_with_grad": _fake_contrastive_forward_with_grad,
    "structure_tile_forward": _fake_structure_tile_forward,
    "structure_tile_backward": _fake_structure_tile_backward,
    "structure_gram_forward": _fake_structure_gram_forward,
    "structure_gram_backward": _fake_structure_gram_backward,
}


# --------------------------------------------------------------------------------------------------
# Autograd: the forward op saves its inputs and per-row statistics; the backward op recomputes.
# --------------------------------------------------------------------------------------------------


def _grad_or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def contrastive_setup(ctx, inputs, output):
        q, k, targets, ctx.scale, ctx.normalize, ctx.symmetric = inputs
        _, _, row_lse, col_lse = output
        ctx.save_for_backward(q, k, targets, row_lse, col_lse)

    def contrastive_backward(ctx, grad_row, grad_col, _grad_row_lse, _grad_col_lse):
        q, k, targets, row_lse, col_lse = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq, dk = ops.contrastive_backward(
            _grad_or_zeros(grad_row, row_lse), _grad_or_zeros(grad_col, col_lse[: row_lse.shape[0]]),
            q, k, targets, row_lse, col_lse, ctx.scale, ctx.normalize, ctx.symmetric, need_q, need_k,
        )
        return dq if need_q else None, dk if need_k else None, None, None, None, None

    def with_grad_setup(ctx, inputs, output):
        q, k = inputs[0], inputs[1]
        ctx.q_dtype, ctx.k_dtype = q.dtype, k.dtype
        ctx.save_for_backward(output[1], output[2])

    def with_grad_backward(ctx, grad, _grad_dq, _grad_dk):
        dq, dk = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (
            (dq * grad).to(ctx.q_dtype) if need_q else None,
            (dk * grad).to(ctx.k_dtype) if need_k else None,
            None, None, None, None, None,
        )

    def tile_setup(ctx, inputs, output):
        s, t, ctx.kind, ctx.scale, ctx.normalize, ctx.row_start, ctx.row_count = inputs
        ctx.save_for_backward(s, t, output)

    def tile_backward(ctx, grad):
        s, t, row_loss = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ds, dt = ops.structure_tile_backward(
            grad, row_loss, s, t, ctx.kind, ctx.scale, ctx.normalize, ctx.row_start, ctx.row_count,
            need_s, need_t,
        )
        return ds if need_s else None, dt if need_t else None, None, None, None, None, None

    def gram_setup(ctx, inputs, output):
        s, t, ctx.kind, ctx.normalize = inputs
        ctx.save_for_backward(s, t, output)

    def gram_backward_(ctx, grad):
        s, t, row_loss = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ds, dt = ops.structure_gram_backward(grad, row_loss, s, t, ctx.kind, ctx.normalize, need_s, need_t)
        return ds if need_s else None, dt if need_t else None, None, None

    torch.library.register_autograd(f"{namespace}::contrastive_forward", contrastive_backward,
                                    setup_context=contrastive_setup)
    torch.library.register_autograd(f"{namespace}::contrastive_forward_with_grad", with_grad_backward,
                                    setup_context=with_grad_setup)
    torch.library.register_autograd(f"{namespace}::structure_tile_forward", tile_backward,
                                    setup_context=tile_setup)
    torch.library.register_autograd(f"{namespace}::structure_gram_forward", gram_backward_,
                                    setup_context=gram_setup)


def register_backend(namespace: str, impls: dict | None = None) -> None:
    """Give the seven ops of ``namespace`` their fake functions and autograd.

    ``impls`` (op name -> Python function) defines the ops as Python custom ops; without it the ops
    must already exist (defined in C++ by ``TORCH_LIBRARY``, as the native extension does).
    """
    for name, schema in SCHEMAS.items():
        qualname = f"{namespace}::{name}"
        if impls is not None:
            torch.library.custom_op(qualname, impls[name], mutates_args=(), schema=schema)
        torch.library.register_fake(qualname, FAKES[name])
    _register_autograd(namespace)


# --------------------------------------------------------------------------------------------------
# The chunked backend's ops.
# --------------------------------------------------------------------------------------------------


CHUNKED_IMPLS = {
    "contrastive_forward": chunked.contrastive_forward,
    "contrastive_backward": chunked.contrastive_backward,
    "contrastive_forward_with_grad": chunked.contrastive_forward_with_grad,
    "structure_tile_forward": chunked.structure_tile_forward,
    "structure_tile_backward": chunked.structure_tile_backward,
    "structure_gram_forward": chunked.structure_gram_forward,
    "structure_gram_backward": chunked.structure_gram_backward,
}

register_backend("mmkd_chunked", CHUNKED_IMPLS)
