"""What is measured: the losses, their inputs, every implementation of them, and their counts.

A *case* is one loss × one backend: a function ``fn(student, teacher) -> scalar loss`` with
student (N, D) requiring grad and teacher (N, D) frozen (our main use: the English teacher is
frozen, only the student learns). Backends are ours (``reference``, ``chunked``, ``triton``,
``native``), the reference math under ``torch.compile`` (``compile``), and peers from other
libraries computing the same contrastive loss (``mnrl``, ``inf-cl``, ``memeff``).

FLOP and byte counts follow DESIGN §5 so that every backend is held to the same work, whatever it
actually does (a backend that recomputes more is slower, not credited with more FLOP/s).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

import mmkd_kernels as mk
from mmkd_kernels import backends as mk_backends
from mmkd_kernels import reference

LOSSES = ("contrastive", "contrastive-symmetric", "structure-pearson", "structure-kl")

# The library defaults (DESIGN §2): τ = 0.05 for InfoNCE, τ = 1 for the relational KL.
CONTRASTIVE_TEMPERATURE = 0.05
STRUCTURE_TEMPERATURE = 1.0

OUR_BACKENDS = ("reference", "chunked", "triton", "native")
PEERS = ("mnrl", "inf-cl", "memeff")
# Every name --backends accepts, in table order. "<fused>-gram" is the gram algorithm of the
# structure loss (mse/pearson only); the plain fused name runs the tile algorithm, like the
# reference, so that the columns compare one algorithm across implementations.
ALL_BACKENDS = ("reference", "compile", "chunked", "chunked-gram", "triton", "triton-gram",
                "native", "native-gram", "mnrl", "inf-cl", "memeff")


def kind_of(loss: str) -> str | None:
    """"structure-pearson" -> "pearson"; None for the contrastive losses."""
    return loss.split("-", 1)[1] if loss.startswith("structure-") else None


def is_symmetric(loss: str) -> bool:
    """The symmetric contrastive loss: each row's and each column's softmax, averaged (CLIP)."""
    return loss == "contrastive-symmetric"


def materializes(backend: str) -> bool:
    """Whether the backend holds N×N matrices (its memory grows as N², the others' as N)."""
    return backend in ("reference", "compile", "mnrl")


def algorithm_of(loss: str, backend: str) -> str | None:
    """The structure algorithm a backend runs ("tile" or "gram"), None for the contrastive loss."""
    if kind_of(loss) is None:
        return None
    return "gram" if backend.endswith("-gram") else "tile"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def make_inputs(n: int, d: int, *, seed: int, dtype=torch.float32, device="cpu"):
    """(student (N, D) leaf requiring grad, teacher (N, D) frozen), fresh random rows.

    Drawn on the CPU from a seeded generator, then moved, so that every process (and the float64
    ground truth) sees the same numbers. The teacher is the student plus twice as much noise: pairs
    have cosine ≈ 0.45, which puts the contrastive loss at O(1), as in the middle of training,
    rather than at either extreme (independent rows: log N; converged: ≈ 0, where float32 can only
    show the cancellation of logsumexp − z_ii).
    """
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, d, generator=gen)
    teacher = student + 2.0 * torch.randn(n, d, generator=gen)
    student = student.to(device=device, dtype=dtype).requires_grad_(True)
    teacher = teacher.to(device=device, dtype=dtype)
    return student, teacher


# --------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------


def _fused_name(backend: str) -> str:
    return backend.removesuffix("-gram")


def unavailable_reason(loss: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``loss`` on ``device``, or None when it can."""
    if backend not in ALL_BACKENDS:
        return f"unknown backend {backend!r} (one of {', '.join(ALL_BACKENDS)})"
    if backend.endswith("-gram") and kind_of(loss) not in ("pearson", "mse"):
        return "the gram algorithm exists for structure mse/pearson only"
    if backend in PEERS and kind_of(loss) is not None:
        return f"{backend} computes the contrastive loss only"
    if backend == "inf-cl" and is_symmetric(loss):
        return "inf-cl computes one direction only"
    if backend == "compile":
        return None
    if backend in PEERS:
        if backend == "mnrl":
            return None if importlib.util.find_spec("sentence_transformers") else "sentence-transformers is not installed"
        if device.type != "cuda":
            return f"{backend} runs on CUDA only"
        module = {"inf-cl": "inf_cl", "memeff": "memeff"}[backend]
        return None if importlib.util.find_spec(module) else f"{module} is not installed"
    return mk_backends.unavailable_reason(_fused_name(backend), device)


def default_backends(loss: str, device: torch.device) -> list[str]:
    """Every backend that can run ``loss`` on ``device``, in table order. Triton on the CPU is its
    interpreter (TRITON_INTERPRET=1), a correctness tool: timed only when asked for by name."""
    return [b for b in ALL_BACKENDS if unavailable_reason(loss, b, device) is None
            and not (b.startswith("triton") and device.type != "cuda")]


# --------------------------------------------------------------------------------------------------
# The implementations: fn(student, teacher) -> scalar loss (the mean over rows)
# --------------------------------------------------------------------------------------------------


def _ours(loss: str, backend: str) -> Callable:
    kind = kind_of(loss)
    if kind is None:
        symmetric = is_symmetric(loss)
        return lambda s, t: mk.contrastive_loss(s, t, temperature=CONTRASTIVE_TEMPERATURE, symmetric=symmetric,
                                                backend=backend)
    algorithm = "tile" if backend == "reference" else algorithm_of(loss, backend)
    name = _fused_name(backend)
    return lambda s, t: mk.structure_loss(s, t, kind=kind, temperature=STRUCTURE_TEMPERATURE,
                                          algorithm=algorithm, backend=name)


def _plain_reference(loss: str) -> Callable:
    """The reference math itself (no custom op, no argument checks): what torch.compile sees."""
    kind = kind_of(loss)
    if kind is None:
        symmetric = is_symmetric(loss)

        def contrastive(s, t):
            targets = torch.arange(s.shape[0], device=s.device)
            return reference.contrastive_rows(s, t, targets, CONTRASTIVE_TEMPERATURE, symmetric, True).mean()
        return contrastive

    def structure(s, t):
        return reference.structure_rows(s, t, kind, STRUCTURE_TEMPERATURE, True).mean()
    return structure


def _compiled(loss: str) -> Callable:
    """torch.compile with its defaults, as a user would write it.

    The defaults specialize on the first N and recompile with N symbolic at the second, so a run
    over many sizes compiles about four graphs (two grad modes, static then dynamic) instead of
    two per size: on a 2-core CPU each costs 5-20 s, which per-size graphs would multiply into
    minutes of the run.
    """
    return torch.compile(_plain_reference(loss))


def _mnrl(symmetric: bool) -> Callable:
    """sentence-transformers' MultipleNegativesRankingLoss with scale = 1/τ, on embeddings; for the
    symmetric loss both directions (query → doc and doc → query), each over its own softmax.

    The class itself (its own cos_sim, scaling and log-sum-exp), given precomputed embeddings:
    ``compute_loss_from_embeddings`` is the part of ``forward`` after the model's encoding.
    """
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    options = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction") if symmetric else {}
    criterion = MultipleNegativesRankingLoss(model=None, scale=1.0 / CONTRASTIVE_TEMPERATURE, **options)
    return lambda s, t: criterion.compute_loss_from_embeddings([s, t], None)


def _inf_cl() -> Callable:
    """Inf-CL's single-GPU Triton loss (one direction, q → k) on normalized rows, scale 1/τ.

    Its kernels split D into heads of head_dim ∈ {16, …, 256}: 128 as issue 4 asks for it (D = 384
    and 768 both split so; at D = 768 its default 256 would run wider fp32 tiles, another speed), else
    the widest that divides D (the small check of ``benchmarks/gpu/check_peers.py``).
    """
    from inf_cl import cal_flash_loss

    def fn(s, t):
        head_dim = next(h for h in (128, 256, 64, 32, 16) if s.shape[1] % h == 0)
        q = torch.nn.functional.normalize(s, dim=1)
        k = torch.nn.functional.normalize(t, dim=1)
        return cal_flash_loss(q, k, scale=1.0 / CONTRASTIVE_TEMPERATURE, head_dim=head_dim).mean()
    return fn


def _memeff(symmetric: bool) -> Callable:
    """memeff's LiT loss, text → image InfoNCE with a locked image tower (our student is its text,
    the frozen teacher its images), as issue 4 names it; for the symmetric loss its bidirectional CLIP
    loss (the teacher, not requiring grad, gets none). stable=False keeps the textbook gradient scale:
    the plain InfoNCE of each direction. Both normalize inside.
    """
    if symmetric:
        from memeff import MemoryEfficientCLIPLoss

        criterion = MemoryEfficientCLIPLoss(temperature=CONTRASTIVE_TEMPERATURE, stable=False)
    else:
        from memeff import MemoryEfficientLiTLoss

        criterion = MemoryEfficientLiTLoss(temperature=CONTRASTIVE_TEMPERATURE, stable=False)
    return lambda s, t: criterion(s, t)


def loss_fn(loss: str, backend: str) -> Callable:
    """fn(student (N, D), teacher (N, D)) -> the scalar loss of ``loss`` by ``backend``."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if backend == "compile":
        return _compiled(loss)
    if backend == "mnrl":
        return _mnrl(is_symmetric(loss))
    if backend == "inf-cl":
        return _inf_cl()
    if backend == "memeff":
        return _memeff(is_symmetric(loss))
    return _ours(loss, backend)


def truth(loss: str, student: torch.Tensor, teacher: torch.Tensor):
    """(loss, student gradient) by the reference in float64 on the same rounded inputs."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double()
    value = _ours(loss, "reference")(s, t)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


# --------------------------------------------------------------------------------------------------
# Counts (DESIGN §5), teacher frozen: only the student needs a gradient.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    flops_fwd: float
    flops_fwd_bwd: float
    bytes_fwd: float
    bytes_fwd_bwd: float


def counts(loss: str, backend: str, n: int, d: int, element_size: int) -> Counts:
    """FLOPs and compulsory bytes of one forward and one forward + backward.

    contrastive (M = N), either form: forward 2·N·M·D (the symmetric loss's columns read the same
    z); backward recomputes z (2·N·M·D) and adds 2·N·M·D for the student's gradient: 6·N·M·D. structure tile (Ds = Dt = D): forward 2·N²·(Ds+Dt);
    backward the same again plus 2·N²·Ds. gram: about 4·N·(Ds+Dt)² each way. Bytes: each input
    read once, the student's gradient written once.
    """
    read = 2 * n * d * element_size
    write = n * d * element_size
    if kind_of(loss) is None:
        fwd = 2.0 * n * n * d
        fwd_bwd = 6.0 * n * n * d
    elif algorithm_of(loss, backend) == "gram":
        fwd = 4.0 * n * (2 * d) ** 2
        fwd_bwd = 2 * fwd
    else:
        fwd = 2.0 * n * n * (2 * d)
        fwd_bwd = 2 * fwd + 2.0 * n * n * d
    return Counts(fwd, fwd_bwd, read, read + write)
