"""One training run: models, teacher cache, evaluation before, Trainer, evaluation after, outputs."""

import dataclasses
import os
import time

import torch
from transformers import AutoConfig, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from . import cache as teacher_cache
from .collate import Collator, PairDataset
from .data import Corpus
from .evaluate import evaluate, table, write_report
from .models import (ModelError, SentenceHeads, Student, check_max_length, load_encoder, load_teacher, load_tokenizer,
                     save_student)
from .objective import Objective, default_group
from .trainer import MMKDTrainer


def same_tokenization(student_tokenizer, teacher_tokenizer, probe: list[str]) -> bool:
    """Whether both tokenizers have one vocabulary and split ``probe`` sentences alike."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        return False
    return student_tokenizer(probe)["input_ids"] == teacher_tokenizer(probe)["input_ids"]


def resolve_levels(objective: Objective, explicit: bool, same: bool) -> tuple[Objective, str | None]:
    """The objective that the tokenizers allow, and what was changed (None: nothing).

    The contrastive token level pairs the student's and the teacher's tokens position by position, so
    it needs one tokenizer; masked-token prediction (tlm) needs the student only. Where the
    tokenizers differ, ``--token-loss both`` keeps its tlm half and ``contrastive`` drops the token
    level, each saying so; ``--levels`` naming token with a contrastive part is an error.
    """
    if "token" not in objective.levels or same or objective.token_loss == "tlm":
        return objective, None
    if explicit:
        raise ModelError("--levels token with --token-loss contrastive/both needs the student and teacher to "
                         "share a tokenizer; use --token-loss tlm or leave token out of --levels")
    if objective.token_loss == "both":
        return (dataclasses.replace(objective, token_loss="tlm"),
                "student and teacher tokenize differently: the token level keeps tlm and leaves out its "
                "contrastive part (--token-loss both -> tlm)")
    return (dataclasses.replace(objective, levels=tuple(l for l in objective.levels if l != "token")),
            "student and teacher tokenize differently: the token level (--token-loss contrastive) is left "
            "out; --token-loss tlm trains it on the student alone")


def check_devices(training: TrainingArguments) -> None:
    """One process drives one GPU: transformers would wrap the student in nn.DataParallel across several,
    whose replicas each return their own tlm loss and batch-norm statistics."""
    if training.world_size == 1 and training.n_gpu > 1:
        raise ModelError(f"{training.n_gpu} GPUs are visible to one process: run under torchrun --nproc-per-node "
                         f"{training.n_gpu} -m mmkd_train, or make one GPU visible (CUDA_VISIBLE_DEVICES=0)")


def enable_checkpointing(encoder) -> None:
    """Recompute each layer in backward; non-reentrant, which DDP with unused parameters needs.
    transformers 5.23 renamed the method (the old name warns); older 5.x has only the old one."""
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_arguments(args) -> TrainingArguments:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        # the sentence MSE is a mean over the local batch: DDP's averaging of the ranks' gradients gives
        # the global batch's only when every rank has the same batch size
        dataloader_drop_last=world > 1,
        ddp_backend=("nccl" if torch.cuda.is_available() else "gloo") if world > 1 else None,
    )


def run(args, objective: Objective, corpus: Corpus, teacher_path: str, student_path: str) -> int:
    """Train, evaluate and save; returns the exit status."""
    from .cli import say

    started = time.perf_counter()
    training = training_arguments(args)  # sets up torch.distributed under torchrun
    check_devices(training)
    teacher_tokenizer = load_tokenizer(teacher_path, "teacher")
    student_tokenizer = load_tokenizer(student_path, "student")
    for role, path, tokenizer in (("teacher", teacher_path, teacher_tokenizer),
                                  ("student", student_path, student_tokenizer)):
        check_max_length(args.max_length, tokenizer, role, AutoConfig.from_pretrained(path, local_files_only=True))
    same = same_tokenization(student_tokenizer, teacher_tokenizer, [p.src for p in corpus.train[:64]])
    objective, changed = resolve_levels(objective, args.levels is not None, same)
    if changed:
        say(f"mmkd-train: {changed}")
    tlm = "token" in objective.levels and objective.token_loss in ("tlm", "both")
    teacher = load_teacher(teacher_path).to(training.device)  # the cache below runs it where training will
    encoder = load_encoder(student_path, masked_lm=tlm)
    set_seed(args.seed)  # the heads start alike in every run (and on every rank)
    heads = None
    if objective.sentence_heads:
        heads = SentenceHeads(teacher.config.hidden_size, objective.head_width, objective.head_norm)
        if objective.head_norm == "batch" and training.world_size > 1:
            heads = torch.nn.SyncBatchNorm.convert_sync_batchnorm(heads)
    student = Student(encoder, teacher.config.hidden_size, heads, objective.pooling)
    if args.gradient_checkpointing:
        enable_checkpointing(encoder)
    trained = sorted({p.lang for p in corpus.train})
    say(f"mmkd-train: {len(corpus.train)} training pairs in {', '.join(trained)}; evaluating "
        f"{', '.join(corpus.evaluation) or 'nothing'}; levels {', '.join(objective.levels)}; "
        f"sentence {objective.sentence_loss}{' with heads' if objective.sentence_heads else ''}, structure {objective.structure_kind}, token {objective.token_loss}")
    if corpus.skipped_lines:
        say(f"mmkd-train: skipped {corpus.skipped_lines} malformed line(s)")

    dataset = PairDataset(corpus.train)
    cached = None
    if args.teacher_cache:
        key = teacher_cache.cache_key(teacher_path, teacher_tokenizer, dataset.sources, args.max_length)
        with training.main_process_first(desc="teacher cache"):
            cached, what = teacher_cache.load_or_build(
                args.teacher_cache, key,
                lambda: teacher_cache.compute_states(teacher, teacher_tokenizer, dataset.sources, args.max_length))
        say(f"mmkd-train: teacher cache {what}: {args.teacher_cache}")

    main_process = training.process_index == 0
    before = after = {}
    if corpus.evaluation and main_process:
        before = evaluate(student, student_tokenizer, corpus.evaluation, args.max_length, objective.pooling)

    trainer = MMKDTrainer(
        model=student, args=training, train_dataset=dataset,
        data_collator=Collator(student_tokenizer, teacher_tokenizer, args.max_length, tlm=tlm),
        processing_class=student_tokenizer, teacher=teacher, objective=objective, teacher_cache=cached,
        same_tokenizer=same,
    )
    resume = get_last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    if args.resume:
        say(f"mmkd-train: resuming from {resume}" if resume else "mmkd-train: --resume: no checkpoint yet, starting anew")
    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - train_started

    if main_process:
        model_dir = os.path.join(args.output_dir, "model")
        save_student(student, student_tokenizer, model_dir, args.max_length, objective.pooling)
        if corpus.evaluation:
            after = evaluate(student, student_tokenizer, corpus.evaluation, args.max_length, objective.pooling)
            say("\nheld-out bitext retrieval P@1 (%), before and after training:")
            say(table(before, after, trained))
        wall = time.perf_counter() - started
        write_report(args.output_dir, before, after, trained, {
            "objective": dataclasses.asdict(objective), "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(wall, 1), "steps": trainer.state.global_step,
            "world_size": training.world_size, "train_pairs": len(corpus.train),
        })
        say(f"\nmmkd-train: model in {model_dir}; report in {os.path.join(args.output_dir, 'retrieval.json')} "
            f"and retrieval.png; {trainer.state.global_step} steps, wall time {wall:.0f} s")
    if default_group() is not None:
        torch.distributed.barrier()
    return 0
