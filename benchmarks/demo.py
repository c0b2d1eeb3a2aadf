"""A one-minute tour of the losses: ``python -m benchmarks.demo`` (``make demo`` runs the trainer instead).

1. Loss values on random data, reference and chunked side by side, and their relative difference.
2. The student's gradient, chunked against the float64 reference.
3. The point of the library: peak extra memory and time of contrastive forward + backward at
   N = 8192, D = 384, chunked against the materializing reference, each measured in a fresh
   process (resident memory, the method of ``benchmarks.run``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import mmkd_kernels as mk
from benchmarks import cases, isolate, measure

N_SMALL, D = 1024, 384
N_LARGE = 8192

# (label, fn(student, teacher, backend)) for every form of the two losses.
FORMS = [
    ("contrastive, τ=0.05", lambda s, t, b: mk.contrastive_loss(s, t, backend=b)),
    ("contrastive, symmetric", lambda s, t, b: mk.contrastive_loss(s, t, symmetric=True, backend=b)),
    ("structure pearson, tile", lambda s, t, b: mk.structure_loss(s, t, algorithm="tile", backend=b)),
    ("structure pearson, gram", lambda s, t, b: mk.structure_loss(s, t, algorithm="gram", backend=b)),
    ("structure mse, gram", lambda s, t, b: mk.structure_loss(s, t, kind="mse", algorithm="gram", backend=b)),
    ("structure kl, τ=1", lambda s, t, b: mk.structure_loss(s, t, kind="kl", backend=b)),
]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def values_section() -> str:
    student, teacher = cases.make_inputs(N_SMALL, D, seed=0)
    rows = []
    for label, fn in FORMS:
        with torch.no_grad():
            ref = fn(student, teacher, "reference")
            chk = fn(student, teacher, "chunked")
        rows.append([label, f"{ref.item():.7f}", f"{chk.item():.7f}", f"{measure.rel_err(chk, ref):.1e}"])
    return (f"1. Loss values, float32, N = {N_SMALL} pairs, D = {D} (teacher = student + noise)\n\n"
            + table(["loss", "reference", "chunked", "rel. difference"], rows))


def gradients_section() -> str:
    student, teacher = cases.make_inputs(N_SMALL, D, seed=1)
    rows = []
    for label, fn in FORMS:
        s64 = student.detach().double().requires_grad_(True)
        t64 = teacher.detach().double()
        (truth,) = torch.autograd.grad(fn(s64, t64, "reference"), s64)
        (grad64,) = torch.autograd.grad(fn(s64, t64, "chunked"), s64)
        (grad32,) = torch.autograd.grad(fn(student, teacher, "chunked"), student)
        rows.append([label, f"{truth.norm().item():.3e}", f"{measure.rel_err(grad64, truth):.1e}",
                     f"{measure.rel_err(grad32, truth):.1e}"])
    return ("2. Student gradient: chunked against the float64 reference (‖out − ref‖ / ‖ref‖)\n\n"
            + table(["loss", "‖gradient‖", "chunked float64", "chunked float32"], rows))


def memory_section() -> str:
    rows, results = [], {}
    for backend in ("reference", "chunked"):
        print(f"   measuring {backend} at N = {N_LARGE} in a fresh process ...", file=sys.stderr, flush=True)
        worker = isolate.Worker(isolate.Spec("contrastive", backend, "cpu", "float32", min_time=0.0,
                                             min_repeats=2, max_repeats=2))
        try:
            answer = worker.ask(("measure", N_LARGE, D, ("fwd_bwd",)), timeout=300)
        finally:
            worker.close()
        if answer["status"] != "ok":
            rows.append([backend, answer["status"], ""])
            continue
        timing = answer["fwd_bwd"]
        results[backend] = timing
        rows.append([backend, f"{timing['median_ms']:.0f} ms", f"{timing['peak_extra_mib']:.0f} MiB"])
    text = (f"3. Contrastive loss, forward + backward, N = {N_LARGE}, D = {D}, float32, CPU "
            f"({torch.get_num_threads()} threads)\n   peak extra memory = resident memory the call adds over "
            f"its inputs, in a fresh process\n\n" + table(["backend", "time (median)", "peak extra memory"], rows))
    if len(results) == 2:
        ref, chk = results["reference"], results["chunked"]
        text += (f"\n\nchunked: {ref['peak_extra_mib'] / max(chk['peak_extra_mib'], 1e-3):.1f}× less memory, "
                 f"{ref['median_ms'] / chk['median_ms']:.2f}× the reference's speed. The reference stores "
                 f"N×N = {N_LARGE * N_LARGE * 4 / 2**20:.0f} MiB similarity matrices; chunked stores row blocks.")
    return text


def main(argv: list[str] | None = None) -> int:
    # No options: the parser answers --help (which ran the whole tour) and refuses unknown arguments.
    argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0]).parse_args(argv)
    start = time.perf_counter()
    print("mmkd-kernels: fused MMKD losses that never store an N×N matrix\n")
    print(values_section(), end="\n\n")
    print(gradients_section(), end="\n\n")
    print(memory_section(), end="\n\n")
    print(f"({time.perf_counter() - start:.0f} s; the full benchmark: python -m benchmarks.run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
