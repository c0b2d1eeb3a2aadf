"""``nn.Module`` wrappers of the losses, for models that hold their criterion as a submodule."""

import torch

from .functional import contrastive_loss, structure_loss


class ContrastiveLoss(torch.nn.Module):
    """``contrastive_loss`` with its keyword arguments fixed at construction.

    ``forward(student, teacher, targets=None)``; see ``mmkd_kernels.contrastive_loss``.
    """

    def __init__(self, *, temperature=0.05, symmetric=False, normalize=True, reduction="mean",
                 backend="auto", process_group=None):
        super().__init__()
        self.temperature, self.symmetric, self.normalize = temperature, symmetric, normalize
        self.reduction, self.backend, self.process_group = reduction, backend, process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None):
        return contrastive_loss(
            student, teacher, temperature=self.temperature, targets=targets, symmetric=self.symmetric,
            normalize=self.normalize, reduction=self.reduction, backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, backend={self.backend!r}"


class StructureLoss(torch.nn.Module):
    """``structure_loss`` with its keyword arguments fixed at construction.

    ``forward(student, teacher)``; see ``mmkd_kernels.structure_loss``.
    """

    def __init__(self, *, kind="pearson", temperature=1.0, normalize=True, algorithm="auto",
                 backend="auto", process_group=None):
        super().__init__()
        self.kind, self.temperature, self.normalize = kind, temperature, normalize
        self.algorithm, self.backend, self.process_group = algorithm, backend, process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor):
        return structure_loss(
            student, teacher, kind=self.kind, temperature=self.temperature, normalize=self.normalize,
            algorithm=self.algorithm, backend=self.backend, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, algorithm={self.algorithm!r}, backend={self.backend!r}"
