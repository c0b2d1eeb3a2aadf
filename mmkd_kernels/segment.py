"""Sub-word states -> word vectors: the mean of the rows that share a segment id.

O(T·D) work and memory with ``index_add``; autograd and ``torch.compile`` handle it as it is, so it
needs no custom kernel.
"""

import torch


def segment_mean(hidden: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """hidden: (T, D) float; segment_ids: (T,) int64, ids < 0 ignored (padding, special tokens).

    Returns (num_segments, D) in hidden's dtype; a segment with no rows is zero. Sums and counts
    are float32 (float64 for float64 rows): in bfloat16 a count stops growing at 256. Ignored rows go
    to one extra segment that is dropped, so they never touch the result, not even through NaN, and
    a batch with no segment at all gives (0, D).
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    ids = torch.where(segment_ids >= 0, segment_ids, num_segments)
    sums = hidden.new_zeros(num_segments + 1, hidden.shape[-1], dtype=acc).index_add(0, ids, hidden.to(acc))
    counts = hidden.new_zeros(num_segments + 1, dtype=acc).index_add(0, ids, hidden.new_ones(ids.shape, dtype=acc))
    return (sums[:num_segments] / counts[:num_segments].clamp_min(1)[:, None]).to(hidden.dtype)
