"""Word alignment by mutual argmax (SimAlign's "argmax"), across different tokenizers, or given.

Words, not sub-words, are aligned: each side's word vectors come from its own tokenizer's words,
so the two tokenizers need not agree. A pair whose data carries a word alignment (Pharaoh links,
data.py) uses those links instead; its words are then the whitespace-separated words that the
links count (collate.py).
"""

import torch


def mutual_argmax(similarity: torch.Tensor) -> torch.Tensor:
    """similarity: (n, m), row i = source word i, column j = target word j.

    Returns (P, 2) int64 pairs (i, j) where j is row i's best column and i is column j's best row.
    Ties go to the lowest index (torch.argmax), so the result is deterministic.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D (n, m), got shape {tuple(similarity.shape)}")
    if similarity.numel() == 0:
        return torch.empty(0, 2, dtype=torch.long, device=similarity.device)
    best_col = similarity.argmax(dim=1)  # (n,)
    best_row = similarity.argmax(dim=0)  # (m,)
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    mutual = best_row[best_col] == rows
    return torch.stack([rows[mutual], best_col[mutual]], dim=1)


@torch.no_grad()
def align_batch(source_words: torch.Tensor, source_count: torch.Tensor,
                target_words: torch.Tensor, target_count: torch.Tensor,
                aligned: torch.Tensor | None = None, given_links: torch.Tensor | None = None) -> torch.Tensor:
    """Align each pair's words within that pair only.

    source_words: (Ws, D) words of all sources, pair by pair (pair b's are a contiguous run of
    source_count[b] rows); target_words: (Wt, D) likewise. Cosine similarity, mutual argmax;
    except for the pairs where ``aligned`` (B,) bool is true, whose links are the rows (b, i, j) of
    ``given_links`` (P, 3) int64: source word i and target word j of pair b.
    Returns (P, 2) int64 global row indices (source row, target row) over the whole batch, pair
    by pair.
    """
    src = torch.nn.functional.normalize(source_words.float(), dim=-1)
    tgt = torch.nn.functional.normalize(target_words.float(), dim=-1)
    src_start = torch.cumsum(source_count, 0) - source_count
    tgt_start = torch.cumsum(target_count, 0) - target_count
    device = source_words.device
    links = []
    for b in range(source_count.shape[0]):
        s0, s1 = int(src_start[b]), int(src_start[b] + source_count[b])
        t0, t1 = int(tgt_start[b]), int(tgt_start[b] + target_count[b])
        if aligned is not None and bool(aligned[b]):
            pairs = given_links[given_links[:, 0] == b, 1:].to(device)
            if pairs.numel() and (int(pairs[:, 0].max()) >= s1 - s0 or int(pairs[:, 1].max()) >= t1 - t0):
                raise ValueError(f"given alignment of pair {b}: a link points past the pair's "
                                 f"{s1 - s0} source / {t1 - t0} target words")
        else:
            pairs = mutual_argmax(src[s0:s1] @ tgt[t0:t1].T)
        links.append(pairs + torch.tensor([s0, t0], device=pairs.device))
    if not links:
        return torch.empty(0, 2, dtype=torch.long, device=device)
    return torch.cat(links)
