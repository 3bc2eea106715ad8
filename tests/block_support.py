"""Test-only helpers on blocks: the inverse of :func:`hf_dpdedup.blocks.to_block_matrix` (the state
dict a block matrix, its layout and the extras stand for; the library rebuilds members from the store
instead), and a constitution's row ids one per block."""

from __future__ import annotations

from typing import Mapping

import torch

from hf_dpdedup.blocks import BlockLayout, tensor_from_rows
from hf_dpdedup.store.constitution import decode_rows


def rebuild_from_matrix(
    matrix: torch.Tensor, layout: BlockLayout, extras: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_block_matrix` plus the extras and aliases: the original state dict."""
    out: dict[str, torch.Tensor] = {}
    for spec in layout.tensors:
        rows = matrix[spec.first_block : spec.first_block + spec.n_blocks]
        out[spec.name] = tensor_from_rows(rows, spec.shape)
    out.update(extras)
    for alias, canonical in layout.aliases.items():
        out[alias] = out[canonical]
    return out


def plain_rows(constitution: dict) -> list[int]:
    """The first tensor's row ids, one per block (as written, runs are ``[first, count]`` pairs)."""
    return list(decode_rows(constitution["tensors"][0]["rows"], "first"))
