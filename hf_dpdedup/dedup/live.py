"""Block-level edits of a live model, in place, with exact undo.

The search applies groups of replacements to the model it validates and reverts the groups the
validator rejects. Nothing is reloaded: each block is a slice of a parameter's storage, a
replacement copies the new values into that slice, and the original values are kept to restore
them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import BlockLayout, plan_layout


@dataclass(frozen=True)
class Replacement:
    """Replace target block ``block`` by ``source``'s block ``source_block`` (values in ``row``)."""

    block: int
    source: str  # "base" or "self"
    source_block: int
    row: torch.Tensor  # [block_size], already in the target's dtype


class LiveBlocks:
    """Views of a model's blocks in its parameters; ``apply`` returns what ``revert`` needs."""

    def __init__(self, model: torch.nn.Module, block_size: int) -> None:
        state = model.state_dict(keep_vars=True)
        self.layout: BlockLayout = plan_layout({k: v.detach() for k, v in state.items()}, block_size)
        self.block_size = block_size
        self._flat: list[tuple[torch.Tensor, int]] = []  # per block: flat parameter view, offset
        for spec in self.layout.tensors:
            tensor = state[spec.name]
            if not tensor.is_contiguous():
                raise ValueError(f"{spec.name} is not contiguous; call model.to(...) or clone it first.")
            flat = tensor.detach().view(-1)
            self._flat.extend((flat, i * block_size) for i in range(spec.n_blocks))

    @property
    def n_blocks(self) -> int:
        return len(self._flat)

    def _slice(self, block: int) -> torch.Tensor:
        flat, start = self._flat[block]
        return flat[start : start + self.block_size]

    def read(self, block: int) -> torch.Tensor:
        """A copy of the block, zero-padded to ``block_size``."""
        part = self._slice(block)
        row = torch.zeros(self.block_size, dtype=part.dtype)
        row[: part.numel()] = part
        return row

    def matrix(self) -> torch.Tensor:
        return torch.stack([self.read(i) for i in range(self.n_blocks)]) if self.n_blocks else torch.empty(0)

    @torch.no_grad()
    def apply(self, replacements: list[Replacement]) -> list[tuple[int, torch.Tensor]]:
        undo = []
        for rep in replacements:
            part = self._slice(rep.block)
            undo.append((rep.block, part.clone()))
            part.copy_(rep.row[: part.numel()])
        return undo

    @torch.no_grad()
    def revert(self, undo: list[tuple[int, torch.Tensor]]) -> None:
        for block, values in reversed(undo):
            self._slice(block).copy_(values)
