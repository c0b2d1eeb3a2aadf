"""torch.library registrations: each fused backend's kernels as custom ops with autograd and fake.

Every hand-written backend exposes the same seven ops in its own namespace (``mmkd_chunked`` here;
``mmkd_triton`` and ``mmkd_native`` define theirs with these schemas), and this module gives all of
them one autograd formula and one fake (shape) function, so ``torch.compile`` traces through any
backend without graph breaks and ``torch.library.opcheck`` can check each op.

Two ways through each loss:
- ``*_forward_with_grad`` returns the summed loss and its gradients at once, for a caller that will
  backpropagate a sum or mean (uniform row gradients): its backward only scales them (DESIGN §5).
  The structure loss is always a mean, so this is its only differentiable path.
- ``*_forward`` returns per-row losses: the forward under ``no_grad``, and for the contrastive loss
  with ``reduction="none"`` or ``symmetric``, whose ``contrastive_backward`` recomputes z.
Results are in the accumulation dtype (float32, or float64 for float64 inputs); an input that needs
no gradient gets an empty (0,) tensor.
"""

import functools

import torch

from . import chunked
from .reference import accumulation_dtype, without_autocast

SCHEMAS = {
    "contrastive_forward": (
        "(Tensor q, Tensor k, Tensor targets, float scale, bool normalize, bool symmetric)"
        " -> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)"
    ),
    "contrastive_backward": (
        "(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, Tensor targets, Tensor row_lse,"
        " Tensor col_lse, Tensor row_loss, Tensor col_loss, float scale, bool normalize, bool symmetric, bool need_q, bool need_k)"
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
    "structure_tile_forward_with_grad": (
        "(Tensor s, Tensor t, str kind, float scale, bool normalize, int row_start, int row_count,"
        " bool need_s, bool need_t) -> (Tensor loss_sum, Tensor ds, Tensor dt)"
    ),
    "structure_gram_forward": "(Tensor s, Tensor t, str kind, bool normalize) -> Tensor",
    "structure_gram_forward_with_grad": (
        "(Tensor s, Tensor t, str kind, bool normalize, bool need_s, bool need_t)"
        " -> (Tensor loss_sum, Tensor ds, Tensor dt)"
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


def _fake_contrastive_backward(grad_row, grad_col, q, k, targets, row_lse, col_lse, row_loss, col_loss,
                               scale, normalize, symmetric, need_q, need_k):
    return _grad_like(q, need_q), _grad_like(k, need_k)


def _fake_with_grad(a, b, *args):
    """Every ``*_forward_with_grad`` op: (loss_sum (), da, db) in the accumulation dtype; its last two
    arguments say which of the first two inputs need a gradient."""
    acc = accumulation_dtype(a, b)
    need_a, need_b = args[-2], args[-1]
    da = a.new_empty(a.shape, dtype=acc) if need_a else a.new_empty(0, dtype=acc)
    db = b.new_empty(b.shape, dtype=acc) if need_b else b.new_empty(0, dtype=acc)
    return a.new_empty((), dtype=acc), da, db


def _fake_structure_tile_forward(s, t, kind, scale, normalize, row_start, row_count):
    return s.new_empty(row_count, dtype=accumulation_dtype(s, t))


def _fake_structure_gram_forward(s, t, kind, normalize):
    return s.new_empty(s.shape[0], dtype=accumulation_dtype(s, t))


FAKES = {
    "contrastive_forward": _fake_contrastive_forward,
    "contrastive_backward": _fake_contrastive_backward,
    "contrastive_forward_with_grad": _fake_with_grad,
    "structure_tile_forward_with_grad": _fake_with_grad,
    "structure_gram_forward_with_grad": _fake_with_grad,
    "structure_tile_forward": _fake_structure_tile_forward,
    "structure_gram_forward": _fake_structure_gram_forward,
}


# --------------------------------------------------------------------------------------------------
# Autograd: contrastive_forward saves its inputs, log-sum-exps and losses (the target's p − 1 is
# expm1(−ℓ), exact where lse − z_t would cancel) and contrastive_backward recomputes z;
# the *_forward_with_grad ops carry their gradients, which the backward scales.
# --------------------------------------------------------------------------------------------------


def _grad_or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _refuse_a_graph(namespace: str) -> None:
    """A backward that builds a graph (create_graph=True, grad mode on) needs the backward's own
    derivative, which the fused ops do not have: say so, instead of a gradient of zero or an error
    about an op's missing formula."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{namespace}: these losses' fused kernels have no second derivative (backward with "
            "create_graph=True); use backend='reference' to differentiate twice"
        )


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def contrastive_setup(ctx, inputs, output):
        q, k, targets, ctx.scale, ctx.normalize, ctx.symmetric = inputs
        row_loss, col_loss, row_lse, col_lse = output
        ctx.save_for_backward(q, k, targets, row_lse, col_lse, row_loss, col_loss)

    def contrastive_backward(ctx, grad_row, grad_col, _grad_row_lse, _grad_col_lse):
        _refuse_a_graph(namespace)
        q, k, targets, row_lse, col_lse, row_loss, col_loss = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq, dk = ops.contrastive_backward(
            _grad_or_zeros(grad_row, row_lse), _grad_or_zeros(grad_col, col_lse[: row_lse.shape[0]]),
            q, k, targets, row_lse, col_lse, row_loss, col_loss, ctx.scale, ctx.normalize, ctx.symmetric, need_q, need_k,
        )
        return dq if need_q else None, dk if need_k else None, None, None, None, None

    def with_grad_setup(ctx, inputs, output):
        ctx.dtypes, ctx.n_inputs = (inputs[0].dtype, inputs[1].dtype), len(inputs)
        ctx.computed = inputs[-2:]  # need_a, need_b: which gradients the forward computed
        ctx.save_for_backward(output[1], output[2])

    def with_grad_backward(ctx, grad, _grad_da, _grad_db):
        """The gradients were computed in the forward: scale them by the scalar's grad_output.

        They are numbers, not a graph, so a backward that builds a graph is refused: its gradient
        would carry a second derivative of zero. (Only refusing a second backward through the result
        would miss a loss summed with other terms, whose gradient has a graph through them.)"""
        _refuse_a_graph(namespace)
        grads = [
            (g * grad).to(dtype) if computed else None
            for g, dtype, computed in zip(ctx.saved_tensors, ctx.dtypes, ctx.computed)
        ]
        return (*grads, *([None] * (ctx.n_inputs - 2)))

    torch.library.register_autograd(f"{namespace}::contrastive_forward", contrastive_backward,
                                    setup_context=contrastive_setup)
    for name in ("contrastive_forward_with_grad", "structure_tile_forward_with_grad",
                 "structure_gram_forward_with_grad"):
        torch.library.register_autograd(f"{namespace}::{name}", with_grad_backward, setup_context=with_grad_setup)


def _python_op(name: str, impl):
    """A Python implementation as its op runs it: with autocast off, and for the structure ops with
    their rows checked, since a tile kernel given rows past N (or a teacher of other N) reads past
    its inputs and the gram statistics divide by N − 1. The public losses never pass such rows; a
    direct call of the op may. (Native's tile ops check theirs in C++.)"""
    impl = without_autocast(impl)
    if name.startswith("structure_gram"):

        @functools.wraps(impl)
        def checked_gram(s, t, kind, normalize, *rest):
            # N − 1 divides the statistics (a ZeroDivisionError at N = 1), and t must hold N rows too.
            if t.shape[0] != s.shape[0] or s.shape[0] < 2:
                raise ValueError(f"{name}: s and t must hold the same N >= 2 rows, got s {tuple(s.shape)} and t "
                                 f"{tuple(t.shape)}")
            return impl(s, t, kind, normalize, *rest)

        return checked_gram
    if not name.startswith("structure_tile"):
        return impl

    @functools.wraps(impl)
    def checked(s, t, kind, scale, normalize, row_start, row_count, *rest):
        n = s.shape[0]
        if t.shape[0] != n or row_start < 0 or row_count < 0 or row_start + row_count > n:
            raise ValueError(f"{name}: rows [{row_start}, {row_start + row_count}) must lie within the N = {n} "
                             f"rows of s and t, got s {tuple(s.shape)} and t {tuple(t.shape)}")
        return impl(s, t, kind, scale, normalize, row_start, row_count, *rest)

    return checked


def register_backend(namespace: str, impls: dict | None = None) -> None:
    """Give the seven ops of ``namespace`` their fake functions and autograd.

    ``impls`` (op name -> Python function) defines those ops as Python custom ops (``_python_op``);
    the others must already exist (defined in C++ by ``TORCH_LIBRARY``, as the native extension
    does: its kernels call no autocast-listed op).
    """
    impls = impls or {}
    for name, schema in SCHEMAS.items():
        qualname = f"{namespace}::{name}"
        if name in impls:
            torch.library.custom_op(qualname, _python_op(name, impls[name]), mutates_args=(), schema=schema)
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
    "structure_tile_forward_with_grad": chunked.structure_tile_forward_with_grad,
    "structure_gram_forward": chunked.structure_gram_forward,
    "structure_gram_forward_with_grad": chunked.structure_gram_forward_with_grad,
}

register_backend("mmkd_chunked", CHUNKED_IMPLS)
