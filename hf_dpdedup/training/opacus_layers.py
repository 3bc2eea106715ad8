"""Opacus per-sample gradient support for transformers' ``Conv1D`` (GPT-2's linear layers).

``Conv1D`` computes ``x @ W + b`` with ``W`` of shape ``[in, out]`` — a transposed ``nn.Linear``.
Opacus ships samplers for ``nn.Linear`` only; these reuse its math with the transposition, so
GPT-2 blocks train under both ``hooks`` and ``ghost`` modes. Importing this module registers them.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from transformers.pytorch_utils import Conv1D


@register_grad_sampler(Conv1D)
def conv1d_grad_sample(layer: Conv1D, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradients ``[n, in, out]`` (weight) and ``[n, out]`` (bias)."""
    a = activations[0].to(backprops.dtype)
    grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = torch.einsum("n...i,n...j->nij", a, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = torch.einsum("n...k->nk", backprops)
    return grads


@register_norm_sampler(Conv1D)
def conv1d_norm_sample(layer: Conv1D, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradient norms without materialising gradients (ghost clipping).

    A norm does not see the transposition, so ``nn.Linear``'s ghost norm applies as is.
    """
    return compute_linear_norm_sample(layer, activations, backprops)
