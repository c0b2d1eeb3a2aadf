"""The MMKD objective (DESIGN §1.3) composed from mmkd_kernels' ops.

    L = w_sentence·L_sentence + w_word·L_word + w_token·L_token + w_structure·L_structure

With B pairs (x English, y target), the student's token states S (2B, L, D) of [y; x], the
teacher's T (B, Lt, D) of x (the student's are already projected to the teacher's width D):

- sentence: pooled s(y), s(x), t(x) (B, D); ``contrastive``: C(s(y), t(x)) + C(s(x), t(x)), or
  ``mse``: MSE(s(y), t(x)) + MSE(s(x), t(x)) (sentence-transformers' multilingual distillation), or
  with ``sentence_heads`` the paper's form: MSE(pred(proj(s(y))), sg(proj(t(x)))) + the same for
  s(x) (P-wide; models.SentenceHeads states the choices).
- word: word vectors (mean of sub-words, mk.segment_mean) of t(x) and s(y); pairs from the data's
  given alignments where a pair has one, else by mutual argmax (align.py); C over all aligned pairs
  of the batch: one row per link, the columns the distinct teacher words of the links (a teacher
  word linked to several student words is one column, the positive of each of their rows, never a
  negative copy of itself).
- token: ``contrastive`` (needs one tokenizer): student vs teacher states on x, position by position,
  C + structure over all non-padding tokens of the batch; ``tlm``: the student's masked-LM loss on
  the masked pair (x, y); ``both``: their sum.
- structure: structure(s(y), t(x)) on sentence vectors, kind kl | pearson | mse.

Across ranks (torch.distributed up, world > 1): every level passes the default group to mmkd_kernels,
which takes each rank's local rows (the word and token levels' counts differ by rank), uses every
rank's teacher rows as columns and scales the values so that DDP's gradient averaging gives the
gradient of the global-batch loss.
"""

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmkd_kernels as mk

from .align import align_batch

LEVELS = ("sentence", "word", "token", "structure")


@dataclasses.dataclass
class Objective:
    """What to compute: the levels switched on, their weights, and each level's form."""

    levels: tuple = LEVELS
    weights: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(LEVELS, 1.0))
    sentence_loss: str = "contrastive"  # contrastive | mse
    structure_kind: str = "pearson"  # kl | pearson | mse
    token_loss: str = "contrastive"  # contrastive | tlm | both
    temperature: float = 0.05  # contrastive
    structure_temperature: float = 0.1  # kl
    pooling: str = "mean"  # mean | cls
    backend: str = "auto"
    sentence_heads: bool = False  # with sentence_loss mse: projection + predictor heads (the paper's form)
    head_width: int = 256  # P, the heads' output width
    head_norm: str = "layer"  # layer | batch

    def min_batch(self) -> int:
        """The fewest pairs a batch (of all ranks) needs: the structure level compares them with each
        other (mmkd_kernels' minimum rows of its kind); batch-normalized heads need two."""
        need = mk.functional.MIN_ROWS[self.structure_kind] if "structure" in self.levels else 1
        return max(need, 2) if self.sentence_heads and self.head_norm == "batch" else need


def default_group():
    """The default process group when running data parallel (world > 1), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


# --------------------------------------------------------------------------------------------------
# Units: sentences, words, tokens
# --------------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, D) states, (B, L) mask -> (B, D) sentence vectors: masked mean or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def words(hidden: torch.Tensor, word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) states, (B, L) word ids (−1: none) -> (W, D) word vectors of the whole batch,
    sentence by sentence, and (B,) words per sentence."""
    count = (word_ids.max(dim=1).values + 1).clamp_min(0)
    offset = torch.cumsum(count, 0) - count
    segments = torch.where(word_ids >= 0, word_ids + offset[:, None], -1)
    return mk.segment_mean(hidden, segments, num_segments=int(count.sum())), count


def tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (N, D) the non-padding token states, sentence by sentence."""
    return hidden[mask.bool()]


# --------------------------------------------------------------------------------------------------
# The word level's rows: their count differs by rank and may be zero
# --------------------------------------------------------------------------------------------------


class BatchError(ValueError):
    """A step's batch that a level cannot use, raised on every rank alike: the command reports it
    without a traceback, since its cause is the data or the options, not the code."""


def word_contrastive(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, objective: Objective,
                     group) -> torch.Tensor:
    """InfoNCE of the links' student words (n, D) against the distinct teacher words (m, D); row i's
    positive is local teacher row ``targets[i]`` ((n,) int64), every rank's teacher rows are columns.

    A rank may hold no link (all its pairs' given alignments empty or truncated away): mmkd_kernels
    then gives it a zero that still joins the collectives. A step without any link in the whole
    batch (every rank's) has no word loss to take a mean of: BatchError, alone as across ranks
    (where mmkd_kernels raises it on every rank, so none is left waiting).
    """
    why = ("word level: no aligned word pair in this step's batch on any rank (every pair's given alignment "
           "is empty or truncated away); check the alignments, or raise --batch-size or --max-length")
    if group is None and student.shape[0] == 0:
        raise BatchError(why)
    try:
        return mk.contrastive_loss(student, teacher, targets=targets, temperature=objective.temperature,
                                   backend=objective.backend, process_group=group)
    except ValueError as error:
        if student.shape[0] == 0:  # the only check a rank without rows can fail: no rows anywhere
            raise BatchError(f"{why} ({error})") from error
        raise


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


def mmkd_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, batch: dict, objective: Objective,
              tlm_loss: torch.Tensor | None = None, same_tokenizer: bool = True, sentence_heads=None,
              sentence_predictions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(weighted total, {level: unweighted value}).

    student_hidden: (2B, L, D) of [y; x] (projected to the teacher's width); teacher_hidden:
    (B, Lt, D) of x; batch: the Collator's dict (masks and word ids). With ``objective.sentence_heads``:
    sentence_heads, the student's ``models.SentenceHeads`` (its projection makes the target), and
    sentence_predictions, (2B, P) its predictions of [y; x] from the student's forward.
    """
    group = default_group()
    student_hidden, teacher_hidden = student_hidden.float(), teacher_hidden.float()
    b = teacher_hidden.shape[0]
    s_mask, t_mask = batch["s_attention_mask"], batch["t_attention_mask"]
    s_y, s_x = student_hidden[:b], student_hidden[b:]
    parts = {}

    if "sentence" in objective.levels or "structure" in objective.levels:
        sy, sx = pool(s_y, s_mask[:b], objective.pooling), pool(s_x, s_mask[b:], objective.pooling)
        tx = pool(teacher_hidden, t_mask, objective.pooling)
    if "sentence" in objective.levels:
        if objective.sentence_heads:
            if sentence_heads is None or sentence_predictions is None:
                raise ValueError("--sentence-heads: the student has no sentence heads (build it with SentenceHeads)")
            target = sentence_heads.target(tx).float()
            predictions = sentence_predictions.float()
            parts["sentence"] = F.mse_loss(predictions[:b], target) + F.mse_loss(predictions[b:], target)
        elif objective.sentence_loss == "mse":
            parts["sentence"] = F.mse_loss(sy, tx) + F.mse_loss(sx, tx)
        else:
            kw = dict(temperature=objective.temperature, backend=objective.backend, process_group=group)
            parts["sentence"] = mk.contrastive_loss(sy, tx, **kw) + mk.contrastive_loss(sx, tx, **kw)
    if "structure" in objective.levels:
        parts["structure"] = mk.structure_loss(
            sy, tx, kind=objective.structure_kind, temperature=objective.structure_temperature,
            backend=objective.backend, process_group=group,
        )
    if "word" in objective.levels:
        t_words, t_count = words(teacher_hidden, batch["t_word_ids"])
        s_words, s_count = words(s_y, batch["s_word_ids"][:b])
        links = align_batch(t_words.detach(), t_count, s_words.detach(), s_count,
                            batch.get("aligned"), batch.get("given_links"))
        columns, targets = torch.unique(links[:, 0], return_inverse=True)
        parts["word"] = word_contrastive(s_words[links[:, 1]], t_words[columns], targets, objective, group)
    if "token" in objective.levels:
        token = 0.0
        if objective.token_loss in ("contrastive", "both"):
            if not same_tokenizer:
                raise ValueError("--token-loss contrastive needs the student and teacher to share a tokenizer")
            s_tok, t_tok = tokens(s_x, s_mask[b:]), tokens(teacher_hidden, t_mask)
            if s_tok.shape[0] != t_tok.shape[0]:
                raise ValueError(
                    f"token level: the student has {s_tok.shape[0]} tokens and the teacher {t_tok.shape[0]}; "
                    "they must tokenize alike"
                )
            # every sequence has at least its special tokens: no rank is ever without rows here
            token = mk.contrastive_loss(s_tok, t_tok, temperature=objective.temperature, backend=objective.backend,
                                        process_group=group) + mk.structure_loss(
                s_tok, t_tok, kind=objective.structure_kind, temperature=objective.structure_temperature,
                backend=objective.backend, process_group=group)
        if objective.token_loss in ("tlm", "both"):
            if tlm_loss is None:
                raise ValueError("--token-loss tlm: the batch has no masked pair (the collator needs tlm=True)")
            token = token + tlm_loss
        parts["token"] = token
    total = sum(objective.weights.get(level, 1.0) * value for level, value in parts.items())
    return total, parts
