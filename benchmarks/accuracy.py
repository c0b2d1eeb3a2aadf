"""Relative errors of every backend and input dtype against the float64 reference (DESIGN §4).

    python -m benchmarks.accuracy [--n 1000] [--d 384] [--out benchmarks/results]

For each regime × loss × backend × dtype: ‖out − ref‖/‖ref‖ of the loss and of the student's
gradient, the reference computed in float64 on the same rounded inputs (student requires grad,
teacher frozen), the worst over three seeds. Three regimes: ``random`` (teacher = student + 2·noise,
early training), ``aligned`` (teacher = student + 0.03·noise, late in distillation: the
contrastive loss is about 1e-5 and p_target rounds to 1 in float32) and ``anisotropic`` (rows
sharing one direction 4× their own, mean cosine about 0.94 as real embeddings have, and the teacher
1e-3 away: where the structure loss's similarities share a large common part that its gram
algorithm must not cancel). Gradients are compared with the float64 gradient rounded to the
input dtype: half-precision gradients otherwise show only their own rounding, the same for every
backend (the eager reference included). The ``reference`` rows are the
eager PyTorch losses run in the inputs' dtype: what a user gets without this library. Every
backend runs in every dtype it computes on ``--device``. On the CPU the ``triton`` rows run its
kernels under Triton's interpreter (float32 arithmetic in NumPy, with exact exponentials where a
GPU uses fast ones), at a smaller N (``--interpreter-n``), bfloat16 through the interpreter's
repaired dot (``benchmarks/triton_interpreter_repairs.py``); ``--device cuda`` runs them
compiled, beside the native CUDA kernels. Writes ``<out>/accuracy-<device>-<date>.{json,md}``.
"""

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

# Before the kernels are defined (at import): without CUDA, the triton rows run under the
# interpreter (on a machine with CUDA, only where TRITON_INTERPRET=1 is set by the caller).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmkd_kernels as mk  # noqa: E402
from benchmarks import report, result_files, triton_interpreter_repairs  # noqa: E402
from mmkd_kernels.backends import unavailable_reason  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# (the scale of a direction every row shares, the teacher's distance from the student), in noise units
REGIMES = {"random": (0.0, 2.0), "aligned": (0.0, 0.03), "anisotropic": (4.0, 1e-3)}
LOSSES = {
    "contrastive": lambda s, t, b: mk.contrastive_loss(s, t, temperature=0.05, backend=b),
    "structure mse (tile)": lambda s, t, b: mk.structure_loss(s, t, kind="mse", algorithm="tile", backend=b),
    "structure mse (gram)": lambda s, t, b: mk.structure_loss(s, t, kind="mse", algorithm="gram", backend=b),
    "structure pearson (tile)": lambda s, t, b: mk.structure_loss(s, t, kind="pearson", algorithm="tile", backend=b),
    "structure pearson (gram)": lambda s, t, b: mk.structure_loss(s, t, kind="pearson", algorithm="gram", backend=b),
    "structure kl": lambda s, t, b: mk.structure_loss(s, t, kind="kl", temperature=0.1, backend=b),
}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def measure(n: int, d: int, backend: str, dtype: torch.dtype, loss, regime: tuple[float, float],
            device: torch.device, seeds=(0, 1, 2)) -> tuple[float, float]:
    """Worst (loss error, gradient error) over the seeds; ``regime`` as REGIMES."""
    common, noise = regime
    worst = (0.0, 0.0)
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        student = torch.randn(n, d, generator=gen)
        if common:  # drawn only here: the other regimes keep the inputs of the files before 2026-12-08
            student += common * torch.randn(d, generator=gen)
        student = student.to(device)
        teacher = student + noise * torch.randn(n, d, generator=gen).to(device)
        s = student.to(dtype).requires_grad_()
        t = teacher.to(dtype)
        s64 = s.detach().double().requires_grad_()
        # Half-precision gradients of a mean over N² pairs underflow: scale as GradScaler does.
        scale = 2.0**16 if dtype in (torch.float16, torch.bfloat16) else 1.0  # GradScaler's initial scale
        out = loss(s, t, backend)
        (grad,) = torch.autograd.grad(out * scale, s)
        ref = loss(s64, t.double(), "reference")
        (grad_ref,) = torch.autograd.grad(ref * scale, s64)
        worst = (max(worst[0], _rel(out, ref)), max(worst[1], _rel(grad, grad_ref.to(dtype))))
    return worst


def _backends(device: torch.device, n: int, triton_n: int, interpreted: bool) -> list[tuple[str, int, list[str]]]:
    """(backend, N, the dtypes it computes on ``device``) of every backend that runs there. Under the
    interpreter, triton at ``triton_n`` (0: none)."""
    backends = []
    for backend in ("reference", "chunked", "native", "triton"):
        dtypes = [name for name, dtype in DTYPES.items() if unavailable_reason(backend, device, dtype) is None]
        size = triton_n if backend == "triton" else n
        if dtypes and size:
            backends.append((backend, size, dtypes))
    return backends


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--interpreter-n", type=int, default=300,
                        help="N of the triton rows (under Triton's interpreter, about N² slower); 0: none")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    interpreted = device.type == "cpu" and unavailable_reason("triton", device) is None
    if interpreted:
        triton_interpreter_repairs.install()  # its bfloat16 dot multiplies bit patterns otherwise
    backends = _backends(device, args.n, args.interpreter_n if interpreted else args.n, interpreted)
    date = datetime.date.today().isoformat()
    stem = args.out / result_files.free_stem(args.out, f"accuracy-{device.type}-{date}", ("json", "md"))
    device_name = report.device_name(device)
    meta = dict(date=date, n=args.n, d=args.d, interpreter_n=args.interpreter_n, torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), device=device_name, regimes=REGIMES,
                git_commit=report.git_commit(),
                command=(f"python -m benchmarks.accuracy --device {device.type} --n {args.n} --d {args.d} "
                         f"--interpreter-n {args.interpreter_n}"))
    rows = []
    lines = write(stem, meta, rows, backends, interpreted, device)
    for regime, shape in REGIMES.items():
        for name, loss in LOSSES.items():
            for backend, n, dtypes in backends:
                for dtype_name in dtypes:
                    loss_err, grad_err = measure(n, args.d, backend, DTYPES[dtype_name], loss, shape, device)
                    rows.append(dict(regime=regime, loss=name, backend=backend, n=n, dtype=dtype_name,
                                     loss_error=loss_err, grad_error=grad_err))
                    # after every row: a run stopped at a time limit keeps what it measured ("—" for the rest)
                    lines = write(stem, meta, rows, backends, interpreted, device)
    print("\n".join(lines))
    return 0


def write(stem: Path, meta: dict, rows: list[dict], backends, interpreted: bool, device: torch.device) -> list[str]:
    """``stem``.json and .md of the rows measured so far; returns the Markdown's lines."""
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Accuracy against the float64 reference, {device.type.upper()} ({meta['device']}, {meta['date']})", "",
             f"`{meta['command']}` (git {str(meta.get('git_commit'))[:12]}): N = {meta['n']}, D = {meta['d']}, worst "
             "of 3 seeds; relative error ‖out − ref‖/‖ref‖ "
             "of the loss / of the student's gradient, the float64 reference on the same rounded inputs (its "
             "gradient rounded to the inputs' dtype). "
             "`reference` rows: the eager PyTorch losses in the inputs' dtype (float32 for half inputs). "
             "DESIGN §4 tolerances: float32 1e-5, float16/bfloat16 inputs 1e-2. "
             f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}." if device.type == "cuda" else ".")]
    if interpreted and any(backend == "triton" for backend, _, _ in backends):
        lines[-1] += (f" `triton` rows: its kernels under Triton's interpreter on the CPU, N = {meta['interpreter_n']}, "
                      "bfloat16 through the interpreter's repaired dot (benchmarks/triton_interpreter_repairs.py); "
                      "exact exponentials where a GPU uses fast ones: the algorithm's accuracy, not a GPU's "
                      "measurement).")
    for regime, (common, noise) in REGIMES.items():
        rows_are = f"noise + {common}·(one direction for all rows)" if common else "noise"
        lines += ["", f"## {regime}: student = {rows_are}, teacher = student + {noise}·noise", "",
                  "| loss | backend | " + " | ".join(DTYPES) + " |", "|---|---|" + "---|" * len(DTYPES)]
        for name in LOSSES:
            for backend, _, _ in backends:
                found = {r["dtype"]: r for r in rows if r["regime"] == regime and r["loss"] == name
                         and r["backend"] == backend}
                cells = [f"{found[d]['loss_error']:.1e} / {found[d]['grad_error']:.1e}" if d in found else "—"
                         for d in DTYPES]
                lines.append(f"| {name} | {backend} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
