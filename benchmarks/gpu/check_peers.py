"""Before a GPU session, on this CPU: do the benchmark's adapters of the GPU peers compute our loss?

    python -m benchmarks.gpu.check_peers        # after benchmarks/gpu/prepare.sh filled .whl/

Inf-CL and memeff are Triton kernels behind a CUDA-only check. Unpacked from the wheels in .whl/
into a temporary folder, with that check (and memeff's device-capability query) taken out there,
they run under Triton's interpreter at a small size. Each adapter of ``benchmarks.cases`` is
compared with the float64 reference (both contrastive losses where the peer has them): the loss,
and the student's gradient where the peer's backward can run here (Inf-CL's uses inline PTX, which the interpreter cannot run). A mismatch would make
the GPU run compare different losses, so it exits 1. Nothing here touches the wheels themselves.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (file in the wheel, CUDA-only line, its stand-in): the only edits.
CPU_EDITS = [
    ("inf_cl/flash.py", "assert q.is_cuda and k.is_cuda", "pass"),
    ("memeff/_common.py", "if not (x.is_cuda and y.is_cuda):", "if False:"),
]
TOLERANCE = 1e-5  # float32 against float64, DESIGN §4


def unpack(wheels: list[Path], into: Path) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(into)
    for name, line, stand_in in CPU_EDITS:
        path = into / name
        text = path.read_text()
        if line not in text:
            raise SystemExit(f"{name}: '{line}' not found; the peer changed, update CPU_EDITS")
        path.write_text(text.replace(line, stand_in))


def main() -> int:
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        print("no wheels in .whl/: run benchmarks/gpu/prepare.sh first", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        unpack(wheels, Path(tmp))
        sys.path.insert(0, tmp)
        import torch

        torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)  # memeff picks H100 tiles
        from benchmarks import cases

        generator = torch.Generator().manual_seed(0)
        student = torch.randn(96, 64, generator=generator, dtype=torch.float64)
        teacher = torch.randn(96, 64, generator=generator, dtype=torch.float64)
        failed = False
        for loss, peer in (("contrastive", "inf-cl"), ("contrastive", "memeff"), ("contrastive-symmetric", "memeff")):
            s64 = student.clone().requires_grad_(True)
            ref = cases.loss_fn(loss, "reference")(s64, teacher)
            (ref_grad,) = torch.autograd.grad(ref, s64)
            s = student.float().requires_grad_(True)
            out = cases.loss_fn(loss, peer)(s, teacher.float())
            loss_err = float((out.detach().double() - ref.detach()).abs() / ref.detach().abs())
            try:
                (grad,) = torch.autograd.grad(out, s)
                grad_err = float((grad.double() - ref_grad).norm() / ref_grad.norm())
                grad_text = f"gradient {grad_err:.1e}"
            except Exception as error:  # noqa: BLE001  (a backward the interpreter cannot run)
                grad_err, grad_text = 0.0, f"gradient not run here ({type(error).__name__}: {str(error)[:80]})"
            ok = loss_err <= TOLERANCE and grad_err <= TOLERANCE
            failed |= not ok
            print(f"{loss} · {peer}: loss {loss_err:.1e}, {grad_text} against float64: "
                  f"{'same loss' if ok else 'MISMATCH'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
