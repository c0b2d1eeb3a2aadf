"""``transformers.Trainer`` with the MMKD objective: the only training code of the trainer.

AMP, gradient accumulation, the optimizer, checkpoints, logging, progress bars and DDP are the
Trainer's; this subclass adds the teacher (frozen, inference mode, or read from the cache), the
loss parts in the log, checkpoints written as transformers directories (safetensors, no pickles of
ours) to a staging name and renamed, and resume from them.
"""

import collections
import os
import shutil
import warnings

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .models import load_heads, replace_dir, save_heads, teacher_hidden
from .objective import Objective, mmkd_loss

STAGING = ".staging"


class EpochSampler(LengthGroupedSampler):
    """Batches of similar lengths (less padding: the run is compute-bound on a CPU), shuffled by
    (seed, epoch) alone, without a last batch too short for the objective.

    - The Trainer calls ``set_epoch``, so a run resumed in the middle of an epoch sees that epoch's
      order again and skips the batches it has trained. Drawn from the global generator, which a
      checkpoint restores as it was at the checkpoint, a resumed epoch got a new order: some pairs
      were trained twice in it and others not at all.
    - The structure level compares a batch's pairs with each other and needs ``min_batch`` of them
      (3 for pearson): a last batch of fewer pairs, the remainder of the pairs by ``batch_size``,
      is left out of the epoch, at most ``min_batch − 1`` pairs, different ones every epoch.
    - No English sentence twice in one step's batch (``keys``: each pair's English sentence, case
      and end punctuation aside, as ``collate.PairDataset.sentence_keys``; a step's batch is
      ``batch_size × world_size`` consecutive indices, one ``batch_size`` per rank): a corpus
      pairs one English sentence with several languages, and the contrastive levels scored its
      second copy, the same teacher row, as a negative of the first. ``repeats`` counts the
      pairs that no swap could separate (a corpus made mostly of one sentence), with a warning.
    """

    def __init__(self, batch_size: int, group_size: int, lengths: list[int], seed: int, min_batch: int,
                 keys: list[int] | None = None, world_size: int = 1):
        super().__init__(group_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0
        remainder = len(lengths) % batch_size
        self.left_out = remainder if remainder < min_batch else 0
        self.keys, self.step_size, self.repeats = keys, batch_size * world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) - self.left_out

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        order = list(super().__iter__())
        if self.keys is not None:
            self.repeats = separate_repeats(order, self.keys, self.step_size)
            if self.repeats:
                warnings.warn(f"{self.repeats} pairs share their English sentence with another pair of their step's "
                              "batch: no later pair could take their place", RuntimeWarning, stacklevel=2)
        return iter(order[: len(self)])


def separate_repeats(order: list[int], keys: list[int], step: int, window: int = 8) -> int:
    """Swap, in place, each index of ``order`` whose key is already in its step (the ``step``
    consecutive positions it falls in) with the nearest later index of another step whose key is
    not there, else with the nearest earlier one that trades without a repeat in either step (the
    last steps have no later ones). Partners are looked for within ``window`` steps either way, and
    not at all before where every earlier step holds the key: a sentence with more copies than
    there are steps made every copy it could not place scan the whole order, quadratic in the
    corpus. Returns how many repeats were left. Deterministic; every index stays once."""
    left = 0
    done: list[set] = []  # the keys of each finished step
    steps_holding = collections.Counter()  # how many finished steps hold each key
    reach = window * step
    for start in range(0, len(order), step):
        end = min(start + step, len(order))
        seen = set()
        for i in range(start, end):
            key = keys[order[i]]
            if key in seen:
                partner = next((j for j in range(end, min(end + reach, len(order))) if keys[order[j]] not in seen),
                               None)
                if partner is None and steps_holding[key] < len(done):
                    partner = next((j for j in range(start - 1, max(start - reach, 0) - 1, -1)
                                    if keys[order[j]] not in seen and key not in done[j // step]), None)
                    if partner is not None:
                        moved = keys[order[partner]]
                        done[partner // step].discard(moved)
                        done[partner // step].add(key)
                        steps_holding[moved] -= 1
                        steps_holding[key] += 1
                if partner is None:
                    left += 1
                    continue
                order[i], order[partner] = order[partner], order[i]
            seen.add(keys[order[i]])
        done.append(seen)
        steps_holding.update(seen)
    return left


class MMKDTrainer(Trainer):
    """Trainer whose ``model`` is a ``models.Student``; extra arguments:

    teacher: the frozen teacher encoder; objective: an ``objective.Objective``; teacher_cache: a
    ``cache.TeacherCache`` or None (then the teacher runs on every batch); same_tokenizer: whether
    student and teacher tokenize alike (the contrastive token level needs it).
    """

    def __init__(self, *args, teacher, objective: Objective, teacher_cache=None, same_tokenizer=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.objective = objective
        self.teacher_cache = teacher_cache
        self.same_tokenizer = same_tokenizer
        self._parts: dict[str, list[float]] = {}
        self._staging_root = None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "lengths", None) is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSampler(self.args.train_batch_size, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                            dataset.lengths, self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                            self.objective.min_batch(), keys=getattr(dataset, "sentence_keys", None),
                            world_size=self.args.world_size)

    # ---- the objective --------------------------------------------------------------------------

    def teacher_states(self, inputs: dict) -> torch.Tensor:
        """(B, Lt, D) the teacher's token states of the batch's English sentences."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(inputs["src_id"], inputs["t_attention_mask"])
        return teacher_hidden(self.teacher, inputs["t_input_ids"], inputs["t_attention_mask"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = self.teacher_states(inputs)
        out = model(**inputs)
        heads = self.accelerator.unwrap_model(model).sentence_heads
        loss, parts = mmkd_loss(out["hidden"], teacher, inputs, self.objective, out.get("tlm"), self.same_tokenizer,
                                sentence_heads=heads, sentence_predictions=out.get("sentence"))
        for level, value in parts.items():
            total = self._parts.setdefault(level, [0.0, 0])
            total[0] += float(value.detach()) if torch.is_tensor(value) else float(value)
            total[1] += 1
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        """Adds ``loss_<level>``: each level's unweighted loss, averaged since the last log (and over ranks)."""
        if "loss" in logs and self._parts:
            levels = sorted(self._parts)
            means = torch.tensor([self._parts[l][0] / max(self._parts[l][1], 1) for l in levels],
                                 dtype=torch.float64, device=self.args.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(means)
                means /= dist.get_world_size()
            logs.update({f"loss_{l}": round(float(v), 4) for l, v in zip(levels, means)})
            self._parts.clear()
        super().log(logs, start_time)

    # ---- checkpoints: transformers directories, staged and renamed -----------------------------

    def _save(self, output_dir=None, state_dict=None) -> None:
        """The student as a transformers directory (safetensors) + tokenizer + its heads' safetensors."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student = self.accelerator.unwrap_model(self.model)
        student.model.save_pretrained(output_dir, safe_serialization=True)
        save_heads(student, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        student = model if model is not None else self.model
        saved = type(student.model).from_pretrained(resume_from_checkpoint, local_files_only=True)
        student.model.load_state_dict(saved.state_dict())
        load_heads(student, resume_from_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Every rank writes into ``.staging/checkpoint-N``; then the main process renames it to
        ``checkpoint-N``, so a killed run leaves only whole checkpoints under that name."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_root = os.path.join(run_dir, STAGING)
        if self.args.should_save:  # what a run killed while saving left there
            shutil.rmtree(self._staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name))
            os.rmdir(os.path.join(run_dir, STAGING))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
