"""Sub-word states -> word vectors: the mean of the rows that share a segment id.

O(T·D) work and memory with ``index_add``; autograd and ``torch.compile`` handle it as it is, so it
needs no custom kernel.
"""

import torch


def segment_mean(hidden: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """hidden: (T, D) float; segment_ids: (T,) int64, ids < 0 ignored (padding, special tokens).

    Returns (num_segments, D) in hidden's dtype; a segment with no rows is zero. Ignored rows never
    touch the result, not even through NaN.
    """
    keep = segment_ids >= 0
    ids = torch.where(keep, segment_ids, torch.zeros_like(segment_ids))
    rows = torch.where(keep[:, None], hidden, torch.zeros_like(hidden))
    sums = hidden.new_zeros(num_segments, hidden.shape[-1]).index_add(0, ids, rows)
    counts = hidden.new_zeros(num_segments).index_add(0, ids, keep.to(hidden.dtype))
    return sums / counts.clamp_min(1)[:, None]
