"""Bitext retrieval P@1 per language on held-out pairs, and its report (table, JSON, PNG).

For N held-out pairs of a language, the student embeds the N English sentences and the N
translations; target→English P@1 is the share of translations whose nearest English sentence
(cosine) is their own, English→target the converse. Chance is 1/N.
"""

import json
import os

import torch

from .data import Pair
from .objective import pool


@torch.no_grad()
def embed(student, tokenizer, texts: list[str], max_length: int, pooling: str, batch_size: int = 64) -> torch.Tensor:
    """(n,) texts -> (n, D) unit-norm sentence vectors of the student (projected by its head)."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    vectors = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = student.encode(enc["input_ids"], enc["attention_mask"]).float()
        vectors.append(torch.nn.functional.normalize(pool(hidden, enc["attention_mask"], pooling), dim=-1))
    student.train(was_training)
    return torch.cat(vectors)


def p_at_1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Share of rows i of queries (N, D) whose most similar row of keys (N, D) is row i."""
    hits = (queries @ keys.T).argmax(dim=1) == torch.arange(queries.shape[0], device=queries.device)
    return hits.float().mean().item()


def retrieval(student, tokenizer, pairs: list[Pair], max_length: int, pooling: str) -> dict:
    """{"tgt2en": P@1, "en2tgt": P@1, "pairs": N} for one language's held-out pairs."""
    en = embed(student, tokenizer, [p.src for p in pairs], max_length, pooling)
    tgt = embed(student, tokenizer, [p.tgt for p in pairs], max_length, pooling)
    return {"tgt2en": p_at_1(tgt, en), "en2tgt": p_at_1(en, tgt), "pairs": len(pairs)}


def evaluate(student, tokenizer, evaluation: dict[str, list[Pair]], max_length: int, pooling: str) -> dict:
    """{lang: retrieval(...)} for every language with held-out pairs."""
    return {lang: retrieval(student, tokenizer, pairs, max_length, pooling) for lang, pairs in evaluation.items() if pairs}


def table(before: dict, after: dict, trained: list[str]) -> str:
    """A fixed-width before/after table of P@1 (%) per language, trained languages first."""
    langs = [l for l in before if l in trained] + [l for l in before if l not in trained]
    lines = [
        f"{'language':<10}{'trained':>8}{'pairs':>7}  {'tgt→en before':>13}{'after':>7}  {'en→tgt before':>13}{'after':>7}"
    ]
    for lang in langs:
        b, a = before[lang], after.get(lang, {})
        cells = [f"{100 * b[k]:13.1f}{100 * a[k]:7.1f}" if k in a else f"{100 * b[k]:13.1f}{'-':>7}"
                 for k in ("tgt2en", "en2tgt")]
        lines.append(f"{lang:<10}{'yes' if lang in trained else 'no':>8}{b['pairs']:>7}  {cells[0]}  {cells[1]}")
    for group, members in (("trained", [l for l in langs if l in trained]),
                           ("untrained", [l for l in langs if l not in trained])):
        if members and after:
            mean = lambda run: sum(run[l][k] for l in members for k in ("tgt2en", "en2tgt")) / (2 * len(members))
            lines.append(f"mean P@1 over {group} languages: {100 * mean(before):.1f} -> {100 * mean(after):.1f}")
    return "\n".join(lines)


def write_report(output_dir: str, before: dict, after: dict, trained: list[str], extra: dict | None = None) -> None:
    """retrieval.json and retrieval.png in ``output_dir`` (each written to a temporary name, renamed)."""
    os.makedirs(output_dir, exist_ok=True)
    report = {"metric": "bitext retrieval P@1 on held-out pairs", "trained_languages": trained,
              "before": before, "after": after, **(extra or {})}
    path = os.path.join(output_dir, "retrieval.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(path + ".tmp", path)
    _plot(os.path.join(output_dir, "retrieval.png"), before, after, trained)


def _plot(path: str, before: dict, after: dict, trained: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = [l for l in before if l in trained] + [l for l in before if l not in trained]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.9 * len(langs) + 2), 3.6), sharey=True)
    x = range(len(langs))
    for ax, key, title in zip(axes, ("tgt2en", "en2tgt"), ("target → English", "English → target")):
        ax.bar([i - 0.2 for i in x], [100 * before[l][key] for l in langs], 0.4, label="before", color="#bbbbbb")
        if after:
            ax.bar([i + 0.2 for i in x], [100 * after[l][key] for l in langs], 0.4, label="after", color="#3366aa")
        ax.set_xticks(list(x), [l + ("" if l in trained else "*") for l in langs], rotation=45)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("P@1 (%)")
    axes[1].legend(loc="upper right")
    fig.suptitle("held-out bitext retrieval (* = not trained on)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
