"""The `triton` backend: fused Triton kernels (CUDA; on CPU under TRITON_INTERPRET=1, for tests).

Importing this package registers its ops as ``torch.ops.mmkd_triton.*`` with the shared schemas,
autograd and fake functions of ``mmkd_kernels.ops``. ``backends.py`` imports it on first use.
"""

import functools

import torch

from .. import ops
from . import contrastive, structure


def on_the_inputs_device(launcher):
    """``launcher`` run with its first tensor's GPU as the current device. Triton launches on the
    current device, not on its arguments': inputs on cuda:1 while cuda:0 is current would run on
    cuda:0 with cuda:1's pointers (as torch's generated code does, set it first)."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if first.device.type != "cuda":
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    return launch


IMPLS = {name: on_the_inputs_device(launcher) for name, launcher in {
    "contrastive_forward": contrastive.contrastive_forward,
    "contrastive_backward": contrastive.contrastive_backward,
    "contrastive_forward_with_grad": contrastive.contrastive_forward_with_grad,
    "structure_tile_forward": structure.structure_tile_forward,
    "structure_tile_forward_with_grad": structure.structure_tile_forward_with_grad,
    "structure_gram_forward": structure.structure_gram_forward,
    "structure_gram_forward_with_grad": structure.structure_gram_forward_with_grad,
}.items()}

ops.register_backend("mmkd_triton", IMPLS)
