"""``nn.Module`` wrappers of the losses, for models that hold their criterion as a submodule."""

import copy

import torch

from . import backends
from .functional import (ALGORITHMS, KINDS, REDUCTIONS, _check_choice, _check_flag, _check_temperature,
                         contrastive_loss, structure_loss)


def _check_settings(temperature, backend, flags, **choices) -> None:
    """The arguments that need no tensor, checked at construction as the functional losses check
    them, so that a wrong one fails where it was written rather than at the first forward."""
    _check_temperature(temperature)
    _check_choice("backend", backend, ("auto", *backends.BACKENDS))
    for name, value in flags.items():
        _check_flag(name, value)
    for name, (value, allowed) in choices.items():
        _check_choice(name, value, allowed)


class _SharesItsGroup(torch.nn.Module):
    """A copy (``copy.deepcopy``: an EMA or teacher copy of the model holding the loss) shares the
    process group: a group is the process's handle on its ranks, which cannot be copied."""

    def __deepcopy__(self, memo):
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


class ContrastiveLoss(_SharesItsGroup):
    """``contrastive_loss`` with its keyword arguments fixed at construction.

    ``forward(student, teacher, targets=None)``; see ``mmkd_kernels.contrastive_loss``.
    """

    def __init__(self, *, temperature=0.05, symmetric=False, normalize=True, reduction="mean",
                 backend="auto", process_group=None):
        super().__init__()
        _check_settings(temperature, backend, dict(symmetric=symmetric, normalize=normalize),
                        reduction=(reduction, REDUCTIONS))
        self.temperature, self.symmetric, self.normalize = temperature, symmetric, normalize
        self.reduction, self.backend, self.process_group = reduction, backend, process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None):
        return contrastive_loss(
            student, teacher, temperature=self.temperature, targets=targets, symmetric=self.symmetric,
            normalize=self.normalize, reduction=self.reduction, backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class StructureLoss(_SharesItsGroup):
    """``structure_loss`` with its keyword arguments fixed at construction.

    ``forward(student, teacher)``; see ``mmkd_kernels.structure_loss``.
    """

    def __init__(self, *, kind="pearson", temperature=1.0, normalize=True, algorithm="auto",
                 backend="auto", process_group=None):
        super().__init__()
        _check_settings(temperature, backend, dict(normalize=normalize), kind=(kind, KINDS),
                        algorithm=(algorithm, ALGORITHMS))
        self.kind, self.temperature, self.normalize = kind, temperature, normalize
        self.algorithm, self.backend, self.process_group = algorithm, backend, process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor):
        return structure_loss(
            student, teacher, kind=self.kind, temperature=self.temperature, normalize=self.normalize,
            algorithm=self.algorithm, backend=self.backend, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, temperature={self.temperature}, normalize={self.normalize}, "
                f"algorithm={self.algorithm!r}, backend={self.backend!r}")
