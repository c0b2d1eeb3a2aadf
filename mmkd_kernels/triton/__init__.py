"""The `triton` backend: fused Triton kernels (CUDA; on CPU under TRITON_INTERPRET=1, for tests).

Importing this package registers its ops as ``torch.ops.mmkd_triton.*`` with the shared schemas,
autograd and fake functions of ``mmkd_kernels.ops``. ``backends.py`` imports it on first use.
"""

from .. import ops
from . import contrastive, structure

IMPLS = {
    "contrastive_forward": contrastive.contrastive_forward,
    "contrastive_backward": contrastive.contrastive_backward,
    "contrastive_forward_with_grad": contrastive.contrastive_forward_with_grad,
    "structure_tile_forward": structure.structure_tile_forward,
    "structure_tile_forward_with_grad": structure.structure_tile_forward_with_grad,
    "structure_gram_forward": structure.structure_gram_forward,
    "structure_gram_forward_with_grad": structure.structure_gram_forward_with_grad,
}

ops.register_backend("mmkd_triton", IMPLS)
