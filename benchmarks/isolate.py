"""One fresh process per loss × backend, so that measurements do not disturb each other.

A worker builds its case once (imports a peer library, sets up torch.compile) and then answers
requests for one size at a time; the parent decides what to ask next (time budget, memory) and
survives whatever happens in the worker: a Python exception comes back as a status, a worker that
dies (the kernel's out-of-memory killer) or hangs (past a hard deadline) is killed and reported.

Workers are forked from ``multiprocessing``'s fork server, which has imported torch and the library
once (a worker then starts in a fraction of a second instead of re-importing torch), and which
never runs an op or touches CUDA, so forking it is safe; where there is no fork server, spawn. The
server starts with glibc's mmap threshold fixed, so that the workers' resident memory follows their
live tensors (see ``measure.py``).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from dataclasses import asdict, dataclass

# Every allocation of 128 KiB or more gets its own mapping, unmapped on free: the resident set
# then counts live tensors only. Without it glibc raises the threshold dynamically (up to 32 MiB)
# and keeps freed blocks of that size in its heap, where a later peak would reuse them unseen.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ROTATING_SETS = 3
ERROR_SEED = 1234  # the inputs of the accuracy check; the parent draws the same ones for the truth


@dataclass(frozen=True)
class Spec:
    """What a worker measures: one loss by one backend, at widths D = ``d`` in ``dtype``."""

    loss: str
    backend: str
    device: str
    dtype: str
    min_time: float
    min_repeats: int
    max_repeats: int
    threads: int | None = None  # torch's intra-op threads; None leaves torch's default


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _serve(conn, spec: Spec) -> None:
    """The worker's loop: ("measure", n, d, modes) | ("errors", n, d, ref_loss, ref_grad) | None."""
    import torch

    from benchmarks import cases, measure

    device = torch.device(spec.device)
    dtype = _dtype(spec.dtype)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        fn = cases.loss_fn(spec.loss, spec.backend)
    except Exception as exc:  # a peer that does not import: every request answers why
        fn, setup_error = None, f"error: {type(exc).__name__}: {exc}"
    warm: set[str] = set()  # modes this process has run: eager CPU backends need no second warm-up
    tunings = None
    if spec.backend.startswith("triton") and device.type == "cuda":
        from benchmarks import autotune_log

        tunings = autotune_log.Recorder()
    while True:
        request = conn.recv()
        if request is None:
            return
        try:
            if fn is None:
                raise RuntimeError(setup_error)
            conn.send(_answer(request, fn, spec, device, dtype, warm, cases, measure, tunings))
        except Exception as exc:
            conn.send({"status": _failure(exc), "traceback": traceback.format_exc(limit=4)})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _answer(request, fn, spec, device, dtype, warm, cases, measure, tunings) -> dict:
    import torch

    kind, n, d = request[:3]
    if kind == "errors":
        # The float64 truth comes as numpy arrays: plain pickles, no shared-memory tensors.
        ref_loss, ref_grad = (torch.from_numpy(array).to(device) for array in request[3:])
        student, teacher = cases.make_inputs(n, d, seed=ERROR_SEED, dtype=dtype, device=device)
        errors = measure.errors(fn, student, teacher, ref_loss, ref_grad)
        warm.add("fwd_bwd")  # only once it ran: a failed check (an exception) leaves the mode cold
        return {"status": "ok", **errors}
    modes = request[3]
    inputs = [cases.make_inputs(n, d, seed=seed, dtype=dtype, device=device) for seed in range(ROTATING_SETS)]
    # torch.compile specializes on shapes: every new N compiles again. On a GPU, Triton's autotuner
    # (ours and the peers') tunes again per size key, timing each config with a 256 MiB scratch
    # buffer, and cuBLAS picks its kernels per shape: inside the measured run, that would count in
    # its time and peak memory. Those always warm up; an eager CPU backend once per mode.
    per_size = spec.backend == "compile" or device.type == "cuda"
    warm_up = modes if per_size else [mode for mode in modes if mode not in warm]
    timings = measure.measure_case(fn, inputs, device, min_time=spec.min_time, min_repeats=spec.min_repeats,
                                   max_repeats=spec.max_repeats, modes=modes, warm_up=warm_up)
    warm.update(modes)
    answer = {"status": "ok", **{mode: asdict(timing) for mode, timing in timings.items()}}
    if tunings is not None:  # what the autotuner timed at this size (benchmarks/autotune_log.py)
        answer["autotune"] = tunings.take()
    return answer


def _failure(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    lowered = text.lower()
    if "out of memory" in lowered or "can't allocate memory" in lowered or isinstance(exc, MemoryError):
        return f"out of memory ({text})"
    return f"error: {text}"


def _main(conn, spec: Spec) -> None:
    try:
        _serve(conn, spec)
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        conn.close()


_PRELOAD = ["torch", "mmkd_kernels", "benchmarks.cases", "benchmarks.measure"]


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


class Worker:
    """A worker process measuring ``spec``; ``ask`` returns its answer or a status saying why not."""

    def __init__(self, spec: Spec):
        self.spec = spec
        context = _context()
        self._conn, child = context.Pipe()
        saved = {key: os.environ.get(key) for key in WORKER_ENV}
        # Inherited by the fork server (or spawned interpreter) at its start, and so by every worker.
        os.environ.update(WORKER_ENV)
        try:
            self._process = context.Process(target=_main, args=(child, spec), daemon=True)
            self._process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child.close()

    def ask(self, request: tuple, timeout: float) -> dict:
        """Send one request; wait at most ``timeout`` seconds for the answer."""
        if not self.alive:
            return {"status": self._death()}
        try:
            self._conn.send(request)
            if self._conn.poll(timeout):
                return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._process.join(5)
            return {"status": self._death()}
        if not self.alive:  # died while we waited
            return {"status": self._death()}
        self.kill()
        return {"status": f"timeout: no answer within {timeout:.0f} s (killed)"}

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def _death(self) -> str:
        code = self._process.exitcode
        if code is not None and code < 0 and -code == 9:
            return "killed (SIGKILL: out of memory?)"
        return f"worker died (exit code {code})"

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)

    def close(self) -> None:
        """Ask the worker to finish; kill it if it does not."""
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(10)
        self.kill()
        self._conn.close()

