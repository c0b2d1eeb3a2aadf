"""A data-race detector for Triton kernels run by Triton's interpreter.

The interpreter runs a launch's programs one after another, so a kernel whose programs race
(two of them store to one address, or one reads what another writes in the same launch) still
gives the same numbers every time here, where a GPU, running the programs at once and in any
order, would not. This records, for every launch, the bytes each program loads, stores and updates
atomically, and reports:

- ``store/store``: a byte stored by two programs (the survivor depends on their order);
- ``store/load``: a byte one program stores and another loads (the load sees either value);
- ``atomic/store`` and ``atomic/load``: a byte updated atomically by one program and stored or
  loaded plainly by another (atomics order only among themselves);
- ``own store/load``: a program loading a byte it has already stored. Triton orders a program's
  memory operations only per thread, and a load may hand the byte to another thread than the
  store did, so this needs a barrier the kernels here never need;
- ``out of bounds``: an access (one load, store or atomic) whose bytes do not all lie in one
  tensor argument, from its first element to its last: past a tensor's end the interpreter reads
  or writes whatever memory lies there, another argument's included, where a GPU may fault or
  read another tensor. (The gaps of a strided view count as inside it.)

Atomic updates of one byte by several programs are what atomics are for, and are not reported.
Byte granularity: accesses of different widths that overlap are seen. Masked-off lanes are not
accesses. ``tests/test_triton_races.py`` runs the library's kernels under it, and racy toy kernels
to show that it finds what it should.
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from triton.runtime import interpreter


@dataclass
class Launch:
    """One kernel launch: its name, grid, the races found (kind → byte count, with one example
    argument each) and how many bytes its programs stored."""

    kernel: str
    grid: tuple
    races: dict = field(default_factory=dict)
    stored_bytes: int = 0


def _bytes(ptrs, mask) -> np.ndarray:
    """The bytes that a load, store or atomic of ``ptrs`` (a pointer block) touches where ``mask``."""
    addresses = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)  # a bool (int1) takes a byte
    return np.unique((addresses.reshape(-1, 1) + np.arange(width, dtype=np.uint64)).reshape(-1))


class _Program:
    """The bytes one program touched, by kind; loads of bytes it stored earlier are counted apart."""

    def __init__(self):
        self.loads, self.stores, self.atomics = [], [], []
        self.own_reads = []

    def load(self, touched):
        if self.stores:
            self.own_reads.append(touched[np.isin(touched, np.concatenate(self.stores))])
        self.loads.append(touched)


def _merge(parts: list, pid: int):
    """(bytes, pid) arrays of one program's accesses of one kind, each byte once."""
    touched = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
    return touched, np.full(touched.shape, pid, dtype=np.int64)


class _Recorder:
    """The launches so far; for the one running, its tensor arguments' spans, the accesses of its
    finished programs (kind → list of (bytes, pids)), the program running and its pid."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.launch: Launch | None = None
        self.spans: dict[str, tuple[int, int]] = {}
        self.accesses: dict[str, list] = {}
        self.own_reads: list[np.ndarray] = []
        self.strays: list[np.ndarray] = []  # accesses that no one tensor argument holds
        self.program: _Program | None = None
        self.pid = -1

    def begin(self, kernel: str, tensors: dict):
        self.launch = Launch(kernel, ())
        self.spans = {name: _span(tensor) for name, tensor in tensors.items() if tensor.numel()}
        self.accesses = {"loads": [], "stores": [], "atomics": []}
        self.program, self.pid = None, -1
        self.own_reads = []
        self.strays = []

    def access(self, touched: np.ndarray) -> np.ndarray:
        """``touched`` (sorted bytes of one access), kept aside as a stray unless one tensor
        argument holds all of it."""
        if touched.size and not any(start <= touched[0] and touched[-1] < end for start, end in self.spans.values()):
            self.strays.append(touched)
        return touched

    def switch(self, pid: int):
        self.finish_program()
        self.program, self.pid = _Program(), pid

    def finish_program(self):
        if self.program is None:
            return
        for kind in ("loads", "stores", "atomics"):
            self.accesses[kind].append(_merge(getattr(self.program, kind), self.pid))
        if self.program.own_reads:
            self.own_reads.append(np.concatenate(self.program.own_reads))
        self.program = None

    def end(self, grid):
        self.finish_program()
        self.launch.grid = tuple(grid)
        loads, stores, atomics = (self._joined(kind) for kind in ("loads", "stores", "atomics"))
        self.launch.stored_bytes = len(np.unique(stores[0]))
        self._report("store/store", *self._shared_by_programs(stores))
        self._report("store/load", *self._across(stores, loads))
        self._report("atomic/store", *self._across(atomics, stores))
        self._report("atomic/load", *self._across(atomics, loads))
        own = np.unique(np.concatenate(self.own_reads)) if self.own_reads else np.empty(0, dtype=np.uint64)
        self._report("own store/load", len(own), own[:1])
        strays = np.unique(np.concatenate(self.strays)) if self.strays else np.empty(0, dtype=np.uint64)
        self._report("out of bounds", len(strays), strays[:1])
        self.launches.append(self.launch)

    def _joined(self, kind):
        parts = self.accesses[kind]
        if not parts:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @staticmethod
    def _shared_by_programs(accesses):
        """(how many, one of them) of the bytes that more than one program touched (each program's
        bytes come once)."""
        touched, counts = np.unique(accesses[0], return_counts=True)
        shared = touched[counts > 1]
        return len(shared), shared[:1]

    @staticmethod
    def _across(first, second):
        """(how many, one of them) of the bytes in ``second`` that another program touched in ``first``."""
        order = np.argsort(first[0], kind="stable")
        bytes_first, pids_first = first[0][order], first[1][order]
        if len(bytes_first) == 0 or len(second[0]) == 0:
            return 0, bytes_first[:0]
        # Every program of ``first`` that touched a byte: its smallest and largest pid, so that
        # one comparison tells whether any other program did.
        unique, starts = np.unique(bytes_first, return_index=True)
        low = np.minimum.reduceat(pids_first, starts)
        high = np.maximum.reduceat(pids_first, starts)
        at = np.clip(np.searchsorted(unique, second[0]), 0, len(unique) - 1)
        hit = unique[at] == second[0]
        other = hit & ((low[at] != second[1]) | (high[at] != second[1]))
        racy = np.unique(second[0][other])
        return len(racy), racy[:1]

    def _report(self, kind, count, example):
        if count:
            self.launch.races[kind] = (count, self._name(int(example[0])))

    def _name(self, address: int) -> str:
        """The kernel argument that holds ``address``, or the address in hex."""
        for name, (start, end) in self.spans.items():
            if start <= address < end:
                return name
        return hex(address)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes from a tensor's first element to the end of its last (non-negative strides). The
    interpreter's addresses are the tensors' own: it hands a kernel CPU tensors as they are
    (``storage.cpu()`` of a CPU storage is that storage)."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


@contextlib.contextmanager
def recording_races():
    """Within the block, every Triton launch is recorded; yields the list of ``Launch``es, each
    with the races found. Only under ``TRITON_INTERPRET=1``."""
    recorder = _Recorder()
    builder = interpreter.interpreter_builder
    executor_call = interpreter.GridExecutor.__call__
    set_grid_idx = type(builder).set_grid_idx
    masked_load, masked_store = type(builder).create_masked_load, type(builder).create_masked_store
    atomic_rmw, atomic_cas = type(builder).create_atomic_rmw, type(builder).create_atomic_cas

    def call(self, *args, **kwargs):
        names = list(self.arg_names)
        bound = dict(zip(names, args)) | kwargs
        recorder.begin(getattr(self.fn, "__name__", str(self.fn)),
                       {name: value for name, value in bound.items() if isinstance(value, torch.Tensor)})
        out = executor_call(self, *args, **kwargs)
        recorder.end(builder.grid_dim)
        return out

    def on_grid_idx(self, x, y, z):
        set_grid_idx(self, x, y, z)
        recorder.switch((x * self.grid_dim[1] + y) * self.grid_dim[2] + z)

    def on_load(self, ptrs, mask, *args):
        recorder.program.load(recorder.access(_bytes(ptrs, mask)))
        return masked_load(self, ptrs, mask, *args)

    def on_store(self, ptrs, value, mask, *args):
        recorder.program.stores.append(recorder.access(_bytes(ptrs, mask)))
        return masked_store(self, ptrs, value, mask, *args)

    def on_atomic_rmw(self, op, ptr, val, mask, *args):
        recorder.program.atomics.append(recorder.access(_bytes(ptr, mask)))
        return atomic_rmw(self, op, ptr, val, mask, *args)

    def on_atomic_cas(self, ptr, *args):
        recorder.program.atomics.append(recorder.access(_bytes(ptr, None)))
        return atomic_cas(self, ptr, *args)

    patches = [(interpreter.GridExecutor, "__call__", call), (type(builder), "set_grid_idx", on_grid_idx),
               (type(builder), "create_masked_load", on_load), (type(builder), "create_masked_store", on_store),
               (type(builder), "create_atomic_rmw", on_atomic_rmw), (type(builder), "create_atomic_cas", on_atomic_cas)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield recorder.launches
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
